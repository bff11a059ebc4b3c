"""Model-family adapters: everything family-specific lives in the family's own files.

A family is an adapter module here (its :class:`Adapter` subclass, decorated with :func:`register_adapter`), the
benchmark's view of it (``<family>_bench.py``: a :class:`~learnpruner.bench.geometry.BenchFamily` subclass, which
registers itself) and, where vLLM serves it, a serving file in :mod:`learnpruner.integrations.vllm` named by the
adapter's :attr:`Adapter.served`. Every module of this package is imported here, so adding a family edits no list.
"""

from __future__ import annotations

import importlib
import pkgutil

from torch import nn

from . import base as _base
from .base import ADAPTERS, Adapter, Served, register_adapter

__all__ = ["Adapter", "ADAPTERS", "Served", "adapter_for", "families_of", "register_adapter"]

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    importlib.import_module(f"{__name__}.{_info.name}")  # each family module registers its adapter


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter that handles ``model``; ``TypeError`` naming the supported classes otherwise. An adapter naming
    the model's own class wins over one that names a base class of it."""
    registered = _base.ADAPTERS  # read at call time (a test may swap the list)
    exact = [cls for cls in registered if type(model).__name__ in cls.model_classes]
    for cls in exact or [cls for cls in registered if cls.matches(model)]:
        return cls(model)
    supported = ", ".join(name for a in registered for name in a.model_classes)
    raise TypeError(f"learnpruner does not support {type(model).__name__}; supported model classes: {supported}")


def families_of(method) -> list[str]:
    """The model families (adapter ``family`` names) a registered method runs on."""
    return [a.family for a in _base.ADAPTERS if a.has_cls or not method.needs_cls]
