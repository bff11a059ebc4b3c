"""Issue "Trust": eval never reports a wrong number silently, and the CLI fails in one clear line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

from learnpruner import evaluation as ev
from learnpruner.cli import main
from learnpruner.hub import load

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    return load("tiny-random-llava")


def _jsonl(folder, name, records, image="a.png"):
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20)).save(folder / image)
    path = folder / name
    path.write_text("".join(json.dumps({"image": image, **r}) + "\n" for r in records))
    return str(path)


def test_resume_refuses_predictions_made_for_other_data(tiny, tmp_path, always_blue):
    model, processor = tiny
    out = tmp_path / "out"
    first = _jsonl(tmp_path / "a", "d.jsonl", [{"question": f"q{i}?", "answer": "blue"} for i in range(4)])
    rec = ev.evaluate(model, processor, ev.load_items(first), ["random"], [64], out, progress=False)
    assert rec[0]["accuracy"] == 1.0
    # same ids (line numbers), same --out, but every answer differs: the saved predictions do not apply
    second = _jsonl(tmp_path / "b", "d.jsonl", [{"question": f"q{i}?", "answer": "zzz"} for i in range(4)])
    with pytest.raises(ValueError, match=r"different data.*another --out or delete") as e:
        ev.evaluate(model, processor, ev.load_items(second), ["random"], [64], out, progress=False)
    assert str(out) in str(e.value)
    # the same data resumes with nothing to recompute
    always_blue.clear()
    assert ev.evaluate(model, processor, ev.load_items(first), ["random"], [64], out, progress=False)[0]["n"] == 4
    assert always_blue == []


def test_a_torn_predictions_line_is_repaired_before_appending(tiny, tmp_path, always_blue):
    model, processor = tiny
    data = _jsonl(tmp_path, "d.jsonl", [{"question": f"q{i}?", "answer": "blue"} for i in range(4)])
    items = ev.load_items(data)
    ev.evaluate(model, processor, items, ["random"], [64], tmp_path / "out", batch_size=2, progress=False)
    preds = tmp_path / "out" / "preds" / "random@64.jsonl"
    lines = preds.read_text().splitlines(keepends=True)
    preds.write_text(lines[0] + lines[1] + lines[2][:15])  # killed while writing the third record
    always_blue.clear()
    rec = ev.evaluate(model, processor, items, ["random"], [64], tmp_path / "out", batch_size=2, progress=False)
    assert always_blue == ["3", "4"]
    assert rec[0]["n"] == 4
    assert [json.loads(line)["id"] for line in preds.read_text().splitlines()] == ["1", "2", "3", "4"]


def test_jsonl_string_answers_duplicate_ids_and_empty_files(tmp_path):
    one = _jsonl(tmp_path, "one.jsonl", [{"question": "q?", "answers": "blue"}])
    assert ev.load_items(one)[0].answers == ["blue"]
    dup = _jsonl(tmp_path, "dup.jsonl", [{"id": 7, "question": "a?", "answer": "x"},
                                         {"id": 8, "question": "b?", "answer": "x"},
                                         {"id": 7, "question": "c?", "answer": "x"}])
    with pytest.raises(ValueError, match=r"dup\.jsonl: id '7' appears on lines 1 and 3"):
        ev.load_items(dup)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl holds no records"):
        ev.load_items(str(tmp_path / "empty.jsonl"))


def test_a_missing_or_unreadable_image_names_its_line_id_and_path(tmp_path):
    data = _jsonl(tmp_path, "d.jsonl", [{"question": "a?", "answer": "x"},
                                        {"id": "b", "image": "gone.png", "question": "b?", "answer": "x"}])
    with pytest.raises(FileNotFoundError, match=r"d\.jsonl:2: item 'b': no image at .*gone\.png"):
        ev.load_items(data)
    (tmp_path / "broken.png").write_text("not a picture")
    data = _jsonl(tmp_path, "e.jsonl", [{"id": "c", "image": "broken.png", "question": "c?", "answer": "x"}])
    with pytest.raises(ValueError, match=r"e\.jsonl:1: item 'c': cannot read image .*broken\.png"):
        ev.load_items(data)[0].pil()


def test_results_merge_every_cell_in_out_and_name_their_run(tiny, tmp_path, always_blue):
    model, processor = tiny
    items = ev.load_items(_jsonl(tmp_path, "d.jsonl", [{"question": "q?", "answer": "blue"}]))
    ev.evaluate(model, processor, items, ["none"], [64], tmp_path / "out", progress=False)
    ev.evaluate(model, processor, items, ["random"], [64, 32], tmp_path / "out", progress=False)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [(r["method"], r["tokens"]) for r in saved] == [("none", 64), ("random", 64), ("random", 32)]
    runs = [r["run"] for r in saved]
    assert runs[0]["methods"] == ["none"] and runs[1]["methods"] == ["random"] and runs[1]["budgets"] == [64, 32]
    assert runs[0]["id"] != runs[1]["id"] == runs[2]["id"] and all(r["started"] for r in runs)
    assert saved[1]["relative"] == 100.0  # relative to the earlier run's `none`


def test_an_out_folder_in_use_is_locked(tiny, tmp_path, always_blue, monkeypatch):
    model, processor = tiny
    items = ev.load_items(_jsonl(tmp_path, "d.jsonl", [{"question": "q?", "answer": "blue"}]))
    out = tmp_path / "out"
    out.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(f"{live.pid}\n")
        with pytest.raises(FileExistsError, match=re.escape(f"{out} is in use by another eval (pid {live.pid})")):
            ev.evaluate(model, processor, items, ["random"], [64], out, progress=False)
        assert always_blue == []
    finally:
        live.kill()
        live.wait()
    # the lock of a process that is gone is taken over, and released at the end, even on errors
    assert ev.evaluate(model, processor, items, ["random"], [64], out, progress=False)[0]["n"] == 1
    assert not (out / ".lock").exists()

    def interrupted(*a, **k):
        assert (out / ".lock").read_text().split()[0] == str(os.getpid())
        raise KeyboardInterrupt

    monkeypatch.setattr(ev.runner, "answer_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(model, processor, items, ["random"], [32], out, progress=False)
    assert not (out / ".lock").exists()


@pytest.mark.parametrize("argv,message", [
    (["eval", "--methods", "learnpruner", "--option", "learnpruner:r1=abc"],
     "--option 'learnpruner:r1=abc': option r1 must be a positive integer, got 'abc'"),
    (["eval", "--methods", "pyramiddrop", "--option", "pyramiddrop:layers=abc"],
     "option layers must be a sequence of integers, got 'abc'"),
    (["eval", "--device", "cuda"], "device 'cuda' is not available"),
    (["generate", "--device", "cuda"], "device 'cuda' is not available"),
    (["generate", "--device", "gpu0"], "unknown device 'gpu0'; accepted: cpu"),
    (["generate", "--option", "r1"], "--option takes KEY=VALUE, got 'r1'"),
    (["generate", "--option", "r1=abc"], "option r1 must be a positive integer, got 'abc'"),
])
def test_bad_cli_input_is_one_line_and_exit_2(capsys, monkeypatch, tmp_path, argv, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    common = ["--model", "tiny-random-llava", "--max-new-tokens", "1"]
    common += ["--limit", "1", "--tokens", "64", "--out", str(tmp_path / "o")] if argv[0] == "eval" else \
        ["--image", "shapesvqa:0", "--lpm", "random"]
    assert main([*argv, *common]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    if "cuda" in argv:
        assert "available: cpu" in err


def test_ctrl_c_says_how_to_resume_and_exits_130(capsys, monkeypatch, tmp_path):
    import learnpruner.evaluation

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(learnpruner.evaluation, "evaluate", interrupted)
    rc = main(["eval", "--model", "tiny-random-llava", "--limit", "1", "--out", str(tmp_path / "o")])
    assert rc == 130
    err = capsys.readouterr().err
    assert err == f"interrupted; rerun the same command to resume from --out {tmp_path / 'o'}\n"
    monkeypatch.setattr("learnpruner.demo.run_demo", interrupted)
    assert main(["demo", "--model", "tiny-random-llava"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


@pytest.mark.parametrize("argv,message", [
    (["generate", "--method", "learnprunr"], "--method: unknown method 'learnprunr'"),
    (["eval", "--methods", "random,random"], "--methods names 'random' twice"),
    (["eval", "--methods", "random", "--tokens", "64,64"], "--tokens names 64 twice"),
    (["bench", "--device", "cuda"], "device 'cuda' is not available"),
    (["bench", "--device", "gpu"], "unknown device 'gpu'"),
    (["bench", "--device", "meta"], "device 'meta' holds no data"),
])
def test_wrong_flags_duplicates_and_devices_are_one_line(capsys, monkeypatch, tmp_path, argv, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if argv[0] == "bench":
        common = ["--arch", "llava-tiny", "--out", str(tmp_path / "b")]
    elif argv[0] == "eval":
        common = ["--model", "tiny-random-llava", "--limit", "1", "--out", str(tmp_path / "o")]
        common += [] if "--tokens" in argv else ["--tokens", "64"]
    else:
        common = ["--model", "tiny-random-llava", "--image", "shapesvqa:0"]
    assert main([*argv, *common]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_null_or_non_text_answer_is_refused_by_line(tmp_path):
    for bad in (None, True, {"a": 1}, [None]):
        path = _jsonl(tmp_path, "d.jsonl", [{"question": "q", "answer": "red"}, {"question": "q", "answer": bad}])
        with pytest.raises(ValueError, match=r"d\.jsonl:2: answer .* is not a text or a number"):
            ev.load_items(path)
    path = _jsonl(tmp_path, "e.jsonl", [{"question": None, "answer": "red"}])
    with pytest.raises(ValueError, match=r"e\.jsonl:1: question null is not a text"):
        ev.load_items(path)
    assert ev.load_items(_jsonl(tmp_path, "f.jsonl", [{"question": "q", "answer": 2}]))[0].answers == ["2"]


def _two_cells(tiny, out, always_blue, tokens=(16,)):
    model, processor = tiny
    items = ev.load_items("shapesvqa", limit=4)
    ev.evaluate(model, processor, items, ["none", "random"], list(tokens), out, progress=False)
    return items


def test_compare_pairs_with_any_unpruned_cell_of_the_same_data(tiny, tmp_path, always_blue, capsys):
    """An eval at 16 tokens writes none@16; another at 64 none@64: compare finds the unpruned cell for both (every
    none cell of the same data and model is the same setting), instead of the last one read."""
    out = tmp_path / "out"
    _two_cells(tiny, out, always_blue, (16,))
    model, processor = tiny
    ev.evaluate(model, processor, ev.load_items("shapesvqa", limit=4), ["none", "random"], [64], out, progress=False)
    assert {p.name for p in (out / "preds").glob("none@*.jsonl")} == {"none@16.jsonl", "none@64.jsonl"}
    for t in (16, 64):
        assert ev.compare_cells(out, "random", "none", t)["n"] == 4
    assert main(["compare", "random", "none", "--out", str(out)]) == 0


def test_a_damaged_cell_record_or_predictions_line_is_refused_not_dropped(tiny, tmp_path, always_blue, capsys):
    out = tmp_path / "out"
    _two_cells(tiny, out, always_blue)
    result = out / "preds" / "random@16.result.json"
    good = result.read_text()
    result.write_text(good[: len(good) // 2])  # truncated
    assert main(["compare", "random", "none", "--out", str(out)]) == 2
    assert "random@16.result.json cannot be read" in capsys.readouterr().err
    result.write_text(json.dumps({k: v for k, v in json.loads(good).items() if k != "tokens"}))
    assert main(["compare", "random", "none", "--out", str(out)]) == 2
    assert "is not a cell record" in capsys.readouterr().err
    result.write_text(good)
    preds = out / "preds" / "random@16.jsonl"
    lines = preds.read_text().splitlines()
    preds.write_text("\n".join([lines[0], "[1, 2]", *lines[1:]]) + "\n")  # valid JSON, not a record
    assert main(["compare", "random", "none", "--out", str(out)]) == 2
    assert "random@16.jsonl:2: not a prediction record" in capsys.readouterr().err


def test_compare_never_overwrites_the_eval_folders_own_files(tiny, tmp_path, always_blue, capsys):
    out = tmp_path / "out"
    _two_cells(tiny, out, always_blue)
    preds = out / "preds" / "random@16.jsonl"
    before = preds.read_bytes()
    for target in (preds, out / "results.json", out / "preds" / "x.json"):
        assert main(["compare", "random", "none", "--out", str(out), "--json", str(target)]) == 2
        assert "eval folder's own files" in capsys.readouterr().err
    assert preds.read_bytes() == before
    assert main(["compare", "random", "none", "--out", str(out), "--json", str(out / "compare.json")]) == 0
    assert json.loads((out / "compare.json").read_text())[0]["b"] == "none"


def test_compare_names_an_unknown_method_and_exits_2(tiny, tmp_path, always_blue, capsys):
    out = tmp_path / "out"
    _two_cells(tiny, out, always_blue)
    assert main(["compare", "learnprunr", "--out", str(out)]) == 2
    assert "unknown method 'learnprunr'" in capsys.readouterr().err
    assert main(["compare", "divprune", "--out", str(out)]) == 2
    assert "'divprune' has no answered cell" in capsys.readouterr().err


def test_cells_of_two_models_in_one_folder_never_meet(tiny, tmp_path, always_blue):
    """Another model's cells in the same --out: no relative accuracy against the other model's none, no pairs."""
    out = tmp_path / "out"
    items = _two_cells(tiny, out, always_blue)
    other, processor = load("tiny-random-llava")
    with torch.no_grad():
        next(other.parameters()).add_(1.0)  # other weights: another fingerprint
    ev.evaluate(other, processor, items, ["divprune"], [16], out, progress=False)
    saved = {r["method"]: r for r in json.loads((out / "results.json").read_text())}
    assert "relative" in saved["random"] and "relative" not in saved["divprune"]
    with pytest.raises(ValueError, match="different models"):
        ev.compare_cells(out, "divprune", "random", 16)
    with pytest.raises(ValueError, match="different models"):
        ev.compare_cells(out, "divprune", "none", 16)


def test_a_paper_eval_after_an_average_one_reuses_the_unpruned_answers(tiny, tmp_path, always_blue):
    model, processor = tiny
    items = ev.load_items("shapesvqa", limit=3)
    out = tmp_path / "out"
    ev.evaluate(model, processor, items, ["none", "random"], [192], out, progress=False)
    asked = len(always_blue)
    ev.evaluate(model, processor, items, ["none", "fastv"], [192], out, progress=False, budget="paper")
    assert len(always_blue) == asked + len(items)  # fastv's items only: none's are answered already


def test_unknown_settings_and_records_without_a_data_fingerprint_are_refused(tiny, tmp_path, always_blue):
    model, processor = tiny
    items = ev.load_items("shapesvqa", limit=2)
    out = tmp_path / "out"
    ev.evaluate(model, processor, items, ["random"], [16], out, progress=False)
    setup = out / "preds" / "random@16.setup.json"
    saved = json.loads(setup.read_text())
    setup.write_text(json.dumps({**saved, "mystery": 1}))
    with pytest.raises(ValueError, match="mystery"):
        ev.evaluate(model, processor, items, ["random"], [16], out, progress=False)
    setup.write_text(json.dumps(saved))
    preds = out / "preds" / "random@16.jsonl"
    recs = [json.loads(line) for line in preds.read_text().splitlines()]
    preds.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "item"}) + "\n" for r in recs))
    with pytest.raises(ValueError, match="has no data fingerprint"):
        ev.evaluate(model, processor, items, ["random"], [16], out, progress=False)


def test_one_edited_item_fingerprint_makes_compare_refuse(tiny, tmp_path, always_blue):
    out = tmp_path / "out"
    _two_cells(tiny, out, always_blue)
    assert ev.compare_cells(out, "random", "none", 16)["n"] == 4
    preds = out / "preds" / "random@16.jsonl"
    recs = [json.loads(line) for line in preds.read_text().splitlines()]
    recs[2]["item"] = "0" * 16
    preds.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(ValueError, match="for different data"):
        ev.compare_cells(out, "random", "none", 16)


def test_an_lpm_retrained_in_place_or_shipping_another_layer_is_refused_on_rerun(tiny, tmp_path):
    """A cell records the LPM's SHA-256 and the options resolved after what its lpm.json ships: a rerun into the
    same --out with the LPM retrained in place (same path), or shipping another stage-2 layer, is refused."""
    from learnpruner import LearnablePruningModule, LPMConfig
    from learnpruner.adaptive import save_lpm_options

    model, processor = tiny
    items = ev.load_items("shapesvqa", limit=1)
    lpm = tmp_path / "lpm"
    torch.manual_seed(0)
    LearnablePruningModule(LPMConfig(feature_dim=96, num_tokens=576)).save(lpm)
    opts = {"learnpruner": {"lpm": str(lpm)}}
    out = tmp_path / "out"
    ev.evaluate(model, processor, items, ["learnpruner"], [64], out, method_options=opts, progress=False)
    setup = json.loads((out / "preds" / "learnpruner@64.setup.json").read_text())
    assert setup["plan"]["lpm"]["sha256"] and setup["plan"]["options"]["layer"] == 3
    assert setup["plan"]["sources"]["layer"] == "default"
    torch.manual_seed(1)
    LearnablePruningModule(LPMConfig(feature_dim=96, num_tokens=576)).save(lpm)  # retrained in place
    with pytest.raises(ValueError, match=r"plan\.lpm"):
        ev.evaluate(model, processor, items, ["learnpruner"], [64], out, method_options=opts, progress=False)
    out2 = tmp_path / "out2"
    ev.evaluate(model, processor, items, ["learnpruner"], [64], out2, method_options=opts, progress=False)
    save_lpm_options(lpm, {"layer": 4})  # now ships another layer (and so other weights' hash)
    with pytest.raises(ValueError, match=r"plan\.(lpm|options|sources)"):
        ev.evaluate(model, processor, items, ["learnpruner"], [64], out2, method_options=opts, progress=False)


def test_a_resumed_random_cell_answers_as_an_uninterrupted_one(tiny, tmp_path, monkeypatch):
    """Random draws are seeded per item (its id): an interrupted and resumed cell, or another batch size, keeps
    exactly the tokens an uninterrupted run keeps."""
    import learnpruner

    model, processor = tiny
    items = ev.load_items("shapesvqa", limit=8)
    real = ev.runner.answer_batch

    def run(out, batch_size, stop_after=None):
        kept, calls = {}, []

        def answer(model, processor, chunk, max_new_tokens, device):
            if stop_after is not None and len(calls) == stop_after:
                raise KeyboardInterrupt
            calls.append(len(chunk))
            preds = real(model, processor, chunk, max_new_tokens, device)
            for it, k in zip(chunk, learnpruner.stats(model).stage1_kept):
                kept[it.id] = k.tolist()
            return preds

        monkeypatch.setattr(ev.runner, "answer_batch", answer)
        ev.evaluate(model, processor, items, ["random"], [16], out, batch_size=batch_size, progress=False,
                    max_new_tokens=1)
        return kept

    whole = run(tmp_path / "a", 4)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", 4, stop_after=1)
    resumed = run(tmp_path / "b", 4)
    assert set(resumed) == {it.id for it in items[4:]}  # the first batch was kept
    assert all(resumed[i] == whole[i] for i in resumed)
    other = run(tmp_path / "c", 3)
    assert other == whole
    assert len({tuple(v) for v in whole.values()}) > 1  # the draws differ from item to item
