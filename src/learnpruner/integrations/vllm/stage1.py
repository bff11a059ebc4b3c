"""Stage 1 inside vLLM: the package's own stage-1 rules and LPM, run where vLLM embeds an image.

vLLM cannot run stage 2 (its paged KV cache shares one block table across layers, so every layer holds the
same tokens), so a budget here is the number of visual tokens each image keeps in every layer: the stage-1
count. LearnPruner runs as its stage 1 (the ``lpm-only`` rule: the LPM with its diversity fill). Peers that
need only the tower's features run as in the transformers engine (DivPrune, CDPruner without a text tower,
random); those that read the encoder's [CLS] attention (VisionZip, VisPruner, cls-only) or the prompt's
text, or that drop tokens inside the LLM (FastV, PyramidDrop, SparseVLM, DART, ...), are refused by name.

Every check is the one :func:`learnpruner.apply` makes (method, options, budget), and every selection is the
registered rule itself (:data:`learnpruner.rules.STAGE1_RULES`), imported, never copied.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ...lpm import LearnablePruningModule
from ...methods import get_method
from ...rules import STAGE1_RULES, VisionContext

__all__ = ["Stage1Spec", "Stage1Runner", "STAGE1_ONLY", "CONFIG_KEY", "spec_of", "attach", "select_kept",
           "serving_line", "guarded"]

CONFIG_KEY = "learnpruner"  # the key of hf_overrides (and so of the HF config) holding the spec
# what a method runs as in vLLM, where it differs from its name
STAGE1_ONLY = {"learnpruner": "lpm-only"}


@dataclass
class _Projector:
    """What a stage-1 rule may ask of the family in vLLM: the projector (the rules that read projected tokens)."""

    project: Any


@dataclass
class Stage1Spec:
    """A validated stage-1 setting for one family: ``method`` (as asked), ``runs_as`` (the method that runs: stage 1
    only), the budget (``tokens`` or ``ratio``), the caller's options (``lpm`` among them) and ``plan``, the method
    resolved by :func:`learnpruner.resolve` (its LPM deferred to engine start: placeholder counts never depend on
    it), which gives every count."""

    method: str
    runs_as: str
    family: str
    tokens: int | None
    ratio: float | None
    options: dict = field(default_factory=dict)
    plan: Any = None

    @property
    def positions(self) -> str:
        from . import POSITIONS

        return POSITIONS[self.family]

    @classmethod
    def from_config(cls, spec: dict | None, family: str = "llava") -> Stage1Spec | None:
        """The spec in an HF config's ``learnpruner`` entry (from ``hf_overrides``), checked; None when absent."""
        if spec is None:
            return None
        if not isinstance(spec, dict):
            raise ValueError(f"hf_overrides[{CONFIG_KEY!r}] must be a dict (learnpruner.integrations.vllm."
                             f"overrides builds it), got {type(spec).__name__}")
        known = {"method", "tokens", "ratio", "options"}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"hf_overrides[{CONFIG_KEY!r}] has unknown keys {unknown}; accepted: {sorted(known)}")
        return cls.check(spec.get("method", "learnpruner"), spec.get("tokens"), spec.get("ratio"),
                         dict(spec.get("options") or {}), family=family)

    @classmethod
    def check(cls, method: str, tokens: int | None = None, ratio: float | None = None,
              options: dict | None = None, family: str = "llava") -> Stage1Spec:
        """Validate as :func:`learnpruner.apply` does (through :func:`learnpruner.resolve`), plus what vLLM cannot
        run; ``ValueError`` naming it. The kept tokens' positions are the family's numbering in vLLM
        (:data:`~learnpruner.integrations.vllm.POSITIONS`: LLaVA's contiguous, the M-RoPE families' original 3-D
        ones); a ``positions`` option must name it."""
        from . import POSITIONS

        options = dict(options or {})
        m = get_method(method)
        runs_as = STAGE1_ONLY.get(m.name, m.name)
        rm = get_method(runs_as)
        if rm.stage2 is not None or rm.stage1 is None and rm.name != "none":
            raise ValueError(
                f"method {m.name!r} drops visual tokens inside the LLM, which vLLM cannot run (its paged KV cache "
                "gives every layer the same tokens); in vLLM run a stage-1 method: "
                f"{', '.join(supported_methods())}"
            )
        if rm.needs_cls:
            raise ValueError(
                f"method {m.name!r} reads the vision encoder's [CLS] attention, which vLLM's vision towers do not "
                f"return; in vLLM run: {', '.join(supported_methods())}"
            )
        if rm.name == "cdpruner" and (options.get("text_model") is not None or
                                      options.get("fallback", "uniform") != "uniform"):
            raise ValueError("cdpruner's text relevance (text_model=, fallback='instruction') reads the prompt, "
                             "which vLLM's image embedding step does not see; in vLLM cdpruner runs with "
                             "fallback='uniform' (the DPP on similarity alone)")
        positions = POSITIONS[family]
        if options.get("positions") not in (None, positions):
            how = ("numbers the kept tokens one after another" if positions == "contiguous" else
                   "keeps the kept tokens' original 3-D (M-RoPE) positions")
            raise ValueError(f"positions={options['positions']!r}: for this family vLLM {how}; only "
                             f"positions={positions!r} is available")
        if options.get("lpm") is not None and not isinstance(options["lpm"], str):
            options["lpm"] = os.fspath(options["lpm"])
        plan = cls._resolve(family, runs_as, tokens, ratio, {**options, "positions": positions}, defer_lpm=True)
        return cls(m.name, runs_as, family, plan.tokens, plan.ratio, options, plan)

    @staticmethod
    def _resolve(family, runs_as, tokens, ratio, options, **kwargs):
        from ...plan import resolve

        opts = {k: v for k, v in options.items() if k in get_method(runs_as).options}
        return resolve(family, runs_as, tokens, ratio=ratio, **kwargs, **opts)

    # --- per image -----------------------------------------------------------------------------------
    def kept(self, n: int) -> int:
        """Visual tokens an image of ``n`` tokens keeps (the placeholders vLLM schedules for it): the plan's stage-1
        count (cached per count by the plan)."""
        schedule = self.plan.schedule(n)
        return n if schedule.r1 is None else schedule.r1

    def needs_lpm(self) -> bool:
        return get_method(self.runs_as).needs_lpm

    def plan_for(self, lpm: LearnablePruningModule | None):
        """The plan with ``lpm`` (a module already loaded; None for methods without one)."""
        options = {**self.options, "positions": self.positions}
        if lpm is not None:
            options["lpm"] = lpm
        return self._resolve(self.family, self.runs_as, self.tokens, self.ratio, options)

    def engine_plan(self, model_path: str | os.PathLike | None, feature_dim: int, feature_layer,
                    num_layers: int | None = None):
        """The full plan at engine start: the spec's method with its LPM (``lpm=`` of the options, else the model
        folder's ``learnpruner-lpm/``) loaded and checked against the model as ``apply`` checks it, the options that
        LPM ships, and the served LLM's depth."""
        options = {**self.options, "positions": self.positions}
        return self._resolve(self.family, self.runs_as, self.tokens, self.ratio, options,
                             model_path=model_path, feature=(feature_dim, feature_layer), num_layers=num_layers)

    def describe(self) -> str:
        budget = f"tokens={self.tokens}" if self.ratio is None else f"ratio={self.ratio}"
        runs = f" (runs as {self.runs_as}: stage 1 only)" if self.runs_as != self.method else ""
        where = ("contiguous (vLLM's numbering)" if self.positions == "contiguous" else
                 "original (kept tokens keep their 3-D M-RoPE positions)")
        return f"{self.method}{runs}, {budget} visual tokens per item in every layer; positions {where}"


