"""learnpruner inside vLLM, Qwen2.5-VL: images, videos and both in one prompt, against the transformers engine.

A tiny random Qwen2.5-VL (windowed 3-block tower, 2x2 merge; a 4-layer LLM with head size 32 for vLLM's CPU
attention and ``mrope_section`` [4, 6, 6]) saved with a PIL image processor, a video processor and the testbed
vocabulary plus Qwen's vision tokens. Kept tokens keep their original 3-D positions in both engines. Runs where
vLLM is installed (see .ci/run); one pruned engine and one stock engine for the module.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

vllm = pytest.importorskip("vllm")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import learnpruner  # noqa: E402
from learnpruner.integrations.vllm import overrides  # noqa: E402

TOKENS = 12
IMAGE = (112, 168)  # (height, width) px: an 8 x 12 patch grid, 24 tokens
SMALL = (56, 84)  # 4 x 6 patches: 6 tokens, below the budget (kept whole)
VIDEO = (4, 84, 112)  # frames, height, width: 2 temporal groups of 3 x 4 tokens = 24
QUESTION = "what colour is the circle ?"
IMG = "<|vision_start|><|image_pad|><|vision_end|>"
VID = "<|vision_start|><|video_pad|><|vision_end|>"
INIT = 0.15  # weights large enough that rotary positions move the logits (0.02 hides a wrong position)
_ENGINES: dict = {}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from learnpruner.adapters.qwen2_5_vl_bench import token_ids, word_processor

    processor = word_processor(min_pixels=28 * 28, max_pixels=112 * 168)
    tok = processor.tokenizer
    torch.manual_seed(0)
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=2048, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, initializer_range=INIT,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 6, 6]})
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1], out_hidden_size=64,
                  tokens_per_second=2)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **token_ids(tok))
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    path = tmp_path_factory.mktemp("tiny-qwen")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    yield str(path)
    _ENGINES.clear()
    gc.collect()


def _engine(folder, hf_overrides):
    key = repr(hf_overrides)
    if key not in _ENGINES:
        _ENGINES[key] = vllm.LLM(folder, dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
                                 mm_processor_cache_gb=0, limit_mm_per_prompt={"image": 2, "video": 1},
                                 gpu_memory_utilization=0.1, hf_overrides=hf_overrides)
    return _ENGINES[key]


def _media():
    from PIL import Image

    g = torch.Generator().manual_seed(0)

    def image(h, w):
        return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())

    video = (torch.rand(*VIDEO, 3, generator=g) * 255).to(torch.uint8).numpy()
    return image(*IMAGE), image(*SMALL), video


def _requests():
    """(prompt, images, video): an image, a video, a video and two images (one below the budget)."""
    big, small, video = _media()
    return [
        (f"<s> user : {IMG} {QUESTION} assistant :", [big], None),
        (f"<s> user : {VID} {QUESTION} assistant :", [], video),
        (f"<s> user : {IMG} {VID} and {IMG} {QUESTION} assistant :", [big, small], video),
    ]


def _vllm_inputs(prompt, images, video):
    data = {}
    if images:
        data["image"] = images if len(images) > 1 else images[0]
    if video is not None:
        data["video"] = (video, {"fps": 2.0, "frames_indices": list(range(len(video))), "total_num_frames": len(video),
                                 "duration": len(video) / 2.0, "video_backend": "opencv", "do_sample_frames": False})
    return {"prompt": prompt, "multi_modal_data": data}


@torch.no_grad()
def _reference(folder, method, tokens):
    """Per request: greedy tokens, first-step log-probabilities, kept count per item and the prompt length, from
    the transformers engine (``method`` None: the unpruned model)."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    if method is not None:
        learnpruner.apply(model, method, tokens=tokens, lpm="random")
    out = []
    for prompt, images, video in _requests():
        kw = {"images": images or None, "videos": [video] if video is not None else None}
        inp = processor(text=[prompt], return_tensors="pt", do_sample_frames=False, **kw)
        if video is not None:  # 2 frames a group at 2 fps, as vLLM reads the metadata (the processor assumes 24 fps)
            inp["second_per_grid_ts"] = torch.tensor([1.0])
        g = model.generate(**inp, max_new_tokens=3, min_new_tokens=3, do_sample=False, output_logits=True,
                           return_dict_in_generate=True)
        counts = [s.count for s in learnpruner.stats(model).images] if method is not None else []
        kept = [len(s.stage1_kept) if s.stage1_kept is not None else s.count
                for s in learnpruner.stats(model).images] if method is not None else []
        out.append(dict(tokens=g.sequences[0, inp["input_ids"].shape[1]:].tolist(),
                        logprobs=torch.log_softmax(g.logits[0][0], -1), counts=counts, kept=kept,
                        length=inp["input_ids"].shape[1] - sum(counts) + sum(kept)))
    return out


