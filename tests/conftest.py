import os
import sys

sys.path.insert(0, os.path.dirname(__file__))


import pytest  # noqa: E402


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
