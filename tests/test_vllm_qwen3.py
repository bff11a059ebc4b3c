"""learnpruner inside vLLM, Qwen3-VL: images, timestamped videos and both in one prompt (DeepStack pruned with the
main embedding) against the transformers engine (``stage1_unit="crop"``: vLLM splits a video's budget over its
frame groups).

A tiny random Qwen3-VL (3-block tower with 16 px patches and DeepStack taps after blocks 0 and 2, a 4-layer LLM
with head size 32 for vLLM's CPU attention) saved with a Qwen3-VL processor over the testbed vocabulary. Its
DeepStack mergers are scaled up so that their additions move the logits. Runs where vLLM is installed (see
.ci/run).
"""

from __future__ import annotations

import gc
import itertools
import os

import pytest
import torch

vllm = pytest.importorskip("vllm")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from test_vllm_qwen import _assert_equal  # noqa: E402  (tokens, first-step log-probabilities, prompt lengths)

import learnpruner  # noqa: E402
from learnpruner.integrations.vllm import overrides  # noqa: E402

TOKENS = 12
IMAGE = (128, 192)  # (height, width) px: an 8 x 12 patch grid, 24 tokens
SMALL = (64, 96)  # 4 x 6 patches: 6 tokens, below the budget (kept whole)
VIDEO = (10, 64, 96)  # frames, height, width: 5 temporal groups of 2 x 3 = 6 tokens; 12 kept as 3, 3, 2, 2, 2
VID = "<|vision_start|><|video_pad|><|vision_end|>"
QUESTION = "what colour is the circle ?"
IMG = "<|vision_start|><|image_pad|><|vision_end|>"
INIT = 0.15
_ENGINES: dict = {}


def _save_tiny(path, moe: bool = False) -> str:
    """A tiny random Qwen3-VL (or Qwen3-VL-MoE) with scaled-up DeepStack mergers and its processor, saved to
    ``path``. MoE experts are written in the released checkpoints' layout (``gate_up_proj`` ``[experts, hidden,
    2 * inter]``, ``down_proj`` ``[experts, inter, hidden]``), which vLLM reads and transformers reads too
    (transformers 5.19 saves them transposed, which vLLM 0.32 cannot load)."""
    import transformers
    from safetensors.torch import load_file, save_file

    from learnpruner.adapters.qwen2_5_vl_bench import token_ids
    from learnpruner.adapters.qwen3_vl_bench import word_processor

    processor = word_processor(min_pixels=32 * 32, max_pixels=10 * 64 * 96)  # a video's bound is on all its frames
    tok = processor.tokenizer
    torch.manual_seed(0)
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
                num_key_value_heads=1, head_dim=32, max_position_embeddings=2048, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, initializer_range=INIT,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 6, 6],
                                 "mrope_interleaved": True})
    if moe:
        # norm_topk_prob: as the released configs say (vLLM reads it; transformers always normalises)
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, decoder_sparse_step=1,
                    norm_topk_prob=True)
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64, deepstack_visual_indexes=[0, 2],
                  num_position_embeddings=64)
    name = "Qwen3VLMoe" if moe else "Qwen3VL"
    config = getattr(transformers, f"{name}Config")(text_config=text, vision_config=vision, **token_ids(tok))
    model = getattr(transformers, f"{name}ForConditionalGeneration")(config).eval()
    with torch.no_grad():
        for merger in model.model.visual.deepstack_merger_list:
            merger.linear_fc2.weight.mul_(30.0)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    if moe:
        weights = load_file(path / "model.safetensors")
        for key in weights:
            if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
                weights[key] = weights[key].transpose(1, 2).contiguous()
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return str(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    yield _save_tiny(tmp_path_factory.mktemp("tiny-qwen3"))
    _ENGINES.clear()
    gc.collect()


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory):
    yield _save_tiny(tmp_path_factory.mktemp("tiny-qwen3-moe"), moe=True)
    _ENGINES.clear()
    gc.collect()


def _engine(folder, hf_overrides):
    key = repr(hf_overrides)
    if key not in _ENGINES:
        _ENGINES[key] = vllm.LLM(folder, dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
                                 mm_processor_cache_gb=0, limit_mm_per_prompt={"image": 2, "video": 1},
                                 gpu_memory_utilization=0.1, hf_overrides=hf_overrides)
    return _ENGINES[key]


