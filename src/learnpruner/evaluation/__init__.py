"""Accuracy of pruning methods: every method x budget on one dataset, resumable.

``learnpruner eval`` answers each question greedily with the pruned model and scores exact match
(after lowercasing and stripping punctuation; any of ``answers`` counts). Predictions are appended
to ``DIR/preds/<method>@<tokens>.jsonl`` one batch at a time, so an interrupted run resumes where
it stopped without recomputing or losing results (a torn last line is cut before appending). Each
prediction carries a fingerprint of its item (id, question, answers, qtype, image): a cell made with
another model, other method options or for other data is refused, not mixed. ``DIR/.lock`` keeps a
second eval off a folder in use. ``DIR/results.json`` (every cell in ``DIR``, each with the run that
made it) and ``DIR/accuracy.png`` are rewritten atomically after every cell.
"""

from __future__ import annotations

from . import runner
from .data import EvalItem, is_correct, load_items, normalize
from .report import compare_cells, markdown_table, paired_table, summarize
from .runner import evaluate

__all__ = ["EvalItem", "load_items", "normalize", "is_correct", "evaluate", "summarize", "markdown_table",
           "paired_table", "compare_cells", "runner"]
