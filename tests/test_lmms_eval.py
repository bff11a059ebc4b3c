"""The lmms-eval integration: model args, bad input refused before weights load, the offline ShapesVQA task,
and (with lmms-eval installed: ``pip install --no-deps lmms-eval==0.7.3 && pip install -e ".[lmms-eval]"``)
the model end to end: its accuracy equals ``learnpruner eval``'s on the same items."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import learnpruner
from learnpruner.cli import main
from learnpruner.evaluation import evaluate, load_items
from learnpruner.hub import load
from learnpruner.integrations.lmms_eval import CLASS_PATH, MODEL_NAME, task  # noqa: F401  (registers lmms-task)
from learnpruner.integrations.lmms_eval.config import check_model, parse_model_args, parse_option
from learnpruner.lpm import LearnablePruningModule, LPMConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes():
    return load("shapes-tiny")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("lmms-task")
    assert main(["lmms-task", "--out", str(out), "--limit", "36"]) == 0
    return out


def _apply_error(model, **kwargs) -> Exception:
    try:
        learnpruner.apply(model, **kwargs)
    except (ValueError, TypeError, OSError) as e:
        return e
    learnpruner.remove(model)
    raise AssertionError(f"apply accepted {kwargs}")


def test_model_args_parsed_like_cli_options():
    args = parse_model_args("shapes-tiny", method="pyramiddrop", tokens=200, layers="[1,2,3]", batch_size="4")
    assert args.options == {"layers": (1, 2, 3)} and args.batch_size == 4 and args.tokens == 200
    assert parse_option('"1,2,4"') == (1, 2, 4) and parse_option("false") is False and parse_option("0.1") == 0.1
    args = parse_model_args("shapes-tiny", ratio=0.1, diversity=0.2, lpm="some/dir", fast="true")
    assert args.budget() == {"ratio": 0.1} and args.options == {"diversity": 0.2, "lpm": "some/dir"} and args.fast
    args = parse_model_args("shapes-tiny", method="dart", tokens=64, budget="paper", stage1_unit="crop")
    assert args.keywords == {"budget": "paper", "stage1_unit": "crop"} and args.options == {}  # apply()'s keywords
    with pytest.raises(ValueError, match="unknown method 'nope'; known methods"):
        parse_model_args("shapes-tiny", method="nope")
    with pytest.raises(ValueError, match="give tokens= or ratio=, not both"):
        parse_model_args("shapes-tiny", tokens=32, ratio=0.1)
    with pytest.raises(ValueError, match="does not take option"):
        parse_model_args("shapes-tiny", method="fastv", diversity=0.1)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        parse_model_args("shapes-tiny", batch_size="auto")
    with pytest.raises(ValueError, match="needs pretrained="):
        parse_model_args(None)


def test_bad_input_refused_before_weights_load(shapes, tmp_path, monkeypatch):
    """Unreachable budget, LPM that does not fit, unsupported family: apply's own message, no weights read."""
    from transformers import AutoModelForImageTextToText, LlamaConfig, PaliGemmaConfig

    model, _ = shapes
    bad_lpm = tmp_path / "lpm"
    LearnablePruningModule(LPMConfig(feature_dim=1024, feature_layer=-2)).save(bad_lpm)
    cases = [dict(method="fastv", tokens=16), dict(method="learnpruner", tokens=32, lpm=str(bad_lpm)),
             dict(method="learnpruner", tokens=32, r1=999), dict(method="fastv", tokens=192, budget="bogus")]
    expected = [str(_apply_error(model, **case)) for case in cases]

    def no_weights(*a, **k):
        raise AssertionError("model weights were loaded")

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", no_weights)
    for case, message in zip(cases, expected):
        with pytest.raises((ValueError, TypeError)) as err:
            check_model(parse_model_args("shapes-tiny", **case))
        assert str(err.value) == message
    check_model(parse_model_args("shapes-tiny", method="learnpruner", tokens=32))  # the shipped LPM fits
    for config in (PaliGemmaConfig(), LlamaConfig(num_hidden_layers=1)):
        folder = tmp_path / type(config).__name__
        config.save_pretrained(folder)
        with pytest.raises(TypeError, match="learnpruner does not support .*; supported model classes: .*Llava"):
            check_model(parse_model_args(str(folder), method="fastv", tokens=64))


