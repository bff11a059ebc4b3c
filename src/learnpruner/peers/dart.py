"""DART (Wen et al., EMNLP 2025, arXiv 2502.11494): duplication-aware pruning inside the LLM."""

from __future__ import annotations

import torch

from ..budget import Schedule, default_layer, single_drop
from ..methods import Method, Option, positive_int, register
from ..rules import LLMContext, Selection, llm_rule
from ..selection import topk_sorted
from .llm_common import _image_sample, _instruction_rows, _per_image


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (j < extra) for j in range(parts)]


def dart_keep(
    vis: torch.Tensor,
    vis_norm: torch.Tensor,
    available: torch.Tensor,
    k: int,
    text: torch.Tensor | None = None,
    text_norm: torch.Tensor | None = None,
    pivot_image: int = 4,
    pivot_text: int = 4,
) -> torch.Tensor:
    """DART's duplication-aware selection for one image: ``k`` kept indices, ascending.

    Pivots are the ``pivot_image`` visual tokens and the ``pivot_text`` instruction tokens with the
    largest ``*_norm`` (DART uses the L1 norm of the keys). The image pivots are kept; then, pivot by
    pivot in sequence order (image pivots, then text pivots), the tokens with the LOWEST cosine
    similarity to that pivot among those not yet taken are added: the remaining ``k - pivots`` slots
    are split as evenly as possible over the pivots (earlier pivots get the remainder).

    Args:
        vis: ``[n, d]`` visual rows (absent ones are ignored through ``available``).
        vis_norm: ``[n]`` pivot score of each visual token.
        available: ``[n]`` bool, tokens still in the sequence.
        k: tokens to keep (at most ``available.sum()``).
        text, text_norm: ``[t, d]`` and ``[t]`` instruction rows and their pivot scores (may be empty).
    """
    m = int(available.sum())
    k = min(k, m)
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=vis.device)
    n_img = min(pivot_image, k)
    piv_img = topk_sorted(vis_norm.float().masked_fill(~available, float("-inf"))[None], n_img)[0]
    pivots = [vis[i] for i in piv_img.tolist()]
    if text is not None and text.shape[0] > 0 and pivot_text > 0 and k > n_img:
        piv_txt = topk_sorted(text_norm.float()[None], min(pivot_text, text.shape[0]))[0]
        pivots += [text[i] for i in piv_txt.tolist()]
    taken = ~available.clone()
    taken[piv_img] = True
    f = torch.nn.functional.normalize(vis.float(), dim=-1)
    for pivot, count in zip(pivots, _split(k - n_img, len(pivots))):
        if count == 0:
            continue
        sim = f @ torch.nn.functional.normalize(pivot.float(), dim=-1)
        # lowest similarity first, ties towards the lower index
        chosen = topk_sorted((-sim).masked_fill(taken, float("-inf"))[None], count)[0]
        taken[chosen] = True
    kept = taken & available
    return kept.nonzero()[:, 0]


def _dart_rule(ctx: LLMContext, k: int) -> Selection:
    if ctx.keys is None:
        raise RuntimeError("the dart rule reads layer K-1's keys: it must be registered with keys=True")
    opts = ctx.options
    # pivot score: L1 norm of layer K-1's keys after RoPE, over all (kv) heads and dims (as official)
    key_l1 = ctx.keys.float().abs().sum(dim=(1, 3))  # [b, s]
    with torch.no_grad():
        normed = ctx.adapter.language_model.norm(ctx.hidden)
    vis_rows = _per_image(ctx, normed, 0.0)
    vis_norm = _per_image(ctx, key_l1)
    present = ctx.present()
    text_rows = _instruction_rows(ctx)
    sample = _image_sample(ctx)
    kept = []
    for i in range(ctx.num_images):
        b = int(sample[i])
        t = text_rows[b]
        kept.append(dart_keep(
            vis_rows[i], vis_norm[i], present[i], k, normed[b, t], key_l1[b, t],
            opts["pivot_image"], opts["pivot_text"],
        ))
    width = min(len(x) for x in kept)
    return Selection(torch.stack([x[:width] for x in kept]))


llm_rule("dart", keys=True)(_dart_rule)


def _dart_layer(options: dict, num_layers: int) -> int:
    """DART's pruning layer (option ``layer``, checked against the depth)."""
    layer = options["layer"]
    if not 1 <= layer < num_layers:
        raise ValueError(f"layer must be in [1, {num_layers - 1}] for a {num_layers}-layer LLM, got {layer}")
    return layer


