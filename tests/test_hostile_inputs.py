"""Issue "Trust, second pass": inputs a hostile or careless user gives, each with the failure it used to cause
(a silent wrong result, a user's data overwritten, a raw traceback or unbounded memory)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import learnpruner
from learnpruner import evaluation as ev
from learnpruner.cli import main
from learnpruner.hub import load

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    return load("tiny-random-llava")


def _jsonl(folder, records, name="d.jsonl"):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# --- 1. an image replaced by another of the same size -------------------------------------------------------------


def test_fingerprint_covers_the_image_content_not_its_size(tiny, tmp_path, always_blue):
    model, processor = tiny
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (20, 20), (255, 0, 0)).save(data / "a.bmp")  # BMP: the byte size follows the pixel count
    path = _jsonl(data, [{"image": "a.bmp", "question": "colour ?", "answer": "blue"}])
    ev.evaluate(model, processor, ev.load_items(path), ["random"], [64], tmp_path / "out", progress=False)
    size = (data / "a.bmp").stat().st_size
    Image.new("RGB", (20, 20), (0, 0, 255)).save(data / "a.bmp")
    assert (data / "a.bmp").stat().st_size == size
    with pytest.raises(ValueError, match="different data"):
        ev.evaluate(model, processor, ev.load_items(path), ["random"], [64], tmp_path / "out", progress=False)


# --- 2. LLaVA-format questions keep their <image> tag ---------------------------------------------------------------


def test_a_question_with_an_image_tag_goes_through_the_chat_template(tiny):
    from learnpruner.hub import format_turn

    _, processor = tiny
    plain = format_turn(processor, "what colour is the circle ?")
    tagged = format_turn(processor, "<image>\nwhat colour is the circle ?")
    assert tagged == plain and plain.count("<image>") == 1
    assert plain.startswith("USER:") or plain != "<image>\nwhat colour is the circle ?"
    after = format_turn(processor, "what colour is the circle ? <image>")
    assert after.index("circle") < after.index("<image>")  # the tag says where the image goes


def test_eval_scores_a_tagged_question_as_the_untagged_one(tmp_path):
    model, processor = load("shapes-tiny")
    from learnpruner.testbed.shapes import load_split, to_jsonl

    items = load_split("test", 8)
    path = to_jsonl(items, str(tmp_path / "plain"))
    records = [json.loads(line) for line in open(path)]
    tagged = _jsonl(tmp_path / "plain", [{**r, "question": "<image>\n" + r["question"]} for r in records], "t.jsonl")
    a = ev.evaluate(model, processor, ev.load_items(path), ["none"], [576], tmp_path / "a", progress=False)
    b = ev.evaluate(model, processor, ev.load_items(tagged), ["none"], [576], tmp_path / "b", progress=False)
    preds = [json.loads(x)["pred"] for x in open(tmp_path / "b" / "preds" / "none@576.jsonl")]
    assert a[0]["accuracy"] == b[0]["accuracy"] >= 0.5 and all(preds)


# --- 3. and 4. media a family or a record cannot hold ----------------------------------------------------------------


def test_generate_refuses_a_video_on_an_image_only_family(tmp_path, capsys):
    pytest.importorskip("av")
    from learnpruner.video import write_video

    write_video(tmp_path / "v.mp4", np.zeros((4, 32, 32, 3), np.uint8))
    rc = main(["generate", "--model", "tiny-random-llava", "--video", str(tmp_path / "v.mp4"), "--prompt", "hi",
               "--frames", "4", "--option", "lpm=random"])
    err = capsys.readouterr().err
    assert rc == 2 and "llava takes no video input" in err and "video_llava" in err


def test_eval_refuses_video_records_on_an_image_only_family(tiny, tmp_path, always_blue):
    model, processor = tiny
    (tmp_path / "v.mp4").write_bytes(b"x")
    path = _jsonl(tmp_path, [{"video": "v.mp4", "question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match=r"d.jsonl:1: item '1': llava takes no video input"):
        ev.evaluate(model, processor, ev.load_items(path), ["random"], [64], tmp_path / "out", progress=False)
    assert not always_blue


def test_a_record_with_both_image_and_video_is_refused(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "v.mp4").write_bytes(b"x")
    path = _jsonl(tmp_path, [{"image": "a.png", "video": "v.mp4", "question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match=r"d.jsonl:1: the record has both image .* and video"):
        ev.load_items(path)


# --- 5. and 12. images read as transformers reads them; a decompression bomb is one error line -----------------------


def test_exif_orientation_is_applied_as_transformers_load_image_does(tmp_path):
    from transformers.image_utils import load_image

    im = Image.new("RGB", (40, 20), (10, 200, 30))
    im.paste((250, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    im.save(tmp_path / "r.jpg", exif=exif, quality=95)
    ours = ev.EvalItem("r", tmp_path / "r.jpg", "q", ["a"]).pil()  # what eval feeds the model
    theirs = load_image(str(tmp_path / "r.jpg"))
    assert ours.size == theirs.size == (20, 40)
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_a_16_bit_png_keeps_its_greys(tmp_path):
    ramp = (np.arange(64, dtype=np.uint16) * 1024)[None].repeat(8, 0)  # 0 .. 64512
    Image.fromarray(ramp).save(tmp_path / "g.png")
    rgb = np.asarray(ev.EvalItem("g", tmp_path / "g.png", "q", ["a"]).pil())
    assert rgb.shape == (8, 64, 3) and rgb[0, 0, 0] == 0 and rgb[0, 32, 0] == 128 and 250 <= rgb[0, 63, 0] <= 252


def test_a_decompression_bomb_is_one_error_line(tiny, tmp_path, monkeypatch, capsys):
    Image.new("RGB", (64, 64)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels: above twice the limit
    rc = main(["generate", "--model", "tiny-random-llava", "--image", str(tmp_path / "bomb.png"), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: cannot read image") and "Traceback" not in err
    _jsonl(tmp_path, [{"image": "bomb.png", "question": "q", "answer": "a"}])
    rc = main(["eval", "--model", "tiny-random-llava", "--data", str(tmp_path / "d.jsonl"), "--methods", "none",
               "--tokens", "64", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "d.jsonl:1: item '1': cannot read image" in err


# --- 6. a prompt longer than the context --------------------------------------------------------------------------


def test_a_question_past_the_context_is_refused_before_generating(tiny, tmp_path, monkeypatch):
    model, processor = tiny
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    words = " ".join(["circle"] * 2000)
    path = _jsonl(tmp_path, [{"image": "a.png", "question": words, "answer": "a"}])
    ran = []
    monkeypatch.setattr(type(model), "generate", lambda *a, **k: ran.append(1))
    with pytest.raises(ValueError, match=r"d.jsonl:1: item '1': the prompt is \d+ tokens .* context of 1024"):
        ev.evaluate(model, processor, ev.load_items(path), ["none"], [576], tmp_path / "out", progress=False)
    assert not ran


# --- 7. a rerun with another setting -------------------------------------------------------------------------------


def test_a_rerun_with_another_dtype_or_model_weights_is_refused(tiny, tmp_path, always_blue):
    model, processor = tiny
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    path = _jsonl(tmp_path, [{"image": "a.png", "question": "q", "answer": "blue"}])
    items = ev.load_items(path)
    ev.evaluate(model, processor, items, ["random"], [64], tmp_path / "out", progress=False)
    half = load("tiny-random-llava", dtype="bfloat16")[0]
    with pytest.raises(ValueError, match=r"another setup \(.*dtype: 'float32' there, 'bfloat16' now"):
        ev.evaluate(half, processor, items, ["random"], [64], tmp_path / "out", progress=False)
    other = load("tiny-random-llava")[0]
    with torch.no_grad():
        other.lm_head.weight.mul_(2)
    with pytest.raises(ValueError, match=r"another setup \(fingerprint"):
        ev.evaluate(other, processor, items, ["random"], [64], tmp_path / "out", progress=False)
    ev.evaluate(load("tiny-random-llava")[0], processor, items, ["random"], [64], tmp_path / "out", progress=False)


# --- 8. resuming LPM training on another model or other data ---------------------------------------------------------


def test_train_resume_refuses_another_model_or_data(tmp_path):
    from learnpruner.testbed.model import build_model, build_processor
    from learnpruner.training import ShapesRecords, TrainConfig, train_lpm

    processor = build_processor()
    cfg = TrainConfig(tokens=64, steps=4, batch_size=2, lr=3e-3, warmup=1, ckpt_every=2, hidden_dim=16, seed=0)
    out = tmp_path / "run"
    train_lpm(build_model(processor.tokenizer, tiny=True, seed=0).eval(), processor, ShapesRecords(), out, cfg,
              progress=False, stop_after=2)
    other = build_model(processor.tokenizer, tiny=True, seed=1).eval()
    with pytest.raises(ValueError, match=r"trained on another model \(model=.*fingerprint=\w+\), this run has"):
        train_lpm(other, processor, ShapesRecords(), out, cfg, resume=True, progress=False)
    same = build_model(processor.tokenizer, tiny=True, seed=0).eval()
    with pytest.raises(ValueError, match=r"another data \(data=shapesvqa, seed=0\), this run has data=shapesvqa, "
                                         r"seed=5"):
        train_lpm(same, processor, ShapesRecords(seed=5), out, cfg, resume=True, progress=False)
    lpm = train_lpm(same, processor, ShapesRecords(), out, cfg, resume=True, progress=False)
    saved = json.loads((out / "lpm.json").read_text())
    assert saved["extra"]["trained_on"]["data"] == "shapesvqa" == lpm.config.extra["trained_on"]["data"]
    assert saved["extra"]["trained_on"]["fingerprint"]


# --- 9. shapesvqa:N past the end of the test split -----------------------------------------------------------------


def test_shapesvqa_item_past_the_test_split_is_refused(capsys):
    rc = main(["generate", "--model", "tiny-random-llava", "--image", "shapesvqa:1200"])
    assert rc == 2 and "below 1200 (the test split's size), got 'shapesvqa:1200'" in capsys.readouterr().err


def test_a_split_limit_past_its_size_is_refused():
    from learnpruner.testbed.shapes import load_split

    with pytest.raises(ValueError, match=r"the val split has 500 items; got n=501"):
        load_split("val", 501)


# --- 10. calibrate never writes into the package ------------------------------------------------------------------


def test_calibrate_writes_to_the_users_out_and_never_into_the_package(tmp_path, capsys):
    from learnpruner.hub import BUILTIN_MODELS

    shipped = BUILTIN_MODELS["shapes-tiny"] / "learnpruner-lpm"
    before = (shipped / "lpm.json").read_bytes()
    rc = main(["calibrate", "--model", "shapes-tiny", "--limit", "2", "--tokens", "64", "--out", str(shipped)])
    assert rc == 2 and "inside the installed learnpruner package" in capsys.readouterr().err
    rc = main(["calibrate", "--model", "shapes-tiny", "--limit", "2", "--tokens", "64"])
    assert rc == 2 and "--out" in capsys.readouterr().err
    out = tmp_path / "mine"
    rc = main(["calibrate", "--model", "shapes-tiny", "--limit", "2", "--tokens", "64", "--out", str(out)])
    assert rc == 0 and (shipped / "lpm.json").read_bytes() == before
    mine = json.loads((out / "lpm.json").read_text())
    theirs = json.loads(before)["extra"]["adaptive_thresholds"]
    assert mine["extra"]["adaptive_thresholds"]["64"] != theirs["64"]  # 2 items: another threshold, in the copy
    assert {k: v for k, v in mine["extra"]["adaptive_thresholds"].items() if k != "64"} == \
        {k: v for k, v in theirs.items() if k != "64"}
    assert (out / "lpm.safetensors").read_bytes() == (shipped / "lpm.safetensors").read_bytes()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    rc = main(["calibrate", "--model", "shapes-tiny", "--limit", "2", "--tokens", "64", "--out",
               str(tmp_path / "full")])
    assert rc == 2 and "is not empty" in capsys.readouterr().err
    rc = main(["calibrate", "--model", "shapes-tiny", "--data", "shapesvqa", "--tokens", "64", "--out", str(out)])
    assert rc == 2 and "'shapesvqa-val'" in capsys.readouterr().err
    rc = main(["calibrate", "--model", "shapes-tiny", "--data", "nope.jsonl", "--tokens", "64", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "pass 'shapesvqa-val'" in err and "'shapesvqa' or" not in err


# --- 11. lmms-task never overwrites a user's files -----------------------------------------------------------------


def test_lmms_task_refuses_a_folder_with_files_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "task"
    out.mkdir()
    (out / "utils.py").write_text("# my own utils\n")
    rc = main(["lmms-task", "--out", str(out), "--limit", "2"])
    assert rc == 2 and "'utils.py', which learnpruner lmms-task did not write" in capsys.readouterr().err
    assert (out / "utils.py").read_text() == "# my own utils\n"
    fresh = tmp_path / "fresh"
    assert main(["lmms-task", "--out", str(fresh), "--limit", "2"]) == 0
    assert main(["lmms-task", "--out", str(fresh), "--limit", "3"]) == 0  # its own files: rewritten
    capsys.readouterr()
    (fresh / "shapesvqa.yaml").write_text("edited\n")
    assert main(["lmms-task", "--out", str(fresh), "--limit", "2"]) == 2
    assert "'shapesvqa.yaml' was changed since" in capsys.readouterr().err


# --- 13. video frames: bounded memory, a frame count the file has -------------------------------------------------


def test_video_reading_keeps_only_the_sampled_frames(tmp_path, monkeypatch):
    av = pytest.importorskip("av")
    from learnpruner import video

    frames = (np.arange(20)[:, None, None, None] * 12 * np.ones((20, 16, 16, 3))).astype(np.uint8)
    video.write_video(tmp_path / "v.mp4", frames)
    converted = []
    real_open = av.open

    class Frame:
        def __init__(self, frame):
            self.frame = frame

        def to_ndarray(self, **kw):
            converted.append(1)
            return self.frame.to_ndarray(**kw)

    class Container:
        def __init__(self, c):
            self.c, self.streams = c, c.streams

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.c.close()

        def demux(self, *a, **k):
            return self.c.demux(*a, **k)

        def seek(self, *a, **k):
            return self.c.seek(*a, **k)

        def decode(self, *a, **k):
            return (Frame(f) for f in self.c.decode(*a, **k))

    monkeypatch.setattr(av, "open", lambda *a, **k: Container(real_open(*a, **k)))
    out = video.read_frames(tmp_path / "v.mp4", 4)
    assert out.shape == (4, 16, 16, 3) and len(converted) == 4
    assert np.abs(out[:, 0, 0, 0].astype(int) - np.array([0, 6, 13, 19]) * 12).max() <= 8
    converted.clear()
    capped = video.read_frames(tmp_path / "v.mp4", 100000)  # capped at the file's 20 frames, each once
    assert capped.shape == (20, 16, 16, 3) and len(converted) == 20


# --- 14. options a family cannot honour, refused at apply ----------------------------------------------------------


def test_contiguous_positions_on_mrope_are_refused_at_apply():
    from helpers import tiny_qwen

    model = tiny_qwen(layers=4)
    with pytest.raises(ValueError, match=r"positions='contiguous' is not available for qwen2_5_vl"):
        learnpruner.apply(model, "fastv", tokens=32, positions="contiguous")
    assert not learnpruner.is_pruned(model)


def test_lmms_eval_check_refuses_contiguous_positions_on_qwen(tmp_path):
    from helpers import tiny_qwen

    from learnpruner.integrations.lmms_eval.config import check_model, parse_model_args

    tiny_qwen(layers=4).save_pretrained(tmp_path / "q")
    with pytest.raises(ValueError, match=r"positions='contiguous' is not available for qwen2_5_vl"):
        check_model(parse_model_args(str(tmp_path / "q"), method="fastv", tokens=32, positions="contiguous"))


# --- 15. messages that name the value and what is accepted ---------------------------------------------------------


def test_budget_message_lists_adaptive(tiny):
    with pytest.raises(ValueError, match=r"'average', 'paper', 'adaptive'.*got 'mean'"):
        learnpruner.apply(tiny[0], "learnpruner", tokens=32, budget="mean", lpm="random")


def test_non_utf8_jsonl_names_the_file_and_line(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"image": "a.png", "question": "q", "answer": "a"}\n{"question": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: not UTF-8 text"):
        ev.load_items(str(path))


def test_overlay_and_demo_outputs_fail_before_the_work(tmp_path, capsys, monkeypatch):
    import learnpruner.hub

    monkeypatch.setattr(learnpruner.hub, "load", lambda *a, **k: pytest.fail("loaded a model"))
    rc = main(["generate", "--model", "x", "--image", "shapesvqa:0", "--overlay", str(tmp_path)])
    assert rc == 2 and "--overlay" in (err := capsys.readouterr().err) and "is a folder" in err
    rc = main(["generate", "--model", "x", "--image", "shapesvqa:0", "--overlay", str(tmp_path / "no" / "a.png")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    import learnpruner.demo

    monkeypatch.setattr(learnpruner.demo, "load", lambda *a, **k: pytest.fail("loaded a model"))
    rc = main(["demo", "--out", str(tmp_path / "file")])
    assert rc == 2 and "is a file, not a folder" in capsys.readouterr().err


def test_fastv_message_suggests_an_earlier_layer_only_when_there_is_one(tiny):
    with pytest.raises(ValueError) as e:
        learnpruner.apply(tiny[0], "fastv", tokens=10, layer=1)
    assert "layer=1" not in str(e.value) and "tokens >=" in str(e.value)
    with pytest.raises(ValueError, match=r"or an earlier layer \(layer=1\)"):
        learnpruner.apply(tiny[0], "fastv", tokens=10, layer=3)


def test_unknown_model_names_get_the_projects_message(tmp_path):
    from learnpruner.integrations.lmms_eval.config import check_model, parse_model_args

    with pytest.raises(FileNotFoundError, match=r"model '/nonexistent/m' is not a local folder, a built-in name"):
        check_model(parse_model_args("/nonexistent/m", method="learnpruner", tokens=32))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no config.json"):
        load(str(tmp_path / "empty"))
