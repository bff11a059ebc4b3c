"""The benchmark's view of a model family: what one bench item is (its geometry), its random inputs as the family's
processor lays them out, and the analytic cost of the vision tower and projector.

The engine's interface (:class:`~learnpruner.adapters.Adapter`) knows none of this. Each family declares a
:class:`BenchFamily` subclass next to its adapter (``adapters/<family>_bench.py``), naming its ``family``: the
subclass registers itself, with the family's named architectures (:attr:`BenchFamily.archs`) and, where it has one,
its benchmark processor. :func:`bench_for` gives the view of a model or an adapter; engine members it does not
define (``text_config``, ``placeholders``, ``family``, ...) are the adapter's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

__all__ = ["ItemGeometry", "BenchFamily", "BENCH_FAMILIES", "bench_for", "bench_archs", "bench_processor",
           "processor_families"]


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


# family (the adapter's ``family``) -> its benchmark view; filled by BenchFamily subclasses as they are defined
BENCH_FAMILIES: dict[str, type[BenchFamily]] = {}


class BenchFamily:
    """One family's benchmark geometry and cost model, over an adapter of one model.

    Subclasses set :attr:`family` (which registers them), :attr:`archs` and what their item holds
    (:attr:`bench_kind`, :attr:`bench_kinds`), and fill in :meth:`item_geometry`, :meth:`random_images`,
    :meth:`vision_flops` and :meth:`projector_flops`."""

    family: str = ""  # the family whose view this class is (registers it); an instance carries its adapter's
    # named architectures with the published dimensions (random weights): name -> a function returning the config
    archs: ClassVar[dict[str, Callable]] = {}
    bench_kind: str = "image"  # what one benchmark sample holds ("image" or "video"); see bench_item
    bench_kinds: ClassVar[tuple[str, ...]] = ("image",)  # the kinds of benchmark sample the family can hold

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "family" in cls.__dict__ and cls.family:
            BENCH_FAMILIES[cls.family] = cls

    def __init__(self, adapter) -> None:
        self.adapter = adapter
        self.model = adapter.model
        self.family = adapter.family  # the model's own (a user's family may reuse a built-in view)

    def __getattr__(self, name: str):
        """Engine members (``text_config``, ``placeholders``, ``num_visual_tokens``, ...) are the adapter's."""
        if name in ("adapter", "model"):
            raise AttributeError(name)
        return getattr(self.adapter, name)

    @classmethod
    def processor(cls, config):
        """The processor of an architecture benchmark for ``config`` (setting the config's token ids to match it),
        or None where the family has none (``learnpruner vllm-bench`` needs one)."""
        return None

    def bench_item(self, kind: str | None) -> BenchFamily:
        """A view of the same model whose helpers describe a sample holding ``kind`` (``None``: the family's
        default, :attr:`bench_kind`); this view is left as it was. ``ValueError`` naming the kinds the family
        accepts otherwise."""
        if kind is None:
            return self
        if kind not in self.bench_kinds:
            raise ValueError(f"{self.family} benchmarks hold {' or '.join(self.bench_kinds)} samples, not {kind!r}")
        other = copy.copy(self)
        other.bench_kind = kind
        return other

    def vision_module(self) -> torch.nn.Module:
        """The module whose forward runs the vision encoder (timed with hooks on an unpatched model)."""
        return self.adapter.vision_module()

    def item_geometry(self, image_size=None) -> ItemGeometry:
        """How one item of ``image_size`` enters the model (default: the largest the family takes, the one
        :meth:`~learnpruner.adapters.Adapter.num_visual_tokens` counts)."""
        raise NotImplementedError(f"{type(self).__name__} describes no benchmark item")

    def random_images(self, batch: int, generator: torch.Generator | None = None, image_size=None) -> dict:
        """Forward arguments for ``batch`` random items (one per sample) of ``image_size`` (default as in
        :meth:`item_geometry`): the pixel values as the processor lays them out, plus the family's extras."""
        raise NotImplementedError(f"{type(self).__name__} makes no benchmark inputs")

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
        """The budgets (visual tokens per item, averaged over LLM layers) ``learnpruner bench`` measures by
        default: every token of the bench item (:meth:`item_geometry`), then 1/3 and 1/9 of them (the ratios of
        LLaVA-1.5's 192 and 64 of 576)."""
        n = self.item_geometry().tokens
        return [n, max(1, round(n / 3)), max(1, round(n / 9))]

    def vision_flops(self, image: ItemGeometry | None = None) -> int:
        """Analytic FLOPs of the vision encoder for one item (every pass it makes; 2 per multiply-add)."""
        raise NotImplementedError(f"{type(self).__name__} has no vision cost model")

    def projector_flops(self, rows: int) -> int:
        """Analytic FLOPs of the projector on ``rows`` feature rows (2 per multiply-add)."""
        raise NotImplementedError(f"{type(self).__name__} has no projector cost model")

    def prompt_inputs(self, input_ids: torch.Tensor) -> dict:
        """Forward arguments the family's processor returns next to ``input_ids`` and that follow from them alone
        (Qwen's ``mm_token_type_ids``); none by default. The benchmark adds them to its fabricated prompts."""
        return {}

    @property
    def bench_token_id(self) -> int:
        """The placeholder id of a benchmark sample's item (the image token; the video token for videos)."""
        return self.adapter.image_token_id


def _registered() -> dict[str, type[BenchFamily]]:
    from .. import adapters  # noqa: F401  (imports every family module: their BenchFamily subclasses register)

    return BENCH_FAMILIES


def bench_for(model, kind: str | None = None) -> BenchFamily:
    """The benchmark view of ``model`` (a model or its adapter) holding ``kind`` items (None: the family's
    default). A family without a view of its own (an adapter registered by a user) gets the nearest base class's,
    else the generic one, whose geometry raises ``NotImplementedError`` naming it."""
    from ..adapters import Adapter, adapter_for

    if isinstance(model, BenchFamily):
        return model.bench_item(kind)
    adapter = model if isinstance(model, Adapter) else adapter_for(model)
    families = _registered()
    cls = next((families[c.family] for c in type(adapter).__mro__ if getattr(c, "family", "") in families),
               BenchFamily)
    return cls(adapter).bench_item(kind)


def bench_archs() -> dict[str, Callable]:
    """Every registered family's named architectures (name -> a function returning its config)."""
    out: dict[str, Callable] = {}
    for cls in _registered().values():
        out.update(cls.archs)
    return out


def processor_families() -> list[str]:
    """The families whose benchmark view builds a processor (:meth:`BenchFamily.processor`)."""
    return [f for f, c in _registered().items() if c.processor.__func__ is not BenchFamily.processor.__func__]


def bench_processor(family: str, config):
    """The benchmark processor of ``family`` for ``config``; ``ValueError`` naming the families that have one."""
    families = _registered()
    with_one = processor_families()
    if family not in with_one:
        raise ValueError(f"family {family!r} has no benchmark processor; families with one: {', '.join(with_one)}")
    return families[family].processor(config)
