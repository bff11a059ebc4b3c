"""Per-instance pruning state, the statistics of the last forward, and pinned selections."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..budget import Schedule

if TYPE_CHECKING:  # annotations only: the engine never imports the adapters (they import the engine's layout)
    from ..adapters import Adapter
    from ..lpm import LearnablePruningModule
    from ..methods import Method

__all__ = ["ItemStats", "Stats", "PruneState", "fixed_selection", "item_keys"]


@dataclass
class ItemStats:
    """What the last forward did to one item: an image or a video (``stats(model).images`` holds them, in prompt
    order; the list keeps its name).

    ``count``: its visual tokens unpruned (the budget's reference). ``structure``: its structure
    positions (LLaVA-NeXT's row newlines), always kept and outside the budget. ``stage1_kept`` and
    ``llm_kept``: kept token indices (1-D, ascending) after stage 1 and after each LLM drop.
    ``tokens_per_layer``: its visual tokens in each decoder layer's input.
    """

    count: int
    schedule: Schedule | None
    tokens_per_layer: list[int]
    stage1_kept: torch.Tensor | None = None
    llm_kept: list[torch.Tensor] = field(default_factory=list)
    structure: int = 0
    # per token: its crop (or frame) and its patch within that crop, where the family has crops
    crops: torch.Tensor | None = None
    patches: torch.Tensor | None = None

    @property
    def average_tokens(self) -> float:
        return sum(self.tokens_per_layer) / max(1, len(self.tokens_per_layer))

    @property
    def final_kept(self) -> torch.Tensor | None:
        """The tokens the last LLM layer saw (None: all)."""
        return self.llm_kept[-1] if self.llm_kept else self.stage1_kept


@dataclass
class Stats:
    """What the last forward with images did.

    ``images``: one :class:`ItemStats` per image, in prompt order. The batch-level fields:
    ``stage1_kept`` / ``stage2_kept``: ``LongTensor[num_images, k]`` of visual-token indices in original
    order (padded with ``-1`` when images keep different counts), or ``None`` where a stage did not run;
    ``llm_kept``: one such table per LLM drop. ``tokens_per_layer``: visual tokens per image in each
    decoder layer's input (the mean over images when they differ), counted on the hidden states
    actually passed to it; structure positions are not visual tokens. ``kept_positions``:
    ``LongTensor[batch, s]`` original sequence index of each row of the returned logits (-1 for padding
    added by compaction). ``stage2_scores``: ``[num_images, n]`` scores of the first LLM drop (``-inf``
    for tokens absent or beyond an image's count). ``schedule``: the schedule, when every image has the
    same one.
    """

    method: str
    schedule: Schedule | None = None
    stage1_kept: torch.Tensor | None = None
    stage2_kept: torch.Tensor | None = None
    llm_kept: list[torch.Tensor] = field(default_factory=list)
    tokens_per_layer: list[int | float] = field(default_factory=list)
    kept_positions: torch.Tensor | None = None
    stage2_scores: torch.Tensor | None = None
    num_images: int = 0
    images: list[ItemStats] = field(default_factory=list)
    plan: object | None = None  # the resolved plan the forward ran (learnpruner.resolve)

    @property
    def average_tokens(self) -> float:
        """Average visual tokens per image per LLM layer in the last forward (the mean over images)."""
        return sum(self.tokens_per_layer) / max(1, len(self.tokens_per_layer))


@dataclass
class PruneState:
    """All pruning state of one model instance (kept in ``model._learnpruner``).

    The budget is ``tokens`` (average visual tokens per LLM layer, per image) or ``ratio`` (each image
    keeps that fraction of its own count, as an average per layer); ``None`` for both means no budget.
    """

    method: Method
    tokens: int | None
    options: dict
    adapter: Adapter
    base_class: type
    ratio: float | None = None
    lpm: LearnablePruningModule | None = None
    generator: torch.Generator | None = None
    last: Stats | None = None
    forced: tuple | None = None
    # optional profiler: ``timer(name)`` returns a context manager timing section ``name``
    # ("vision", "stage1", "projector", "llm_select"); set by the benchmark, None otherwise
    timer: object | None = None
    # decode on static KV buffers with a capturable step (CUDA graphs on GPU); see learnpruner.engine.decode_static
    fast: bool = False
    # "image" or "crop" (see learnpruner.apply); the method's default when not given
    stage1_unit: str = "image"
    # how ``tokens``/``ratio`` is read: "average" (visual tokens per LLM layer) or "paper" (the label of the
    # method's published configuration); see learnpruner.budget
    budget: str = "average"
    # budget="adaptive": the LPM keep-probability above which stage 1 keeps a token (calibrated for ``tokens``)
    adaptive: float | None = None
    # fast=True: the CUDA graphs of the fast prefill (vision passes, LLM segments); see learnpruner.engine.graphs
    graphs: object | None = None
    # the resolved plan (learnpruner.resolve): the one place the budget becomes a schedule
    plan: object | None = None
    # per item of the next forwards, in prompt order: the key its random draws are seeded by (see item_keys)
    items: list | None = None

    def section(self, name: str):
        return self.timer(name) if self.timer is not None else nullcontext()

    def schedule(self, n: int) -> Schedule:
        """The schedule of an image with ``n`` visual tokens (the plan's, cached per ``n``)."""
        return self.plan.schedule(n)


@contextmanager
def fixed_selection(model, stage1_kept: torch.Tensor | None, llm_kept=None):
    """Within this context, forwards keep exactly these token sets instead of running the rules.

    Used to recompute a generation step by step over the kept sets of its prefill (cache checks),
    and by visualisations. Indices are ``[num_images, k]`` visual-token indices (``-1`` pads rows of
    images that keep fewer); ``llm_kept`` is one tensor (one LLM drop) or a list with one tensor per
    drop (``Stats.llm_kept``). Merged tokens are not replayed: only the kept sets are fixed.
    """
    state: PruneState = model._learnpruner
    previous, state.forced = state.forced, (stage1_kept, llm_kept)
    try:
        yield model
    finally:
        state.forced = previous


@contextmanager
def item_keys(model, keys):
    """Within this context, the random draws of a stage-1 rule (``random``) for each item of a forward are seeded by
    that item's key (``keys``: one per image or video, in prompt order) and the ``seed`` option, not by a generator
    that advances from call to call: an item's answer then never depends on its batch, or on whether a run was
    interrupted and resumed (``learnpruner eval`` passes the item ids)."""
    state: PruneState = model._learnpruner
    previous, state.items = state.items, list(keys)
    try:
        yield model
    finally:
        state.items = previous


@dataclass
class CacheSegments:
    """What a pruned prefill leaves on its KV cache (attribute :data:`SEGMENTS_ATTR`) for the decode steps: the
    prompt's original length (positions continue from it) and, per group of layers that cached the same tokens,
    the group's first layer and the ``[b, cached]`` padding mask of what it cached."""

    orig_len: int
    segments: list[tuple[int, torch.Tensor]]


SEGMENTS_ATTR = "_learnpruner_segments"  # the cache attribute holding a CacheSegments
STATIC_ATTR = "_learnpruner_static"  # the cache attribute holding the fast decode's StaticSegments