def _dart_schedule(tokens: int, n: int, num_layers: int, options: dict) -> Schedule:
    layer = _dart_layer(options, num_layers)
    if options.get("r2") is not None:
        r2 = options["r2"]
        return Schedule(n=n, num_layers=num_layers, drops=((layer, r2),) if r2 < n else ())
    return single_drop(tokens, n, num_layers, layer, "dart")


def dart_paper_count(tokens: int, pivot_image: int = 4, pivot_text: int = 4) -> int:
    """Tokens DART's official code keeps after its pruning layer for a label ``tokens`` (``max_num_trunction``):
    the image pivots plus ``TOKEN_TOPK = tokens // (pivot_image + pivot_text)`` per pivot (192/128/64/32 ->
    196/132/68/36 with the default 4 + 4 pivots)."""
    pivots = pivot_image + pivot_text
    return pivot_image + pivots * (tokens // pivots) if pivots else tokens


def _dart_paper(tokens: int, n: int, num_layers: int, options: dict) -> Schedule:
    layer = _dart_layer(options, num_layers)
    r = options.get("r2")
    if r is None:
        r = dart_paper_count(tokens, options["pivot_image"], options["pivot_text"])
    r = max(1, r)
    return Schedule(n=n, num_layers=num_layers, drops=((layer, r),) if r < n else ())


register(Method(
    name="dart",
    summary='LLM layer 2: pivots, keep the least duplicated',
    paper='DART, EMNLP 2025',
    stage1=None,
    stage2="dart",
    schedule_fn=_dart_schedule,
    paper_fn=_dart_paper,
    options=(Option("layer", lambda num_layers: default_layer(num_layers, 2), positive_int("layer", 0),
                    "the LLM layer of the drop (official K=2 of 32, scaled with depth)"),
             "r2",
             Option("pivot_image", 4, positive_int("pivot_image", 0), "visual pivot tokens (official 4)"),
             Option("pivot_text", 4, positive_int("pivot_text", 0), "instruction pivot tokens (official 4)")),
    doc=(
        "DART (Wen et al., 'Stop Looking for Important Tokens in Multimodal Language Models: Duplication "
        "Matters More', EMNLP 2025, arXiv 2502.11494). Before LLM layer K (official K=2) pivot tokens are "
        "chosen (official defaults): the pivot_image=4 visual tokens and pivot_text=4 instruction tokens "
        "(every token after the image) with the largest L1 norm of their keys in layer K-1 after RoPE "
        "(summed over all key heads and dims, as official; the rule is registered with keys=True so the "
        "engine hands it these keys); the image pivots are kept and, pivot by pivot, the visual tokens LEAST "
        "similar (cosine, on the hidden states entering layer K after the final RMSNorm, as the official "
        "code) to the pivot are added until r tokens remain for layers K..L-1. Budget: one drop, "
        "r = round((T L - K n) / (L - K)) (budget.single_drop): 192/128/64 -> r=166/98/30, averages "
        "191.6/127.9/64.1 for n=576, L=32; budgets below ceil((K n + L - K) / L) (37 for 576/32) are "
        "unreachable and raise ValueError (pass layer=1 to prune earlier: 32 -> r=14, average 31.6, or r2= "
        "to set the count). Differences from the official code, and what is followed: (1) official keeps "
        "pivot_image + (pivot_image + pivot_text) * floor(R / 8) tokens (132 for its '128', counted after "
        "layer 2, not averaged); here exactly r, the remainder split over the first pivots. (2) Official "
        "visits pivots in Python-set order; here in sequence order. (3) Official runs batch size 1 with "
        "fixed image offsets; here per image, with padding. Positions keep their original ids (as official: "
        "position_ids = keep_indexs). budget='paper' runs the official configuration for the label T (ZichenWen1/DART, "
        "llava/model/language_model/modeling_llama_self.py, get_retained_image_token; scripts/v1_5/eval/*.sh: "
        "pruned_layer 2, max_num_trunction T, pivots 4 + 4): TOKEN_TOPK = T // 8 per pivot, so 4 + 8 * (T // 8) "
        "tokens from layer 2 on: 192/128/64/32 -> 196/132/68/36 (averages 219.8/159.8/99.8/69.8 for n=576, L=32)."
    ),
))
