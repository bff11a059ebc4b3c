"""LearnPruner (arXiv 2604.23950) and its ablations, as variations of one definition.

LearnPruner is two stages: stage 1 (rule ``"lpm"``, :mod:`learnpruner.rules`) keeps the tokens a learnable
pruning module scores highest after the vision encoder, stage 2 (rule ``"text"``) keeps, before LLM layer K,
the tokens the instruction attends to most. Each ablation of the paper's table swaps or removes one stage:

=============  ================  ===============  =======================================
method         stage 1           stage 2          schedule
=============  ================  ===============  =======================================
learnpruner    lpm               text             r1:r2 = 3:1 at layer K (two_stage)
lpm-only       lpm               --               T after the encoder, every layer
cls-text       cls-attention     text             as learnpruner
cls-only*      cls-attention     --               as lpm-only
lpm-lpm*       lpm-lpm           lpm-again        as learnpruner
text-only      --                text             one drop at layer K (single_drop)
=============  ================  ===============  =======================================

(* registered by name only: :data:`~learnpruner.methods.ABLATIONS`.) :func:`variant` derives each one's
schedule and options from its stages; the rules the ablations add (``cls-attention``, ``lpm-lpm``,
``lpm-again``) are defined here. Every variant keeps LearnPruner's positions (original: kept tokens keep their
position ids, as the paper) and the paper's average budget convention.
"""

from __future__ import annotations

import torch

from .. import selection as sel
from ..budget import Schedule, default_layer, two_stage
from ..rules import LLMContext, Selection, VisionContext, llm_rule, lpm_of, stage1_rule
from ..selection import topk_sorted
from .base import COMMON, Method, Option, check_layer, register, stage1_schedule, stage2_schedule

__all__ = ["learnpruner_schedule", "variant", "VARIANTS"]

OPTION_ORDER = ("lpm", "r1", "r2", "layer", "diversity")
# stage 2's layer K: 12 of 32 layers in the paper, scaled with depth (round(12 L / 32))
LAYER = Option("layer", lambda num_layers: default_layer(num_layers, 12), COMMON["layer"].check,
               "stage 2's LLM layer K (paper: 12 of 32, scaled with depth: round(12 L / 32))")
LPM_STAGE1 = ("lpm", "lpm-lpm")  # the stage-1 rules that read the LPM (option lpm, diversity fill)


def stage2_layer(options: dict, num_layers: int) -> int:
    """Stage 2's layer K: option ``layer`` (its default, :data:`LAYER`, 12 of 32 scaled with depth)."""
    return check_layer(options["layer"] if options.get("layer") is not None else LAYER.default_for(num_layers),
                       num_layers)


def learnpruner_schedule(tokens: int, n: int, num_layers: int, options: dict) -> Schedule:
    """Both stages: ``two_stage``'s r1:r2 = 3:1 split at layer K, or the ``r1``/``r2`` options."""
    layer = stage2_layer(options, num_layers)
    s = two_stage(tokens, n, num_layers, layer)
    r1 = options["r1"] if options.get("r1") is not None else s.r1
    r2 = options["r2"] if options.get("r2") is not None else s.r2
    if r1 is not None and r1 >= n:
        r1 = None
    first = n if r1 is None else r1
    if r2 is not None and r2 >= first:
        r2 = None
    return Schedule(n=n, num_layers=num_layers, r1=r1, drops=((layer, r2),) if r2 is not None else ())



def _stage2_only_schedule(tokens: int, n: int, num_layers: int, options: dict) -> Schedule:
    """Stage 2 alone: one drop at LearnPruner's layer K, not moved silently (the ablation isolates stage 2 there)."""
    return stage2_schedule(tokens, n, num_layers, options, stage2_layer(options, num_layers), "text-only")


