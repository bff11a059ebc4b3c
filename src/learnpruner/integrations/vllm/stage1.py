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
from pathlib import Path
from typing import Any

import torch

from ...budget import check_ratio, check_tokens, tokens_for
from ...lpm import LearnablePruningModule
from ...methods import get_method
from ...rules import STAGE1_RULES, VisionContext

__all__ = ["Stage1Spec", "Stage1Runner", "STAGE1_ONLY", "CONFIG_KEY", "spec_of", "attach", "select_kept"]

CONFIG_KEY = "learnpruner"  # the key of hf_overrides (and so of the HF config) holding the spec
# what a method runs as in vLLM, where it differs from its name
STAGE1_ONLY = {"learnpruner": "lpm-only"}
DEFAULT_TOKENS = 64


@dataclass
class _State:
    """What a stage-1 rule reads of the engine's state (``options``, ``lpm``, ``generator``, ``adapter``)."""

    options: dict
    lpm: LearnablePruningModule | None
    generator: torch.Generator | None
    adapter: Any  # has ``project(features)``: the model's projector


@dataclass
class _Projector:
    project: Any


@dataclass
class Stage1Spec:
    """A validated stage-1 setting: ``method`` (as asked), ``rule`` (the stage-1 rule that runs), the budget
    (``tokens`` or ``ratio``) and the method's options (``lpm`` among them)."""

    method: str
    runs_as: str
    tokens: int | None
    ratio: float | None
    options: dict = field(default_factory=dict)
    positions: str = "contiguous"

    @classmethod
    def from_config(cls, spec: dict | None, positions: str = "contiguous") -> Stage1Spec | None:
        """The spec in an HF config's ``learnpruner`` entry (from ``hf_overrides``), checked; None when absent.
        ``positions``: how the family's vLLM model numbers the kept tokens (see :meth:`check`)."""
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
                         dict(spec.get("options") or {}), positions=positions)

    @classmethod
    def check(cls, method: str, tokens: int | None = None, ratio: float | None = None,
              options: dict | None = None, positions: str = "contiguous") -> Stage1Spec:
        """Validate as :func:`learnpruner.apply` does, plus what vLLM cannot run; ``ValueError`` naming it.
        ``positions`` is the family's numbering in vLLM: ``"contiguous"`` (LLaVA: vLLM numbers the kept tokens
        one after another) or ``"original"`` (M-RoPE families: the kept tokens keep their 3-D positions); a
        ``positions`` option must name it."""
        options = dict(options or {})
        m = get_method(method)
        runs_as = STAGE1_ONLY.get(m.name, m.name)
        rm = get_method(runs_as)
        if tokens is not None and ratio is not None:
            raise ValueError(f"give tokens= or ratio=, not both (got tokens={tokens!r}, ratio={ratio!r})")
        ratio = check_ratio(ratio) if ratio is not None else None
        tokens = check_tokens(tokens if tokens is not None else DEFAULT_TOKENS) if ratio is None else None
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
        if options.get("positions") not in (None, positions):
            how = ("numbers the kept tokens one after another" if positions == "contiguous" else
                   "keeps the kept tokens' original 3-D (M-RoPE) positions")
            raise ValueError(f"positions={options['positions']!r}: for this family vLLM {how}; only "
                             f"positions={positions!r} is available")
        lpm = options.pop("lpm", None)
        rm.check_options(options)
        n = 576  # any count: stage-1 schedules read only the budget (checked again per image)
        rm.schedule(tokens_for(n, tokens, ratio), n, 2, options)
        if lpm is not None:
            options["lpm"] = lpm if lpm == "random" else os.fspath(lpm)
        return cls(m.name, runs_as, tokens, ratio, options, positions)

    # --- per image -----------------------------------------------------------------------------------
    def kept(self, n: int) -> int:
        """Visual tokens an image of ``n`` tokens keeps (the placeholders vLLM schedules for it); computed once per
        count (a request stream holds few distinct sizes)."""
        counts = self.__dict__.setdefault("_kept", {})
        if n not in counts:
            if self.runs_as == "none":
                counts[n] = n
            else:
                schedule = get_method(self.runs_as).schedule(tokens_for(n, self.tokens, self.ratio), n, 2,
                                                             self._rule_options())
                counts[n] = n if schedule.r1 is None else schedule.r1
        return counts[n]

    def _rule_options(self) -> dict:
        return {k: v for k, v in self.options.items() if k != "lpm"}

    def needs_lpm(self) -> bool:
        return get_method(self.runs_as).needs_lpm

    def load_lpm(self, model_path: str | os.PathLike | None, family: str, feature_dim: int,
                 feature_layer) -> LearnablePruningModule | None:
        """The LPM the rule reads (``options["lpm"]``, else the model folder's ``learnpruner-lpm/``), checked
        against the model as ``apply`` checks it; None for rules without one."""
        if not self.needs_lpm():
            return None
        from ...lpm import LPMConfig

        path = self.options.get("lpm")
        if path == "random":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(self.options.get("seed", 0)))
                lpm = LearnablePruningModule(LPMConfig(feature_dim=feature_dim, family=family,
                                                       feature_layer=feature_layer))
        else:
            if path is None:
                default = Path(model_path or "") / "learnpruner-lpm"
                if not (default / "lpm.json").is_file():
                    raise ValueError(f"method {self.method!r} needs a Learnable Pruning Module: give lpm=PATH in "
                                     f"the overrides (the model folder {model_path!r} ships none)")
                path = default
            lpm = LearnablePruningModule.load(path)
        lpm.check_compatible(family, feature_dim, feature_layer)
        return lpm.eval()

    def describe(self) -> str:
        budget = f"tokens={self.tokens}" if self.ratio is None else f"ratio={self.ratio}"
        runs = f" (runs as {self.runs_as}: stage 1 only)" if self.runs_as != self.method else ""
        where = ("contiguous (vLLM's numbering)" if self.positions == "contiguous" else
                 "original (kept tokens keep their 3-D M-RoPE positions)")
        return f"learnpruner {self.method}{runs}, {budget} visual tokens per item in every layer; positions {where}"