def _requests():
    """(prompt, images, video): one image; two images (one below the budget); a video; an image, a video and an
    image."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)

    def image(h, w):
        return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())

    big, small = image(*IMAGE), image(*SMALL)
    video = (torch.rand(*VIDEO, 3, generator=g) * 255).to(torch.uint8).numpy()
    return [(f"<s> user : {IMG} {QUESTION} assistant :", [big], None),
            (f"<s> user : {IMG} and {IMG} {QUESTION} assistant :", [big, small], None),
            (f"<s> user : {VID} {QUESTION} assistant :", [], video),
            (f"<s> user : {IMG} {VID} and {IMG} {QUESTION} assistant :", [big, small], video)]


def _metadata(video) -> dict:
    """The video's metadata as both engines read it: every frame, at 2 fps."""
    return {"fps": 2.0, "frames_indices": list(range(len(video))), "total_num_frames": len(video),
            "duration": len(video) / 2.0}


@torch.no_grad()
def _reference(folder, method, tokens):
    """Per request: greedy tokens, first-step log-probabilities and the prompt length, from the transformers
    engine (``method`` None: the unpruned model), stage 1 per frame group as vLLM runs it."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    if method is not None:
        lpm = {"lpm": "random"} if learnpruner.get_method(method).needs_lpm else {}
        learnpruner.apply(model, method, tokens=tokens, stage1_unit="crop", **lpm)
    out = []
    for prompt, images, video in _requests():
        kw = {} if video is None else {"videos": [video], "video_metadata": [_metadata(video)],
                                       "do_sample_frames": False}
        inp = processor(text=[prompt], images=images or None, return_tensors="pt", **kw)
        g = model.generate(**inp, max_new_tokens=3, min_new_tokens=3, do_sample=False, output_logits=True,
                           return_dict_in_generate=True)
        stats = learnpruner.stats(model).images if method is not None else []
        counts = [s.count for s in stats]
        kept = [len(s.stage1_kept) if s.stage1_kept is not None else s.count for s in stats]
        out.append(dict(tokens=g.sequences[0, inp["input_ids"].shape[1]:].tolist(),
                        logprobs=torch.log_softmax(g.logits[0][0], -1), counts=counts, kept=kept,
                        length=inp["input_ids"].shape[1] - sum(counts) + sum(kept)))
    return out


def _generate(llm):
    params = vllm.SamplingParams(max_tokens=3, min_tokens=3, temperature=0, logprobs=5)
    inputs = []
    for prompt, images, video in _requests():
        data = {"image": images if len(images) > 1 else images[0]} if images else {}
        if video is not None:
            data["video"] = (video, {**_metadata(video), "video_backend": "opencv", "do_sample_frames": False})
        inputs.append({"prompt": prompt, "multi_modal_data": data})
    return llm.generate(inputs, params, use_tqdm=False)


@pytest.mark.parametrize("method,runs_as", [("learnpruner", "lpm-only"), ("learnpruner-set", "learnpruner-set")])
def test_images_videos_and_both_equal_the_transformers_engine_deepstack_included(folder, method, runs_as):
    llm = _engine(folder, overrides("qwen3_vl", method, TOKENS, lpm="random"))
    reference = _reference(folder, runs_as, TOKENS)
    assert [r["counts"] for r in reference] == [[24], [24, 6], [30], [24, 30, 6]]
    assert [r["kept"] for r in reference] == [[12], [12, 6], [12], [12, 12, 6]]
    _assert_equal(_generate(llm), reference)


def _fresh_engines() -> None:
    """Drop the cached engines and vLLM's process-wide parallel state: in-process engines (no multiprocessing)
    share it, and a MoE engine needs an expert-parallel group that an earlier dense engine's state lacks."""
    from vllm.distributed import cleanup_dist_env_and_memory

    _ENGINES.clear()
    gc.collect()
    cleanup_dist_env_and_memory()


