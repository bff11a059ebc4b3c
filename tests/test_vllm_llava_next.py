"""learnpruner inside vLLM, LLaVA-NeXT (AnyRes): images of two sizes in one batch, against the transformers engine.

A tiny random LLaVA-NeXT (CLIP at 56 px, 16 tokens a crop; grids up to 2x2; head size 32 for vLLM's CPU
attention) saved to a folder both engines load. Runs where vLLM is installed (see .ci/run).
"""

from __future__ import annotations

import os

import pytest
import torch

vllm = pytest.importorskip("vllm")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import learnpruner  # noqa: E402
from learnpruner.integrations.vllm import overrides  # noqa: E402

PINPOINTS = [[56, 112], [112, 56], [112, 112]]
SIZES = [(112, 112), (60, 150)]  # (height, width): 80 tokens + 8 newlines, 48 + 4
QUESTIONS = ["what colour is the circle ?", "how many squares ?"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    from learnpruner.testbed.model import CHAT_TEMPLATE, build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=56, patch_size=14, projection_dim=32)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=PINPOINTS,
                             image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                             vision_feature_select_strategy="default")
    model = LlavaNextForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.model.image_newline.normal_()
    images = LlavaNextImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                        image_grid_pinpoints=PINPOINTS)
    processor = LlavaNextProcessor(image_processor=images, tokenizer=tok, patch_size=14,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=CHAT_TEMPLATE)
    path = tmp_path_factory.mktemp("tiny-next")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def _images():
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()) for h, w in SIZES]


def _prompts():
    return [f"USER: <image>\n{q} ASSISTANT:" for q in QUESTIONS]


@torch.no_grad()
def _reference(path, method, tokens):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    learnpruner.apply(model, method, tokens=tokens, positions="contiguous", lpm="random")
    out = []
    for image, prompt in zip(_images(), _prompts()):
        inp = processor(images=image, text=prompt, return_tensors="pt")
        g = model.generate(**inp, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True,
                           min_new_tokens=3)
        st = learnpruner.stats(model).images[0]
        kept = len(st.stage1_kept) if st.stage1_kept is not None else st.count
        out.append((g.sequences[0, inp["input_ids"].shape[1]:].tolist(), torch.log_softmax(g.logits[0][0], -1),
                    kept, st.structure, inp["input_ids"].shape[1] - st.count + kept))
    return out


@pytest.mark.parametrize("method,runs_as", [("learnpruner", "lpm-only"), ("learnpruner-set", "learnpruner-set")])
def test_images_of_two_sizes_equal_the_transformers_engine(folder, method, runs_as):
    llm = vllm.LLM(folder, dtype="float32", enforce_eager=True, max_model_len=1024, mm_processor_cache_gb=0,
                   limit_mm_per_prompt={"image": 1}, gpu_memory_utilization=0.1,
                   hf_overrides=overrides("llava_next", method, 24, lpm="random"))
    params = vllm.SamplingParams(max_tokens=3, min_tokens=3, temperature=0, logprobs=5)
    outs = llm.generate([{"prompt": p, "multi_modal_data": {"image": im}} for p, im in zip(_prompts(), _images())],
                        params, use_tqdm=False)  # one batch: both sizes together
    reference = _reference(folder, runs_as, 24)
    for o, (toks, logprobs, kept, newlines, length) in zip(outs, reference):
        assert kept == 24 and newlines in (8, 4)
        assert len(o.prompt_token_ids) == length  # the text, the kept tokens and every row newline
        assert list(o.outputs[0].token_ids) == toks
        for t, lp in o.outputs[0].logprobs[0].items():
            assert abs(lp.logprob - logprobs[t].item()) < 1e-4
    del llm


def test_a_budget_between_the_count_without_and_with_newlines_keeps_every_token(folder):
    """84 tokens for the 112x112 image (80 tokens + 8 newlines): the budget is counted on tokens, not on
    placeholders, so nothing is pruned, in vLLM as in the transformers engine."""
    llm = vllm.LLM(folder, dtype="float32", enforce_eager=True, max_model_len=1024, mm_processor_cache_gb=0,
                   limit_mm_per_prompt={"image": 1}, gpu_memory_utilization=0.1,
                   hf_overrides=overrides("llava_next", "learnpruner", 84, lpm="random"))
    params = vllm.SamplingParams(max_tokens=3, min_tokens=3, temperature=0, logprobs=5)
    image, prompt = _images()[0], _prompts()[0]
    out = llm.generate([{"prompt": prompt, "multi_modal_data": {"image": image}}], params, use_tqdm=False)[0]
    toks, logprobs, kept, newlines, length = _reference(folder, "lpm-only", 84)[0]
    assert (kept, newlines) == (80, 8)
    assert len(out.prompt_token_ids) == length
    assert list(out.outputs[0].token_ids) == toks
    for t, lp in out.outputs[0].logprobs[0].items():
        assert abs(lp.logprob - logprobs[t].item()) < 1e-4
    del llm
