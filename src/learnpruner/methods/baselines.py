"""The baselines: ``none`` (no pruning, the reference) and ``random`` (uniform random pruning after the encoder)."""

from __future__ import annotations

from ..budget import Schedule
from .base import Method, register


def _none_schedule(tokens: int, n: int, num_layers: int, options: dict) -> Schedule:
    return Schedule(n=n, num_layers=num_layers)


def _random_schedule(tokens: int, n: int, num_layers: int, options: dict) -> Schedule:
    r1 = options["r1"] if options.get("r1") is not None else tokens
    return Schedule(n=n, num_layers=num_layers, r1=r1 if r1 < n else None)


register(Method(
    name="none",
    summary='keeps every token (the reference)',
    paper='-',
    stage1=None,
    stage2=None,
    schedule_fn=_none_schedule,
    doc="No pruning: every visual token is kept. The reference every method is compared with.",
))

register(Method(
    name="random",
    summary='after the encoder: uniformly at random (seeded per item)',
    paper='baseline',
    stage1="random",
    stage2=None,
    schedule_fn=_random_schedule,
    options=("seed", "r1"),
    doc=(
        "Random pruning after the vision encoder: keep ``tokens`` visual tokens chosen uniformly at random "
        "(default seed 0; each forward draws new indices from the seeded generator). Every LLM layer sees "
        "the same ``tokens``, so the average equals the budget. No official code: positions original by default "
        "(positions='contiguous' renumbers the kept tokens); both budget conventions are the same."
    ),
))
