"""The fast prefill (``apply(..., fast=True)``): the LLM segments between two selections on static shapes.

A pruned prefill runs its decoder layers in segments: layers ``[0, K1)`` on the stage-1 sequence, ``[K1, K2)``
after the first LLM drop, and so on; each selection runs between two segments. On the fast path:

* the stage-1 sequence is left-padded to a length bucket (a multiple of :data:`BUCKET` tokens) with masked rows,
  exactly the padding a left-padded batch has, so prompts of nearby lengths share one shape;
* every drop removes a number of visual tokens fixed by the schedule, so the shape of each later segment
  follows from the bucket, the batch size and the schedule;
* each segment is one function of tensors (hidden states, mask, rotary cos/sin, positions) that returns its
  output, every layer's keys and values (written into the cache afterwards) and, before a drop, the q/k
  projections the stage-2 readout needs. :class:`~learnpruner.engine.graphs.GraphCache` captures it once per
  shape as a CUDA graph and replays it; on a CPU the same function runs as it is.

The padding rows are masked everywhere (attention, selection, the decode masks) and are left out of what the
prefill returns and of ``learnpruner.stats``: outputs equal the plain path's up to floating-point rounding
(the masked rows change the kernels' reduction order, not the result). The KV cache holds the padding rows
too (masked), at most ``BUCKET - 1`` per layer.
"""

from __future__ import annotations

import torch

from .readout import Capture
from .sequence import Seq, add_stream, call_layer, causal_mask

__all__ = ["BUCKET", "bucket_length", "pad_to_bucket", "unpad", "run_segment"]

BUCKET = 64  # the fast prefill pads the stage-1 sequence up to a multiple of this many tokens


def bucket_length(length: int, bucket: int = BUCKET) -> int:
    """The padded length of a sequence of ``length`` tokens: the next multiple of ``bucket`` (at least one)."""
    if length < 0 or bucket < 1:
        raise ValueError(f"need length >= 0 and bucket >= 1, got {length} and {bucket}")
    return max(bucket, -(-length // bucket) * bucket)


def pad_to_bucket(seq: Seq, bucket: int = BUCKET) -> tuple[Seq, int]:
    """``seq`` left-padded with masked rows to :func:`bucket_length`, and the number of rows added."""
    b, s = seq.hidden.shape[:2]
    pad = bucket_length(s, bucket) - s
    if pad == 0:
        return seq, 0
    device = seq.hidden.device
    idx = torch.cat([torch.full((b, pad), -1, dtype=torch.long, device=device),
                     torch.arange(s, device=device).expand(b, s)], dim=1)
    return seq.take(idx), pad


def unpad(seq: Seq, pad: int) -> Seq:
    """``seq`` without ``pad`` leading columns. After compaction (right-aligned) every row still starts with at
    least ``pad`` padding rows, so this gives the sequence the plain path has."""
    if pad == 0:
        return seq
    b, s = seq.hidden.shape[:2]
    return seq.take(torch.arange(pad, s, device=seq.hidden.device).expand(b, s - pad))


class _Recorder:
    """The cache the attention layers of a segment see: it returns each layer's new keys and values as they
    are (a prefill attends to itself only) and keeps them, so they become outputs of the segment."""

    def __init__(self):
        self.keys, self.values = [], []

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.keys.append(key_states)
        self.values.append(value_states)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


def run_segment(state, start: int, stop: int, seq: Seq, cache, readout_layer: int | None):
    """Decoder layers ``[start, stop)`` on ``seq`` (static shapes); writes their keys and values into ``cache``.

    Returns the last layer's hidden states and, when ``readout_layer`` is given, that layer's q/k projection
    outputs (for :func:`~learnpruner.engine.readout.layer_readout`)."""
    ad = state.adapter
    mask = causal_mask(ad, seq.hidden, seq.mask, cache, seq.pos, start if start else None)

    adds = seq.adds if seq.adds is not None and start < seq.adds.shape[0] else None

    def segment(hidden, mask, cos, sin, pos, *streams):
        recorder = _Recorder()
        cap = Capture(ad.attention(readout_layer)) if readout_layer is not None else None
        try:
            for i in range(start, stop):
                hidden = call_layer(ad, ad.layers[i], hidden, mask, (cos, sin), pos, recorder, True, {})
                hidden = add_stream(hidden, streams[0] if streams else None, i)
        finally:
            if cap is not None:
                cap.close()
        return hidden, recorder.keys, recorder.values, (dict(cap.out) if cap is not None else {})

    hidden, keys, values, qk = state.graphs.run(("llm", start, stop, readout_layer, adds is not None), segment,
                                                seq.hidden, mask, *seq.cos_sin, seq.pos,
                                                *(() if adds is None else (adds,)))
    for j, i in enumerate(range(start, stop)):
        cache.update(keys[j], values[j], i)
    return hidden, qk