class Stage1Runner:
    """Runs the plan's rule on the features of a batch of images of one token count (``[g, n, d]``)."""

    def __init__(self, spec: Stage1Spec, lpm, project):
        """``lpm``: the engine plan (:meth:`Stage1Spec.engine_plan`), or the loaded LPM (None without one) to plan
        with."""
        from ...plan import Plan

        plan = lpm if isinstance(lpm, Plan) else spec.plan_for(lpm)
        self.spec, self.plan = spec, plan
        method = get_method(plan.method)
        self.lpm = plan.module.eval() if plan.module is not None else None
        self.generator = torch.Generator().manual_seed(plan.options["seed"]) if method.stage1 == "random" else None
        self.projector = _Projector(project)
        self.rule = STAGE1_RULES.get(method.stage1 or "")

    @torch.no_grad()
    def select(self, features: torch.Tensor, k: int | None = None, coords: torch.Tensor | None = None
               ) -> torch.Tensor | None:
        """``[g, k]`` ascending kept indices of each image (``features``: ``[g, n, d]``), or None to keep all; ``k``
        (default: the spec's count for ``n`` tokens) for a part of an item with its own share; ``coords`` (``[g, n,
        2]`` or ``[n, 2]``): each token's place in its crop or frame grid, as the adapter gives it."""
        g, n = features.shape[:2]
        k = self.spec.kept(n) if k is None else k
        if self.rule is None or k >= n:
            return None
        empty = torch.zeros(0, 0, dtype=torch.long, device=features.device)
        ctx = VisionContext(features, self.plan.options, self.projector, None, empty, empty, empty, lpm=self.lpm,
                            generator=self.generator)
        if coords is not None:
            ctx.coords = (coords if coords.dim() == 3 else coords[None].expand(g, -1, -1)).to(features.device)
        selection = self.rule(ctx, k)
        if selection.replace is not None:
            raise ValueError(f"{self.spec.runs_as} merges tokens, which the vLLM integration does not run")
        return selection.kept


