"""The lmms-eval model on Qwen2.5-VL and Qwen3-VL folders, end to end: its answers are the transformers engine's.

The Qwen processors cannot be built without torchvision (their video processors), which does not import on
torch's CPU build unless the vLLM plugin's hook is installed (``learnpruner.integrations.vllm.torchvision_cpu``);
so this runs where both torchvision and lmms-eval import (in ``.ci/run``: the vLLM environment).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("lmms_eval")

import learnpruner  # noqa: E402

QUESTION = "how many squares ?"
# (height, width) px of two images: 24 and 8 tokens (a token covers 28 px on Qwen2.5-VL, 32 px on Qwen3-VL)
SIZES = {"qwen2_5_vl": ((112, 168), (56, 112)), "qwen3_vl": ((128, 192), (64, 128))}


class _Request:
    def __init__(self, *args):
        self.args = args


def _visual(doc):
    return [doc["image"]]


def _save(path, family: str) -> str:
    """A tiny random Qwen2.5-VL or Qwen3-VL with its word-level processor (sizes of :data:`SIZES` kept as they
    are), saved to ``path``."""
    import transformers

    from learnpruner.adapters import qwen2_5_vl_bench, qwen3_vl_bench
    from learnpruner.adapters.qwen2_5_vl_bench import token_ids

    bench = qwen3_vl_bench if family == "qwen3_vl" else qwen2_5_vl_bench
    (height, width), (low_h, low_w) = SIZES[family]
    processor = bench.word_processor(min_pixels=low_h * low_w, max_pixels=height * width)
    tok = processor.tokenizer
    torch.manual_seed(0)
    rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 6, 6]}
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64)
    if family == "qwen3_vl":
        rope["mrope_interleaved"] = True
        vision.update(patch_size=16, deepstack_visual_indexes=[0, 2], num_position_embeddings=64)
        name = "Qwen3VL"
    else:
        vision.update(patch_size=14, window_size=56, fullatt_block_indexes=[1])
        name = "Qwen2_5_VL"
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
                num_key_value_heads=1, head_dim=32, max_position_embeddings=2048, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, initializer_range=0.15,
                rope_parameters=rope)
    config = getattr(transformers, f"{name}Config")(text_config=text, vision_config=vision, **token_ids(tok))
    getattr(transformers, f"{name}ForConditionalGeneration")(config).eval().save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def _images(family: str):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())
            for h, w in SIZES[family]]


@torch.no_grad()
def _direct(folder, images) -> list[str]:
    """Each image's answer from the model with ``apply`` and the folder's processor, one request at a time."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    learnpruner.apply(model, "divprune", ratio=0.25)
    out = []
    for image in images:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inp = processor(text=[text], images=[image], return_tensors="pt")
        ids = model.generate(**inp, max_new_tokens=4, do_sample=False, num_beams=1,
                             pad_token_id=processor.tokenizer.pad_token_id)
        out.append(processor.tokenizer.decode(ids[0, inp["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return out


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_a_qwen_folder_answers_as_the_engine_in_a_batch_of_two_sizes(family, tmp_path):
    from loguru import logger

    from learnpruner.integrations.lmms_eval.model import LearnPrunerLMM

    folder = _save(tmp_path / family, family)
    images = _images(family)
    lm = LearnPrunerLMM(pretrained=folder, method="divprune", ratio=0.25, batch_size=2, device="cpu")
    lm.task_dict = {"t": {"test": [{"image": im} for im in images]}}
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="INFO")
    try:
        out = lm.generate_until([_Request(QUESTION, {"max_new_tokens": 4}, _visual, i, "t", "test")
                                 for i in range(len(images))])
    finally:
        logger.remove(sink)
    assert out == _direct(folder, images)
    [line] = [x for x in lines if "visual tokens per layer / per image" in x]
    per_request = dict(part.split(" ") for part in line.split("per image: ")[1].strip().split("; "))
    assert per_request == {"t/0": "6.0/24", "t/1": "2.0/8"}  # a quarter of each image's own count, every layer
