"""Attention readout inside the LLM: what layer ``K-1`` tells stage 2 about the visual tokens.

Scores are computed from the layer's own q/k projections (captured by forward hooks) with the
model's RoPE, for the query rows a rule asks for only, so no attention implementation has to
return weights (SDPA and FlashAttention work) and the probabilities equal eager attention's.
"""

from __future__ import annotations

import torch

from .. import selection as sel
from .layout import instruction_rows
from .sequence import Seq, take

__all__ = ["query_rows", "Capture", "layer_readout"]


def query_rows(vis: torch.Tensor, mask: torch.Tensor | None, rule) -> tuple[torch.Tensor, torch.Tensor]:
    """Which rows score the visual tokens: ``(index [b, q], valid [b, q])``.

    ``"text"``: the instruction (:func:`~learnpruner.engine.layout.instruction_rows`); a sample whose
    prompt ends with the image falls back to its last token. ``"last"``: the last valid token of each
    sample. A callable computes its own rows.
    """
    if callable(rule):
        return rule(vis, mask)
    b, s = vis.shape
    ar = torch.arange(s, device=vis.device).expand(b, s)
    valid = mask.bool() if mask is not None else torch.ones(b, s, dtype=torch.bool, device=vis.device)
    last_valid = torch.where(valid, ar, -1).amax(dim=1)
    if rule == "last":
        return last_valid[:, None], torch.ones(b, 1, dtype=torch.bool, device=vis.device)
    if rule != "text":
        raise ValueError(f"unknown query rule {rule!r}; accepted: 'text', 'last' or a callable")
    rows = instruction_rows(vis, valid)
    empty = rows.sum(dim=1) == 0
    rows[empty, last_valid[empty].clamp(min=0)] = True
    q = int(rows.sum(dim=1).max())
    order = torch.sort(rows.long(), dim=1, descending=True, stable=True).indices[:, :q]
    return order, rows.gather(1, order)


class Capture:
    """Forward hooks that keep one layer's queries and keys before RoPE for a single call: the outputs of its q/k
    projections, or of its q/k norms where the attention normalises them (Qwen3's ``q_norm`` / ``k_norm``)."""

    def __init__(self, attn):
        self.out = {}
        q = attn.q_norm if getattr(attn, "q_norm", None) is not None else attn.q_proj
        k = attn.k_norm if getattr(attn, "k_norm", None) is not None else attn.k_proj
        self.handles = [
            q.register_forward_hook(lambda m, i, o: self.out.__setitem__("q", o)),
            k.register_forward_hook(lambda m, i, o: self.out.__setitem__("k", o)),
        ]

    def close(self):
        for h in self.handles:
            h.remove()


def layer_readout(ad, layer_idx: int, cap: dict, seq: Seq, query, want_keys: bool) -> dict:
    """What an LLM rule reads of layer ``layer_idx``: attention from the ``query`` rows and/or the keys.

    Returns ``scores`` ([b, s], mean over heads and valid query rows), ``attention`` ([b, q, s], mean
    over heads), ``query_index``, ``query_valid`` and ``keys`` ([b, kv_heads, s, head_dim] after RoPE)
    as requested.
    """
    attn = ad.attention(layer_idx)
    rope = ad.rotary_fn(layer_idx)
    hd = attn.head_dim
    b, s = seq.vis.shape
    k = cap["k"].view(b, s, -1, hd).transpose(1, 2)
    cos, sin = (t.expand(b, *t.shape[1:]) for t in seq.cos_sin)
    _, k = rope(k, k, cos, sin)
    out = {"keys": k} if want_keys else {}
    if query is not None:
        qidx, qvalid = query_rows(seq.vis, seq.mask, query)
        q = take(cap["q"], qidx).view(b, qidx.shape[1], -1, hd).transpose(1, 2)
        q, _ = rope(q, q, take(cos, qidx), take(sin, qidx))
        valid = seq.mask.bool() if seq.mask is not None else torch.ones(b, s, dtype=torch.bool, device=k.device)
        probs = sel.attention_probs(q, k, attn.scaling, qidx, valid)
        out.update(scores=sel.aggregate_scores(probs, qvalid), attention=probs.mean(dim=1), query_index=qidx,
                   query_valid=qvalid)
    return out
