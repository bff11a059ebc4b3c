"""The analytic cost model of a decoder-only LLM, shared by every family's benchmark: prefill FLOPs of the decoder
layers and the LM head, and KV-cache bytes, given how many tokens each layer sees (see ``bench.FLOPS_CONVENTION``:
2 FLOPs per multiply-add; q/k/v/o, a 3-matrix SwiGLU MLP, attention scores and weighted values counted full
non-causal q x kv, as ``FlopCounterMode`` counts SDPA)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["text_dims", "llm_flops", "lm_head_flops", "kv_bytes"]


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
