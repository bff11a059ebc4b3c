"""Rule registries: how each stage picks the visual tokens to keep.

A *stage-1 rule* runs after the vision encoder on the features of the vision feature layer; an
*LLM rule* runs before a decoder layer on the hidden states (and, when it declares a ``query``,
on the attention that layer's predecessor gave the visual tokens). Both return a
:class:`Selection`: sorted indices of the visual tokens kept per image, and optionally new rows
for some kept slots (merged tokens, as in VisionZip's contextual tokens or SparseVLM's recycling).

Rules adapt the model-free functions of :mod:`learnpruner.selection` to the engine's contexts.
Methods in :mod:`learnpruner.methods` name the rules they use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from . import selection as sel

__all__ = [
    "Selection",
    "VisionContext",
    "LLMContext",
    "LLMRule",
    "STAGE1_RULES",
    "LLM_RULES",
    "stage1_rule",
    "llm_rule",
    "item_seed",
]


@dataclass
class Selection:
    """Kept visual tokens per image (``kept``: ``[num_images, k]``, ascending).

    ``replace`` (``[num_images, k, d]``) with ``replace_mask`` (``[num_images, k]`` bool) gives new
    rows for some kept slots: merged tokens that take the place (and position id) of a kept token.
    """

    kept: torch.Tensor
    replace: torch.Tensor | None = None
    replace_mask: torch.Tensor | None = None


@dataclass
class VisionContext:
    """What a stage-1 rule may read, built by the engine from the plan and the step's tensors (never its state).

    ``features``: ``[num_images, n, d]`` before the projector. ``options``: the plan's resolved options (every option
    of the method, defaults filled). ``adapter``: the family's adapter (its ``project``, embeddings, tokenizer path).
    ``lpm`` and ``generator``: the plan's LPM and the random generator, where the method has one. ``items``: per
    image, a key its random draws are seeded by (eval: the item's id, so an answer never depends on the batch or on
    a resume); None: draws follow ``generator``. ``coords``: ``[num_images, n, 2]``, each token's (row, column) in its
    crop or frame grid in ``[-1, 1]`` (None where the adapter gives none). ``shared``: one dict for every rule of one
    forward (what stage 1 leaves for stage 2).
    """

    features: torch.Tensor
    options: Mapping[str, Any]
    adapter: Any = None
    pixel_values: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None
    vis: torch.Tensor | None = None  # [b, s] visual-token index of each position, -1 for text
    img: torch.Tensor | None = None  # [b, s] image number of each position, -1 for text
    attention_mask: torch.Tensor | None = None  # [b, s] padding mask as given by the user
    lpm: Any = None
    generator: torch.Generator | None = None
    items: list | None = None
    coords: torch.Tensor | None = None  # [num_images, n, 2]: each token's place in its crop grid (VisualFeatures)
    # filled by the engine for rules registered with needs_cls=True: "cls" [num_images, n] and
    # "keys" [num_images, n, head_dim] of the encoder layer that produced the feature layer
    cache: dict = field(default_factory=dict)
    shared: dict = field(default_factory=dict)

    def cls_attention(self) -> torch.Tensor:
        """``[num_images, n]`` attention from [CLS] to each visual token at the feature layer.

        Available when the rule was registered with ``needs_cls=True`` (the engine then captures it
        during the vision forward, at no extra pass).
        """
        if "cls" not in self.cache:
            raise RuntimeError("this stage-1 rule must be registered with needs_cls=True to read [CLS] attention")
        return self.cache["cls"]

    def item_generators(self) -> list[torch.Generator] | None:
        """Per image, a generator seeded by its item key and the ``seed`` option (None without item keys)."""
        if self.items is None:
            return None
        seed = int(self.options.get("seed", 0))
        return [torch.Generator().manual_seed(item_seed(seed, key)) for key in self.items]


def item_seed(seed: int, key) -> int:
    """A 63-bit seed for item ``key`` under ``seed`` (stable across processes and versions: SHA-256)."""
    import hashlib

    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:15], 16)


@dataclass
class LLMContext:
    """What an LLM rule may read, for the sequence entering decoder layer ``layer``."""

    hidden: torch.Tensor  # [b, s, d]
    vis: torch.Tensor  # [b, s]
    img: torch.Tensor  # [b, s]
    mask: torch.Tensor | None  # [b, s] padding mask
    scores: torch.Tensor | None  # [num_images, n] attention received (-inf where absent), if the rule has a query
    num_images: int
    n: int
    layer: int
    options: Mapping[str, Any]  # the plan's resolved options
    adapter: Any = None  # the family's adapter (its final norm, for rules that read normed hidden states)
    # the LLM's input embeddings of these rows (after stage 1; merged rows as merged)
    input_embeds: torch.Tensor | None = None
    # when the rule has a query: each query row's attention probabilities [b, q, s] (mean over heads) in
    # layer ``layer - 1``, with the rows' sequence index [b, q] and validity [b, q]
    attention: torch.Tensor | None = None
    query_index: torch.Tensor | None = None
    query_valid: torch.Tensor | None = None
    # when the rule was registered with keys=True: layer ``layer - 1``'s keys after RoPE [b, kv_heads, s, head_dim]
    keys: torch.Tensor | None = None
    # one dict shared by every drop of the same forward for this group of images (what a rule decides at its first
    # drop and reuses), and one shared by every rule of the forward (what stage 1 leaves for stage 2)
    scratch: dict = field(default_factory=dict)
    shared: dict = field(default_factory=dict)

    def visual_rows(self) -> torch.Tensor:
        """``[num_images, n, d]`` hidden rows of the visual tokens present (zeros where absent)."""
        table = self.hidden.new_zeros(self.num_images, self.n, self.hidden.shape[-1])
        present = self.vis >= 0
        table[self.img[present], self.vis[present]] = self.hidden[present]
        return table

    def present(self) -> torch.Tensor:
        """``[num_images, n]`` bool: which visual tokens are still in the sequence."""
        table = torch.zeros(self.num_images, self.n, dtype=torch.bool, device=self.vis.device)
        p = self.vis >= 0
        table[self.img[p], self.vis[p]] = True
        return table


@dataclass(frozen=True)
class LLMRule:
    """An LLM rule and the query rows whose attention it reads (``None``: no attention needed).

    ``query`` is ``"text"`` (every instruction token after the image), ``"last"`` (the last token) or
    a callable ``(vis, mask) -> (index [b, q], valid [b, q])``.
    """

    fn: Callable[[LLMContext, int], Selection]
    query: str | Callable | None = None
    keys: bool = False


STAGE1_RULES: dict[str, Callable[[VisionContext, int], Selection]] = {}
LLM_RULES: dict[str, LLMRule] = {}


def stage1_rule(name: str, needs_cls: bool = False, needs_lpm: bool = False):
    """Register a stage-1 rule under ``name``; ``needs_cls`` makes the engine capture [CLS] attention,
    ``needs_lpm`` makes ``apply`` resolve a Learnable Pruning Module (option ``lpm``) into ``state.lpm``."""

    def deco(fn):
        if name in STAGE1_RULES:
            raise ValueError(f"stage-1 rule {name!r} is already registered")
        fn.needs_cls = needs_cls
        fn.needs_lpm = needs_lpm
        STAGE1_RULES[name] = fn
        return fn

    return deco


def llm_rule(name: str, query: str | Callable | None = None, keys: bool = False):
    """Register an LLM rule under ``name`` that reads the attention of ``query`` rows (and/or the keys)."""

    def deco(fn):
        if name in LLM_RULES:
            raise ValueError(f"LLM rule {name!r} is already registered")
        LLM_RULES[name] = LLMRule(fn, query, keys)
        return fn

    return deco


# --- the rules of the core methods ------------------------------------------------------------------


def lpm_of(ctx: VisionContext):
    """The plan's LPM, moved to the features' device and dtype (it is not a submodule of the model, so it
    follows the model's moves here)."""
    lpm = ctx.lpm
    p, f = next(lpm.parameters()), ctx.features
    if p.device != f.device or p.dtype != f.dtype:
        lpm.to(device=f.device, dtype=f.dtype)
    return lpm


@stage1_rule("lpm", needs_lpm=True)
def _lpm(ctx: VisionContext, k: int) -> Selection:
    keep_prob = lpm_of(ctx)(ctx.features)
    return Selection(sel.lpm_select(keep_prob, ctx.features, k, ctx.options["diversity"]))


@stage1_rule("random")
def _random(ctx: VisionContext, k: int) -> Selection:
    f = ctx.features
    per_item = ctx.item_generators()
    if per_item is None:
        return Selection(sel.random_select(f.shape[0], f.shape[1], k, ctx.generator, device=f.device))
    return Selection(torch.cat([sel.random_select(1, f.shape[1], k, g, device=f.device) for g in per_item]))


def _top_scores(ctx: LLMContext, k: int) -> Selection:
    available = int((ctx.scores > float("-inf")).sum(dim=1).min())
    return Selection(sel.topk_sorted(ctx.scores, min(k, available)))


llm_rule("text", query="text")(_top_scores)
llm_rule("last", query="last")(_top_scores)
