"""Decode steps after a pruned prefill: each layer group attends to exactly its cached kept tokens."""

from __future__ import annotations

import torch

from .sequence import call_layer, causal_mask, text_positions
from .state import CacheSegments

__all__ = ["decode"]


def decode(ad, segments_info: CacheSegments, inputs_embeds, attention_mask, position_ids, cache, use_cache, kwargs):
    """One step (or a few tokens) after a pruned prefill.

    ``segments_info`` (left on the cache by the prefill) holds the prompt's original length and, per
    layer group, its first layer and the compacted padding mask of what it cached. Positions continue
    from the ORIGINAL prompt length (kept tokens keep their original positions), not the cache length.
    """
    b, s = inputs_embeds.shape[:2]
    orig_len, segments = segments_info.orig_len, segments_info.segments
    virtual_past = orig_len + (cache.get_seq_length(0) - segments[0][1].shape[1])
    if attention_mask is not None and attention_mask.shape[1] != virtual_past + s:
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[1]} positions, expected {virtual_past + s} "
            "(prompt + generated tokens)"
        )
    if attention_mask is not None:
        new = attention_mask[:, orig_len:]
    else:
        new = torch.ones(b, virtual_past + s - orig_len, dtype=torch.long, device=inputs_embeds.device)
    given = position_ids  # M-RoPE families may get [3 or 4, b, s]: text positions for the masks, the rest for RoPE
    position_ids = text_positions(ad, given, s, virtual_past, inputs_embeds.device)
    rope = ad.decode_rope_positions(position_ids if given is None else given, cache)
    cos_sin = ad.language_model.rotary_emb(inputs_embeds, position_ids=rope)
    starts = [start for start, _ in segments]
    masks = [
        causal_mask(ad, inputs_embeds, torch.cat([m, new.to(m.dtype)], dim=1), cache, position_ids, start)
        for start, m in segments
    ]
    hidden = inputs_embeds
    seg = 0
    for i, layer in enumerate(ad.layers[: ad.text_config.num_hidden_layers]):
        while seg + 1 < len(starts) and i >= starts[seg + 1]:
            seg += 1
        hidden = call_layer(ad, layer, hidden, masks[seg], cos_sin, position_ids, cache, use_cache, kwargs)
    return hidden
