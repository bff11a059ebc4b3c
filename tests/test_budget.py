"""Budget arithmetic: schedules, their rounding edges, and budgets a method cannot reach."""

from __future__ import annotations

import pytest

import learnpruner
from learnpruner.budget import UnreachableBudget, single_drop, tokens_for, two_stage
from learnpruner.hub import load


def test_single_drop_refuses_the_budget_whose_drop_would_keep_nothing():
    """At 144 of 576 tokens with a drop at layer 2 of 8, the first two layers alone spend the budget: r rounds
    to 0, which must be refused (naming the lowest budget), not kept as an empty image."""
    with pytest.raises(UnreachableBudget, match=r"at least 145 visual tokens"):
        single_drop(144, 576, 8, 2, "fastv")
    s = single_drop(145, 576, 8, 2, "fastv")
    assert s.drops == ((2, 1),) and s.per_layer() == [576, 576, 1, 1, 1, 1, 1, 1]


def test_tokens_for_rounds_a_ratio_to_the_nearest_count_and_never_to_zero():
    assert tokens_for(9, None, 0.3) == 3  # 2.7
    assert tokens_for(10, None, 0.25) == 2  # 2.5 rounds half to even
    assert tokens_for(9, None, 0.01) == 1
    assert tokens_for(576, 64, None) == 64


def test_a_budget_whose_schedule_averages_something_else_is_refused():
    """LearnPruner at tokens=1 keeps r1 = 3 and r2 = 1 (the 3 : 1 split cannot go lower): 2.0 per layer, which
    must never be shown as a 1-token cell; rounding slack (64 -> 111/37 = 64.75 on 32 layers) is accepted."""
    m = learnpruner.get_method("learnpruner")
    with pytest.raises(UnreachableBudget, match=r"reaches 2\.0"):
        m.schedule(1, 576, 8, {"layer": 4})
    assert m.schedule(64, 576, 32, {}).average == pytest.approx(64.75)
    assert two_stage(64, 576, 32, 12).r1 == 111
    assert m.schedule(1, 576, 8, {"layer": 4, "r1": 3, "r2": 1}).average == 2.0  # explicit counts: as asked
    model, _ = load("tiny-random-llava")
    with pytest.raises(UnreachableBudget, match="cannot average 1 visual tokens"):
        learnpruner.apply(model, "learnpruner", tokens=1, lpm="random")
    assert not learnpruner.is_pruned(model)