def test_lmms_task_command_writes_an_offline_task(task_dir, capsys):
    data = task_dir / "shapesvqa.jsonl"
    items = load_items(str(data))  # the format learnpruner eval reads
    assert len(items) == 36 and items[0].id == "test-0" and (task_dir / "images" / "test-0.png").is_file()
    reference = load_items("shapesvqa", 36)
    assert [(i.question, i.answers, i.qtype) for i in items] == [(i.question, i.answers, i.qtype) for i in reference]
    assert items[5].pil().tobytes() == reference[5].pil().tobytes()  # PNG: the very pixels
    yaml = (task_dir / "shapesvqa.yaml").read_text()
    assert "dataset_path: json" in yaml and json.dumps(str(data)) in yaml and "!function utils.process_results" in yaml
    assert "exact_match_position" in yaml and (task_dir / "utils.py").is_file()
    assert main(["lmms-task", "--out", str(task_dir / "x"), "--split", "train"]) == 2
    assert main(["lmms-task", "--out", str(task_dir / "x"), "--limit", "0"]) == 2
    assert "--split must be one of" in capsys.readouterr().err


def test_pyproject_registers_the_plugin():
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["entry-points"]["lmms_eval.models"] == {
        MODEL_NAME: "learnpruner.integrations.lmms_eval:manifests"}
    assert any("integrations/lmms_eval/tasks" in p for p in meta["tool"]["setuptools"]["package-data"]["learnpruner"])
    assert any(r.startswith("filelock") and "<4" in r for r in meta["project"]["optional-dependencies"]["lmms-eval"])


# --- with lmms-eval installed ---------------------------------------------------------------------


class _Request:
    def __init__(self, *args):
        self.args = args


def _lmm(**kwargs):
    pytest.importorskip("lmms_eval")
    from learnpruner.integrations.lmms_eval.model import LearnPrunerLMM

    lm = LearnPrunerLMM(pretrained="shapes-tiny", device="cpu", **kwargs)
    items = load_items("shapesvqa", 4)
    lm.task_dict = {"t": {"test": [{"image": it.pil(), "question": it.question, "answer": it.answers[0]}
                                   for it in items]}}
    return lm, items


@pytest.fixture(scope="module")
def pruned_lmm():
    return _lmm(method="learnpruner", tokens=32, batch_size=3)


def _visual(doc):
    return [doc["image"]]


def test_entry_point_makes_model_name_work():
    pytest.importorskip("lmms_eval")
    from lmms_eval.models import get_model

    from learnpruner.integrations.lmms_eval import manifests

    assert manifests()[0].simple_class_path == CLASS_PATH
    assert get_model(MODEL_NAME).__name__ == "LearnPrunerLMM"


def test_generate_batched_stop_strings_and_multi_round(pruned_lmm):
    lm, items = pruned_lmm
    greedy = {"max_new_tokens": 4, "temperature": 0, "do_sample": False}
    requests = [_Request(it.question, dict(greedy), _visual, i, "t", "test") for i, it in enumerate(items)]
    batched = lm.generate_until(requests)
    lm.batch_size_per_gpu = 1
    assert lm.generate_until(requests) == batched  # padded batches (3 + 1) answer as one at a time
    assert batched[0] == "blue"
    cut = lm.generate_until([_Request(items[0].question, {**greedy, "until": ["u"]}, _visual, 0, "t", "test")])
    assert cut == ["bl"]

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        if round_idx == 1:
            return [doc["image"]], "how many objects are there?", False, previous_output, "info"
        assert previous_round_info == "info" and len(previous_output) == 2
        return None, None, True, previous_output, None

    lm.batch_size_per_gpu = 2
    multi = lm.generate_until_multi_round(
        [_Request(items[i].question, dict(greedy), _visual, doc_to_text, i, "t", "test") for i in (0, 1)])
    assert [m[0] for m in multi] == batched[:2] and all(len(m) == 2 for m in multi)
    lm.batch_size_per_gpu = 3


@pytest.mark.parametrize("method", ["none", "learnpruner"])
def test_loglikelihood_matches_the_models_own_loss(method, pruned_lmm):
    lm, items = pruned_lmm if method == "learnpruner" else _lmm(method=method, batch_size=3)
    requests = [_Request(it.question, " " + it.answers[0], _visual, i, "t", "test") for i, it in enumerate(items)]
    got = lm.loglikelihood(requests)
    for (logprob, greedy), it in zip(got, items):
        prompt = lm._prompt(it.question, 1)
        n = len(lm.tok_encode(prompt + " " + it.answers[0])) - len(lm.tok_encode(prompt))
        inputs = lm._inputs([prompt + " " + it.answers[0]], [[it.pil()]])
        labels = torch.full_like(inputs["input_ids"], -100)
        labels[:, -n:] = inputs["input_ids"][:, -n:]
        with torch.inference_mode():
            loss = lm.model(**inputs, labels=labels, use_cache=False).loss  # mean over the n continuation tokens
        assert logprob == pytest.approx(-float(loss) * n, rel=1e-4, abs=1e-4)
        assert isinstance(greedy, bool)


