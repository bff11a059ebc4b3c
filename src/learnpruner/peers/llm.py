"""Peer methods that prune inside the LLM (LLM rules): DART, PyramidDrop, SparseVLM.

Each method is an LLM rule (registered with :func:`learnpruner.rules.llm_rule`) plus a budget mapping
to a :class:`~learnpruner.budget.Schedule`. The selection logic lives in small tensor functions
(:func:`dart_keep`, :func:`text_raters`, :func:`sparsevlm_scores`, :func:`dpc_knn_merge`,
:func:`recycle_counts`) so that it can be tested on hand-built tensors; the rules only adapt them to
the engine's :class:`LLMContext`.
"""

from __future__ import annotations

from .dart import dart_keep, dart_paper_count
from .llm_common import lambda_schedule, staged_schedule
from .pyramiddrop import pdrop_paper_lambda
from .sparsevlm import (
    dpc_knn_merge,
    recycle_counts,
    sparsevlm_paper_counts,
    sparsevlm_scores,
    sparsevlm_select,
    text_raters,
)

__all__ = [
    "dart_keep",
    "dart_paper_count",
    "text_raters",
    "dpc_knn_merge",
    "recycle_counts",
    "sparsevlm_select",
    "sparsevlm_scores",
    "sparsevlm_paper_counts",
    "pdrop_paper_lambda",
    "staged_schedule",
    "lambda_schedule",
]
