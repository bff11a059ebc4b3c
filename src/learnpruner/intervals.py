"""Uncertainty of accuracy figures: bootstrap intervals over items and paired comparisons of two methods.

A cell's accuracy is a mean over items; its 95% interval is the percentile bootstrap over those items
(seeded, so a rerun prints the same interval). Two methods evaluated on the same items are compared item by
item: the interval of the difference comes from resampling items (each resample keeps both methods' answers to
an item together), and the exact McNemar test counts the items only one of them got right. A difference is a
win only where its interval excludes zero; otherwise the two are "level".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["BOOTSTRAP", "LEVEL", "bootstrap_interval", "Paired", "paired", "mcnemar_exact", "verdict"]

BOOTSTRAP = 2000  # resamples
LEVEL = 0.95


def _resample_means(values: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = len(values)
    means = np.empty(n_boot)
    for start in range(0, n_boot, 256):  # bounded memory: 256 resamples of n items at a time
        idx = rng.integers(0, n, size=(min(256, n_boot - start), n))
        means[start:start + len(idx)] = values[idx].mean(axis=1)
    return means


def bootstrap_interval(values: Sequence[float], n_boot: int = BOOTSTRAP, level: float = LEVEL,
                       seed: int = 0) -> tuple[float, float]:
    """``(low, high)``: the percentile bootstrap interval of the mean of ``values`` (e.g. 0/1 per item)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("no values: an interval needs at least one item")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    means = _resample_means(v, n_boot, seed)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: ``only_a`` items only A got right, ``only_b`` only B (binomial, p=1/2)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / (1 << n)  # exact integers: 2.0 ** n overflows past 1023
    return min(1.0, 2.0 * tail)


@dataclass(frozen=True)
class Paired:
    """A paired comparison of A and B on the same ``n`` items (accuracies as fractions)."""

    n: int
    accuracy_a: float
    accuracy_b: float
    difference: float  # A - B
    low: float
    high: float
    only_a: int  # items only A answered right
    only_b: int
    p_value: float  # exact McNemar

    @property
    def verdict(self) -> str:
        return verdict(self.low, self.high)

    def as_dict(self) -> dict:
        return {"n": self.n, "accuracy_a": self.accuracy_a, "accuracy_b": self.accuracy_b,
                "difference": self.difference, "ci": [self.low, self.high], "only_a": self.only_a,
                "only_b": self.only_b, "mcnemar_p": self.p_value, "verdict": self.verdict}


def verdict(low: float, high: float) -> str:
    """``"A better"`` / ``"B better"`` where the interval of A - B excludes zero, else ``"level"``."""
    return "A better" if low > 0 else "B better" if high < 0 else "level"


def paired(a: Sequence[bool], b: Sequence[bool], n_boot: int = BOOTSTRAP, level: float = LEVEL,
           seed: int = 0) -> Paired:
    """Compare two methods' per-item correctness on the same items, in the same order."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired comparison needs the same items for both methods, got {x.shape} and {y.shape}")
    low, high = bootstrap_interval(x - y, n_boot, level, seed)
    only_a, only_b = int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())
    return Paired(len(x), float(x.mean()), float(y.mean()), float((x - y).mean()), low, high, only_a, only_b,
                  mcnemar_exact(only_a, only_b))
