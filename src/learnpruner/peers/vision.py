"""Peer methods that prune after the vision encoder (stage-1 rules), and LearnPruner's ablations.

Registered methods: ``visionzip``, ``vispruner``, ``divprune``, ``cdpruner`` (peers) and ``lpm-only``,
``cls-text``, ``text-only`` (LearnPruner ablations). The selection math lives in
:mod:`learnpruner.peers.vision_select`; the rules here only gather what each method reads.
"""

from __future__ import annotations

import torch

from ..budget import Schedule, default_layer, single_drop
from ..engine.layout import TEXT, instruction_rows
from ..methods import Method, _check_layer, _learnpruner_schedule, register
from ..rules import Selection, VisionContext, stage1_rule
from ..selection import topk_sorted
from . import vision_select as vs

__all__: list[str] = []


# --- helpers -----------------------------------------------------------------------------------------


def _cls_row_kept(ctx: VisionContext) -> bool:
    """Whether the features hold the [CLS] row as token 0 (LLaVA's strategy "full")."""
    return ctx.adapter.cls_row_in_features()


def _cls_scores(ctx: VisionContext) -> torch.Tensor:
    return ctx.cls_attention().float().to(ctx.features.device)


def _projected(ctx: VisionContext) -> torch.Tensor:
    """All ``n`` visual tokens through the projector (the LLM's input-embedding space)."""
    return ctx.adapter.project(ctx.features)


def _pad_ids(ctx: VisionContext) -> set[int]:
    model = getattr(ctx.adapter, "model", None)
    configs = [getattr(model, "config", None), getattr(ctx.adapter, "text_config", None),
               getattr(model, "generation_config", None)]
    ids = {getattr(c, "pad_token_id", None) for c in configs if c is not None}
    return {int(i) for i in ids if isinstance(i, int)}


def _instruction_mask(ctx: VisionContext) -> torch.Tensor:
    """``[b, s]`` bool: the instruction tokens of each sample (the shared definition).

    Padding is excluded by the attention mask, or without one by the model's pad token ids; a sample
    whose prompt ends with the image falls back to all its text tokens.
    """
    ids, vis = ctx.input_ids, ctx.vis
    if ctx.attention_mask is not None:
        valid = ctx.attention_mask.to(vis.device).bool()
    else:
        valid = torch.ones_like(vis, dtype=torch.bool)
        for p in _pad_ids(ctx):
            valid &= ids != p
    after = instruction_rows(vis, valid)
    text = valid & (vis == TEXT)
    empty = after.sum(dim=1) == 0
    return torch.where(empty[:, None], text, after)


def _image_sample(ctx: VisionContext, num_images: int) -> torch.Tensor:
    """``[num_images]``: the sample (batch row) each image belongs to."""
    rows, cols = (ctx.img >= 0).nonzero(as_tuple=True)
    out = torch.zeros(num_images, dtype=torch.long, device=ctx.img.device)
    out[ctx.img[rows, cols]] = rows
    return out


def _relevance(ctx: VisionContext, projected: torch.Tensor) -> torch.Tensor:
    """``[num_images, n]``: mean cosine of each projected visual token with the instruction embeddings."""
    emb = ctx.adapter.language_model.embed_tokens(ctx.input_ids.to(projected.device)).float()
    emb = torch.nn.functional.normalize(emb, dim=-1)
    mask = _instruction_mask(ctx).to(emb.device)
    w = mask.float()[..., None]
    query = (emb * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)  # [b, D] mean of unit embeddings
    query = query[_image_sample(ctx, projected.shape[0]).to(emb.device)]  # [num_images, D]
    vis = torch.nn.functional.normalize(projected.float(), dim=-1)
    rel = (vis @ query[:, :, None])[..., 0]
    has_text = mask.any(dim=1)[_image_sample(ctx, projected.shape[0]).to(emb.device)]
    return torch.where(has_text[:, None], rel, torch.zeros_like(rel))


def _check_choice(options: dict, key: str, choices: tuple) -> None:
    if key in options and options[key] not in choices:
        raise ValueError(f"option {key} must be one of {choices}, got {options[key]!r}")


