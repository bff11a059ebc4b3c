"""The engine: runs a pruned forward pass through an adapted model.

Data path, once (one file per step)::

    pixels -> adapter.encode: features (n_i per image) and the visual layout          (layout.py)
    -> STAGE 1 rule per group of equal-count images -> kept rows -> projector (kept rows only)
    -> placeholders of dropped tokens leave the sequence; kept tokens keep their
       original position ids and order, or are renumbered (option positions)          (sequence.py)
    -> LLM layers [0, K) -> scores from layer K-1's queries and keys                   (readout.py)
    -> STAGE 2 rule -> kept -> LLM layers [K, L) on the shorter sequence -> logits     (prefill.py)
    -> decode steps over layer groups that cached different lengths                    (decode.py, decode_static.py)

Pruned tokens are physically removed from the hidden states (no masking in place of removal). With
a KV cache, layers before K cache the stage-1 set and layers from K on the stage-2 set; the
compacted padding masks travel on the cache object (a ``CacheSegments``) so that every decode step attends to exactly
the kept tokens.
"""

from .forward import pruned_forward
from .layout import STRUCTURE, TEXT, Layout, VisualFeatures, instruction_rows
from .sequence import call_layer, causal_mask
from .state import SEGMENTS_ATTR, CacheSegments, ItemStats, PruneState, Stats, fixed_selection, item_keys

__all__ = [
    "PruneState",
    "Stats",
    "ItemStats",
    "pruned_forward",
    "fixed_selection",
    "item_keys",
    "Layout",
    "VisualFeatures",
    "instruction_rows",
    "TEXT",
    "STRUCTURE",
    "SEGMENTS_ATTR",
    "CacheSegments",
    "call_layer",
    "causal_mask",
]
