"""learnpruner inside vLLM, LLaVA-OneVision: images of two sizes (one past anyres_max_9, interpolated) and a video,
against the transformers engine.

A tiny random LLaVA-OneVision (SigLIP at 56 px, 16 tokens a crop; grids up to 4x4; Qwen2 with head size 32 for
vLLM's CPU attention) saved with its processor to a folder both engines load. Runs where vLLM and torchvision are
installed (see .ci/run: the vLLM environment).
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

PINPOINTS = [[56 * h, 56 * w] for h in range(1, 5) for w in range(1, 5)]
SIZES = [(112, 112), (224, 224)]  # (height, width): a 2x2 grid, and a 4x4 grid interpolated to 12x12
QUESTIONS = ["what colour is the circle ?", "how many squares ?"]
TOKENS = 24


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from helpers import save_onevision

    return save_onevision(tmp_path_factory.mktemp("tiny-onevision"), PINPOINTS)

def _images():
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()) for h, w in SIZES]


def _video():
    g = torch.Generator().manual_seed(1)
    return (torch.rand(8, 56, 56, 3, generator=g) * 255).to(torch.uint8).numpy()


@torch.no_grad()
def _reference(path, method, tokens, items):
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    lpm = {"lpm": "random"} if learnpruner.get_method(method).needs_lpm else {}
    learnpruner.apply(model, method, tokens=tokens, positions="contiguous", **lpm)
    out = []
    for kind, media, prompt in items:
        inp = processor(text=prompt, return_tensors="pt", **({"images": media} if kind == "image" else
                                                             {"videos": [media]}))
        g = model.generate(**inp, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True,
                           min_new_tokens=3)
        st = learnpruner.stats(model).images[0]
        kept = len(st.stage1_kept) if st.stage1_kept is not None else st.count
        out.append((g.sequences[0, inp["input_ids"].shape[1]:].tolist(), torch.log_softmax(g.logits[0][0], -1),
                    kept, st.structure, inp["input_ids"].shape[1] - st.count + kept))
    return out


def _items():
    images = [("image", im, f"USER: <image>\n{q} ASSISTANT:") for im, q in zip(_images(), QUESTIONS)]
    return images + [("video", _video(), "USER: <video>\nwhat moves ? ASSISTANT:")]


@pytest.mark.parametrize("method,runs_as", [("learnpruner", "lpm-only"), ("learnpruner-set", "learnpruner-set"),
                                            ("divprune", "divprune")])
def test_images_and_a_video_equal_the_transformers_engine(folder, method, runs_as):
    llm = vllm.LLM(folder, dtype="float32", enforce_eager=True, max_model_len=2048, mm_processor_cache_gb=0,
                   limit_mm_per_prompt={"image": 1, "video": 1}, gpu_memory_utilization=0.1,
                   hf_overrides=overrides("llava_onevision", method, TOKENS,
                                          **({"lpm": "random"} if method != "divprune" else {})))
    params = vllm.SamplingParams(max_tokens=3, min_tokens=3, temperature=0, logprobs=5)
    items = _items()
    requests = [{"prompt": p, "multi_modal_data": {kind: media}} for kind, media, p in items]
    outs = llm.generate(requests, params, use_tqdm=False)  # one batch: both image sizes and the video
    reference = _reference(folder, runs_as, TOKENS, items)
    for o, (toks, logprobs, kept, newlines, length) in zip(outs, reference):
        assert kept == TOKENS and newlines in (8, 12, 1)
        assert len(o.prompt_token_ids) == length  # the text, the kept tokens and every newline
        assert list(o.outputs[0].token_ids) == toks
        for t, lp in o.outputs[0].logprobs[0].items():
            assert abs(lp.logprob - logprobs[t].item()) < 1e-4
    del llm
