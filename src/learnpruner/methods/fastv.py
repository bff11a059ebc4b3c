"""FastV (Chen et al., ECCV 2024): one drop inside the LLM, ranked by the last token's attention."""

from __future__ import annotations

from ..budget import Schedule
from .base import Method, Option, check_layer, positive_int, register, stage2_schedule


def _fastv_schedule(tokens: int, n: int, num_layers: int, options: dict) -> Schedule:
    return stage2_schedule(tokens, n, num_layers, options, check_layer(options["layer"], num_layers), "fastv")


def _fastv_paper(tokens: int, n: int, num_layers: int, options: dict) -> Schedule:
    """FastV's own parametrisation: K=2, ATTENTION_RANK = T tokens kept from layer K on (R = 1 - T / n). K is the
    paper's layer 2 at any depth, as in the average convention (not scaled: on a shallow LLM a drop after
    layer 1 keeps little of the signal FastV relies on)."""
    layer = check_layer(options["layer"], num_layers)
    r = options["r2"] if options.get("r2") is not None else tokens
    return Schedule(n=n, num_layers=num_layers, drops=((layer, r),) if r < n else ())


register(Method(
    name="fastv",
    summary="LLM layer 2: the last token's attention",
    paper='FastV, ECCV 2024',
    stage1=None,
    stage2="last",
    schedule_fn=_fastv_schedule,
    paper_fn=_fastv_paper,
    options=(Option("layer", 2, positive_int("layer", 0), "the LLM layer K of the drop (paper: 2, at any depth)"),
             "r2"),
    doc=(
        "FastV (Chen et al., 'An Image is Worth 1/2 Tokens After Layer 2', ECCV 2024). After LLM layer K-1 "
        "(paper default K=2) the visual tokens receiving the least attention from the LAST token (mean over "
        "heads) are dropped for layers K..L-1. The paper states a ratio R (50%); here the number kept is "
        "mapped to the average budget: r = (T L - K n) / (L - K). With K=2 a budget below about 2n/L (37 of "
        "576 for 32 layers) is unreachable and raises ValueError; pass layer=1 to prune earlier, or r2= to "
        "set the kept count directly. The official code scores with eager attention weights; here the same "
        "probabilities are computed from the layer's queries and keys, so SDPA and FlashAttention work. "
        "budget='paper': FastV's own parametrisation (official code pkunlp-icler/FastV, "
        "src/transformers/src/transformers/models/llama/modeling_llama.py: AGG_LAYER K and ATTENTION_RANK, the "
        "tokens kept from layer K on): K=2 and T kept, i.e. R = 1 - T/n (192/128/64 -> 192/128/64 from layer 2, "
        "averages 216.0/156.0/96.0 for n=576, L=32), as DART's paper reports FastV; the SparseVLM and VisionZip "
        "tables instead matched FastV's average (budget='average'). Positions: original (as official: "
        "position_ids = keep_indexs)."
    ),
))
