"""learnpruner: LearnPruner (arXiv 2604.23950) and peer visual-token pruning for Hugging Face VLMs.

>>> import learnpruner
>>> learnpruner.apply(model, method="learnpruner", tokens=64, lpm="path/to/lpm")
>>> model.generate(**inputs)
>>> learnpruner.stats(model).tokens_per_layer

The names below load on first use (PEP 562), so ``import learnpruner`` and the ``learnpruner`` command's
``--help``, ``--version`` and argument errors answer without importing torch or transformers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "apply": ".api", "remove": ".api", "stats": ".api", "is_pruned": ".api",
    "resolve": ".plan", "Plan": ".plan",
    "fixed_selection": ".engine", "Stats": ".engine",
    "LearnablePruningModule": ".lpm", "LPMConfig": ".lpm",
    "METHODS": ".methods", "get_method": ".methods",
}

__all__ = ["apply", "remove", "stats", "resolve", "Plan", "is_pruned", "fixed_selection", "Stats",
           "LearnablePruningModule", "LPMConfig", "METHODS", "get_method", "__version__"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'learnpruner' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
