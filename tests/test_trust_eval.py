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