def _check_ratio(options: dict, key: str, hi_open: bool = False) -> None:
    v = options.get(key)
    if v is None:
        return
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v and (v < 1.0 if hi_open else v <= 1.0)
    if not ok:
        raise ValueError(f"option {key} must be a number in [0, 1{')' if hi_open else ']'}, got {v!r}")


def _stage1_schedule(tokens: int, n: int, num_layers: int, options: dict) -> Schedule:
    """Stage 1 keeps ``tokens``; every LLM layer sees them (the average equals the budget)."""
    return Schedule(n=n, num_layers=num_layers, r1=tokens if tokens < n else None)


# --- VisionZip ---------------------------------------------------------------------------------------


@stage1_rule("visionzip", needs_cls=True)
def _visionzip(ctx: VisionContext, k: int) -> Selection:
    opts = ctx.options
    dominant, contextual = vs.visionzip_split(k, opts.get("contextual"))
    scores = _cls_scores(ctx)
    if _cls_row_kept(ctx):  # the official code always keeps [CLS] as a dominant token
        scores = scores.clone()
        scores[:, 0] = float("inf")
    keys = ctx.cache.get("keys")
    metric = ctx.features if keys is None else (keys.mean(dim=2) if keys.dim() == 4 else keys)
    with torch.no_grad():
        kept, replace, mask = vs.visionzip_select(
            scores, metric.to(ctx.features.device), ctx.features, dominant, contextual,
            opts.get("merge", "official"),
        )
    return Selection(kept, replace if bool(mask.any()) else None, mask if bool(mask.any()) else None)


def _visionzip_schedule(tokens: int, n: int, num_layers: int, options: dict) -> Schedule:
    _check_choice(options, "merge", ("official", "mean"))
    c = options.get("contextual")
    if c is not None and (isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= min(tokens, n)):
        raise ValueError(f"option contextual must be an integer in [0, {min(tokens, n)}], got {c!r}")
    return _stage1_schedule(tokens, n, num_layers, options)


register(Method(
    name="visionzip",
    stage1="visionzip",
    stage2=None,
    schedule_fn=_visionzip_schedule,
    options=("contextual", "merge"),
    stage1_unit="crop",
    doc=(
        "VisionZip (Yang et al., 'VisionZip: Longer is Better but Not Necessary in Vision Language Models', "
        "CVPR 2025), training-free variant. Dominant tokens: the highest [CLS] attention (mean over heads) at "
        "the encoder layer that produces the feature layer (layer -2 for LLaVA-1.5). Contextual tokens: of the "
        "remaining tokens (in index order), C targets are taken with stride max(1, R // C); every other "
        "remaining token is assigned to its most cosine-similar target and merged into it. Official splits "
        "64 = 54 + 10, 128 = 108 + 20, 192 = 162 + 30; other budgets use C = round(10 T / 64) (option "
        "contextual= overrides). Every LLM layer sees T tokens. Where the official code differs from the paper "
        "and what is followed: (1) the official merged row is target + mean(assigned) (not a plain average); "
        "followed by default, merge='mean' gives the average of the target and its assigned tokens; "
        "(2) the official 'dominant=54' is 53 patches plus the [CLS] token's own feature; HF LLaVA's default "
        "strategy drops [CLS] from the features, so here all 54 dominant tokens are patches (under strategy "
        "'full' [CLS] is always kept, as officially); (3) the similarity metric is, as officially, the head-mean "
        "attention keys of the encoder layer that produced the feature layer (captured in the same vision pass); "
        "(4) the official code appends the contextual tokens after the dominant ones; here each merged token "
        "takes the slot and position id of its target token, so image order is preserved. LLaVA-NeXT, as the "
        "official code runs it: every crop (base and grid) is compressed alone with its own [CLS] attention and "
        "keys, the image's budget split evenly over its crops (the paper's 160 of 2880 = 32 per crop for five "
        "crops). Differences: the official code drops the grid's row newlines and restores the grid tokens "
        "without unpadding; here the unpadded grid and its newlines (structure, outside the budget) stay as "
        "transformers packs them, so a crop that lost padding rows has fewer candidates."
    ),
))


