"""The adapter interface the engine runs against."""

from __future__ import annotations

import copy
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


class Adapter:
    """Where a model family keeps its parts, and how it turns pixels into visual-token features.

    The engine needs: the text embedding, decoder layers, final norm, rotary embedding and LM head;
    the image placeholder id; vision features at the feature layer (before the projector) and the
    projector itself. Subclasses fill these in for one model family.
    """

    family: str = ""
    model_classes: tuple[str, ...] = ()
    has_cls: bool = True  # the vision encoder has a [CLS] token (rules registered with needs_cls read it)
    # forward keyword arguments that carry visual inputs (handed to ``encode``); the first ones that are pixel
    # tensors decide whether a forward has images at all
    pixel_inputs: tuple[str, ...] = ("pixel_values",)
    bench_kind: str = "image"  # what one benchmark sample holds ("image" or "video"); see bench_item
    bench_kinds: tuple[str, ...] = ("image",)  # the kinds of benchmark sample the family can hold
    # every image has num_visual_tokens() tokens (LLaVA-1.5); False where counts follow the input's size
    uniform_token_count: bool = False
    visual_inputs: tuple[str, ...] = ("pixel_values",)
    # forward keyword arguments that steer the vision tower (handed to ``encode`` as given, None when absent)
    vision_options: tuple[str, ...] = ()
    media: tuple[str, ...] = ("image",)  # what a prompt may hold: "image", "video"
    mrope: bool = False  # multi-dimensional rotary positions (M-RoPE): kept tokens cannot be renumbered

    def __init__(self, model: nn.Module):
        self.model = model

    def check_method(self, method) -> None:
        """``ValueError`` naming the method and the family when the method needs what this family lacks."""
        if method.needs_cls and not self.has_cls:
            raise ValueError(
                f"method {method.name!r} reads the vision encoder's [CLS] attention, but {self.family} has no "
                f"[CLS] token; methods that run on {self.family}: {', '.join(self.supported_methods())}"
            )

    def check_options(self, method, options: dict) -> None:
        """``ValueError`` naming the option when this family cannot honour it (checked at ``apply``)."""
        from ..methods import positions_for

        positions, explicit = positions_for(method, options)
        if explicit and positions == "contiguous" and self.mrope:
            raise ValueError(
                f"positions='contiguous' is not available for {self.family}: its rotary positions are "
                f"multi-dimensional (M-RoPE), so kept tokens keep their original ones; use positions='original'"
            )

    def check_media(self, kind: str) -> None:
        """``ValueError`` naming the kind when a prompt of this family cannot hold it (e.g. a video on LLaVA-1.5)."""
        if kind not in self.media:
            raise ValueError(f"{self.family} takes no {kind} input (it takes: {', '.join(self.media)}); "
                             f"families that take a {kind}: {', '.join(families_with(kind))}")

    def supported_methods(self) -> list[str]:
        """The registered methods this family runs."""
        from ..methods import METHODS

        return [name for name, m in sorted(METHODS.items()) if self.has_cls or not m.needs_cls]

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__name__ in cls.model_classes or any(
            c.__name__ in cls.model_classes for c in type(model).__mro__
        )

    # --- parts of the text model -------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        raise NotImplementedError

    @property
    def text_config(self):
        return self.language_model.config

    @property
    def layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    @property
    def image_token_id(self) -> int:
        raise NotImplementedError

    def attention(self, layer_idx: int) -> nn.Module:
        return self.layers[layer_idx].self_attn

    def rotary_fn(self, layer_idx: int) -> Callable:
        """The ``apply_rotary_pos_emb`` of the module that defines the layer's attention class."""
        mod = sys.modules[type(self.attention(layer_idx)).__module__]
        fn = getattr(mod, "apply_rotary_pos_emb", None)
        if fn is None:
            raise TypeError(f"cannot find apply_rotary_pos_emb next to {type(self.attention(layer_idx)).__name__}")
        return fn

    @property
    def cache_kwarg(self) -> str:
        """``cache`` (transformers >= 5.24) or ``past_key_values`` (earlier 5.x) for decoder layers."""
        params = inspect.signature(self.layers[0].forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    # --- vision ---------------------------------------------------------------------------------
    def num_visual_tokens(self) -> int:
        """Visual tokens per image that the LLM would see unpruned."""
        raise NotImplementedError

    def feature_dim(self) -> int:
        raise NotImplementedError

    def video_tokens(self, frames: int | None = None) -> int | None:
        """Visual tokens of a video of ``frames`` frames, where that count is fixed by the frame count alone (None:
        the family takes no video, or a video's count follows its size too, as on Qwen2.5-VL)."""
        return None

    def cls_row_in_features(self) -> bool:
        """Whether token 0 of the features is the encoder's [CLS] row (kept as a visual token)."""
        return False

    def feature_layer(self):
        raise NotImplementedError

    def vision_features(self, pixel_values: torch.Tensor, cls_attention: bool = False, **kwargs):
        """``[num_images, n, d]`` features at the vision feature layer, before the projector.

        With ``cls_attention=True`` returns ``(features, extras)`` where ``extras["cls"]`` is ``[num_images, n]``,
        the [CLS] token's attention to each visual token at the feature layer (mean over heads), and
        ``extras["keys"]`` that layer's keys ``[num_images, n, head_dim]`` (mean over heads).
        """
        raise NotImplementedError

    def placeholders(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[b, s]`` bool: the prompt positions the visual items fill, in item order."""
        return input_ids == self.image_token_id

    def rope_positions(self, input_ids: torch.Tensor, attention_mask, positions: torch.Tensor, visual: dict, cache):
        """The positions the rotary embedding reads for a forward over the UNPRUNED prompt (or a step without
        a pruned cache): ``positions`` ([b or 1, s]) for 1-D RoPE. Families with multi-dimensional positions
        (M-RoPE) return theirs, and may leave on ``cache`` what decode steps need (e.g. ``rope_deltas``).
        Kept tokens then carry their rows of the resulting cos/sin."""
        return positions

    def decode_rope_positions(self, positions: torch.Tensor, cache):
        """Rotary positions of decode steps after a pruned prefill, at the original (unpruned) text positions
        ``positions`` ([b or 1, s]), from what :meth:`rope_positions` left on ``cache``."""
        return positions

    def encode(self, pixel_values: torch.Tensor, cls_attention: bool = False, **kwargs):
        """The images of one forward as :class:`~learnpruner.engine.layout.VisualFeatures`: per image its
        feature rows (before the projector, in token order) and, per placeholder position, the token it
        holds (or structure). ``kwargs``: the forward's vision arguments (feature layer, strategy,
        ``image_sizes``)."""
        raise NotImplementedError

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Projector applied to (kept) feature rows: ``[..., d] -> [..., hidden]``."""
        raise NotImplementedError

    def output_class(self) -> type:
        raise NotImplementedError

    def model_module_attr(self, *names: str):
        """The first of ``names`` defined in the module of the model's class or of a base class (the transformers
        modeling module, also for a subclass defined elsewhere); ``TypeError`` naming them otherwise."""
        for cls in type(self.model).__mro__:
            mod = sys.modules.get(cls.__module__)
            for name in names:
                if mod is not None and hasattr(mod, name):
                    return getattr(mod, name)
        raise TypeError(f"none of {', '.join(names)} is defined next to {type(self.model).__name__} or its bases")

    # --- benchmark helpers (learnpruner.bench) --------------------------------------------------
    def vision_module(self) -> nn.Module:
        """The module whose forward runs the vision encoder (timed with hooks on an unpatched model)."""
        raise NotImplementedError

    def item_geometry(self, image_size=None) -> ItemGeometry:
        """How one image of ``image_size`` ``(height, width)`` enters the model (default: the largest the
        family takes, the one :meth:`num_visual_tokens` counts)."""
        raise NotImplementedError

    def random_images(self, batch: int, generator: torch.Generator | None = None, image_size=None) -> dict:
        """Forward arguments for ``batch`` random images (one per sample) of ``image_size`` (default as in
        :meth:`item_geometry`): ``pixel_values`` as the processor lays them out, plus the family's extras."""
        raise NotImplementedError

    def graph_modules(self) -> list[nn.Module]:
        """The vision modules the fast prefill may capture as CUDA graphs: their forward has static shapes for
        given input shapes and no host synchronisation (none by default)."""
        return []

    def bench_item(self, kind: str | None) -> Adapter:
        """An adapter of the same model whose benchmark helpers below describe a sample holding ``kind``
        (``None``: the family's default, :attr:`bench_kind`); this adapter is left as it was. ``ValueError``
        naming the kinds the family accepts otherwise."""
        if kind is None:
            return self
        if kind not in self.bench_kinds:
            raise ValueError(f"{self.family} benchmarks hold {' or '.join(self.bench_kinds)} samples, not {kind!r}")
        other = copy.copy(self)
        other.bench_kind = kind
        return other

    def bench_region(self) -> torch.Tensor:
        """``[k]`` token ids of one bench item's part of the prompt, as the processor lays it out: its
        placeholders, and any text it writes inside the item (:attr:`ItemGeometry.text`). Default: the
        item's placeholders in one run."""
        return torch.full((self.item_geometry().placeholders,), self.bench_token_id, dtype=torch.long)

    def bench_note(self, image: ItemGeometry) -> str:
        """How ``learnpruner bench`` describes one sample's item of geometry ``image`` under its table."""
        text = f"{image.tokens} visual tokens"
        if image.crops > 1 or image.structure:
            h, w = image.size
            text = (f"one {h}x{w} image ({image.crops} crops): {text} + {image.structure} structure tokens "
                    f"(row newlines, kept, outside the budget)")
        return text

    def bench_budgets(self) -> list[int]:
        """The budgets (visual tokens per image, averaged over LLM layers) ``learnpruner bench`` measures by
        default: every token of the bench item (:meth:`item_geometry`), then 1/3 and 1/9 of them (the ratios of
        LLaVA-1.5's 192 and 64 of 576)."""
        n = self.item_geometry().tokens
        return [n, max(1, round(n / 3)), max(1, round(n / 9))]

    def vision_flops(self, image: ItemGeometry | None = None) -> int:
        """Analytic FLOPs of the vision encoder for one image (every pass it makes; 2 per multiply-add)."""
        raise NotImplementedError

    def projector_flops(self, rows: int) -> int:
        """Analytic FLOPs of the projector on ``rows`` feature rows (2 per multiply-add)."""
        raise NotImplementedError

    def prompt_inputs(self, input_ids: torch.Tensor) -> dict:
        """Forward arguments the family's processor returns next to ``input_ids`` and that follow from them alone
        (Qwen's ``mm_token_type_ids``); none by default. The benchmark adds them to its fabricated prompts."""
        return {}

    @property
    def bench_token_id(self) -> int:
        """The placeholder id of a benchmark sample's item (the image token; the video token for videos)."""
        return self.image_token_id

    def text_positions(self, position_ids: torch.Tensor) -> torch.Tensor | None:
        """The 1-D text positions ``[b or 1, s]`` (for masks and layers) in a forward's ``position_ids``; None when
        they hold none (the engine then counts them). Families with multi-dimensional rotary positions pick
        their text row; the ids as given still reach :meth:`rope_positions` / :meth:`decode_rope_positions`."""
        return position_ids


@dataclass(frozen=True)
class ItemGeometry:
    """One benchmark item (an image, or a video whose frames or frame groups are its crops) as the model sees it:
    its ``size`` ``(height, width)``, the vision encoder's ``crops``
    (passes) for it, its visual ``tokens`` (selectable, the budget's reference), its ``structure``
    placeholders (kept, outside the budget: LLaVA-NeXT's row newlines) and the ``text`` tokens the processor
    writes inside it (Qwen3-VL's timestamps and delimiters between a video's frame groups: plain text, in every
    layer)."""

    size: tuple[int, int]
    crops: int
    tokens: int
    structure: int = 0
    text: int = 0

    @property
    def placeholders(self) -> int:
        """Image placeholder positions in the prompt (tokens plus structure)."""
        return self.tokens + self.structure


def families_with(kind: str) -> list[str]:
    """The registered families whose prompts may hold ``kind`` ("image" or "video")."""
    from . import ADAPTERS

    return [a.family for a in ADAPTERS if kind in a.media]
