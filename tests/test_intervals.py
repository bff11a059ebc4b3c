"""Confidence intervals and paired comparisons in eval results (issue "Accuracy evidence")."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from learnpruner import evaluation as ev
from learnpruner.cli import main
from learnpruner.hub import load
from learnpruner.intervals import bootstrap_interval, mcnemar_exact, paired


def test_bootstrap_interval_is_seeded_and_covers_the_normal_approximation():
    rng = np.random.default_rng(1)
    x = (rng.random(1200) < 0.8).astype(float)
    lo, hi = bootstrap_interval(x)
    assert (lo, hi) == bootstrap_interval(x)  # seeded
    se = math.sqrt(x.mean() * (1 - x.mean()) / len(x))
    assert abs((hi - lo) - 2 * 1.96 * se) < 0.006 and lo < x.mean() < hi
    with pytest.raises(ValueError, match="at least one item"):
        bootstrap_interval([])


def test_mcnemar_exact_matches_the_binomial_tail():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)  # two-sided: 2 * (1/2)^6
    assert mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)


def test_mcnemar_exact_with_thousands_of_discordant_items():
    """A large split gives more than 1023 discordant pairs (random against a pruning method on 6000 items): the
    p-value is still computed (it underflowed 2.0 ** n before), symmetric, and 1 for an even split."""
    assert mcnemar_exact(1500, 1500) == 1.0
    assert mcnemar_exact(2100, 300) == mcnemar_exact(300, 2100) == 0.0  # below the smallest double
    p = mcnemar_exact(1060, 940)  # a normal approximation gives about 0.0073
    assert 0.005 < p < 0.01


def test_a_known_difference_is_a_win_and_none_is_level():
    rng = np.random.default_rng(0)
    base = rng.random(1000) < 0.7
    better = base | (rng.random(1000) < 0.3)  # right wherever base is, and on about 30% of the others
    pr = paired(better, base)
    assert pr.difference > 0.05 and pr.low > 0 and pr.verdict == "A better" and pr.p_value < 1e-6
    assert pr.only_b == 0 and pr.only_a == int((better & ~base).sum())
    noise = paired(base, base)
    assert noise.difference == 0 and noise.verdict == "level" and noise.p_value == 1.0
    flips = base.copy()
    flips[np.flatnonzero(base)[:6]] = False  # six items lost, six others won: no difference
    flips[np.flatnonzero(~base)[:6]] = True
    swapped = paired(flips, base)
    assert swapped.difference == 0 and swapped.low < 0 < swapped.high and swapped.verdict == "level"
    assert (swapped.only_a, swapped.only_b, swapped.p_value) == (6, 6, 1.0)
    with pytest.raises(ValueError, match="same items"):
        paired([True, False], [True])


def test_eval_records_intervals_and_paired_comparisons(tmp_path, monkeypatch, capsys):
    import learnpruner
    from learnpruner.methods import METHODS, Method

    # three stand-in methods that prune nothing themselves (their answers are fixed above)
    base = METHODS["random"]
    for name in ("good", "same", "bad"):
        monkeypatch.setitem(METHODS, name, Method(**{**base.__dict__, "name": name}))
    model, processor = load("tiny-random-llava")
    monkeypatch.setattr(learnpruner, "stats", lambda m: None)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"id": str(i), "image": "a.png", "question": "q",
                                                          "answer": "blue"}) + "\n" for i in range(1, 41)))
    fake = {"good": 30, "same": 30, "bad": 10, "none": 40}

    def answer(model, processor, items, max_new_tokens, device):
        name = model._learnpruner.method.name if learnpruner.is_pruned(model) else "none"
        return ["blue" if int(it.id) <= fake[name] else "red" for it in items]

    monkeypatch.setattr(ev.runner, "answer_batch", answer)
    items = ev.load_items(str(tmp_path / "d.jsonl"))
    recs = ev.evaluate(model, processor, items, ["none", "good", "same", "bad"], [64], tmp_path / "out",
                       progress=False)
    by = {r["method"]: r for r in recs}
    assert by["good"]["accuracy"] == 0.75 and by["good"]["ci"][0] < 0.75 < by["good"]["ci"][1]
    assert by["good"]["paired"]["bad@64"]["verdict"] == "A better"
    assert by["good"]["paired"]["same@64"]["verdict"] == "level"
    assert by["good"]["paired"]["same@64"]["ci"] == [0.0, 0.0]
    assert by["bad"]["paired"]["none@64"]["verdict"] == "B better"
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["method"]: r.get("paired", {}).keys() for r in saved}["good"] >= {"bad@64", "same@64", "none@64"}
    table = ev.markdown_table(recs)
    assert "75.0 [" in table and "| 64 | bad | good | -50.0 |" in table and "good better" in table
    assert "| 64 | same | good | +0.0 | [+0.0, +0.0] | 1 | level |" in table
    # the compare command, from the saved predictions
    assert main(["compare", "good", "bad", "--out", str(tmp_path / "out"), "--json", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "| 64 | good | bad | 40 | 75.0 | 25.0 | +50.0 |" in out and "good better" in out
    assert json.loads((tmp_path / "c.json").read_text())[0]["verdict"] == "A better"
    assert main(["compare", "good", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "| good | same |" in out and "| good | none |" in out and "| good | bad |" in out


def test_compare_refuses_cells_over_different_data(tmp_path, monkeypatch, capsys):
    import learnpruner

    model, processor = load("tiny-random-llava")
    monkeypatch.setattr(ev.runner, "answer_batch", lambda m, p, items, *a: ["blue"] * len(items))
    monkeypatch.setattr(learnpruner, "stats", lambda m: None)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    for name, n in (("a.jsonl", 4), ("b.jsonl", 6)):
        (tmp_path / name).write_text("".join(json.dumps({"id": f"x{i}", "image": "a.png", "question": "q",
                                                         "answer": "blue"}) + "\n" for i in range(n)))
    out = tmp_path / "out"
    ev.evaluate(model, processor, ev.load_items(str(tmp_path / "a.jsonl")), ["random"], [64], out, progress=False)
    ev.evaluate(model, processor, ev.load_items(str(tmp_path / "b.jsonl")), ["divprune"], [64], out, progress=False)
    with pytest.raises(ValueError, match=r"different data \(4 items, data \w+ against 6 items"):
        ev.compare_cells(out, "random", "divprune", 64)
    assert main(["compare", "random", "divprune", "--out", str(out)]) == 2
    assert "different data" in capsys.readouterr().err
    assert main(["compare", "random", "vispruner", "--out", str(out)]) == 2
    assert "no answered cell vispruner@64" in capsys.readouterr().err


def test_compare_in_the_paper_convention_reads_average_only_methods_from_their_average_cells(tmp_path, monkeypatch,
                                                                                          capsys):
    """LearnPruner has no paper schedule of its own (both conventions run the same): ``compare --budget paper``
    pairs its average cell with FastV's paper cell; FastV's average cell is not read as its paper one."""
    import learnpruner

    model, processor = load("tiny-random-llava")
    monkeypatch.setattr(learnpruner, "stats", lambda m: None)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"id": str(i), "image": "a.png", "question": "q",
                                                          "answer": "blue"}) + "\n" for i in range(1, 41)))
    fake = {("learnpruner", "average"): 30, ("fastv", "paper"): 10, ("fastv", "average"): 20, ("none", "average"): 40,
            ("none", "paper"): 40}

    def answer(model, processor, items, max_new_tokens, device):
        state = model._learnpruner
        right = fake[(state.method.name, state.budget)]
        return ["blue" if int(it.id) <= right else "red" for it in items]

    monkeypatch.setattr(ev.runner, "answer_batch", answer)
    items = ev.load_items(str(tmp_path / "d.jsonl"))
    out = tmp_path / "out"
    ev.evaluate(model, processor, items, ["none", "learnpruner", "fastv"], [32], out, progress=False,
                method_options={"learnpruner": {"lpm": "random"}})
    ev.evaluate(model, processor, items, ["none", "fastv"], [32], out, progress=False, budget="paper")
    pair = ev.compare_cells(out, "learnpruner", "fastv", 32, budget="paper")
    assert (pair["accuracy_a"], pair["accuracy_b"], pair["verdict"]) == (0.75, 0.25, "A better")
    # the one unpruned cell (last recorded by the paper run) serves both conventions
    for budget in ("average", "paper"):
        assert ev.compare_cells(out, "learnpruner", "none", 32, budget=budget)["accuracy_b"] == 1.0
    only_average = tmp_path / "only-average"
    ev.evaluate(model, processor, items, ["learnpruner", "fastv"], [32], only_average, progress=False,
                method_options={"learnpruner": {"lpm": "random"}})
    with pytest.raises(ValueError, match=r"no answered cell fastv@32 \(paper budgets\)"):
        ev.compare_cells(only_average, "learnpruner", "fastv", 32, budget="paper")
    assert main(["compare", "learnpruner", "--out", str(out), "--budget", "paper"]) == 0
    printed = capsys.readouterr().out
    assert "| 32 | learnpruner | fastv | 40 | 75.0 | 25.0 | +50.0 |" in printed


def test_test_large_split_is_deterministic_and_apart_from_test_and_val():
    from learnpruner.testbed.shapes import SPLIT_SIZES, generate_item

    assert SPLIT_SIZES["test-large"] >= 5000
    a, b = generate_item("test-large", 7), generate_item("test-large", 7)
    assert a.question == b.question and a.image.tobytes() == b.image.tobytes()
    for split in ("test", "val"):
        assert generate_item(split, 7).image.tobytes() != a.image.tobytes()
    items = ev.load_items("shapesvqa:test-large", 3)
    assert [it.id for it in items] == ["test-large-0", "test-large-1", "test-large-2"]
    with pytest.raises(ValueError, match=r"no split 'large'; accepted: shapesvqa:val, shapesvqa:test, "):
        ev.load_items("shapesvqa:large")
    with pytest.raises(ValueError, match=r"the test-large split has 6000 items; got n=6001"):
        ev.load_items("shapesvqa:test-large", 6001)