def _generate(llm):
    params = vllm.SamplingParams(max_tokens=3, min_tokens=3, temperature=0, logprobs=5)
    return llm.generate([_vllm_inputs(*r) for r in _requests()], params, use_tqdm=False)  # one batch


def _assert_equal(outs, reference):
    for o, ref in zip(outs, reference):
        assert len(o.prompt_token_ids) == ref["length"]
        assert list(o.outputs[0].token_ids) == ref["tokens"]
        for t, lp in o.outputs[0].logprobs[0].items():
            assert abs(lp.logprob - ref["logprobs"][t].item()) < 1e-4


@pytest.mark.parametrize("method,runs_as", [("learnpruner", "lpm-only"), ("learnpruner-set", "learnpruner-set")])
def test_images_videos_and_both_equal_the_transformers_engine(folder, method, runs_as):
    llm = _engine(folder, overrides("qwen2_5_vl", method, TOKENS, lpm="random"))
    reference = _reference(folder, runs_as, TOKENS)
    assert [r["counts"] for r in reference] == [[24], [24], [24, 24, 6]]
    assert [r["kept"] for r in reference] == [[12], [12], [12, 12, 6]]
    _assert_equal(_generate(llm), reference)


def test_a_budget_that_keeps_every_token_is_stock_vllm(folder):
    stock = _generate(_engine(folder, None))
    whole = _generate(_engine(folder, overrides("qwen2_5_vl", "divprune", 24)))  # every item has <= 24 tokens
    _assert_equal(stock, _reference(folder, None, None))
    for s, w in zip(stock, whole):
        assert w.prompt_token_ids == s.prompt_token_ids
        assert list(w.outputs[0].token_ids) == list(s.outputs[0].token_ids)
        for t, lp in s.outputs[0].logprobs[0].items():
            assert abs(w.outputs[0].logprobs[0][t].logprob - lp.logprob) < 1e-5


def test_grid_offsets_travel_exactly_in_bfloat16():
    from learnpruner.integrations.vllm.mrope import decode_offsets, encode_offsets

    offsets = torch.tensor([[0, 255, 256, 65535], [3, 1000, 7, 0], [40000, 1, 2, 257]])
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert torch.equal(decode_offsets(encode_offsets(offsets, dtype)), offsets)
    with pytest.raises(ValueError, match="65536"):
        encode_offsets(torch.tensor([[65536], [0], [0]]), torch.float32)


def test_grid_offsets_number_tokens_as_get_rope_index():
    from learnpruner.adapters.qwen2_5_vl import grid_extent, grid_offsets

    assert grid_offsets(torch.arange(12), (2, 2, 3), 2.0).tolist() == [
        [0] * 6 + [2] * 6, [0, 0, 0, 1, 1, 1] * 2, [0, 1, 2] * 4]
    assert grid_extent((2, 2, 3), 2.0) == 3 and grid_extent((1, 4, 6)) == 6
    assert grid_offsets(torch.tensor([0, 6, 12]), (3, 2, 3), 0.5)[0].tolist() == [0, 0, 1]


def test_tensor_parallel_ranks_keep_the_same_tokens_and_positions(folder, monkeypatch):
    vllm.envs.disable_envs_cache()  # an earlier engine froze vLLM's environment variables
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per rank (vLLM binds NUMA nodes otherwise)
    llm = vllm.LLM(folder, dtype="float32", enforce_eager=True, max_model_len=1024, seed=0, mm_processor_cache_gb=0,
                   limit_mm_per_prompt={"image": 2, "video": 1}, gpu_memory_utilization=0.1, tensor_parallel_size=2,
                   distributed_executor_backend="mp", hf_overrides=overrides("qwen2_5_vl", "learnpruner", TOKENS,
                                                                             lpm="random"))
    try:
        outs = _generate(llm)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
    _assert_equal(outs, _reference(folder, "lpm-only", TOKENS))


def test_vllm_bench_serves_a_qwen_architecture(tmp_path):
    from learnpruner.integrations.vllm.bench import run_vllm_bench

    records = run_vllm_bench(None, "qwen2.5-vl-tiny", [("none", None), ("divprune", 16)], requests=2, new_tokens=2,
                             repeats=1, out_dir=str(tmp_path), engine_kwargs={"gpu_memory_utilization": 0.1,
                                                                              "max_model_len": 4096},
                             print_fn=lambda *a: None)
    none, pruned = records
    assert none["prompt_tokens"] - pruned["prompt_tokens"] == 1280 - 16  # one 896x1120 image: 1280 tokens


def test_evs_with_a_learnpruner_budget_is_refused_when_the_engine_starts(folder):
    with pytest.raises(ValueError, match=r"video_pruning_rate \(vLLM's EVS\) and a learnpruner budget both prune"):
        vllm.LLM(folder, dtype="float32", enforce_eager=True, max_model_len=1024, mm_processor_cache_gb=0,
                 gpu_memory_utilization=0.1, video_pruning_rate=0.5,
                 hf_overrides=overrides("qwen2_5_vl", "divprune", TOKENS))
