"""learnpruner inside vLLM, InternVL3 (HF layout, served by vLLM's InternS1 class): images of different tile counts
in one batch, against the transformers engine; a video is refused when it is processed, and the engine serves the
next request.

A tiny random InternVL (InternViT at 112 px: 16 tokens a tile after the pixel shuffle; up to 4 tiles plus the
thumbnail; Qwen2 with head size 32 for vLLM's CPU attention) saved with its processor to a folder both engines
load. Runs where vLLM and torchvision are installed (see .ci/run: the vLLM environment).
"""

from __future__ import annotations

import os

import pytest
import torch

vllm = pytest.importorskip("vllm")
pytest.importorskip("torchvision")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import learnpruner  # noqa: E402
from learnpruner.integrations.vllm import overrides  # noqa: E402

SIZES = [(112, 224), (224, 224)]  # (height, width): 2 tiles + thumbnail, 4 tiles + thumbnail
QUESTIONS = ["what colour is the circle ?", "how many squares ?"]
TOKENS = 24


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from helpers import save_internvl

    return save_internvl(tmp_path_factory.mktemp("tiny-internvl"))

def _images():
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()) for h, w in SIZES]


def _prompts():
    return [f"USER: <IMG_CONTEXT>\n{q} ASSISTANT:" for q in QUESTIONS]


@torch.no_grad()
def _reference(path, method, tokens):
    from transformers import AutoProcessor, InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    lpm = {"lpm": "random"} if learnpruner.get_method(method).needs_lpm else {}
    learnpruner.apply(model, method, tokens=tokens, positions="contiguous", **lpm)
    out = []
    for image, prompt in zip(_images(), _prompts()):
        inp = processor(images=image, text=prompt, return_tensors="pt")
        g = model.generate(**inp, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True,
                           min_new_tokens=3)
        st = learnpruner.stats(model).images[0]
        kept = len(st.stage1_kept) if st.stage1_kept is not None else st.count
        out.append((g.sequences[0, inp["input_ids"].shape[1]:].tolist(), torch.log_softmax(g.logits[0][0], -1),
                    kept, st.count, inp["input_ids"].shape[1] - st.count + kept))
    return out


@pytest.mark.parametrize("method,runs_as", [("learnpruner", "lpm-only"), ("learnpruner-set", "learnpruner-set"),
                                            ("divprune", "divprune")])
def test_images_of_different_tile_counts_equal_the_transformers_engine(folder, method, runs_as):
    llm = vllm.LLM(folder, dtype="float32", enforce_eager=True, max_model_len=1024, mm_processor_cache_gb=0,
                   limit_mm_per_prompt={"image": 1}, gpu_memory_utilization=0.1,
                   hf_overrides=overrides("internvl", method, TOKENS,
                                          **({"lpm": "random"} if method != "divprune" else {})))
    params = vllm.SamplingParams(max_tokens=3, min_tokens=3, temperature=0, logprobs=5)
    outs = llm.generate([{"prompt": p, "multi_modal_data": {"image": im}} for p, im in zip(_prompts(), _images())],
                        params, use_tqdm=False)
    reference = _reference(folder, runs_as, TOKENS)
    for o, (toks, logprobs, kept, count, length) in zip(outs, reference):
        assert kept == TOKENS and count in (3 * 16, 5 * 16)
        assert len(o.prompt_token_ids) == length  # the text, <img>, the kept tokens, </img>
        assert list(o.outputs[0].token_ids) == toks
        for t, lp in o.outputs[0].logprobs[0].items():
            assert abs(lp.logprob - logprobs[t].item()) < 1e-4
    del llm


def test_a_video_is_refused_when_processed_and_the_next_request_is_served(folder):
    llm = vllm.LLM(folder, dtype="float32", enforce_eager=True, max_model_len=1024, mm_processor_cache_gb=0,
                   limit_mm_per_prompt={"image": 1}, gpu_memory_utilization=0.1,
                   hf_overrides=overrides("internvl", "divprune", TOKENS))
    params = vllm.SamplingParams(max_tokens=3, min_tokens=3, temperature=0)
    video = (torch.rand(4, 112, 112, 3) * 255).to(torch.uint8).numpy()
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="At most 0 video"):
        llm.generate([{"prompt": "USER: <video>\nwhat moves ? ASSISTANT:", "multi_modal_data": {"video": video}}],
                     params, use_tqdm=False)
    out = llm.generate([{"prompt": _prompts()[0], "multi_modal_data": {"image": _images()[0]}}], params,
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 3
    del llm
