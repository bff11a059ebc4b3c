"""Sequence bookkeeping: the running (shortened) sequence and how positions are dropped from it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from transformers.masking_utils import create_causal_mask

__all__ = ["compact", "take", "Seq", "keep_positions", "contiguous_positions", "causal_mask", "call_layer",
           "add_stream", "layer_additions"]


def compact(keep: torch.Tensor) -> torch.Tensor:
    """Index map ``[b, s']`` of the kept positions of each row, right-aligned; ``-1`` marks new padding.

    Right alignment keeps every sample's last token in the last column (as left padding does), so
    rows that keep different counts (several images per sample) stay aligned for generation.
    """
    b, _ = keep.shape
    counts = keep.sum(dim=1)
    width = int(counts.max()) if b else 0
    slot = keep.long().cumsum(dim=1) - 1 + (width - counts)[:, None]
    idx = torch.full((b, width), -1, dtype=torch.long, device=keep.device)
    rows, cols = keep.nonzero(as_tuple=True)
    idx[rows, slot[rows, cols]] = cols
    return idx


def take(x: torch.Tensor, idx: torch.Tensor, fill=0) -> torch.Tensor:
    """Gather ``x[b, idx[b, j], ...]`` along dim 1 (``x`` may have batch 1); ``fill`` where ``idx < 0``."""
    if x.shape[0] != idx.shape[0]:
        x = x.expand(idx.shape[0], *x.shape[1:])
    safe = idx.clamp(min=0)
    out = x.gather(1, safe.view(*safe.shape, *([1] * (x.dim() - 2))).expand(*safe.shape, *x.shape[2:]))
    pad = (idx < 0).view(*idx.shape, *([1] * (x.dim() - 2)))
    return out.masked_fill(pad, fill) if bool(pad.any()) else out


def contiguous_positions(pos: torch.Tensor, mask: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor:
    """``[b, s]`` positions after dropping the rows where ``keep`` is False: consecutive among each row's kept
    valid tokens, ending at its last token's position (``pos + dropped valid rows after it``).

    Rotary attention depends only on position differences, so this is the contiguous numbering from 0 of the
    official code (VisionZip, PyramidDrop, SparseVLM...) shifted by a constant per sample: the same attention,
    while the last prompt token keeps its position, so decode steps continue from the prompt's original
    length (plain and fast path alike) exactly as the official code continues from the shortened length.
    """
    valid = torch.ones_like(keep) if mask is None else mask.to(keep.device).bool()
    dropped = (valid & ~keep).long()
    after = dropped.sum(dim=1, keepdim=True) - dropped.cumsum(dim=1)
    return pos.to(keep.device) + after


@dataclass
class Seq:
    """The running sequence: hidden states plus per-position bookkeeping, all ``[b, s, ...]``."""

    hidden: torch.Tensor
    mask: torch.Tensor | None  # 2D padding mask (None = no padding, as given by the user)
    pos: torch.Tensor  # position ids [b or 1, s]
    cos_sin: tuple[torch.Tensor, torch.Tensor]
    vis: torch.Tensor  # visual-token index, TEXT or STRUCTURE (see engine.layout.Layout)
    img: torch.Tensor  # image number or -1
    orig: torch.Tensor  # original sequence index or -1 (padding added by compaction)
    # positions="contiguous": the rotary embedding; each drop then renumbers the kept rows consecutively
    # (contiguous_positions) and recomputes their cos/sin. None: kept rows keep their original positions.
    rotary: Callable | None = None
    # [streams, b, s, D] added to the residual stream after decoder layer j (fill_streams; None: no such inputs)
    adds: torch.Tensor | None = None

    def drop(self, keep: torch.Tensor) -> Seq:
        """The sequence without the rows where ``keep`` ([b, s] bool) is False (compacted, see :func:`compact`)."""
        if self.rotary is None:
            return self.take(compact(keep))
        seq = replace(self, pos=contiguous_positions(self.pos, self.mask, keep)).take(compact(keep))
        seq.cos_sin = self.rotary(seq.hidden, position_ids=seq.pos)
        return seq

    def take(self, idx: torch.Tensor) -> Seq:
        b, s = self.hidden.shape[:2]
        mask = self.mask if self.mask is not None else torch.ones(b, s, dtype=torch.long, device=idx.device)
        return Seq(
            hidden=take(self.hidden, idx),
            mask=take(mask, idx, 0),
            pos=take(self.pos, idx, 1),
            cos_sin=(take(self.cos_sin[0], idx), take(self.cos_sin[1], idx)),
            vis=take(self.vis, idx, -1),
            img=take(self.img, idx, -1),
            orig=take(self.orig, idx, -1),
            rotary=self.rotary,
            adds=None if self.adds is None else torch.stack([take(a, idx) for a in self.adds]),
        )

    def visual_counts(self, num_images: int) -> list[int]:
        """Visual tokens of each image present in the sequence."""
        present = self.vis >= 0
        return torch.bincount(self.img[present], minlength=num_images).tolist()


def keep_positions(vis: torch.Tensor, img: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """``[b, s]`` bool: every non-visual position plus the visual tokens marked in ``chosen`` [num_images, n]."""
    is_vis = vis >= 0
    return ~is_vis | chosen[img.clamp(min=0), vis.clamp(min=0)]


def causal_mask(ad, hidden, mask2d, cache, pos, layer_idx=None):
    """The decoder's attention mask for ``hidden`` (sized against cache layer ``layer_idx`` when given)."""
    kwargs = {"position_ids": pos}
    if layer_idx is not None:
        kwargs["layer_idx"] = layer_idx
    return create_causal_mask(ad.text_config, hidden, mask2d, cache, **kwargs)


def call_layer(ad, layer, hidden, mask, cos_sin, pos, cache, use_cache, kwargs):
    """One decoder layer with the keyword arguments transformers' decoders pass."""
    return layer(
        hidden,
        attention_mask=mask,
        position_embeddings=cos_sin,
        position_ids=pos,
        use_cache=use_cache,
        **{ad.cache_kwarg: cache},
        **kwargs,
    )


def add_stream(hidden: torch.Tensor, adds: torch.Tensor | None, layer: int) -> torch.Tensor:
    """The output of decoder layer ``layer`` plus what ``adds`` (``[streams, b, s, D]``, :attr:`Seq.adds`) adds after
    it: zero rows leave a position as it is, as the model's own in-place addition at its visual rows does."""
    if adds is None or layer >= adds.shape[0]:
        return hidden
    return hidden + adds[layer].to(hidden.dtype)


@contextmanager
def layer_additions(ad, adds: torch.Tensor | None) -> Iterator[None]:
    """Within this context the model's own forward adds ``adds[j]`` (``[streams, b, s, D]`` at full length, from
    :func:`~learnpruner.engine.layout.fill_streams`) to the output of decoder layer ``j`` (forward hooks on the
    instance's layers): the training forwards, which run the model on embeddings, see the side streams (Qwen3-VL's
    DeepStack features) as the model's own forward with pixels would. Nothing happens for ``adds=None``."""
    if adds is None:
        yield
        return

    def hook(j):
        def add(module, args, output):
            if isinstance(output, tuple):
                return (add_stream(output[0], adds, j), *output[1:])
            return add_stream(output, adds, j)
        return add

    handles = [ad.layers[j].register_forward_hook(hook(j)) for j in range(adds.shape[0])]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def text_positions(ad, given: torch.Tensor | None, length: int, start, device) -> torch.Tensor:
    """``[1 or b, length]`` 1-D text positions of a forward: those in the ``position_ids`` it was given (M-RoPE
    families may get ``[3 or 4, b, s]``; the adapter reads the text row) or, without any, ``start ..
    start + length - 1``."""
    positions = ad.text_positions(given) if given is not None else None
    return positions if positions is not None else (torch.arange(length, device=device) + start)[None]
