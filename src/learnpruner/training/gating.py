"""Gated attention: dropped keys excluded in the forward pass, with a gradient to their gates; the stage-2
gate of the training forward."""

from __future__ import annotations

import logging

import torch

from .config import GATED_ATTENTION

logger = logging.getLogger("learnpruner.training")


def gated_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, learnpruner_gate=None,
                    **kwargs):
    """Eager attention whose post-softmax key probabilities are multiplied by ``learnpruner_gate`` [b, s_kv]."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask[:, :, :, : key.shape[-2]]
    probs = torch.softmax(weights.float(), dim=-1)
    stage2 = learnpruner_gate if isinstance(learnpruner_gate, Stage2Gate) else None
    gate = stage2.gate(module.layer_idx) if stage2 is not None else learnpruner_gate
    if gate is not None:
        probs = probs * gate[:, None, None, : key.shape[-2]].float()
        probs = probs / probs.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    if stage2 is not None:
        stage2.observe(module.layer_idx, probs)
    out = torch.matmul(probs.to(value.dtype), value).transpose(1, 2).contiguous()
    return out, probs


class Stage2Gate:
    """Every layer's key gate when stage 2 runs in the training forward (``TrainConfig.stage2``).

    Layers before ``layer`` use the stage-1 gate ``base`` ``[b, s]`` (straight-through). Layer ``layer - 1``
    reports its gated attention probabilities: the instruction rows' mean attention (over heads and rows, as
    :func:`~learnpruner.selection.aggregate_scores` at inference) ranks each image's stage-1 tokens, and the top
    ``r2[image]`` stay. From ``layer`` on the gate is ``base`` times that 0/1 choice. ``vis``/``img``: the
    layout's token index and image of each position; ``query_index``/``query_valid``: the instruction rows
    (:func:`~learnpruner.engine.readout.query_rows`)."""

    def __init__(self, base, layer: int, vis, img, r2: list[int], widths: list[int], query_index, query_valid):
        self.base, self.layer, self.vis, self.img = base, layer, vis, img
        self.r2, self.widths = r2, widths
        self.query_index, self.query_valid = query_index, query_valid
        self.chosen: torch.Tensor | None = None  # [num_images, width] bool: stage 2's pick
        self.keep: torch.Tensor | None = None  # [b, s]: 0 where stage 2 drops a visual token

    def gate(self, layer_idx: int) -> torch.Tensor:
        if layer_idx < self.layer:
            return self.base
        if self.keep is None:
            raise RuntimeError(f"stage 2 gates layer {layer_idx} before layer {self.layer - 1} chose its tokens")
        return self.base * self.keep

    @torch.no_grad()
    def observe(self, layer_idx: int, probs: torch.Tensor) -> None:
        if layer_idx != self.layer - 1:
            return
        from .. import selection as sel
        from ..engine.sequence import keep_positions

        b, h, _, s = probs.shape
        idx = self.query_index[:, None, :, None].expand(b, h, -1, s)
        scores = sel.aggregate_scores(probs.gather(2, idx), self.query_valid)
        kept1 = self.base.detach() > 0
        vis = torch.where(kept1, self.vis, -1)  # tokens stage 1 dropped are absent: they score -inf
        width = max(self.widths)
        table = sel.per_image_scores(scores, vis, self.img, len(self.r2), width)
        chosen = torch.zeros(table.shape, dtype=torch.bool, device=table.device)
        for r in sorted(set(self.r2)):
            rows = torch.tensor([i for i, x in enumerate(self.r2) if x == r], device=table.device)
            finite = torch.isfinite(table[rows]).sum(dim=1)
            picked = sel.topk_sorted(table[rows], min(r, width))
            ok = torch.arange(picked.shape[1], device=table.device)[None] < finite[:, None]
            chosen[rows[:, None].expand_as(picked)[ok], picked[ok]] = True
        self.chosen = chosen
        self.keep = keep_positions(self.vis, self.img, chosen).to(self.base.dtype)


def _register_gated_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(GATED_ATTENTION, gated_attention)
    AttentionMaskInterface.register(GATED_ATTENTION, eager_mask)