def supported_methods() -> list[str]:
    """The methods the vLLM integration runs (stage 1 only, no [CLS] attention)."""
    from ...methods import METHODS

    out = []
    for name in sorted(METHODS):
        m = get_method(STAGE1_ONLY.get(name, name))
        if m.stage2 is None and (m.stage1 is not None or m.name == "none") and not m.needs_cls:
            out.append(name)
    return out


def spec_of(config, family: str) -> Stage1Spec:
    """The checked spec of a served model's HF ``config`` (its ``learnpruner`` entry, from ``hf_overrides``) for
    ``family``. Checked once per distinct entry: the processor asks for it on every request."""
    entry = getattr(config, CONFIG_KEY, None)
    if entry is None:
        raise ValueError(f"learnpruner's vLLM architectures need hf_overrides[{CONFIG_KEY!r}] "
                         "(learnpruner.integrations.vllm.overrides builds it)")
    try:
        key = json.dumps(entry, sort_keys=True)
    except TypeError:  # not JSON data: from_config names what is wrong
        return Stage1Spec.from_config(entry, family)
    return _checked_spec(key, family)


@functools.lru_cache(maxsize=32)
def _checked_spec(entry_json: str, family: str) -> Stage1Spec:
    return Stage1Spec.from_config(json.loads(entry_json), family)


def attach(model, vllm_config, family: str, feature_dim: int, feature_layer, project) -> None:
    """Give a vLLM ``model`` its spec (``model.learnpruner``), its engine plan (the LPM loaded: ``feature_dim`` and
    ``feature_layer`` are the rows stage 1 reads) and a stage-1 runner; ``project`` maps kept feature rows to LLM
    embeddings (the rules that read projected tokens call it). Logs one line saying what the engine prunes: the
    family, the method, the budget and the LPM."""
    config = vllm_config.model_config.hf_config
    spec = spec_of(config, family)
    depth = getattr(config.get_text_config(), "num_hidden_layers", None)
    plan = spec.engine_plan(vllm_config.model_config.model, feature_dim, feature_layer, depth)
    model.learnpruner = spec
    model._stage1 = Stage1Runner(spec, plan, project)
    model.__dict__["_lpm"] = model._stage1.lpm  # not a submodule: vLLM's weight loading never sees it
    from vllm.logger import init_logger

    init_logger("vllm.learnpruner").info("%s", serving_line(spec, plan))  # vLLM's handlers show "vllm.*"


def serving_line(spec: Stage1Spec, plan) -> str:
    """The one line an engine logs at start: what it prunes, in which family, at which budget, with which LPM."""
    from ...plan import describe_lpm

    which = "no LPM" if plan.lpm is None else f"LPM: {describe_lpm(plan.lpm)}"
    return f"learnpruner: serving {spec.family} with {spec.describe()}; {which}"


def guarded(stock: type) -> type:
    """vLLM's ``stock`` model class, unchanged but for one check at engine start: a config holding a learnpruner
    entry (``hf_overrides``) without naming learnpruner's architecture is refused, never served unpruned in silence.
    :func:`~learnpruner.integrations.vllm.register` registers it under the stock architecture's own name."""

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs) -> None:
        if getattr(vllm_config.model_config.hf_config, CONFIG_KEY, None) is not None:
            raise ValueError(
                f"hf_overrides holds a {CONFIG_KEY!r} entry but its architectures do not name learnpruner's, so "
                f"vLLM would serve {stock.__name__} unpruned: add the architectures entry "
                "(learnpruner.integrations.vllm.overrides(family, method, tokens) builds both), or drop the "
                f"{CONFIG_KEY!r} entry to serve the model unpruned")
        stock.__init__(self, vllm_config=vllm_config, prefix=prefix, **kwargs)

    return type(stock.__name__, (stock,), {"__init__": __init__, "__module__": __name__,
                                           "__qualname__": stock.__qualname__, "__doc__": stock.__doc__})


def select_kept(model, features: torch.Tensor, k: int | None = None, coords: torch.Tensor | None = None
                ) -> torch.Tensor | None:
    """``[g, k]``: stage 1's kept indices of ``features`` (``[g, n, d]``, one item each, or one part of an item
    keeping ``k``; ``coords`` each token's grid place, :class:`~learnpruner.engine.layout.VisualFeatures`), None to
    keep all."""
    if model._lpm is not None:
        model._lpm.to(features.device, features.dtype)
    return model._stage1.select(features, k, coords)
