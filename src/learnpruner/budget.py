"""Token budgets: the average number of visual tokens per LLM layer.

A budget ``T`` means the AVERAGE number of visual tokens each decoder layer processes (the
FLOPs-matched convention of the LearnPruner, FastV and SparseVLM papers). A method that keeps
``r1`` tokens in layers ``[0, K)`` and ``r2`` in ``[K, L)`` meets the budget when
``(K * r1 + (L - K) * r2) / L`` is (close to) ``T``.

That is the ``"average"`` convention (the default). The ``"paper"`` convention (``apply(...,
budget="paper")``) reads ``T`` as the label of each peer's published configuration instead: the
counts its official code keeps for that label (e.g. DART keeps ``T + 4`` tokens after layer 2, so its
"128" averages about 160 tokens per layer). Methods whose papers use the average convention
(LearnPruner, and every method that prunes after the vision encoder) map both conventions alike.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

__all__ = ["Schedule", "BUDGETS", "POSITIONS", "UnreachableBudget", "check_budget", "check_tokens", "check_ratio",
           "tokens_for", "split_evenly", "average", "default_layer", "two_stage", "single_drop", "describe"]

BUDGETS = ("average", "paper")  # how a budget T is read (see the module docstring)
POSITIONS = ("original", "contiguous")  # position ids of the tokens kept after a drop


class UnreachableBudget(ValueError):
    """A budget a method's schedule cannot reach for an item of its token count (e.g. below what a drop at layer
    K allows): the message names the lowest reachable budget. Families whose items have their own counts
    (Qwen-VL) meet it per item at the forward, as :func:`learnpruner.apply` cannot know the counts."""


@dataclass(frozen=True)
class Schedule:
    """How many visual tokens (per image) each part of the LLM sees.

    ``r1``: tokens kept by stage 1 (after the vision encoder), ``None`` when stage 1 keeps all.
    ``drops``: ``((layer, r), ...)`` drops inside the LLM, by increasing layer: from ``layer`` on,
    ``r`` tokens remain. Two-stage methods have one drop; PyramidDrop-style methods several.
    """

    n: int
    num_layers: int
    r1: int | None = None
    drops: tuple[tuple[int, int], ...] = ()

    def per_layer(self) -> list[int]:
        """Visual tokens per image each decoder layer processes under this schedule."""
        current = self.n if self.r1 is None else self.r1
        starts = dict(self.drops)
        counts = []
        for i in range(self.num_layers):
            if i in starts:
                current = min(current, starts[i])
            counts.append(current)
        return counts

    @property
    def r2(self) -> int | None:
        """Tokens kept by the first LLM drop (stage 2), or None."""
        return self.drops[0][1] if self.drops else None

    @property
    def layer(self) -> int | None:
        """Layer of the first LLM drop (stage 2), or None."""
        return self.drops[0][0] if self.drops else None

    @property
    def average(self) -> float:
        counts = self.per_layer()
        return sum(counts) / len(counts)

    @property
    def is_noop(self) -> bool:
        return all(c >= self.n for c in self.per_layer())


def check_budget(budget: object) -> str:
    """Validate a budget convention: ``"average"`` or ``"paper"``. Raises ``ValueError`` naming the bad value."""
    if not isinstance(budget, str) or budget not in BUDGETS:
        raise ValueError(
            f"budget must be one of {', '.join(repr(b) for b in BUDGETS)} (average visual tokens per LLM layer, or "
            f"the label of each method's published configuration), got {budget!r}"
        )
    return budget


def check_tokens(tokens: object) -> int:
    """Validate a budget: a positive integer. Raises ``ValueError`` naming the bad value."""
    if isinstance(tokens, bool) or not isinstance(tokens, numbers.Integral):
        if isinstance(tokens, float) and tokens.is_integer() and tokens > 0:
            return int(tokens)
        raise ValueError(
            f"tokens must be a positive integer (average visual tokens per LLM layer), got {tokens!r}"
        )
    if tokens <= 0:
        raise ValueError(f"tokens must be a positive integer (average visual tokens per LLM layer), got {tokens}")
    return int(tokens)


def check_ratio(ratio: object) -> float:
    """Validate a per-image fraction ``0 < ratio <= 1``. Raises ``ValueError`` naming the bad value."""
    ok = isinstance(ratio, numbers.Real) and not isinstance(ratio, bool) and 0.0 < float(ratio) <= 1.0
    if not ok:
        raise ValueError(
            f"ratio must be a number in (0, 1] (the fraction of each image's visual tokens kept, as an average "
            f"per LLM layer), got {ratio!r}"
        )
    return float(ratio)


def tokens_for(n: int, tokens: int | None, ratio: float | None) -> int:
    """The budget of an image with ``n`` visual tokens: ``tokens``, or ``max(1, round(ratio * n))``."""
    return tokens if ratio is None else max(1, round(ratio * n))


def average(r1: int, r2: int, layer: int, num_layers: int) -> float:
    """Average visual tokens per layer for ``r1`` tokens in ``[0, layer)`` and ``r2`` after."""
    return (layer * r1 + (num_layers - layer) * r2) / num_layers


def default_layer(num_layers: int, layer_of_32: int) -> int:
    """A layer index given for a 32-layer LLM, scaled to ``num_layers`` (at least 1, below L)."""
    return max(1, min(num_layers - 1, round(layer_of_32 * num_layers / 32)))


def two_stage(tokens: int, n: int, num_layers: int, layer: int, ratio: float = 3.0) -> Schedule:
    """LearnPruner's schedule: ``r1 : r2 = ratio : 1`` with an average of ``tokens``.

    ``r2 = round(T L / (ratio K + L - K))`` and ``r1 = max(ratio * r2, round((T L - (L - K) r2) / K))``:
    the ratio is kept and rounding slack goes to stage 1. This reproduces the paper's
    64 -> 111/37 and 32 -> 55/18 for LLaVA-1.5-7B (L = 32, K = 12). When ``r1`` would exceed ``n``,
    stage 1 keeps everything and ``r2`` absorbs the budget. A budget of at least ``n`` is a no-op.
    """
    if tokens >= n:
        return Schedule(n=n, num_layers=num_layers)
    k, tl = layer, tokens * num_layers
    r2 = max(1, round(tl / (ratio * k + num_layers - k)))
    r1 = max(round(ratio * r2), round((tl - (num_layers - k) * r2) / k))
    if r1 >= n:
        r2 = round((tl - k * n) / (num_layers - k))
        return Schedule(n=n, num_layers=num_layers, drops=((layer, min(r2, n)),) if r2 < n else ())
    return Schedule(n=n, num_layers=num_layers, r1=r1, drops=((layer, min(r2, r1)),))


def single_drop(tokens: int, n: int, num_layers: int, layer: int, method: str) -> Schedule:
    """One drop at ``layer`` (FastV-style): all ``n`` tokens before it, ``r`` after, average ``tokens``.

    ``r = round((T L - K n) / (L - K))``. Budgets below ``K n / L`` cannot be reached without
    moving the drop earlier; they raise ``ValueError`` naming the smallest reachable budget.
    """
    if tokens >= n:
        return Schedule(n=n, num_layers=num_layers)
    r = round((tokens * num_layers - layer * n) / (num_layers - layer))
    if r < 1:
        lowest = -(-(layer * n + (num_layers - layer)) // num_layers)
        earlier = " or an earlier layer (layer=1)" if layer > 1 else ""
        raise UnreachableBudget(
            f"{method} prunes at LLM layer {layer} of {num_layers}, so its average budget is at least "
            f"{lowest} visual tokens for {n}-token images; got tokens={tokens}. Use tokens >= {lowest}{earlier}."
        )
    return Schedule(n=n, num_layers=num_layers, drops=((layer, r),))


def describe(schedule: Schedule) -> str:
    """One line: the visual tokens each run of layers sees and the average, e.g.
    ``"576 (layers 0-1), 196 (2-31); average 219.8"``."""
    counts = schedule.per_layer()
    runs, start = [], 0
    for i in range(1, len(counts) + 1):
        if i == len(counts) or counts[i] != counts[start]:
            where = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
            runs.append(f"{counts[start]} ({'layers ' if not runs else ''}{where})")
            start = i
    return f"{', '.join(runs)}; average {schedule.average:.1f}"


def split_evenly(total: int, sizes: list[int], at_least: int = 0) -> list[int]:
    """``total`` spread as evenly as possible over parts of capacity ``sizes`` (earlier parts first). With
    ``at_least``, every part gets at least that many (or its whole capacity, if smaller), even when ``total`` is
    smaller than what that takes: a part is never left empty when the caller needs each one to hold a token."""
    share = [min(at_least, c) for c in sizes]
    left = max(0, min(total, sum(sizes)) - sum(share))
    while left:
        open_parts = [j for j, c in enumerate(sizes) if share[j] < c]
        base, extra = divmod(left, len(open_parts))
        for rank, j in enumerate(open_parts):
            add = min(sizes[j] - share[j], base + (rank < extra))
            share[j] += add
            left -= add
    return share
