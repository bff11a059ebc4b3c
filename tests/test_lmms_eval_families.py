"""The lmms-eval model on LLaVA-OneVision and InternVL3 folders, end to end: its answers are the transformers engine's.

Both processors need torchvision (their video processors), which does not import on torch's CPU build unless the
vLLM plugin's hook is installed; so this runs where both torchvision and lmms-eval import (in ``.ci/run``: the vLLM
environment).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("lmms_eval")

import learnpruner  # noqa: E402

QUESTION = "how many squares ?"
SIZES = [(112, 112), (112, 224)]


class _Request:
    def __init__(self, *args):
        self.args = args


def _visual(doc):
    return [doc["image"]]


def _images():
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()) for h, w in SIZES]


@torch.no_grad()
def _direct(folder, images, tokens) -> tuple[list[str], list[int]]:
    """Each image's answer and visual-token count from the model with ``apply`` and the folder's processor."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    learnpruner.apply(model, "divprune", tokens=tokens)
    answers, counts = [], []
    for image in images:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inp = processor(text=[text], images=[image], return_tensors="pt")
        ids = model.generate(**inp, max_new_tokens=4, do_sample=False, num_beams=1,
                             pad_token_id=processor.tokenizer.pad_token_id)
        answers.append(processor.tokenizer.decode(ids[0, inp["input_ids"].shape[1]:], skip_special_tokens=True).strip())
        counts.append(learnpruner.stats(model).images[0].count)
    return answers, counts


@pytest.mark.parametrize("family", ["llava_onevision", "internvl"])
def test_a_folder_answers_as_the_engine_in_a_batch_of_two_sizes(family, tmp_path):
    from helpers import save_internvl, save_onevision
    from loguru import logger

    from learnpruner.integrations.lmms_eval.model import LearnPrunerLMM

    if family == "internvl":
        folder = save_internvl(tmp_path / family)
    else:
        folder = save_onevision(tmp_path / family, [[56 * h, 56 * w] for h in range(1, 5) for w in range(1, 5)])
    images = _images()
    lm = LearnPrunerLMM(pretrained=folder, method="divprune", tokens=16, batch_size=2, device="cpu")
    lm.task_dict = {"t": {"test": [{"image": im} for im in images]}}
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="INFO")
    try:
        out = lm.generate_until([_Request(QUESTION, {"max_new_tokens": 4}, _visual, i, "t", "test")
                                 for i in range(len(images))])
    finally:
        logger.remove(sink)
    answers, counts = _direct(folder, images, 16)
    assert out == answers
    [line] = [x for x in lines if "visual tokens per layer / per image" in x]
    per_request = dict(part.split(" ") for part in line.split("per image: ")[1].strip().split("; "))
    assert per_request == {f"t/{i}": f"16.0/{n}" for i, n in enumerate(counts)}


@pytest.mark.parametrize("family", ["llava_onevision", "internvl"])
def test_the_commands_run_on_a_folder_with_its_real_processor(family, tmp_path, capsys):
    """``learnpruner generate``, ``eval`` and ``train`` on a saved folder, through the stock processor."""
    from helpers import save_internvl, save_onevision

    from learnpruner.cli import main

    if family == "internvl":
        folder = save_internvl(tmp_path / family)
    else:
        folder = save_onevision(tmp_path / family, [[56 * h, 56 * w] for h in range(1, 5) for w in range(1, 5)])
    assert main(["generate", "--model", folder, "--image", "shapesvqa:0", "--method", "divprune", "--tokens", "16",
                 "--max-new-tokens", "3", "--device", "cpu"]) == 0
    assert "16" in capsys.readouterr().out
    out = tmp_path / "eval"
    assert main(["eval", "--model", folder, "--data", "shapesvqa", "--limit", "4", "--methods", "none,divprune",
                 "--tokens", "16", "--batch-size", "2", "--out", str(out), "--device", "cpu"]) == 0
    assert (out / "results.json").is_file()
    lpm = tmp_path / "lpm"
    assert main(["train", "--model", folder, "--data", "shapesvqa", "--tokens", "16", "--out", str(lpm),
                 "--steps", "2", "--batch-size", "2", "--records", "4", "--features", str(tmp_path / "fc"),
                 "--device", "cpu"]) == 0
    assert (lpm / "lpm.json").is_file()
