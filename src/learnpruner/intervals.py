"""Uncertainty of accuracy figures: intervals for a cell's accuracy and for the paired difference of two methods.

Every figure here is a proportion of items answered right, so the intervals are the score intervals made for
proportions, which stay honest where a resampling interval collapses (a handful of items, or a cell that is all
right or all wrong):

* a cell's accuracy: the Wilson score interval (Wilson, JASA 1927); 50 of 50 right gives [92.9, 100], not
  [100, 100];
* the difference between two methods answering the same items: Newcombe's hybrid score interval for paired
  proportions (Newcombe, Statistics in Medicine 1998, method 10), built from the two Wilson intervals and the
  correlation of the paired answers; one item answered right by A only gives [-12, 100], not [100, 100];
* the test: the exact McNemar test on the items only one of the two answered right.

A difference is called a win only where the interval excludes zero AND the McNemar test rejects "no difference"
at the same level; otherwise the two are "level". Inputs must be 0/1 (or booleans): NaN or any other value is
refused, naming it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

__all__ = ["LEVEL", "wilson_interval", "accuracy_interval", "Paired", "paired", "mcnemar_exact", "newcombe_paired",
           "check_binary"]

LEVEL = 0.95


def _z(level: float) -> float:
    if not (isinstance(level, (int, float)) and 0 < level < 1):
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    return NormalDist().inv_cdf(0.5 + level / 2)


def check_binary(values: Sequence, what: str = "values") -> np.ndarray:
    """``values`` as a 1-D float array of 0s and 1s; ``ValueError`` naming the first NaN or other value."""
    try:
        v = np.asarray(values, dtype=np.float64).reshape(-1) if len(values) else np.zeros(0)
    except (TypeError, ValueError):
        first = next((x for x in values if not isinstance(x, (bool, int, float, np.number))), None)
        raise ValueError(f"{what} must be 0/1 (right or wrong per item), got {first!r}") from None
    bad = ~np.isin(v, (0.0, 1.0))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{what} must be 0/1 (right or wrong per item), got {values[i]!r} at position {i}")
    return v


def wilson_interval(successes: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """``(low, high)``: the Wilson score interval of a proportion ``successes / n``."""
    if n <= 0:
        raise ValueError("no items: an interval needs at least one item")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, {n}], got {successes}")
    z = _z(level)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_interval(correct: Sequence, level: float = LEVEL) -> tuple[float, float]:
    """The Wilson interval of the accuracy of per-item correctness ``correct`` (0/1)."""
    v = check_binary(correct, "correctness")
    if v.size == 0:
        raise ValueError("no values: an interval needs at least one item")
    return wilson_interval(int(v.sum()), int(v.size), level)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: ``only_a`` items only A got right, ``only_b`` only B (binomial, p=1/2)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / (1 << n)  # exact integers: 2.0 ** n overflows past 1023
    return min(1.0, 2.0 * tail)


def newcombe_paired(both: int, only_a: int, only_b: int, neither: int, level: float = LEVEL) -> tuple[float, float]:
    """``(low, high)`` of ``p_A - p_B`` for paired 0/1 outcomes (Newcombe 1998, method 10): the Wilson limits of each
    method's accuracy combined with the phi correlation of the 2x2 table (0 where a margin is empty)."""
    n = both + only_a + only_b + neither
    if n <= 0:
        raise ValueError("no items: an interval needs at least one item")
    p1, p2 = (both + only_a) / n, (both + only_b) / n
    l1, u1 = wilson_interval(both + only_a, n, level)
    l2, u2 = wilson_interval(both + only_b, n, level)
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    phi = (both * neither - only_a * only_b) / math.sqrt(margins) if margins else 0.0
    dl1, du1, dl2, du2 = p1 - l1, u1 - p1, p2 - l2, u2 - p2
    delta = math.sqrt(max(0.0, dl1 ** 2 - 2 * phi * dl1 * du2 + du2 ** 2))
    eps = math.sqrt(max(0.0, du1 ** 2 - 2 * phi * du1 * dl2 + dl2 ** 2))
    d = p1 - p2
    return max(-1.0, d - delta), min(1.0, d + eps)


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
    level: float = LEVEL

    @property
    def verdict(self) -> str:
        """``"A better"`` / ``"B better"`` where the interval excludes zero and the McNemar test agrees at the same
        level, else ``"level"``."""
        significant = self.p_value < 1 - self.level
        if significant and self.low > 0:
            return "A better"
        if significant and self.high < 0:
            return "B better"
        return "level"

    def as_dict(self) -> dict:
        return {"n": self.n, "accuracy_a": self.accuracy_a, "accuracy_b": self.accuracy_b,
                "difference": self.difference, "ci": [self.low, self.high], "only_a": self.only_a,
                "only_b": self.only_b, "mcnemar_p": self.p_value, "verdict": self.verdict,
                "interval": "newcombe-paired"}


def paired(a: Sequence, b: Sequence, level: float = LEVEL) -> Paired:
    """Compare two methods' per-item correctness (0/1) on the same items, in the same order."""
    x, y = check_binary(a, "A's correctness"), check_binary(b, "B's correctness")
    if x.shape != y.shape:
        raise ValueError(f"paired comparison needs the same items for both methods, got {x.size} and {y.size}")
    if x.size == 0:
        raise ValueError("no items: a paired comparison needs at least one item")
    both = int(((x == 1) & (y == 1)).sum())
    only_a, only_b = int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())
    neither = int(x.size) - both - only_a - only_b
    low, high = newcombe_paired(both, only_a, only_b, neither, level)
    return Paired(int(x.size), float(x.mean()), float(y.mean()), float((x - y).mean()), low, high, only_a, only_b,
                  mcnemar_exact(only_a, only_b), level)
