"""The 2026 peers that combine importance with explicit coverage after the vision encoder: SCOPE and IDPruner's
maximal marginal relevance (``mmr``). Their selection math is in :mod:`learnpruner.peers.vision_select`
(:func:`~learnpruner.peers.vision_select.scope_select`, :func:`~learnpruner.peers.vision_select.mmr_select`); the
rules here gather what each reads. Both keep T tokens after the encoder (the same in both budget conventions).
"""

from __future__ import annotations

import torch

from ..methods import Method, Option, fraction, register, stage1_schedule
from ..rules import Selection, VisionContext, lpm_of, stage1_rule
from . import vision_select as vs

__all__: list[str] = []


@stage1_rule("scope", needs_cls=True)
def _scope(ctx: VisionContext, k: int) -> Selection:
    with torch.no_grad():
        saliency = ctx.cls_attention().float().to(ctx.features.device)
        return Selection(vs.scope_select(ctx.features, k, saliency, ctx.options["alpha"]))


register(Method(
    name="scope",
    summary='after the encoder: [CLS] saliency x coverage gain',
    paper='SCOPE, NeurIPS 2025',
    positions="contiguous",
    stage1="scope",
    stage2=None,
    schedule_fn=stage1_schedule,
    stage1_unit="crop",
    options=(Option("alpha", 1.0, fraction("alpha", 0.0, 16.0), "the saliency's exponent (official ALPHA=1.0)"),),
    doc=(
        "SCOPE (Deng et al., 'SCOPE: Saliency-Coverage Oriented Token Pruning for Efficient Multimodal LLMs', "
        "NeurIPS 2025, arXiv 2510.24214). Greedy: T tokens are picked one at a time, each the one maximising its "
        "saliency ** alpha times its coverage gain, the gain being sum_j max(0, cos(j, i) - cover_j) over every "
        "token j, cover_j the highest cosine similarity of j to the tokens already picked (0 at the start), on the "
        "vision feature layer's rows (CLIP layer -2 for LLaVA-1.5, before the projector). Saliency: the [CLS] "
        "attention of the encoder layer producing the feature layer (the official code sums it over heads; the "
        "mean here ranks alike). Defaults as the official code (kinredon/SCOPE, scope/clip_encoder.py SCOPE(); "
        "run_scope_llava.sh: ALPHA=1.0, COMBINED=multi). Every LLM layer sees T tokens. Positions: contiguous, as "
        "official (the kept rows, in index order, form the LLM's shortened prompt); positions='original' keeps the "
        "original ids. LLaVA-NeXT, as the official code runs it: every crop alone with the image's budget split "
        "evenly over its crops (the tower runs on all crops as one batch, T / crops each); the official code then "
        "drops the grid's row newlines, here they stay as structure. budget='paper' is the same (T kept)."
    ),
))


@stage1_rule("mmr", needs_lpm=True)
def _mmr(ctx: VisionContext, k: int) -> Selection:
    with torch.no_grad():
        importance = lpm_of(ctx)(ctx.features).float()
        projected = ctx.adapter.project(ctx.features)
        return Selection(vs.mmr_select(projected, importance, k, ctx.options["lam"]).to(ctx.features.device))


register(Method(
    name="mmr",
    summary='after the encoder: maximal marginal relevance (LPM importance)',
    paper='IDPruner, arXiv 2602.13315',
    positions="original",
    stage1="mmr",
    stage2=None,
    schedule_fn=stage1_schedule,
    options=("lpm", Option("lam", 0.5, fraction("lam"), "importance against redundancy (official mmr_lambda=0.5)")),
    doc=(
        "IDPruner's maximal marginal relevance (Tencent AngelSlim, 'IDPruner', arXiv 2602.13315; "
        "angelslim/compressor/token_compressor/algorithm/idpruner.py, configs/*/pruning/idpruner_r*.yaml). The "
        "first token is the most important; each next one maximises lam * importance - (1 - lam) * its highest "
        "cosine similarity to the tokens picked, the importance min-max normalised to [0, 1] per image and the "
        "similarity on the projected visual tokens (the LLM's input embeddings), as official; lam=0.5 and one "
        "token per step (parallel_k=1), the official defaults. Every LLM layer sees T tokens. One difference, "
        "named: the official importance is a learned scorer (VisionSelector, 12.85M parameters, trained with the "
        "VLM frozen), released for Qwen2.5-VL only; here the importance is this library's learned scorer of the "
        "same kind, the Learnable Pruning Module (lpm=, the model folder's own by default), trained with the VLM "
        "frozen on the answer loss. Positions: original, as official (AngelSlim's apply_pruning_mask keeps the "
        "kept rows' position ids). budget='paper' is the same (T kept)."
    ),
))