def variant(name: str, stage1: str | None, stage2: str | None, doc: str, listed: bool = True, summary: str = "",
            paper: str = "") -> Method:
    """Register the LearnPruner variant with these stages: its schedule (both stages: learnpruner's; stage 1
    alone: T after the encoder; stage 2 alone: one drop at layer K) and its options (``lpm`` and ``diversity``
    where stage 1 reads the LPM; ``r1`` with both stages; ``r2`` and ``layer`` with stage 2) follow from them."""
    if stage1 and stage2:
        schedule = learnpruner_schedule
    elif stage1:
        schedule = stage1_schedule
    else:
        schedule = _stage2_only_schedule
    wanted = set()
    if stage1 in LPM_STAGE1:
        wanted |= {"lpm", "diversity"}
    if stage1 and stage2:
        wanted.add("r1")
    if stage2:
        wanted |= {"r2", "layer"}
    options = tuple(LAYER if o == "layer" else o for o in OPTION_ORDER if o in wanted)
    return register(Method(name=name, stage1=stage1, stage2=stage2, schedule_fn=schedule, options=options, doc=doc,
                           summary=summary, paper=paper),
                    listed=listed)


# --- the rules only the ablations use ----------------------------------------------------------------


@stage1_rule("cls-attention", needs_cls=True)
def _cls_top(ctx: VisionContext, k: int) -> Selection:
    """The ``k`` tokens with the highest [CLS] attention (mean over heads), no diversity fill."""
    return Selection(topk_sorted(ctx.cls_attention().float().to(ctx.features.device), k))


_LPM_LPM_STASH = "lpm_lpm_keep_prob"  # in the forward's shared dict: {n: (keep_prob [images, n], stage-1 kept)}


@stage1_rule("lpm-lpm", needs_lpm=True)
def _lpm_lpm_stage1(ctx: VisionContext, k: int) -> Selection:
    """Stage 1 of lpm-lpm: exactly learnpruner's (top r1 by the LPM's keep-probability, the diversity fill);
    the keep-probabilities stay in the forward's shared dict for stage 2 of the same forward."""
    with torch.no_grad():
        keep_prob = lpm_of(ctx)(ctx.features)
        kept = sel.lpm_select(keep_prob, ctx.features, k, ctx.options["diversity"])
    table = torch.zeros_like(keep_prob, dtype=torch.bool)
    table.scatter_(1, kept, True)
    ctx.shared.setdefault(_LPM_LPM_STASH, {})[ctx.features.shape[1]] = (keep_prob, table)
    return Selection(kept)


@llm_rule("lpm-again")
def _lpm_lpm_stage2(ctx: LLMContext, k: int) -> Selection:
    """Stage 2 of lpm-lpm: the tokens present ranked again by the keep-probability stage 1's LPM gave them in this
    forward (no diversity fill); the top ``k`` are kept."""
    stash = ctx.shared.get(_LPM_LPM_STASH, {}).pop(ctx.n, None)
    present = ctx.present()
    if stash is None or stash[0].shape != (ctx.num_images, ctx.n) or not torch.equal(
            stash[1].to(present.device), present):
        raise ValueError(
            "lpm-lpm's stage 2 ranks by the keep-probabilities of this forward's stage 1: run it with "
            "stage1_unit='image' and without a fixed stage-1 selection"
        )
    scores = stash[0].float().to(present.device).masked_fill(~present, float("-inf"))
    return Selection(topk_sorted(scores, min(k, int(present.sum(dim=1).min()))))


# --- the variants --------------------------------------------------------------------------------------

