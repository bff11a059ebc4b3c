"""Peer methods that prune after the vision encoder (stage-1 rules).

Registered methods: ``visionzip``, ``vispruner``, ``divprune``, ``cdpruner`` (LearnPruner's own ablations are in
:mod:`learnpruner.methods.learnpruner`). The selection math lives in :mod:`learnpruner.peers.vision_select`;
the rules here only gather what each method reads. These peers keep T tokens after the vision encoder, which
is their papers' budget in both conventions (``budget="average"`` and ``"paper"``); their official code feeds
the LLM the shortened prompt, so their ``positions`` default is ``"contiguous"``.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..budget import Schedule
from ..engine.layout import TEXT, image_samples, instruction_rows
from ..methods import Method, Option, choice, fraction, positive_int, register, stage1_schedule
from ..rules import Selection, VisionContext, stage1_rule
from . import clip_text as ct
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


def _relevance(ctx: VisionContext, projected: torch.Tensor) -> torch.Tensor:
    """``[num_images, n]``: mean cosine of each projected visual token with the instruction embeddings."""
    emb = ctx.adapter.language_model.embed_tokens(ctx.input_ids.to(projected.device)).float()
    emb = torch.nn.functional.normalize(emb, dim=-1)
    mask = _instruction_mask(ctx).to(emb.device)
    w = mask.float()[..., None]
    query = (emb * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)  # [b, D] mean of unit embeddings
    query = query[image_samples(ctx.img, projected.shape[0]).to(emb.device)]  # [num_images, D]
    vis = torch.nn.functional.normalize(projected.float(), dim=-1)
    rel = (vis @ query[:, :, None])[..., 0]
    has_text = mask.any(dim=1)[image_samples(ctx.img, projected.shape[0]).to(emb.device)]
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


# --- VisionZip ---------------------------------------------------------------------------------------


@stage1_rule("visionzip", needs_cls=True)
def _visionzip(ctx: VisionContext, k: int) -> Selection:
    opts = ctx.options
    dominant, contextual = vs.visionzip_split(k, opts["contextual"])
    scores = _cls_scores(ctx)
    if _cls_row_kept(ctx):  # the official code always keeps [CLS] as a dominant token
        scores = scores.clone()
        scores[:, 0] = float("inf")
    keys = ctx.cache.get("keys")
    metric = ctx.features if keys is None else (keys.mean(dim=2) if keys.dim() == 4 else keys)
    with torch.no_grad():
        kept, replace, mask = vs.visionzip_select(
            scores, metric.to(ctx.features.device), ctx.features, dominant, contextual,
            opts["merge"],
        )
    return Selection(kept, replace if bool(mask.any()) else None, mask if bool(mask.any()) else None)


def _visionzip_schedule(tokens: int, n: int, num_layers: int, options: dict) -> Schedule:
    c = options.get("contextual")
    if c is not None and (isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= min(tokens, n)):
        raise ValueError(f"option contextual must be an integer in [0, {min(tokens, n)}], got {c!r}")
    return stage1_schedule(tokens, n, num_layers, options)


register(Method(
    name="visionzip",
    summary='after the encoder: [CLS]-dominant + merged contextual',
    paper='VisionZip, CVPR 2025',
    positions="contiguous",
    stage1="visionzip",
    stage2=None,
    schedule_fn=_visionzip_schedule,
    options=(Option("contextual", None, positive_int("contextual", 0),
                    "merged contextual tokens (default round(10 T / 64): 64 = 54 + 10)"),
             Option("merge", "official", choice("merge", ("official", "mean"), listed=False),
                    "a contextual row: target + mean(assigned) (official) or their mean")),
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
        "transformers packs them, so a crop that lost padding rows has fewer candidates. Positions: contiguous by "
        "default, as official (the vision tower returns T tokens and LLaVA numbers the shortened prompt 0..len-1; "
        "dvlab-research/VisionZip, visionzip/clip_encoder.py); positions='original' keeps the original ids. "
        "budget='paper' is the same (T kept after the encoder; splits from the paper)."
    ),
))


# --- VisPruner ---------------------------------------------------------------------------------------


@stage1_rule("vispruner", needs_cls=True)
def _vispruner(ctx: VisionContext, k: int) -> Selection:
    with torch.no_grad():
        kept = vs.vispruner_select(_cls_scores(ctx), ctx.features, k, ctx.options["important_ratio"])
    return Selection(kept)


def _vispruner_schedule(tokens: int, n: int, num_layers: int, options: dict) -> Schedule:
    return stage1_schedule(tokens, n, num_layers, options)


register(Method(
    name="vispruner",
    summary='after the encoder: [CLS]-important + diverse',
    paper='VisPruner, ICCV 2025',
    positions="contiguous",
    stage1="vispruner",
    stage2=None,
    schedule_fn=_vispruner_schedule,
    options=(Option("important_ratio", 0.5, fraction("important_ratio"),
                    "share of T kept by [CLS] attention (official default 0.5)"),),
    doc=(
        "VisPruner (Zhang et al., 'Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token "
        "Pruning in VLMs', ICCV 2025). Important tokens: the int(T * important_ratio) tokens with the highest "
        "[CLS] attention (mean over heads) at the encoder layer producing the feature layer. Diverse tokens: the "
        "rest, in decreasing attention order, are thinned by repeated bipartite duplicate removal (alternate "
        "split into A/B, drop the up to 8 A tokens most cosine-similar to some B token, on the pre-projector "
        "features) until T - T_imp remain. Default important_ratio=0.5, the official code's default (its README "
        "also runs 0.75 at 64 tokens); every LLM layer sees T tokens. The official code is followed (removal chunk "
        "of 8, decreasing-attention order of the remainder, A/B alternation); its batched indexing assumes an even "
        "remainder, this implementation handles any. Ties are broken towards the lower index (stable sorts). "
        "Positions: contiguous by default, as official (Theia-4869/VisPruner, llava/model/llava_arch.py: the kept "
        "tokens form the LLM's shortened prompt); positions='original' keeps the original ids. budget='paper' "
        "is the same (T kept after the encoder; the official scripts take T and important_ratio directly)."
    ),
))


# --- DivPrune ----------------------------------------------------------------------------------------


@stage1_rule("divprune")
def _divprune(ctx: VisionContext, k: int) -> Selection:
    with torch.no_grad():
        feats = ctx.features if ctx.options["features"] == "vision" else _projected(ctx)
        return Selection(vs.divprune_select(feats, k).to(ctx.features.device))


def _divprune_schedule(tokens: int, n: int, num_layers: int, options: dict) -> Schedule:
    return stage1_schedule(tokens, n, num_layers, options)


register(Method(
    name="divprune",
    summary='after the encoder: max-min diversity',
    paper='DivPrune, CVPR 2025',
    positions="contiguous",
    stage1="divprune",
    stage2=None,
    schedule_fn=_divprune_schedule,
    options=(Option("features", "projected", choice("features", ("projected", "vision"), listed=False),
                    "the rows diversity is measured on: the projected tokens (official) or the vision features"),),
    doc=(
        "DivPrune (Alvar et al., 'DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models', "
        "CVPR 2025). Greedy max-min diversity (cosine distance): T tokens are picked one at a time, each the "
        "token farthest from the already selected set. As in the official code: the features are the PROJECTED "
        "visual tokens (LLM input embeddings; features='vision' uses the pre-projector ones), and the first token "
        "is the one whose nearest other token is farthest (not the lowest mean similarity). The official code "
        "sets the count as a ratio of the tokens (round(ratio * n)); here T is given directly. Every LLM layer "
        "sees T tokens. The projector runs once over all n tokens for the selection (the engine then projects "
        "the kept rows). Positions: contiguous by default, as official (vbdi/divprune, "
        "LLaVA/llava/model/llava_arch.py: the kept rows of the embedded prompt, positions counted afresh); "
        "positions='original' keeps the original ids. budget='paper' is the same (T = round(SUBSET_RATIO n))."
    ),
))


# --- CDPruner ----------------------------------------------------------------------------------------


def _vlm_tokenizer(ctx: VisionContext):
    """The VLM's tokenizer (to read the instruction as text): option ``tokenizer``, else the model's folder."""
    spec = ctx.options.get("tokenizer")
    if spec is None:
        model = getattr(ctx.adapter, "model", None)
        spec = getattr(getattr(model, "config", None), "_name_or_path", "") or getattr(model, "name_or_path", "")
        if not spec:
            raise ValueError(
                "cdpruner with text_model reads the instruction as text and needs the model's tokenizer: pass "
                "tokenizer=PATH_OR_TOKENIZER (the VLM's tokenizer or processor)"
            )
    return ct.load_tokenizer(spec, "the model's tokenizer (option tokenizer)")


def instruction_texts(ctx: VisionContext, tokenizer) -> list[str]:
    """Per sample: its instruction (the valid text after its last image) decoded, special tokens skipped."""
    mask = _instruction_mask(ctx)
    return [tokenizer.decode(ctx.input_ids[b][mask[b].to(ctx.input_ids.device)].tolist(),
                             skip_special_tokens=True).strip() for b in range(mask.shape[0])]


def _post_layernorm(ctx: VisionContext, clip: nn.Module) -> nn.Module:
    """The vision tower's own ``post_layernorm`` (as the official code), else the loaded CLIP's."""
    try:
        tower = ctx.adapter.vision_module()
    except (NotImplementedError, AttributeError):
        tower = None
    ln = getattr(getattr(tower, "vision_model", tower), "post_layernorm", None)
    width = ctx.features.shape[-1]
    if not isinstance(ln, nn.LayerNorm) or ln.normalized_shape[-1] != width:
        ln = clip.vision_model.post_layernorm
    return ln


def clip_text_relevance(ctx: VisionContext) -> torch.Tensor:
    """``[num_images, n]`` CDPruner's official raw relevance with the CLIP text tower of option ``text_model``
    (see :mod:`learnpruner.peers.clip_text`), before normalisation."""
    opts = ctx.options
    clip = ct.load_clip_text(opts["text_model"], opts.get("text_tokenizer"))
    device = ctx.features.device
    clip.model.to(device)
    proj = clip.model.visual_projection
    if proj.in_features != ctx.features.shape[-1]:
        raise ValueError(
            f"cdpruner's text_model projects {proj.in_features}-wide vision rows, but the model's feature layer is "
            f"{ctx.features.shape[-1]} wide: text_model must be the CLIP the vision tower comes from"
        )
    texts = instruction_texts(ctx, _vlm_tokenizer(ctx))
    sample = image_samples(ctx.img, ctx.features.shape[0]).tolist()
    cache: dict[int, torch.Tensor] = {}
    embeds = []
    for b in sample:
        if b not in cache:
            cache[b] = ct.text_embeds(clip, texts[b], device)
        embeds.append(cache[b])
    return ct.clip_relevance(ctx.features, _post_layernorm(ctx, clip.model), proj, embeds)


@stage1_rule("cdpruner")
def _cdpruner(ctx: VisionContext, k: int) -> Selection:
    with torch.no_grad():
        projected = _projected(ctx)
        if ctx.options.get("text_model") is not None:
            raw = clip_text_relevance(ctx)
        elif ctx.options["fallback"] == "uniform":  # no relevance: the DPP on similarity alone
            raw = torch.ones(projected.shape[:2], device=projected.device)
        else:
            raw = _relevance(ctx, projected)
        relevance = vs.normalize_relevance(raw, ctx.options.get("theta"))
        kernel = vs.conditional_kernel(projected, relevance)
        return Selection(vs.dpp_greedy(kernel, k).to(ctx.features.device))


def _cdpruner_schedule(tokens: int, n: int, num_layers: int, options: dict) -> Schedule:
    tm = options.get("text_model")
    if tm is not None and not isinstance(tm, (str, os.PathLike, nn.Module, ct.ClipText)):
        raise ValueError(f"option text_model must be a path, a hub id or a CLIP module, got {type(tm).__name__}")
    for key in ("tokenizer", "text_tokenizer"):
        v = options.get(key)
        if v is not None and not isinstance(v, (str, os.PathLike)) and not callable(getattr(v, "decode", None)):
            raise ValueError(f"option {key} must be a path, a hub id or a tokenizer, got {type(v).__name__}")
        if v is not None and tm is None:
            raise ValueError(f"option {key} is only used with text_model= (CDPruner's CLIP text relevance)")
    return stage1_schedule(tokens, n, num_layers, options)


register(Method(
    name="cdpruner",
    summary='after the encoder: conditional DPP (instruction relevance)',
    paper='CDPruner, 2025',
    stage1="cdpruner",
    stage2=None,
    schedule_fn=_cdpruner_schedule,
    positions="contiguous",
    options=(Option("theta", None, fraction("theta", open_high=True),
                    "the paper's trade-off exp(theta / (2 (1 - theta)) r) (default: r linearly, as official)"),
             Option("text_model", None, None, "the CLIP whose text tower gives the official relevance"),
             Option("text_tokenizer", None, None, "text_model's tokenizer (with a module text_model)"),
             Option("tokenizer", None, None, "the VLM's tokenizer, to read the instruction (default: the model's)"),
             Option("fallback", "uniform", choice("fallback", ("instruction", "uniform"), listed=False),
                    "relevance without text_model: constant (uniform) or the instruction's embeddings")),
    doc=(
        "CDPruner (Zhang et al., 'Beyond Attention or Similarity: Maximizing Conditional Diversity for Token "
        "Pruning in MLLMs', 2025). Conditional DPP: kernel L = diag(r) S diag(r), S the cosine similarity of the "
        "projected visual tokens, r the instruction relevance min-max normalised per image; T tokens by greedy "
        "MAP inference with the incremental Cholesky update. Defaults follow the official code: r enters "
        "linearly (its theta/exp(alpha r) weighting is commented out; theta=0.5 here gives the paper's "
        "exp(theta / (2 (1 - theta)) r)). Instruction relevance, official (text_model=PATH_OR_ID, the CLIP the "
        "vision tower comes from, e.g. openai/clip-vit-large-patch14-336 for LLaVA-1.5; loaded once as "
        "transformers' CLIPModel with its tokenizer, or text_model=<CLIPModel> with text_tokenizer=...): as "
        "Theia-4869/CDPruner (llava/model/llava_arch.py encode_images, multimodal_encoder/clip_encoder.py), the "
        "patch embeddings are the tower's post_layernorm of the feature-layer rows through CLIP's "
        "visual_projection (float32), the instruction goes through CLIP's text tower (no truncation: segments of "
        "77 tokens, one embedding each), r = mean over segments of the NEGATED cosine (penultimate-layer CLIP "
        "patches are anti-aligned with text), min-max normalised. The instruction is read as text with the "
        "model's tokenizer (option tokenizer=, default: the model's folder): the valid text after the image, "
        "special tokens skipped (the official code passes the bare question; here the chat template's tail, "
        "e.g. 'ASSISTANT:', is part of it). Normalisation is per image (the official min/max run over the batch, "
        "which equals it at the official batch size 1). Without text_model (the default) there is no official "
        "relevance; two honest fallbacks, chosen on the ShapesVQA validation split (500 items, shipped model): "
        "fallback='uniform' (default: constant relevance, the DPP on similarity alone; 84.0% at 64 tokens, 82.4% "
        "at 32) and fallback='instruction' (r = cosine between each projected visual token and the mean unit "
        "LLM input embedding of the instruction tokens, all text when none follows the image, no negation, "
        "normalised per image; 79.6% and 78.4%). Every LLM layer sees T tokens. "
        "Positions: contiguous by default, as official (the kept tokens "
        "form the LLM's shortened prompt); positions='original' keeps the original ids. budget='paper' is the "
        "same (the scripts take T, visual_token_num, directly)."
    ),
))
