"""The analytic cost model of a decoder-only LLM, shared by every family's benchmark: prefill FLOPs of the decoder
layers and the LM head, and KV-cache bytes, given how many tokens each layer sees (see ``bench.FLOPS_CONVENTION``:
2 FLOPs per multiply-add; q/k/v/o, a 3-matrix SwiGLU MLP, attention scores and weighted values counted full
non-causal q x kv, as ``FlopCounterMode`` counts SDPA)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["text_dims", "llm_flops", "lm_head_flops", "kv_bytes", "items_breakdown", "items_kv_bytes"]


def text_dims(text_config) -> tuple[int, int, int, int, int]:
    """``(hidden, heads, kv_heads, head_dim, intermediate)`` of a text config."""
    heads = text_config.num_attention_heads
    hd = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    kv = getattr(text_config, "num_key_value_heads", None) or heads
    return text_config.hidden_size, heads, kv, hd, text_config.intermediate_size


def llm_flops(text_config, tokens_per_layer: Sequence[int]) -> int:
    """Prefill FLOPs of the decoder layers, layer ``i`` on ``tokens_per_layer[i]`` tokens."""
    h, heads, kv, hd, ffn = text_dims(text_config)
    return sum(2 * n * (h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * ffn) + 4 * n * n * heads * hd
               for n in tokens_per_layer)


def lm_head_flops(text_config, positions: int) -> int:
    """FLOPs of the LM head on ``positions`` positions."""
    return 2 * positions * text_config.hidden_size * text_config.vocab_size


def kv_bytes(text_config, tokens_per_layer: Sequence[int], batch: int = 1, dtype=torch.bfloat16) -> int:
    """Bytes of the keys and values the layers cache, layer ``i`` holding ``tokens_per_layer[i]`` tokens."""
    _, _, kv, hd, _ = text_dims(text_config)
    size = torch.empty((), dtype=dtype).element_size()
    return sum(2 * batch * kv * n * hd * size for n in tokens_per_layer)


def _items_per_layer(schedules, text_tokens: int) -> list[int]:
    return [text_tokens + sum(c) for c in zip(*(s.per_layer() for s in schedules))]


def items_breakdown(text_config, schedules, text_tokens: int, vision: int, projector, batch: int = 1,
                    lm_head: str = "last") -> dict:
    """Analytic prefill FLOPs of one prompt holding several items (images and videos), each pruned by its
    :class:`~learnpruner.budget.Schedule` in ``schedules``, times ``batch``: ``vision`` (the tower on every item,
    given), ``projector`` (``projector(rows)`` on every item's stage-1 rows), ``llm`` (per layer ``text_tokens``
    plus every item's visual tokens of that layer) and ``lm_head`` (``"last"``: one position; ``"all"``: every
    final position)."""
    if lm_head not in ("last", "all"):
        raise ValueError(f"lm_head must be 'last' or 'all', got {lm_head!r}")
    per_layer = _items_per_layer(schedules, text_tokens)
    rows = sum(s.r1 if s.r1 is not None else s.n for s in schedules)
    positions = 1 if lm_head == "last" else per_layer[-1]
    parts = {"vision": vision, "projector": projector(rows), "llm": llm_flops(text_config, per_layer),
             "lm_head": lm_head_flops(text_config, positions)}
    return {k: batch * v for k, v in parts.items()}


def items_kv_bytes(text_config, schedules, text_tokens: int, batch: int = 1, dtype=torch.bfloat16) -> int:
    """Bytes of the KV cache after the prefill of a prompt holding several items: per layer keys and values of the
    text and that layer's visual tokens of every item."""
    return kv_bytes(text_config, _items_per_layer(schedules, text_tokens), batch, dtype)
