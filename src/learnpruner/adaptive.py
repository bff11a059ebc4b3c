"""Adaptive budgets: the LPM's own keep decisions set how many tokens each image keeps.

LearnPruner's abstract calls the method adaptive: an image with few informative regions needs fewer
tokens than a cluttered one. Under ``apply(..., budget="adaptive", tokens=T)`` stage 1 keeps, in every
image, the tokens whose LPM keep-probability exceeds a threshold ``t_T`` (at least one); stage 2 keeps the
same share of them as the fixed schedule's ``r2 / r1``. ``t_T`` is calibrated once on validation data so that
the average stage-1 count over the data equals the fixed schedule's ``r1`` (so the average budget over a
dataset is ``T``, while single images spend more or less), and it ships with the LPM (``lpm.json``,
``extra["adaptive_thresholds"]``): ``learnpruner calibrate``.

An LPM also ships the method options chosen with it on validation data (``extra["options"]``, e.g. the
stage-2 layer of the model it was trained for): :func:`save_lpm_options` writes them, and ``apply`` uses them
for every option the caller does not give (:func:`lpm_options`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from .utils import atomic_write

__all__ = ["THRESHOLDS", "OPTIONS", "calibrate", "save_thresholds", "save_lpm_options", "lpm_options",
           "adaptive_threshold"]

THRESHOLDS = "adaptive_thresholds"  # key in the LPM's lpm.json "extra": {"<tokens>": threshold}
OPTIONS = "options"  # key in the LPM's lpm.json "extra": method options validated with this LPM


def lpm_options(lpm, method) -> dict:
    """The options shipped with ``lpm`` that ``method`` accepts (the others are for other methods)."""
    shipped = lpm.config.extra.get(OPTIONS, {}) if lpm is not None else {}
    return {k: v for k, v in shipped.items() if k in method.options and k != "lpm"}


def adaptive_threshold(method, lpm, tokens: int | None, ratio: float | None) -> float:
    """The calibrated threshold for ``tokens`` shipped with ``lpm``; ``ValueError`` saying what is missing."""
    if lpm is None:
        raise ValueError(f"budget='adaptive' needs a method whose stage 1 is a Learnable Pruning Module "
                         f"(learnpruner, lpm-only); {method.name!r} has none")
    if tokens is None or ratio is not None:
        raise ValueError("budget='adaptive' takes tokens=T (the dataset average it was calibrated for), not ratio=")
    table = lpm.config.extra.get(THRESHOLDS, {})
    if str(tokens) not in table:
        have = ", ".join(sorted(table, key=int)) or "none"
        raise ValueError(f"this LPM has no adaptive threshold for tokens={tokens} (calibrated: {have}); run "
                         f"`learnpruner calibrate --model ... --tokens {tokens}` on validation data first")
    return float(table[str(tokens)])


@torch.no_grad()
def calibrate(model, lpm, batches: Iterable[dict], tokens: list[int], method: str = "learnpruner") -> dict[int, float]:
    """Thresholds ``{T: t}`` such that over the images of ``batches`` (processor outputs) the stage-1 counts
    ``max(1, #(p > t))`` add up to what the fixed schedule of ``method`` keeps at ``T`` (its ``r1``, or every
    token where stage 1 keeps all), with the options shipped with ``lpm`` (its stage-2 layer moves ``r1``)."""
    from .adapters import adapter_for
    from .plan import resolve

    ad = adapter_for(model)
    probs = []
    param = next(lpm.parameters())
    for batch in batches:
        inputs = {k: v.to(param.device) for k, v in batch.items() if k in ad.visual_inputs}
        visual = ad.encode(inputs.pop("pixel_values", None), input_ids=batch["input_ids"].to(param.device), **inputs)
        feats = visual.features if isinstance(visual.features, list) else list(visual.features)
        probs += [lpm(f.to(param.dtype)).float().cpu() for f in feats]
    if not probs:
        raise ValueError("calibration needs at least one image")
    out = {}
    for t in tokens:
        plan = resolve(model, method, t, lpm=lpm)  # the options the LPM ships (its stage-2 layer) move r1
        goal = 0
        for p in probs:
            r1 = plan.schedule(p.numel()).r1
            goal += p.numel() if r1 is None else r1
        lo, hi = 0.0, 1.0
        for _ in range(40):  # bisection: the kept count falls as the threshold rises
            mid = (lo + hi) / 2
            kept = sum(max(1, int((p > mid).sum())) for p in probs)
            lo, hi = (mid, hi) if kept > goal else (lo, mid)
        out[t] = (lo + hi) / 2
    return out


def _merge_extra(folder: str | os.PathLike, key: str, values: dict) -> Path:
    """Merge ``values`` into ``extra[key]`` of the ``lpm.json`` in ``folder`` (atomically); returns its path."""
    path = Path(folder) / "lpm.json"
    meta = json.loads(path.read_text())
    meta.setdefault("extra", {}).setdefault(key, {}).update(values)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
    return path


def save_thresholds(folder: str | os.PathLike, thresholds: dict[int, float]) -> Path:
    """Merge ``thresholds`` into the ``lpm.json`` of the LPM folder (atomically); returns its path."""
    return _merge_extra(folder, THRESHOLDS, {str(t): float(v) for t, v in thresholds.items()})


def save_lpm_options(folder: str | os.PathLike, options: dict) -> Path:
    """Ship method options with the LPM in ``folder`` (merged into its ``lpm.json``, atomically): ``apply`` uses
    them whenever the caller does not give that option. Values must be JSON numbers, strings or booleans."""
    bad = {k: v for k, v in options.items() if k == "lpm" or not isinstance(v, (int, float, str, bool))}
    if bad:
        raise ValueError(f"LPM options must be plain values (not 'lpm'), got {bad!r}")
    return _merge_extra(folder, OPTIONS, dict(options))