def test_the_moe_model_equals_the_transformers_engine(moe_folder):
    from transformers import AutoConfig

    assert type(AutoConfig.from_pretrained(moe_folder)).__name__ == "Qwen3VLMoeConfig"
    _fresh_engines()
    try:
        stock = _generate(_engine(moe_folder, None))
        _assert_equal(stock, _reference(moe_folder, None, None))  # stock vLLM reads the checkpoint as transformers
        llm = _engine(moe_folder, overrides("qwen3_vl_moe", "learnpruner", TOKENS, lpm="random"))
        reference = _reference(moe_folder, "lpm-only", TOKENS)
        assert [r["kept"] for r in reference] == [[12], [12, 6], [12], [12, 12, 6]]
        _assert_equal(_generate(llm), reference)
    finally:
        _fresh_engines()


def test_a_videos_placeholder_runs_are_its_groups_shares(folder):
    from learnpruner.integrations.vllm.qwen3_vl import group_shares
    from learnpruner.integrations.vllm.stage1 import Stage1Spec

    llm = _engine(folder, overrides("qwen3_vl", "learnpruner", TOKENS, lpm="random"))
    video_id = llm.llm_engine.model_config.hf_config.video_token_id
    ids = _generate(llm)[2].prompt_token_ids
    runs = [len(list(run)) for token, run in itertools.groupby(ids) if token == video_id]
    assert runs == [3, 3, 2, 2, 2]
    assert group_shares(Stage1Spec.check("learnpruner", TOKENS), 5, 6) == [3, 3, 2, 2, 2]


def test_a_budget_that_keeps_every_token_is_stock_vllm(folder):  # 30: the video's count, the largest
    stock = _generate(_engine(folder, None))
    whole = _generate(_engine(folder, overrides("qwen3_vl", "divprune", 30)))
    _assert_equal(stock, _reference(folder, None, None))
    for s, w in zip(stock, whole, strict=True):
        assert w.prompt_token_ids == s.prompt_token_ids
        assert list(w.outputs[0].token_ids) == list(s.outputs[0].token_ids)
        for t, lp in s.outputs[0].logprobs[0].items():
            assert abs(w.outputs[0].logprobs[0][t].logprob - lp.logprob) < 1e-5


def test_evs_with_a_learnpruner_budget_is_refused_when_the_engine_starts(folder):
    with pytest.raises(ValueError, match=r"video_pruning_rate \(vLLM's EVS\) and a learnpruner budget both prune"):
        vllm.LLM(folder, dtype="float32", enforce_eager=True, max_model_len=1024, mm_processor_cache_gb=0,
                 gpu_memory_utilization=0.1, video_pruning_rate=0.5,
                 hf_overrides=overrides("qwen3_vl", "divprune", TOKENS))


def test_vllm_bench_serves_a_qwen3_architecture(tmp_path):
    from learnpruner.integrations.vllm.bench import run_vllm_bench

    records = run_vllm_bench(None, "qwen3-vl-tiny", [("none", None), ("divprune", 16)], requests=2, new_tokens=2,
                             repeats=1, out_dir=str(tmp_path), engine_kwargs={"gpu_memory_utilization": 0.1,
                                                                              "max_model_len": 4096},
                             print_fn=lambda *a: None)
    none, pruned = records
    assert none["prompt_tokens"] - pruned["prompt_tokens"] == 1280 - 16  # one 1024x1280 image: 1280 tokens


def test_a_video_with_more_groups_than_kept_tokens_keeps_one_per_group_and_the_engine_lives(folder):
    """divprune at 3 tokens on a 5-group video: every group keeps one token (no empty run for the mergers), as the
    transformers engine's per-group split does, and the next ordinary request is answered."""
    llm = _engine(folder, overrides("qwen3_vl", "divprune", 3))
    reference = _reference(folder, "divprune", 3)
    assert reference[2]["kept"] == [5]  # one per group, above the budget of 3: the floor, stated in stats
    outs = _generate(llm)
    _assert_equal(outs, reference)
    video_id = llm.llm_engine.model_config.hf_config.video_token_id
    runs = [len(list(run)) for token, run in itertools.groupby(outs[2].prompt_token_ids) if token == video_id]
    assert runs == [1, 1, 1, 1, 1]
    again = _generate(llm)  # the engine answers the same requests again
    assert [list(o.outputs[0].token_ids) for o in again] == [list(o.outputs[0].token_ids) for o in outs]