def test_offline_shapesvqa_accuracy_equals_learnpruner_eval(task_dir, shapes, tmp_path):
    """``python -m lmms_eval --model learnpruner ... --tasks shapesvqa --include_path DIR`` with no network scores
    what ``learnpruner eval`` scores on the same items, answer by answer, and logs the budget it ran."""
    pytest.importorskip("lmms_eval")
    out = tmp_path / "lmms-out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "learnpruner",
           "--model_args", "pretrained=shapes-tiny,method=learnpruner,tokens=32,batch_size=8,device=cpu",
           "--tasks", "shapesvqa", "--include_path", str(task_dir), "--output_path", str(out), "--log_samples"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "visual tokens per LLM layer on average" in run.stdout + run.stderr
    results = json.loads(Path(glob.glob(str(out / "*" / "*_results.json"))[0]).read_text())
    samples = [json.loads(line) for line in Path(glob.glob(str(out / "*" / "*_samples_shapesvqa.jsonl"))[0]).open()]

    model, processor = shapes
    items = load_items(str(task_dir / "shapesvqa.jsonl"))
    [record] = evaluate(model, processor, items, ["learnpruner"], [32], tmp_path / "eval", batch_size=8,
                        progress=False)
    preds = {json.loads(line)["id"]: json.loads(line)["pred"]
             for line in (tmp_path / "eval" / "preds" / "learnpruner@32.jsonl").open()}
    assert results["results"]["shapesvqa"]["exact_match,none"] == pytest.approx(record["accuracy"])
    for qtype, acc in record["per_qtype"].items():
        assert results["results"]["shapesvqa"][f"exact_match_{qtype},none"] == pytest.approx(acc)
    assert {items[s["doc_id"]].id: s["filtered_resps"][0] if isinstance(s["filtered_resps"], list)
            else s["filtered_resps"] for s in samples} == preds
    throughput = results["throughput"]
    assert throughput["avg_learnpruner_visual_tokens_per_layer"] == pytest.approx(record["avg_tokens"])
    assert throughput["avg_learnpruner_budget_tokens"] == 32


@pytest.mark.slow
def test_data_parallel_two_processes(task_dir, tmp_path):
    """``torchrun --nproc_per_node 2 -m lmms_eval ...`` on CPUs (gloo): each process answers half, same accuracy."""
    pytest.importorskip("lmms_eval")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    outs = {}
    for procs in (1, 2):
        out = tmp_path / f"dp{procs}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "-m", "lmms_eval",
               "--model", "learnpruner", "--model_args",
               "pretrained=shapes-tiny,method=learnpruner,tokens=32,batch_size=8",
               "--tasks", "shapesvqa", "--include_path", str(task_dir), "--output_path", str(out)]
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        if procs == 2:
            assert "(rank 1): method=learnpruner,tokens=32: 18 requests" in run.stdout + run.stderr
        outs[procs] = json.loads(Path(glob.glob(str(out / "*" / "*_results.json"))[0]).read_text())["results"]
    assert outs[1] == outs[2]


def test_llava_next_images_of_different_sizes_in_one_batch(tmp_path):
    """Any family with an adapter: a LLaVA-NeXT folder, ``ratio=`` per image, per-request statistics logged."""
    pytest.importorskip("lmms_eval")
    from helpers import next_processor, tiny_llava_next
    from loguru import logger
    from PIL import Image

    from learnpruner.integrations.lmms_eval.model import LearnPrunerLMM

    folder = tmp_path / "next"
    tiny_llava_next().save_pretrained(folder)
    next_processor().save_pretrained(folder)
    lm = LearnPrunerLMM(pretrained=str(folder), method="divprune", ratio=0.25, batch_size=2, device="cpu")
    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())
              for h, w in ((112, 112), (60, 150))]
    lm.task_dict = {"t": {"test": [{"image": im} for im in images]}}
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="INFO")
    try:
        out = lm.generate_until([_Request("how many squares ?", {"max_new_tokens": 3}, _visual, i, "t", "test")
                                 for i in range(2)])
    finally:
        logger.remove(sink)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)
    [line] = [x for x in lines if "visual tokens per layer / per image" in x]
    per_request = dict(part.split(" ") for part in line.split("per image: ")[1].strip().split("; "))
    for label in ("t/0", "t/1"):
        avg, count = per_request[label].split("/")
        assert float(avg) == pytest.approx(round(0.25 * int(count)), abs=0.5)
    assert per_request["t/0"].split("/")[1] != per_request["t/1"].split("/")[1]  # each image its own count