# --- VisPruner ---------------------------------------------------------------------------------------


@stage1_rule("vispruner", needs_cls=True)
def _vispruner(ctx: VisionContext, k: int) -> Selection:
    with torch.no_grad():
        kept = vs.vispruner_select(_cls_scores(ctx), ctx.features, k, ctx.options.get("important_ratio", 0.5))
    return Selection(kept)


def _vispruner_schedule(tokens: int, n: int, num_layers: int, options: dict) -> Schedule:
    _check_ratio(options, "important_ratio")
    return _stage1_schedule(tokens, n, num_layers, options)


register(Method(
    name="vispruner",
    stage1="vispruner",
    stage2=None,
    schedule_fn=_vispruner_schedule,
    options=("important_ratio",),
    doc=(
        "VisPruner (Zhang et al., 'Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token "
        "Pruning in VLMs', ICCV 2025). Important tokens: the int(T * important_ratio) tokens with the highest "
        "[CLS] attention (mean over heads) at the encoder layer producing the feature layer. Diverse tokens: the "
        "rest, in decreasing attention order, are thinned by repeated bipartite duplicate removal (alternate "
        "split into A/B, drop the up to 8 A tokens most cosine-similar to some B token, on the pre-projector "
        "features) until T - T_imp remain. Default important_ratio=0.5, the official code's default (its README "
        "also runs 0.75 at 64 tokens); every LLM layer sees T tokens. The official code is followed (removal chunk "
        "of 8, decreasing-attention order of the remainder, A/B alternation); its batched indexing assumes an even "
        "remainder, this implementation handles any. Ties are broken towards the lower index (stable sorts)."
    ),
))


# --- DivPrune ----------------------------------------------------------------------------------------


@stage1_rule("divprune")
def _divprune(ctx: VisionContext, k: int) -> Selection:
    with torch.no_grad():
        feats = ctx.features if ctx.options.get("features", "projected") == "vision" else _projected(ctx)
        return Selection(vs.divprune_select(feats, k).to(ctx.features.device))


def _divprune_schedule(tokens: int, n: int, num_layers: int, options: dict) -> Schedule:
    _check_choice(options, "features", ("projected", "vision"))
    return _stage1_schedule(tokens, n, num_layers, options)


register(Method(
    name="divprune",
    stage1="divprune",
    stage2=None,
    schedule_fn=_divprune_schedule,
    options=("features",),
    doc=(
        "DivPrune (Alvar et al., 'DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models', "
        "CVPR 2025). Greedy max-min diversity (cosine distance): T tokens are picked one at a time, each the "
        "token farthest from the already selected set. As in the official code: the features are the PROJECTED "
        "visual tokens (LLM input embeddings; features='vision' uses the pre-projector ones), and the first token "
        "is the one whose nearest other token is farthest (not the lowest mean similarity). The official code "
        "sets the count as a ratio of the tokens (round(ratio * n)); here T is given directly. Every LLM layer "
        "sees T tokens. The projector runs once over all n tokens for the selection (the engine then projects "
        "the kept rows)."
    ),
))


# --- CDPruner ----------------------------------------------------------------------------------------


@stage1_rule("cdpruner")
def _cdpruner(ctx: VisionContext, k: int) -> Selection:
    with torch.no_grad():
        projected = _projected(ctx)
        relevance = vs.normalize_relevance(_relevance(ctx, projected), ctx.options.get("theta"))
        kernel = vs.conditional_kernel(projected, relevance)
        return Selection(vs.dpp_greedy(kernel, k).to(ctx.features.device))


def _cdpruner_schedule(tokens: int, n: int, num_layers: int, options: dict) -> Schedule:
    _check_ratio(options, "theta", hi_open=True)
    return _stage1_schedule(tokens, n, num_layers, options)


