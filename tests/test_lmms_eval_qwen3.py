"""The lmms-eval model on a Qwen3-VL folder, end to end: its answers are the transformers engine's.

Qwen3-VL's processor cannot be built without torchvision (its video processor), which does not import on torch's
CPU build unless the plugin's hook is installed (``learnpruner.integrations.vllm.torchvision_cpu``); so this runs
where both torchvision and lmms-eval import (in ``.ci/run``: the vLLM environment).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("lmms_eval")

import learnpruner  # noqa: E402

QUESTION = "how many squares ?"
SIZES = ((128, 192), (64, 128))  # (height, width) px: 24 and 8 tokens (16 px patches, 2x2 merge)


class _Request:
    def __init__(self, *args):
        self.args = args


def _visual(doc):
    return [doc["image"]]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from learnpruner.adapters.qwen2_5_vl_bench import token_ids
    from learnpruner.adapters.qwen3_vl_bench import word_processor

    processor = word_processor(min_pixels=32 * 32, max_pixels=128 * 192)
    tok = processor.tokenizer
    torch.manual_seed(0)
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
                num_key_value_heads=1, head_dim=32, max_position_embeddings=2048, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, initializer_range=0.15,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 6, 6],
                                 "mrope_interleaved": True})
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64, deepstack_visual_indexes=[0, 2],
                  num_position_embeddings=64)
    model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(text_config=text, vision_config=vision,
                                                          **token_ids(tok))).eval()
    path = tmp_path_factory.mktemp("qwen3-lmms")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def _images():
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()) for h, w in SIZES]


@torch.no_grad()
def _direct(folder, images) -> list[str]:
    """Each image's answer from the model with ``apply`` and the folder's processor, one request at a time."""
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
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


def test_qwen3_folder_answers_as_the_engine_in_a_batch_of_two_sizes(folder):
    from loguru import logger

    from learnpruner.integrations.lmms_eval.model import LearnPrunerLMM

    images = _images()
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