VARIANTS = {
    "learnpruner": variant("learnpruner", "lpm", "text", listed=True,
                           summary='LPM after the encoder + instruction attention at layer 12',
                           paper='LearnPruner, arXiv 2604.23950', doc=(
        "LearnPruner (arXiv 2604.23950). Stage 1: a learnable pruning module scores each visual token from "
        "the vision feature layer; the top r1 by keep-probability are kept, 10% of r1 (diversity=0.1) filled "
        "by max-min cosine diversity. Stage 2: after LLM layer K-1 (K=12 for 32 layers, scaled with depth: "
        "round(12 L / 32)), tokens are scored by the attention they receive from all instruction tokens after "
        "the image (mean over those queries and heads) and the top r2 are kept for layers K..L-1. Budget split "
        "r1:r2 = 3:1 (64 -> 111/37, 32 -> 55/18 for 32 layers). No official code exists; defaults follow the "
        "paper's text. The paper reports the average convention, so budget='paper' is the same. Positions: "
        "original (kept tokens keep their position ids, as the paper does)."
    )),
    "lpm-only": variant("lpm-only", "lpm", None, listed=True,
                        summary="after the encoder: the LPM (learnpruner's stage 1)",
                        paper='ablation, arXiv 2604.23950', doc=(
        "LearnPruner ablation 'LPM only' (arXiv 2604.23950, ablation at 64 tokens: 96.1): stage 1 of learnpruner "
        "(the LPM's top tokens with the 10% max-min diversity fill) keeps T tokens; no LLM drop, so every layer "
        "sees T. Needs lpm= like learnpruner. "
        "Positions: original by default (kept tokens keep their position ids, as the LearnPruner paper); "
        "positions='contiguous' renumbers them."
    )),
    "cls-text": variant("cls-text", "cls-attention", "text", listed=True,
                        summary="[CLS] attention after the encoder + learnpruner's stage 2",
                        paper='ablation, arXiv 2604.23950', doc=(
        "LearnPruner ablation '[CLS] attention + text attention': learnpruner with the LPM replaced by [CLS] "
        "attention (top r1 by the [CLS] attention of the encoder layer producing the feature layer, mean over "
        "heads, no diversity fill); stage 2 and the r1:r2 = 3:1 schedule at layer K (12 of 32) are learnpruner's. "
        "Positions: original by default (kept tokens keep their position ids, as the LearnPruner paper); "
        "positions='contiguous' renumbers them."
    )),
    "text-only": variant("text-only", None, "text", listed=True,
                        summary="layer 12: instruction attention (learnpruner's stage 2)",
                        paper='ablation, arXiv 2604.23950', doc=(
        "LearnPruner ablation 'text attention only': no stage 1; after LLM layer K-1 (learnpruner's K: 12 of 32, "
        "scaled with depth) the visual tokens are scored by the attention of all instruction tokens after the "
        "image and the top r are kept for layers K..L-1, r = (T L - K n) / (L - K) so the average is T. With "
        "all n tokens in the first K layers, budgets below about K n / L (217 of 576 at K=12, L=32) are unreachable "
        "and raise ValueError; pass layer= (an earlier drop) or r2= (the kept count) for those. The drop layer "
        "is not moved silently, so the ablation isolates stage 2 at learnpruner's layer. "
        "Positions: original by default (kept tokens keep their position ids, as the LearnPruner paper); "
        "positions='contiguous' renumbers them."
    )),
    "cls-only": variant("cls-only", "cls-attention", None, listed=False,
                           summary='after the encoder: [CLS] attention',
                           paper='ablation, arXiv 2604.23950', doc=(
        "LearnPruner ablation '[CLS] attention only' (arXiv 2604.23950, ablation at 64 tokens: 94.6): after the "
        "vision encoder the T tokens with the highest [CLS] attention (encoder layer producing the feature layer, "
        "mean over heads) are kept, no diversity fill and no LLM drop, so every layer sees T (lpm-only with the "
        "LPM replaced by [CLS] attention). Registered by name only (not in learnpruner.METHODS). "
        "Positions: original by default (kept tokens keep their position ids, as the LearnPruner paper); "
        "positions='contiguous' renumbers them."
    )),
    "lpm-lpm": variant("lpm-lpm", "lpm-lpm", "lpm-again", listed=False,
                           summary='LPM after the encoder, the LPM again at layer 12',
                           paper='ablation, arXiv 2604.23950', doc=(
        "LearnPruner ablation 'LPM + LPM' (arXiv 2604.23950, ablation at 64 tokens: 96.9, the same as the method): "
        "learnpruner with stage 2's text attention replaced by a second LPM pass. Definition used here (the paper "
        "publishes no stage-2 LPM, and a module for the LLM's hidden states would need its own training): stage 1 "
        "is learnpruner's (top r1 by the LPM's keep-probability, 10% diversity fill); before LLM layer K the "
        "stage-1 tokens are ranked again by the SAME keep-probabilities (computed once, on the vision feature layer, "
        "in this forward) and the top r2 kept, no diversity fill. Schedule as learnpruner (r1:r2 = 3:1 at layer "
        "K=12 of 32; 64 -> 111/37). Needs lpm= like learnpruner (loaded at the first forward). Registered by name "
        "only (not in learnpruner.METHODS). "
        "Positions: original by default (kept tokens keep their position ids, as the LearnPruner paper); "
        "positions='contiguous' renumbers them."
    )),
}
