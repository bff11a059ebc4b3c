"""The resolved plan: the one place a method, a budget, its options and its LPM become a schedule.

:func:`resolve` turns what a caller asks (a method, ``tokens=`` or ``ratio=``, a budget convention, options) into a
:class:`Plan`: every option of the method with its default filled in and where it came from (the caller, the LPM's
``lpm.json``, or the method's declared default), the LPM with its SHA-256, the budget mode, and
:meth:`Plan.schedule` for an item of ``n`` visual tokens. ``learnpruner.apply``, the vLLM plugin, ``eval``,
``train``, ``calibrate`` and ``bench`` all build one, and nothing else maps a budget to a schedule; ``stats(model)
.plan`` returns the one a model runs, and every eval cell stores :meth:`Plan.as_dict` (a rerun compares it, so two
LPMs at the same path, or two layers, never mix in one cell).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from .budget import BUDGETS, Schedule, UnreachableBudget, check_budget, check_ratio, check_tokens, tokens_for
from .lpm import LearnablePruningModule, LPMConfig
from .methods import get_method

__all__ = ["Plan", "resolve", "BUDGET_MODES", "DEFAULT_TOKENS", "SOURCES"]

BUDGET_MODES = (*BUDGETS, "adaptive")  # how a budget is read: see learnpruner.apply
DEFAULT_TOKENS = 64
SOURCES = ("caller", "lpm.json", "default")


@dataclass(frozen=True, eq=False)
class Plan:
    """A method resolved for one model family: immutable, and all a run's answers depend on besides the weights.

    ``options``: every option of the method (``lpm`` excepted), resolved; ``sources``: for each, ``"caller"``,
    ``"lpm.json"`` (shipped with the LPM) or ``"default"``. ``lpm``: ``{"path", "sha256"}`` of the LPM file, or
    ``{"random": seed}``, or ``{"module": True}`` for one passed in memory (None: the method has none); ``module``
    the LPM itself. ``budget``: ``"average"``, ``"paper"`` or ``"adaptive"`` (then ``threshold`` is the calibrated
    keep-probability and schedules follow the average convention).
    """

    method: str
    family: str
    num_layers: int
    tokens: int | None
    ratio: float | None
    budget: str
    options: MappingProxyType
    sources: MappingProxyType
    stage1_unit: str
    lpm: MappingProxyType | None = None
    threshold: float | None = None
    module: LearnablePruningModule | None = field(default=None, repr=False)
    _schedules: dict = field(default_factory=dict, repr=False)

    @property
    def convention(self) -> str:
        """The convention schedules are read in (an adaptive budget is an average one)."""
        return "average" if self.budget == "adaptive" else self.budget

    def budget_for(self, n: int) -> int:
        """The budget of an item of ``n`` visual tokens: ``tokens``, or ``max(1, round(ratio n))``."""
        return tokens_for(n, self.tokens, self.ratio)

    def schedule(self, n: int) -> Schedule:
        """The schedule of an item of ``n`` visual tokens (cached per ``n``); ``UnreachableBudget`` naming the lowest
        budget when the method cannot meet it for such an item."""
        if n not in self._schedules:
            m = get_method(self.method)
            self._schedules[n] = m.schedule(self.budget_for(n), n, self.num_layers, dict(self.options),
                                            self.convention)
        return self._schedules[n]

    def as_dict(self) -> dict:
        """The plan as JSON data (what an eval cell records and compares on a rerun)."""
        def plain(v):
            if isinstance(v, (str, int, float, bool, type(None))):
                return v
            if isinstance(v, (tuple, list)):
                return [plain(x) for x in v]
            return repr(v)

        # a method whose paper uses the average convention runs the same plan under "paper": recorded as one
        same = self.budget == "paper" and get_method(self.method).paper_fn is None
        return {"method": self.method, "family": self.family, "num_layers": self.num_layers, "tokens": self.tokens,
                "ratio": self.ratio, "budget": "average" if same else self.budget, "stage1_unit": self.stage1_unit,
                "options": {k: plain(v) for k, v in self.options.items()}, "sources": dict(self.sources),
                "lpm": None if self.lpm is None else dict(self.lpm), "threshold": self.threshold}

    def describe(self) -> str:
        budget = f"tokens={self.tokens}" if self.ratio is None else f"ratio={self.ratio}"
        lpm = "" if self.lpm is None else f", LPM {describe_lpm(self.lpm)}"
        return f"{self.method} at {budget} ({self.budget} convention){lpm}"


def describe_lpm(ref) -> str:
    if ref is None:
        return "none"
    if "random" in ref:
        return f"random (untrained, seed {ref['random']})"
    if ref.get("module"):
        return "passed as a module"
    return f"{ref['path']} (sha256 {ref['sha256'][:12]})"


def _lpm_from(spec, model_path, family: str, feature: tuple[int, Any] | None, num_tokens: int | None, seed: int,
              folder: str = "learnpruner-lpm"):
    """``(module, ref)``: the LPM a plan reads, from a path, a module, ``"random"`` or the model folder's own
    (``folder`` inside it: the method's :attr:`~learnpruner.methods.Method.lpm_folder`)."""
    if spec is None:
        default = Path(model_path or "") / folder
        if model_path and (default / "lpm.json").is_file():
            spec = default
        else:
            raise ValueError(
                "this method needs a Learnable Pruning Module: pass lpm=PATH (a folder written by `learnpruner "
                "train`), lpm=<LearnablePruningModule>, or lpm='random' for an untrained one"
                + (f" (the model folder {model_path!r} ships no {folder}/)" if model_path else ""))
    if isinstance(spec, str) and spec == "random":
        if feature is None:
            return None, MappingProxyType({"random": seed})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = LearnablePruningModule(LPMConfig(feature_dim=feature[0], family=family,
                                                      feature_layer=feature[1], num_tokens=num_tokens))
        return module, MappingProxyType({"random": seed})
    if isinstance(spec, (str, os.PathLike)):
        module = LearnablePruningModule.load(spec)
        return module, MappingProxyType(dict(module.source))
    if isinstance(spec, LearnablePruningModule):
        ref = dict(spec.source) if spec.source else {"module": True}
        return spec, MappingProxyType(ref)
    raise TypeError(f"lpm must be a path, a LearnablePruningModule or 'random', got {type(spec).__name__}")


def resolve(model_or_family, method: str = "learnpruner", tokens: int | None = None, *, ratio: float | None = None,
            budget: str = "average", stage1_unit: str | None = None, num_layers: int | None = None,
            model_path: str | os.PathLike | None = None, feature: tuple[int, Any] | None = None,
            uniform_count: int | None = None, defer_lpm: bool = False, **options) -> Plan:
    """The :class:`Plan` of ``method`` at a budget for a model (a transformers instance) or a family name.

    With a model, the family, the LLM's depth, the LPM's expected features and the model folder (where the default
    LPM lives) come from its adapter. With a family name give ``num_layers`` where the method drops inside the LLM,
    ``feature=(width, layer)`` to check (or build) an LPM, and ``model_path`` for the default LPM; vLLM's plugin
    resolves this way. Every check :func:`learnpruner.apply` makes is made here: the method, the budget and its
    convention, each option (name and value), the LPM against the family and the feature layer, and the schedule at
    the family's nominal item (``uniform_count``: the count every item has, so an unreachable budget is refused now;
    families whose items have their own counts meet it per item at the forward). ``defer_lpm``: the LPM is not
    loaded (``plan.lpm`` is ``{"deferred": path or None}``): vLLM's prompt processor counts placeholders with such a
    plan, and its engine resolves the full one, with the LPM, at start.
    """
    m = get_method(method)
    adapter = None
    if isinstance(model_or_family, nn.Module):
        from .adapters import adapter_for

        adapter = adapter_for(model_or_family)
        family = adapter.family
        num_layers = adapter.text_config.num_hidden_layers
        model_path = getattr(model_or_family.config, "_name_or_path", "") or None
        feature = (adapter.feature_dim(), adapter.feature_layer())
        uniform_count = adapter.num_visual_tokens() if adapter.uniform_token_count else None
        adapter.check_method(m)
    elif isinstance(model_or_family, str):
        family = model_or_family
    else:
        raise TypeError(f"resolve takes a transformers model instance or a family name, got "
                        f"{type(model_or_family).__name__}")
    if tokens is not None and ratio is not None:
        raise ValueError(f"give tokens= or ratio=, not both (got tokens={tokens!r}, ratio={ratio!r})")
    ratio = check_ratio(ratio) if ratio is not None else None
    tokens = check_tokens(tokens if tokens is not None else DEFAULT_TOKENS) if ratio is None else None
    if not isinstance(budget, str) or budget not in BUDGET_MODES:
        raise ValueError(f"budget must be one of {', '.join(repr(b) for b in BUDGET_MODES)} (average visual tokens "
                         "per LLM layer, the label of each method's published configuration, or a per-image count "
                         f"the LPM decides), got {budget!r}")
    if budget != "adaptive":
        check_budget(budget)
    if stage1_unit not in (None, "image", "crop"):
        raise ValueError(f"stage1_unit must be 'image' or 'crop', got {stage1_unit!r}")
    given = m.check_options(options)
    if adapter is not None:
        adapter.check_options(m, given)
    lpm_spec = given.pop("lpm", None)
    depth = num_layers if num_layers is not None else 32
    module, ref = None, None
    if m.needs_lpm and defer_lpm:
        ref = MappingProxyType({"deferred": None if lpm_spec is None else
                                (lpm_spec if isinstance(lpm_spec, str) else os.fspath(lpm_spec))})
    elif m.needs_lpm:
        seed = int(given.get("seed", 0))
        n_nominal = adapter.num_visual_tokens() if adapter is not None else None
        module, ref = _lpm_from(lpm_spec, model_path, family, feature, n_nominal, seed, m.lpm_folder)
        if module is not None and feature is not None:
            module.check_compatible(family, *feature)
        elif module is not None and module.config.family != family:
            raise ValueError(f"this LPM was trained for model family {module.config.family!r}, but the model is "
                             f"{family!r}")
    from .adaptive import lpm_options

    shipped = lpm_options(module, m) if module is not None else {}
    resolved, sources = m.defaults(depth), {}
    for k in resolved:
        if k in given:
            resolved[k], sources[k] = given[k], "caller"
        elif k in shipped:
            resolved[k], sources[k] = m.specs[k].validate(shipped[k]), "lpm.json"
        else:
            sources[k] = "default"
    threshold = None
    if budget == "adaptive":
        from .adaptive import adaptive_threshold

        threshold = adaptive_threshold(m, module, tokens, ratio)
    plan = Plan(method=m.name, family=family, num_layers=depth, tokens=tokens, ratio=ratio, budget=budget,
                options=MappingProxyType(resolved), sources=MappingProxyType(sources),
                stage1_unit=stage1_unit or m.stage1_unit, lpm=ref, threshold=threshold, module=module)
    n = uniform_count if uniform_count is not None else (adapter.num_visual_tokens() if adapter else 576)
    try:  # early: the options, and the budget where every item has n tokens
        plan.schedule(n)
    except UnreachableBudget:
        if uniform_count is not None:
            raise
        # items with their own counts (n is nominal): each item meets its budget, or is refused naming its count,
        # at the forward; here only the options are checked (at the full budget no schedule drops anything)
        m.schedule(n, n, depth, dict(resolved), plan.convention)
        plan._schedules.clear()
    return plan