register(Method(
    name="cdpruner",
    stage1="cdpruner",
    stage2=None,
    schedule_fn=_cdpruner_schedule,
    options=("theta",),
    doc=(
        "CDPruner (Zhang et al., 'Beyond Attention or Similarity: Maximizing Conditional Diversity for Token "
        "Pruning in MLLMs', 2025). Conditional DPP: kernel L = diag(r) S diag(r), S the cosine similarity of the "
        "projected visual tokens, r the instruction relevance min-max normalised per image; T tokens by greedy "
        "MAP inference with the incremental Cholesky update. Defaults follow the official code: r enters "
        "linearly (its theta/exp(alpha r) weighting is commented out; theta=0.5 here gives the paper's "
        "exp(theta / (2 (1 - theta)) r)). Instruction embedding, where this implementation must differ: the "
        "official code scores the relevance with CLIP's TEXT tower (not part of a LLaVA checkpoint) against "
        "CLIP-projected patch embeddings, NEGATED (penultimate-layer CLIP patches are anti-aligned with text), "
        "normalised over the batch. Here the model's own alignment is used: the projector maps visual tokens into "
        "the LLM's input-embedding space, so r = cosine between each projected visual token and the mean unit "
        "input embedding of the instruction tokens (the valid text after the image; all text when none follows), "
        "without negation (no such inversion in that space), normalised per image (batch-independent). No "
        "extra model is loaded. Every LLM layer sees T tokens."
    ),
))


# --- LearnPruner ablations ---------------------------------------------------------------------------


@stage1_rule("cls-attention", needs_cls=True)
def _cls_top(ctx: VisionContext, k: int) -> Selection:
    return Selection(topk_sorted(_cls_scores(ctx), k))


def _lpm_only_schedule(tokens: int, n: int, num_layers: int, options: dict) -> Schedule:
    return _stage1_schedule(tokens, n, num_layers, options)


def _text_only_schedule(tokens: int, n: int, num_layers: int, options: dict) -> Schedule:
    layer = _check_layer(options.get("layer", default_layer(num_layers, 12)), num_layers)
    if options.get("r2") is not None:
        r2 = options["r2"]
        return Schedule(n=n, num_layers=num_layers, drops=((layer, r2),) if r2 < n else ())
    return single_drop(tokens, n, num_layers, layer, "text-only")


register(Method(
    name="lpm-only",
    stage1="lpm",
    stage2=None,
    schedule_fn=_lpm_only_schedule,
    options=("lpm", "diversity"),
    doc=(
        "LearnPruner ablation 'LPM only' (arXiv 2604.23950, ablation at 64 tokens: 96.1): stage 1 of learnpruner "
        "(the LPM's top tokens with the 10% max-min diversity fill) keeps T tokens; no LLM drop, so every layer "
        "sees T. Needs lpm= like learnpruner."
    ),
))

register(Method(
    name="cls-text",
    stage1="cls-attention",
    stage2="text",
    schedule_fn=_learnpruner_schedule,
    options=("r1", "r2", "layer"),
    doc=(
        "LearnPruner ablation '[CLS] attention + text attention': learnpruner with the LPM replaced by [CLS] "
        "attention (top r1 by the [CLS] attention of the encoder layer producing the feature layer, mean over "
        "heads, no diversity fill); stage 2 and the r1:r2 = 3:1 schedule at layer K (12 of 32) are learnpruner's."
    ),
))

register(Method(
    name="text-only",
    stage1=None,
    stage2="text",
    schedule_fn=_text_only_schedule,
    options=("layer", "r2"),
    doc=(
        "LearnPruner ablation 'text attention only': no stage 1; after LLM layer K-1 (learnpruner's K: 12 of 32, "
        "scaled with depth) the visual tokens are scored by the attention of all instruction tokens after the "
        "image and the top r are kept for layers K..L-1, r = (T L - K n) / (L - K) so the average is T. With "
        "all n tokens in the first K layers, budgets below about K n / L (217 of 576 at K=12, L=32) are unreachable "
        "and raise ValueError; pass layer= (an earlier drop) or r2= (the kept count) for those. The drop layer "
        "is not moved silently, so the ablation isolates stage 2 at learnpruner's layer."
    ),
))
