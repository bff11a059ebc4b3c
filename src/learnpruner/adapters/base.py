"""The adapter interface the engine runs against."""

from __future__ import annotations

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
    # every image has num_visual_tokens() tokens (LLaVA-1.5); False where counts follow the input's size
    uniform_token_count: bool = False
    visual_inputs: tuple[str, ...] = ("pixel_values",)
    # forward keyword arguments that steer the vision tower (handed to ``encode`` as given, None when absent)
    vision_options: tuple[str, ...] = ()
    media: tuple[str, ...] = ("image",)  # what a prompt may hold: "image", "video"
    mrope: bool = False  # multi-dimensional rotary positions (M-RoPE): kept tokens cannot be renumbered
    # the vLLM architectures the family serves pruned (learnpruner.integrations.vllm reads them; none: not served)
    served: tuple[Served, ...] = ()

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

    def vision_module(self) -> nn.Module:
        """The module whose forward runs the vision encoder (peers read its post-layernorm; the benchmark times
        it with hooks on an unpatched model)."""
        raise NotImplementedError

    def graph_modules(self) -> list[nn.Module]:
        """The vision modules the fast prefill may capture as CUDA graphs: their forward has static shapes for
        given input shapes and no host synchronisation (none by default)."""
        return []

    def text_positions(self, position_ids: torch.Tensor) -> torch.Tensor | None:
        """The 1-D text positions ``[b or 1, s]`` (for masks and layers) in a forward's ``position_ids``; None when
        they hold none (the engine then counts them). Families with multi-dimensional rotary positions pick
        their text row; the ids as given still reach :meth:`rope_positions` / :meth:`decode_rope_positions`."""
        return position_ids


@dataclass(frozen=True)
class Served:
    """One vLLM architecture a family serves with stage-1 pruning (:mod:`learnpruner.integrations.vllm`).

    ``key``: the name ``overrides()`` takes ("llava", "qwen3_vl_moe"); ``stock``: vLLM's architecture it replaces;
    ``module``: the serving file ``integrations/vllm/<module>.py`` holding the ``pruned`` class and the
    ``guard`` class (vLLM's own, refusing a learnpruner entry that names no pruned architecture); ``positions``:
    how vLLM numbers the kept tokens ("contiguous", or "original" for M-RoPE)."""

    key: str
    stock: str
    module: str
    pruned: str
    guard: str
    positions: str

    @property
    def architecture(self) -> str:
        """The pruned architecture's name in vLLM's registry and in ``hf_overrides``."""
        return "LearnPruner" + self.stock


# every registered adapter class, tried in order (a user's first); families register themselves (register_adapter)
ADAPTERS: list[type[Adapter]] = []


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Add a family's adapter (a subclass of :class:`Adapter`; usable as a class decorator, as every built-in family
    does). It is tried before those registered earlier, so a subclass of a supported model class can get an
    adapter of its own."""
    if not (isinstance(cls, type) and issubclass(cls, Adapter)):
        raise TypeError(f"register_adapter takes a subclass of learnpruner.adapters.Adapter, got {cls!r}")
    if cls not in ADAPTERS:
        ADAPTERS.insert(0, cls)
    return cls


def families_with(kind: str) -> list[str]:
    """The registered families whose prompts may hold ``kind`` ("image" or "video")."""
    return [a.family for a in ADAPTERS if kind in a.media]
