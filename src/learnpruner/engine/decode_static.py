"""The fast decode path (``apply(..., fast=True)``): static KV buffers and a capturable decode step.

After a pruned prefill every layer group holds its own number of cached tokens. The plain path
keeps them in a ``DynamicCache`` that grows by concatenation, and rebuilds the attention masks in
Python every step. The fast path moves the prefill's keys and values into preallocated buffers
(one per layer, each with its own kept length plus room for new tokens) and runs every decode
step with static shapes: new keys/values are written with ``index_copy_`` at a position held in a
device tensor, and each layer group's mask is computed from that same tensor. No step reads a
value back to the host, so on CUDA the whole step (all decoder layers, norm and LM head) is
captured once as a CUDA graph and replayed; on other devices the same step runs eagerly. Outputs
equal the plain path's (tested on CPU). Supported attention implementations: ``sdpa`` and
``eager``.
"""

from __future__ import annotations

import torch

from .graphs import GraphCache
from .sequence import text_positions
from .state import STATIC_ATTR, CacheSegments

__all__ = ["StaticSegments", "fast_decode", "CAPACITY_STEP"]

CAPACITY_STEP = 256  # new tokens the buffers hold before they are regrown (and the graph recaptured)


class StaticSegments:
    """Per-layer KV buffers after a pruned prefill, duck-typed as the cache the attention layers update."""

    def __init__(self, cache, cached: CacheSegments, capacity: int = CAPACITY_STEP):
        self.cached = cached
        self.num_layers = len(cache.layers)
        self.base = [cache.layers[i].keys.shape[-2] for i in range(self.num_layers)]
        self.capacity = capacity
        ref = cache.layers[0].keys
        self.device = ref.device
        self.keys, self.values = [], []
        for i in range(self.num_layers):
            k, v = cache.layers[i].keys, cache.layers[i].values
            kb = k.new_zeros(*k.shape[:2], self.base[i] + capacity, k.shape[-1])
            vb = v.new_zeros(*v.shape[:2], self.base[i] + capacity, v.shape[-1])
            kb[:, :, : self.base[i]] = k
            vb[:, :, : self.base[i]] = v
            self.keys.append(kb)
            self.values.append(vb)
        self.step = torch.zeros((), dtype=torch.long, device=self.device)  # tokens decoded so far
        self.generated = 0  # the same count on the host (advanced by the caller, never read from the device)
        starts = [start for start, _ in cached.segments]
        self.segment_of = [max(j for j, s in enumerate(starts) if s <= i) for i in range(self.num_layers)]
        self.prefix = [m.bool() for _, m in cached.segments]  # [b, base of the group's first layer]
        self.graphs = GraphCache(max_graphs=1)  # the decode step's graph (recaptured after grow)

    # the interface the attention layers call ---------------------------------------------------------
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        q = key_states.shape[-2]
        idx = self.base[layer_idx] + self.step + torch.arange(q, device=self.device)
        self.keys[layer_idx].index_copy_(2, idx, key_states)
        self.values[layer_idx].index_copy_(2, idx, value_states)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.base[layer_idx] + self.generated

    # masks ------------------------------------------------------------------------------------------
    def masks(self, q: int, impl: str, dtype: torch.dtype) -> list[torch.Tensor]:
        """One 4D mask per layer group for ``q`` new tokens: the group's kept prefix plus the new tokens so far."""
        out = []
        new = torch.arange(self.capacity, device=self.device)
        for prefix in self.prefix:
            b = prefix.shape[0]
            rows = self.step + torch.arange(q, device=self.device)  # index of each query among the new tokens
            allowed_new = new[None, :] <= rows[:, None]  # [q, capacity], causal among new tokens
            allowed = torch.cat([prefix[:, None, :].expand(b, q, -1), allowed_new[None].expand(b, -1, -1)], dim=-1)
            allowed = allowed[:, None]  # [b, 1, q, base + capacity]
            if impl == "sdpa":
                out.append(allowed)
            else:
                out.append(torch.zeros(allowed.shape, dtype=dtype, device=self.device).masked_fill(
                    ~allowed, torch.finfo(dtype).min))
        return out

    def grow(self) -> None:
        """Make room for ``CAPACITY_STEP`` more new tokens (the captured graph is dropped)."""
        for i in range(self.num_layers):
            for bufs in (self.keys, self.values):
                old = bufs[i]
                new = old.new_zeros(*old.shape[:2], old.shape[2] + CAPACITY_STEP, old.shape[3])
                new[:, :, : old.shape[2]] = old
                bufs[i] = new
        self.capacity += CAPACITY_STEP
        self.graphs.clear()


def _step(ad, segments: StaticSegments, hidden, position_ids, rope, impl, kwargs):
    """Every decoder layer on the new tokens, against the static buffers (before the final norm). ``position_ids``:
    the text positions; ``rope``: the rotary positions (the same tensor for 1-D RoPE, ``[3, b, q]`` for M-RoPE)."""
    lm = ad.language_model
    cos_sin = lm.rotary_emb(hidden, position_ids=rope)
    masks = segments.masks(hidden.shape[1], impl, hidden.dtype)
    for i, layer in enumerate(ad.layers[: segments.num_layers]):
        hidden = layer(hidden, attention_mask=masks[segments.segment_of[i]], position_embeddings=cos_sin,
                       position_ids=position_ids, use_cache=True, **{ad.cache_kwarg: segments}, **kwargs)
    return hidden


def fast_decode(ad, cache, cached: CacheSegments, inputs_embeds, position_ids, kwargs) -> torch.Tensor:
    """One decode forward on the fast path: the last decoder layer's hidden states ``[b, q, d]``."""
    impl = ad.text_config._attn_implementation
    if impl not in ("sdpa", "eager"):
        raise ValueError(f"the fast path supports attn_implementation 'sdpa' and 'eager', not {impl!r}")
    segments = getattr(cache, STATIC_ATTR, None)
    if segments is None:
        segments = StaticSegments(cache, cached)
        setattr(cache, STATIC_ATTR, segments)
        for layer in cache.layers:  # the dynamic copies are no longer read
            layer.keys, layer.values = layer.keys[..., :0, :], layer.values[..., :0, :]
    q = inputs_embeds.shape[1]
    if segments.generated + q > segments.capacity:
        segments.grow()
    given = position_ids  # M-RoPE families may get [3 or 4, b, q]: text positions for the masks, the rest for RoPE
    position_ids = text_positions(ad, given, q, cached.orig_len + segments.generated, inputs_embeds.device)
    # rotary positions: device-side arithmetic only (M-RoPE adds the cached rope_deltas), no host sync
    rope = ad.decode_rope_positions(position_ids if given is None else given, cache)
    if inputs_embeds.is_cuda and q == 1 and not kwargs:
        hidden = _graphed(ad, segments, inputs_embeds, position_ids, rope, impl)
    else:
        hidden = _step(ad, segments, inputs_embeds, position_ids, rope, impl, kwargs)
    segments.step += q
    segments.generated += q
    return hidden


def _graphed(ad, segments: StaticSegments, inputs_embeds, position_ids, rope, impl):
    """Replay (capturing once, through the engine's one :class:`~learnpruner.engine.graphs.GraphCache`) a CUDA
    graph of the single-token decode step; warm-up calls put the cache position back where it was."""
    before = segments.step.clone()

    def step(x, pos, r):
        return _step(ad, segments, x, pos, r, impl, {})

    return segments.graphs.run("decode", step, inputs_embeds, position_ids, rope,
                               reset=lambda: segments.step.copy_(before))
