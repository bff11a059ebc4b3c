"""learnpruner: LearnPruner (arXiv 2604.23950) and peer visual-token pruning for Hugging Face VLMs.

>>> import learnpruner
>>> learnpruner.apply(model, method="learnpruner", tokens=64, lpm="path/to/lpm")
>>> model.generate(**inputs)
>>> learnpruner.stats(model).tokens_per_layer
"""

from . import peers  # noqa: E402,F401  (registers the peer methods)
from .api import apply, is_pruned, remove, stats
from .engine import Stats, fixed_selection
from .lpm import LearnablePruningModule, LPMConfig
from .methods import METHODS, get_method
from .plan import Plan, resolve

__version__ = "0.1.0"

__all__ = [
    "apply",
    "remove",
    "stats",
    "resolve",
    "Plan",
    "is_pruned",
    "fixed_selection",
    "Stats",
    "LearnablePruningModule",
    "LPMConfig",
    "METHODS",
    "get_method",
    "__version__",
]
