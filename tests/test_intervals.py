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
from learnpruner.intervals import accuracy_interval, mcnemar_exact, paired, wilson_interval


def test_wilson_interval_matches_the_normal_approximation_on_many_items_and_stays_open_at_the_edges():
    rng = np.random.default_rng(1)
    x = (rng.random(1200) < 0.8).astype(float)
    lo, hi = accuracy_interval(x)
    se = math.sqrt(x.mean() * (1 - x.mean()) / len(x))
    assert abs((hi - lo) - 2 * 1.96 * se) < 0.002 and lo < x.mean() < hi
    lo, hi = accuracy_interval([1] * 50)  # all right: no zero-width interval
    assert hi == 1.0 and lo == pytest.approx(0.9287, abs=1e-4)
    assert wilson_interval(0, 1) == (0.0, pytest.approx(0.7935, abs=1e-4))
    with pytest.raises(ValueError, match="at least one item"):
        accuracy_interval([])


def test_intervals_refuse_nan_and_values_other_than_0_and_1():
    for bad in ([1, float("nan")], [1, 0.5], [2, 0], [1, None]):
        with pytest.raises(ValueError, match="must be 0/1"):
            paired(bad, [1, 1])
        with pytest.raises(ValueError, match="must be 0/1"):
            accuracy_interval(bad)
    assert paired([True, False], [1, 0]).difference == 0.0  # booleans are 0/1


def test_small_or_unanimous_paired_comparisons_are_never_a_win():
    """A win needs an interval that excludes zero AND the McNemar test: one item, three items, or 50 items that
    both methods answered alike never crown a winner, and their intervals keep a width."""
    one = paired([1], [0])
    assert one.verdict == "level" and one.low < 0 < one.high and one.p_value == 1.0
    three = paired([1, 1, 1], [0, 0, 0])
    assert three.verdict == "level" and three.p_value == 0.25
    same = paired([1] * 50, [1] * 50)
    assert same.verdict == "level" and same.low < 0 < same.high and same.high - same.low > 0.05
    many = paired([1] * 9 + [0] * 11, [0] * 20)  # nine items only A answered: p = 2 / 512
    assert many.verdict == "A better" and many.low > 0


def test_the_paired_interval_covers_the_true_difference_at_its_level():
    """Newcombe's interval keeps about 95% coverage on 60 paired items (10,000 simulated comparisons)."""
    rng = np.random.default_rng(0)
    for pa, pb, rho in ((0.8, 0.75, 0.5), (0.9, 0.9, 0.7), (0.6, 0.5, 0.2)):
        hits = 0
        for _ in range(2000):
            z = rng.random(60)
            a = z < pa
            b = np.where(rng.random(60) < rho, z < pb, rng.random(60) < pb)
            pr = paired(a, b)
            hits += pr.low <= pa - pb <= pr.high
        assert 0.93 <= hits / 2000 <= 0.99, (pa, pb, rho, hits / 2000)


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
    lo, hi = by["good"]["paired"]["same@64"]["ci"]  # identical answers: level, with an interval of some width
    assert lo < 0 < hi and hi - lo > 0.05
    assert by["bad"]["paired"]["none@64"]["verdict"] == "B better"
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["method"]: r.get("paired", {}).keys() for r in saved}["good"] >= {"bad@64", "same@64", "none@64"}
    table = ev.markdown_table(recs)
    assert "75.0 [" in table and "| 64 | bad | good | -50.0 |" in table and "good better" in table
    assert "| 64 | same | good | +0.0 | [-4.4, +4.4] | 1 | level |" in table
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
    assert "'vispruner' has no answered cell" in capsys.readouterr().err


def test_compare_in_the_paper_convention_reads_average_only_methods_from_their_average_cells(tmp_path, monkeypatch,
                                                                                          capsys):
    """LearnPruner has no paper schedule of its own (both conventions run the same): ``compare --budget paper``
    pairs its average cell with FastV's paper cell; FastV's average cell is not read as its paper one. At 192 tokens
    both of FastV's cells are answerable on the tiny model (at 32 its average cell is unreachable, and the check would
    hold whatever compare read)."""
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
    ev.evaluate(model, processor, items, ["none", "learnpruner", "fastv"], [192], out, progress=False,
                method_options={"learnpruner": {"lpm": "random"}})
    ev.evaluate(model, processor, items, ["none", "fastv"], [192], out, progress=False, budget="paper")
    pair = ev.compare_cells(out, "learnpruner", "fastv", 192, budget="paper")
    assert (pair["accuracy_a"], pair["accuracy_b"], pair["verdict"]) == (0.75, 0.25, "A better")
    # the one unpruned cell (last recorded by the paper run) serves both conventions
    for budget in ("average", "paper"):
        assert ev.compare_cells(out, "learnpruner", "none", 192, budget=budget)["accuracy_b"] == 1.0
    only_average = tmp_path / "only-average"
    ev.evaluate(model, processor, items, ["learnpruner", "fastv"], [192], only_average, progress=False,
                method_options={"learnpruner": {"lpm": "random"}})
    with pytest.raises(ValueError, match=r"no answered cell fastv@192 \(paper budgets\)"):
        ev.compare_cells(only_average, "learnpruner", "fastv", 192, budget="paper")
    assert main(["compare", "learnpruner", "--out", str(out), "--budget", "paper"]) == 0
    printed = capsys.readouterr().out
    assert "| 192 | learnpruner | fastv | 40 | 75.0 | 25.0 | +50.0 |" in printed


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
