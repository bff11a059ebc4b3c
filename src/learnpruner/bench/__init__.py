"""``learnpruner bench``: speed, memory and FLOPs of every pruning method, measured honestly.

For each method x budget x batch size the benchmark measures, on one model:

- ``vision_ms``, ``stage1_ms``, ``projector_ms``, ``llm_select_ms``: the engine's own timer sections
  (:attr:`learnpruner.engine.PruneState.timer`), summed per forward, median over repeats;
- ``prefill_ms``: time to first token, one whole forward (vision tower included) with the KV cache and
  ``logits_to_keep=1``, as ``generate`` runs it;
- ``e2e_ms``: ``generate`` of exactly ``new_tokens`` tokens (greedy, ``min_new_tokens`` forces the count);
- ``decode_ms_per_token``: ``(e2e_ms - prefill_ms) / (new_tokens - 1)`` (generate minus prefill);
- ``ideal_prefill_ms``: the measured ``vision_ms`` plus the same decoder layers fed hidden states of the
  scheduled lengths per layer group with no selection work (pre-sliced vision features through the
  projector, then slicing only); ``overhead = prefill_ms / ideal_prefill_ms``;
- ``kv_cache_bytes``: bytes of the cache tensors after prefill (:func:`kv_cache_bytes`);
- ``peak_mem_bytes``: ``torch.cuda.max_memory_allocated`` over prefill and generate (None on CPU);
- ``flops``: analytic prefill FLOPs (:func:`analytic_flops`);
- ``images``: per image its visual ``count``, its ``structure`` positions and its visual tokens per layer.

Every sample holds one image, the largest the family takes (LLaVA-1.5: 336x336, 576 tokens; LLaVA-NeXT:
672x672, 5 crops, 2880 tokens plus 48 row newlines), or for Video-LLaVA one 8-frame video (8 x 257 = 2056
tokens, each frame a crop); budgets are visual tokens per image (per video). Everything family-specific
(inputs, placeholder token, vision tower, FLOPs of tower and projector) comes from the model's adapter.

Timing protocol: ``warmup`` untimed runs, then ``repeats`` timed runs whose median is reported; inputs
rotate over ``variants`` different random images and prompts. CUDA times come from CUDA events, CPU
times from ``time.perf_counter``. Methods that need a Learnable Pruning Module get ``lpm="random"``:
an untrained LPM costs exactly what a trained one does.
"""

from __future__ import annotations

import importlib

from . import command as _command  # noqa: F401  (registers the `bench` subcommand; imports nothing heavy)

# name -> the submodule defining it, loaded on first use (PEP 562): building the CLI's parser imports no torch
_LAZY = {
    "ARCHS": ".archs", "arch_adapter": ".archs", "arch_config": ".archs", "build_arch": ".archs",
    "FLOPS_CONVENTION": ".flops", "_output_cache": ".flops", "analytic_flops": ".flops", "analytic_kv_bytes": ".flops",
    "flops_breakdown": ".flops", "kv_cache_bytes": ".flops",
    "_make_inputs": ".inputs",
    "plot_results": ".report", "speed_table": ".report", "write_results": ".report",
    "_plan": ".run", "cpu_name": ".run", "run_bench": ".run",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'learnpruner.bench' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "ARCHS",
    "FLOPS_CONVENTION",
    "arch_config",
    "arch_adapter",
    "build_arch",
    "flops_breakdown",
    "analytic_flops",
    "analytic_kv_bytes",
    "kv_cache_bytes",
    "run_bench",
    "speed_table",
    "write_results",
    "plot_results",
    "_make_inputs",
    "cpu_name",
    "_plan",
    "_output_cache",
]
