import os
import sys

sys.path.insert(0, os.path.dirname(__file__))


import pytest  # noqa: E402

# the quick subset (`pytest -m quick`, under 3 minutes on a 2-core CPU): the engine's parity harness, the rules and
# methods, the plan, the intervals, learnpruner-set, the CLI
QUICK = {"test_engine.py", "test_rules.py", "test_plan.py", "test_intervals.py", "test_learnpruner_set.py",
         "test_cli.py", "test_peers_vision.py", "test_budget.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in QUICK:
            item.add_marker(pytest.mark.quick)


@pytest.fixture
def always_blue(monkeypatch):
    """``evaluate`` answers "blue" to everything (no model forward) and records the ids asked."""
    from learnpruner import evaluation as ev

    asked = []

    def answer(model, processor, items, max_new_tokens, device):
        asked.extend(it.id for it in items)
        return ["blue"] * len(items)

    monkeypatch.setattr(ev.runner, "answer_batch", answer)
    return asked
