"""Evaluation metrics, resume, the JSONL format, and the plot/overlay files."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from learnpruner import evaluation as ev
from learnpruner.demo import run_demo
from learnpruner.hub import load
from learnpruner.viz import overlay_kept, plot_accuracy

torch.set_num_threads(1)


def test_normalize_and_exact_match():
    assert ev.normalize("  Blue. ") == "blue"
    assert ev.is_correct("Yes!", ["yes"]) and not ev.is_correct("yes no", ["yes"])
    assert ev.is_correct("two", ["2", "two"])


def test_markdown_table_and_relative_accuracy():
    recs = ev.summarize([
        {"method": "none", "tokens": 576, "status": "ok", "accuracy": 0.8, "per_qtype": {"a": 0.8}},
        {"method": "random", "tokens": 64, "status": "ok", "accuracy": 0.4, "per_qtype": {"a": 0.4}},
        {"method": "fastv", "tokens": 64, "status": "unreachable", "reason": "x"},
        {"method": "dart", "tokens": 64, "status": "unreachable", "reason": "its budget is at least 73 visual tokens"},
        {"method": "cdpruner", "tokens": 64, "status": "ok", "accuracy": 0.6, "avg_tokens": 60.0},
        {"method": "divprune", "tokens": 64, "status": "ok", "accuracy": 0.6, "avg_tokens": 64.4},
    ])
    assert recs[1]["relative"] == pytest.approx(50.0)
    table = ev.markdown_table(recs)
    assert "| random | 40.0 (50.0%) |" in table and "| fastv | unreachable |" in table
    assert "| dart | unreachable (needs >= 73) |" in table
    assert "| cdpruner | 60.0 (75.0%) [reached 60.0] |" in table and "| divprune | 60.0 (75.0%) |" in table


@pytest.fixture(scope="module")
def tiny():
    return load("tiny-random-llava")


def _png_size(path):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def test_eval_writes_results_and_resumes_without_recomputing(tiny, tmp_path, monkeypatch):
    model, processor = tiny
    items = ev.load_items("shapesvqa", limit=3)
    opts = {"learnpruner": {"lpm": "random"}}
    calls = []
    real = ev.runner.answer_batch
    monkeypatch.setattr(ev.runner, "answer_batch", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    # interrupt the run during the second batch of learnpruner@64 (its first batch is already written)
    original = ev.runner.learnpruner.stats

    def stats_then_crash(m):
        if len(calls) == 4:
            raise KeyboardInterrupt
        return original(m)

    monkeypatch.setattr(ev.runner.learnpruner, "stats", stats_then_crash)
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(model, processor, items, ["none", "learnpruner"], [64, 32], tmp_path, batch_size=2,
                    method_options=opts, progress=False)
    assert not ev.runner.learnpruner.is_pruned(model)
    monkeypatch.setattr(ev.runner.learnpruner, "stats", original)
    before = (tmp_path / "preds" / "none@64.jsonl").read_text()
    partial = (tmp_path / "preds" / "learnpruner@64.jsonl").read_text().splitlines()
    assert len(partial) == 2
    calls.clear()
    recs = ev.evaluate(model, processor, items, ["none", "learnpruner"], [64, 32], tmp_path, batch_size=2,
                       method_options=opts, progress=False)
    # none@64 (3 items) and the first learnpruner batch (2 items) were not recomputed
    assert (tmp_path / "preds" / "none@64.jsonl").read_text() == before
    assert (tmp_path / "preds" / "learnpruner@64.jsonl").read_text().splitlines()[:2] == partial
    assert calls == [1, 2, 1]
    assert [(r["method"], r["tokens"], r["n"]) for r in recs] == [("none", 64, 3), ("learnpruner", 64, 3),
                                                                    ("learnpruner", 32, 3)]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert {"method", "tokens", "accuracy", "per_qtype"} <= set(saved[1])
    assert abs(saved[1]["avg_tokens"] - 64.75) < 1e-6
    assert _png_size(tmp_path / "accuracy.png") == (990, 528)


def test_resuming_a_cell_with_other_options_is_refused(tiny, tmp_path):
    model, processor = tiny
    items = ev.load_items("shapesvqa", limit=1)
    rand = {"learnpruner": {"lpm": "random"}}
    ev.evaluate(model, processor, items, ["learnpruner"], [64], tmp_path, method_options=rand, progress=False)
    from learnpruner import LearnablePruningModule, LPMConfig

    other = tmp_path.parent / f"{tmp_path.name}-lpm"
    LearnablePruningModule(LPMConfig(feature_dim=96, num_tokens=576)).save(other)  # another LPM
    with pytest.raises(ValueError, match="another --out"):
        ev.evaluate(model, processor, items, ["learnpruner"], [64], tmp_path,
                    method_options={"learnpruner": {"lpm": str(other)}}, progress=False)
    # the same setup resumes (nothing left to do), and the saved predictions are untouched
    before = (tmp_path / "preds" / "learnpruner@64.jsonl").read_text()
    ev.evaluate(model, processor, items, ["learnpruner"], [64], tmp_path, method_options=rand, progress=False)
    assert (tmp_path / "preds" / "learnpruner@64.jsonl").read_text() == before


def test_unreachable_budget_is_recorded(tiny, tmp_path):
    model, processor = tiny
    items = ev.load_items("shapesvqa", limit=1)
    recs = ev.evaluate(model, processor, items, ["fastv"], [32], tmp_path, progress=False)
    assert recs[0]["status"] == "unreachable" and "at least" in recs[0]["reason"]


def test_jsonl_items_and_bad_records(tmp_path):
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_text(
        json.dumps({"image": "a.png", "question": "q?", "answers": ["x", "y"], "qtype": "t"}) + "\n"
        + json.dumps({"image": "a.png", "question": "q2?", "answer": "z"}) + "\n")
    items = ev.load_items(str(tmp_path / "d.jsonl"))
    assert [(i.question, i.answers, i.qtype) for i in items] == [("q?", ["x", "y"], "t"), ("q2?", ["z"], "all")]
    assert items[0].pil().size == (20, 20)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "a.png"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: bad record"):
        ev.load_items(str(tmp_path / "bad.jsonl"))
    with pytest.raises(FileNotFoundError, match="no data at"):
        ev.load_items(str(tmp_path / "missing.jsonl"))


def test_plot_and_overlay_are_valid_pngs(tmp_path):
    plot_accuracy([{"method": "none", "tokens": 576, "status": "ok", "accuracy": 0.9},
                   {"method": "m", "tokens": 64, "status": "ok", "accuracy": 0.7},
                   {"method": "m", "tokens": 32, "status": "ok", "accuracy": 0.5}], tmp_path / "p.png")
    assert _png_size(tmp_path / "p.png") == (990, 528)
    img = Image.new("RGB", (336, 336), (200, 100, 50))
    overlay_kept(img, [("a", None, None), ("b", torch.arange(0, 576, 5), torch.arange(0, 576, 25))], 24,
                 tmp_path / "o.png", title="t")
    assert _png_size(tmp_path / "o.png") == (924, 528)


def test_demo_writes_one_overlay_per_image(tmp_path):
    lines = []
    paths = run_demo("tiny-random-llava", images=2, out_dir=str(tmp_path), print_fn=lines.append)
    assert [p.name for p in paths] == ["demo-0000.png", "demo-0001.png"]
    assert all(_png_size(p) == (1386, 528) for p in paths)  # three readable panels
    text = "\n".join(lines)
    assert "stage 1 kept 111, stage 2 kept 37" in text and "stage 1 kept 55, stage 2 kept 18" in text


def test_noop_budgets_reuse_the_reference_predictions(tiny, tmp_path, monkeypatch):
    model, processor = tiny
    items = ev.load_items("shapesvqa", limit=2)
    calls = []
    real = ev.runner.answer_batch
    monkeypatch.setattr(ev.runner, "answer_batch", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    recs = ev.evaluate(model, processor, items, ["random", "none"], [576, 64], tmp_path, progress=False)
    assert calls == [2, 2]  # none@576 and random@64; random@576 keeps every token and reuses none's answers
    cell = next(r for r in recs if r["method"] == "random" and r["tokens"] == 576)
    assert cell["n"] == 2 and "reused" in cell["reason"]
    assert cell["accuracy"] == next(r for r in recs if r["method"] == "none")["accuracy"]