def test_the_processing_info_counts_what_the_processor_writes(folder):
    """``get_num_video_tokens`` (vLLM's encoder-cache and scheduling size) is the kept count the prompt holds, one
    per group included; the profiler's frame search finds the most frames whose unpruned tokens fit the bound."""
    from vllm.multimodal import MULTIMODAL_REGISTRY

    for tokens, kept in ((TOKENS, 12), (3, 5)):
        llm = _engine(folder, overrides("qwen3_vl", "divprune", tokens))
        info = MULTIMODAL_REGISTRY.create_processor(llm.llm_engine.model_config).info
        video_id = llm.llm_engine.model_config.hf_config.video_token_id
        held = sum(t == video_id for t in _generate(llm)[2].prompt_token_ids)
        frames, height, width = VIDEO
        counted = info.get_num_video_tokens(image_width=width, image_height=height, num_frames=frames,
                                            image_processor=info.get_video_processor(), mm_kwargs={})
        assert counted == held == kept
    processor = info.get_image_processor()
    w, h = info.get_image_size_with_most_features()

    def unpruned(frames):
        from vllm.model_executor.models.qwen3_vl import Qwen3VLProcessingInfo

        return Qwen3VLProcessingInfo.get_num_video_tokens(info, image_width=w, image_height=h, num_frames=frames,
                                                          image_processor=processor, mm_kwargs={})

    for bound in (unpruned(4), unpruned(4) + 1, unpruned(9)):
        found = info._get_max_video_frames(bound)
        assert unpruned(found) <= bound < unpruned(found + 1)


def test_positions_do_not_depend_on_the_order_of_the_items(folder):
    """``get_mrope_input_positions`` numbers the prompt from its items sorted by place: the same positions whatever
    order vLLM lists them in."""
    llm = _engine(folder, overrides("qwen3_vl", "learnpruner", TOKENS, lpm="random"))
    model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    out = _generate(llm)[3]  # image, video, image
    from vllm.multimodal.inputs import MultiModalFeatureSpec  # noqa: F401  (the spec type vLLM passes)

    captured = []
    real = type(model).get_mrope_input_positions

    def spy(self, input_tokens, mm_features):
        captured.append((list(input_tokens), list(mm_features)))
        return real(self, input_tokens, mm_features)

    type(model).get_mrope_input_positions = spy
    try:
        _generate(llm)
    finally:
        type(model).get_mrope_input_positions = real
    tokens, features = next(c for c in captured if len(c[1]) == 3)
    assert tokens == list(out.prompt_token_ids)
    forward, fwd_delta = real(model, tokens, features)
    backward, bwd_delta = real(model, tokens, features[::-1])
    assert torch.equal(forward, backward) and fwd_delta == bwd_delta


def test_a_learnpruner_entry_without_its_architecture_is_refused(folder):
    entry = overrides("qwen3_vl", "divprune", TOKENS)
    with pytest.raises(ValueError, match="architectures do not name learnpruner's"):
        vllm.LLM(folder, dtype="float32", enforce_eager=True, max_model_len=1024, mm_processor_cache_gb=0,
                 gpu_memory_utilization=0.1, hf_overrides={"learnpruner": entry["learnpruner"]})


def test_the_engine_says_what_it_prunes_when_it_starts(folder, capfd):
    import logging

    # vLLM configures logging when its first engine starts, which resets the handlers of loggers below "vllm" made
    # before; its own handler may write to a stream captured earlier. Read both: a handler of ours, and the output
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("vllm.learnpruner")
    logger.addHandler(handler)
    _fresh_engines()
    capfd.readouterr()
    try:
        _engine(folder, overrides("qwen3_vl", "learnpruner", TOKENS, lpm="random"))
    finally:
        logger.removeHandler(handler)
    captured = capfd.readouterr()
    lines = records + (captured.out + captured.err).splitlines()
    line = next(x for x in lines if "learnpruner: serving" in x)
    assert "serving qwen3_vl with learnpruner (runs as lpm-only: stage 1 only), tokens=12" in line
    assert "LPM: random (untrained, seed 0)" in line
    _fresh_engines()