class Stage1Runner:
    """Runs the spec's rule on the features of a batch of images of one token count (``[g, n, d]``)."""

    def __init__(self, spec: Stage1Spec, lpm: LearnablePruningModule | None, project):
        self.spec = spec
        seed = int(spec.options.get("seed", 0))
        generator = torch.Generator().manual_seed(seed) if get_method(spec.runs_as).stage1 == "random" else None
        from ...adaptive import lpm_options

        options = {**lpm_options(lpm, get_method(spec.runs_as)), **spec._rule_options()}  # as apply merges them
        self.state = _State(options, lpm, generator, _Projector(project))
        self.rule = STAGE1_RULES.get(get_method(spec.runs_as).stage1 or "")

    @torch.no_grad()
    def select(self, features: torch.Tensor, k: int | None = None) -> torch.Tensor | None:
        """``[g, k]`` ascending kept indices of each image (``features``: ``[g, n, d]``), or None to keep all; ``k``
        (default: the spec's count for ``n`` tokens) for a part of an item with its own share."""
        g, n = features.shape[:2]
        k = self.spec.kept(n) if k is None else k
        if self.rule is None or k >= n:
            return None
        empty = torch.zeros(0, 0, dtype=torch.long, device=features.device)
        ctx = VisionContext(features, self.state, None, empty, empty, empty)
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


def spec_of(config, positions: str = "contiguous") -> Stage1Spec:
    """The checked spec of a served model's HF ``config`` (its ``learnpruner`` entry, from ``hf_overrides``).
    Checked once per distinct entry: the processor asks for it on every request."""
    entry = getattr(config, CONFIG_KEY, None)
    if entry is None:
        raise ValueError(f"learnpruner's vLLM architectures need hf_overrides[{CONFIG_KEY!r}] "
                         "(learnpruner.integrations.vllm.overrides builds it)")
    try:
        key = json.dumps(entry, sort_keys=True)
    except TypeError:  # not JSON data: from_config names what is wrong
        return Stage1Spec.from_config(entry, positions=positions)
    return _checked_spec(key, positions)


@functools.lru_cache(maxsize=32)
def _checked_spec(entry_json: str, positions: str) -> Stage1Spec:
    return Stage1Spec.from_config(json.loads(entry_json), positions=positions)


def attach(model, spec: Stage1Spec, lpm: LearnablePruningModule | None, project) -> None:
    """Give a vLLM ``model`` its spec (``model.learnpruner``) and a stage-1 runner; ``project`` maps kept
    feature rows to LLM embeddings (the rules that read projected tokens call it)."""
    model.learnpruner = spec
    model._stage1 = Stage1Runner(spec, lpm, project)
    model.__dict__["_lpm"] = lpm  # not a submodule: vLLM's weight loading and checks never see it


def select_kept(model, features: torch.Tensor, k: int | None = None) -> torch.Tensor | None:
    """``[g, k]``: stage 1's kept indices of ``features`` (``[g, n, d]``, one item each, or one part of an item
    keeping ``k``), None to keep all."""
    if model._lpm is not None:
        model._lpm.to(features.device, features.dtype)
    return model._stage1.select(features, k)
