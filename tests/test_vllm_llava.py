"""learnpruner inside vLLM, LLaVA-1.5 (the shipped shapes-tiny): the plugin against the transformers engine.

Runs where vLLM is installed (`.ci/run` builds that environment: vLLM pins its own transformers); skipped
elsewhere. Engines start once per budget for the whole module (about 40 s each on a 2-core CPU).
"""

from __future__ import annotations

import os

import pytest
import torch

vllm = pytest.importorskip("vllm")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import learnpruner  # noqa: E402
from learnpruner.hub import BUILTIN_MODELS, load  # noqa: E402
from learnpruner.integrations.vllm import overrides  # noqa: E402
from learnpruner.testbed.shapes import generate_item  # noqa: E402

MODEL = str(BUILTIN_MODELS["shapes-tiny"])
ITEMS = [generate_item("test", i) for i in range(6)]
PROMPTS = [f"USER: <image>\n{it.question} ASSISTANT:" for it in ITEMS]
_ENGINES: dict = {}


@pytest.fixture(scope="module", autouse=True)
def stock_layout(tmp_path_factory):
    """shapes-tiny with its CLIP weights renamed to the layout vLLM 0.32's own LLaVA loader reads
    (``vision_tower.vision_model.*``): stock vLLM cannot load the transformers-5 layout, the plugin loads both."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("shapes-tiny-stock")
    for f in os.listdir(MODEL):
        if os.path.isfile(os.path.join(MODEL, f)) and f != "model.safetensors":
            shutil.copy(os.path.join(MODEL, f), folder / f)
    state = load_file(os.path.join(MODEL, "model.safetensors"))
    save_file({k.replace("vision_tower.", "vision_tower.vision_model.", 1) if k.startswith("vision_tower.") else k: v
               for k, v in state.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    STOCK_LAYOUT.append(str(folder))
    yield
    _ENGINES.clear()  # the engines go with the module (the server test starts its own)
    import gc

    gc.collect()


STOCK_LAYOUT: list[str] = []


def engine(hf_overrides: dict | None):
    key = repr(hf_overrides)
    if key not in _ENGINES:
        path = MODEL if hf_overrides is not None else STOCK_LAYOUT[0]
        _ENGINES[key] = vllm.LLM(path, dtype="float32", enforce_eager=True, max_model_len=1024,
                                 mm_processor_cache_gb=0, limit_mm_per_prompt={"image": 1},
                                 gpu_memory_utilization=0.1, hf_overrides=hf_overrides, seed=0)
    return _ENGINES[key]


def served(hf_overrides: dict | None):
    """``(prompt token count, greedy tokens, first-token logprobs {token: logprob})`` per prompt."""
    params = vllm.SamplingParams(max_tokens=4, temperature=0, logprobs=5)
    out = engine(hf_overrides).generate([{"prompt": p, "multi_modal_data": {"image": it.image}}
                                         for p, it in zip(PROMPTS, ITEMS)], params, use_tqdm=False)
    return [(len(o.prompt_token_ids), list(o.outputs[0].token_ids),
             {t: lp.logprob for t, lp in o.outputs[0].logprobs[0].items()}) for o in out]


@pytest.fixture(scope="module")
def transformers_model():
    return load("shapes-tiny")


@torch.no_grad()
def reference(model_processor, method: str | None, tokens: int, **options):
    """The transformers engine with the same rule, budget and contiguous positions (vLLM's numbering)."""
    model, processor = model_processor
    if method is not None:
        learnpruner.apply(model, method, tokens=tokens, positions="contiguous", **options)
    try:
        out = []
        for p, it in zip(PROMPTS, ITEMS):
            inp = processor(images=it.image, text=p, return_tensors="pt")
            g = model.generate(**inp, max_new_tokens=4, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
            out.append((g.sequences[0, inp["input_ids"].shape[1]:].tolist(),
                        torch.log_softmax(g.logits[0][0].float(), -1)))
        return out
    finally:
        if method is not None:
            learnpruner.remove(model)


@pytest.mark.parametrize("method,runs_as,tokens,options", [
    ("learnpruner", "lpm-only", 64, {}), ("divprune", "divprune", 32, {}),
    ("learnpruner-set", "learnpruner-set", 32, {"lpm": "random", "gamma": 0.5})])
def test_greedy_tokens_and_logprobs_equal_the_transformers_engine(transformers_model, method, runs_as, tokens, options):
    got = served(overrides("llava", method, tokens, **options))
    stock = served(None)
    for (n_tokens, toks, lps), (n_stock, *_), (ref_toks, ref_lp) in zip(got, stock, reference(
            transformers_model, runs_as, tokens, **options)):
        assert n_tokens == n_stock - 576 + tokens  # the prompt holds the kept visual tokens only
        assert toks == ref_toks
        for t, lp in lps.items():
            assert abs(lp - ref_lp[t].item()) < 1e-4, (t, lp, ref_lp[t].item())


def test_a_budget_that_keeps_every_token_is_stock_vllm(transformers_model):
    full, stock = served(overrides("llava", "learnpruner", 576)), served(None)
    assert full == stock
    for (_, toks, _), (ref_toks, _) in zip(stock, reference(transformers_model, None, 576)):
        assert toks == ref_toks


def test_a_method_vllm_cannot_run_is_refused_when_the_engine_starts():
    bad = {"architectures": ["LearnPrunerLlavaForConditionalGeneration"],
           "learnpruner": {"method": "fastv", "tokens": 64}}
    with pytest.raises(ValueError, match=r"method 'fastv' drops visual tokens inside the LLM, which vLLM cannot run"):
        vllm.LLM(MODEL, dtype="float32", enforce_eager=True, max_model_len=1024, mm_processor_cache_gb=0,
                 gpu_memory_utilization=0.1, hf_overrides=bad)


def test_vllm_bench_measures_stock_and_pruned_serving(tmp_path):
    import json

    from learnpruner.integrations.vllm.bench import run_vllm_bench, table

    records = run_vllm_bench(None, "llava-tiny", [("none", None), ("learnpruner", 16)], requests=4, new_tokens=2,
                             repeats=2, out_dir=str(tmp_path), engine_kwargs={"gpu_memory_utilization": 0.1},
                             print_fn=lambda *a: None)
    none, pruned = records
    assert none["prompt_tokens"] - pruned["prompt_tokens"] == 64 - 16  # llava-tiny: 64 visual tokens per image
    assert all(r["ttft_ms"] > 0 and r["requests_per_s"] > 0 and r["card"].startswith(("cpu", "NVIDIA"))
               for r in records)
    assert json.loads((tmp_path / "vllm-bench.json").read_text()) == records
    assert "| learnpruner | 16 |" in table(records)
    for r in records:  # percentiles as vLLM's serving benchmark reports them
        assert r["ttft_ms_p50"] <= r["ttft_ms_p90"] <= r["ttft_ms_p99"] and r["latency_ms_p50"] > 0
    assert "TTFT ms p50 / p90 / p99" in table(records)


def test_tensor_parallel_ranks_select_alike(transformers_model, monkeypatch):
    """TP=2 on the CPU backend (one core per rank): every rank runs stage 1 on the full projector input and
    must keep the same rows, so the answer equals the transformers engine's as at TP=1."""
    vllm.envs.disable_envs_cache()  # an earlier engine froze vLLM's environment variables
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # vLLM's CPU workers bind one NUMA node each otherwise
    llm = vllm.LLM(MODEL, dtype="float32", enforce_eager=True, max_model_len=1024, mm_processor_cache_gb=0,
                   limit_mm_per_prompt={"image": 1}, gpu_memory_utilization=0.1, seed=0, tensor_parallel_size=2,
                   distributed_executor_backend="mp", hf_overrides=overrides("llava", "learnpruner", 64))
    try:
        params = vllm.SamplingParams(max_tokens=4, temperature=0, logprobs=5)
        out = llm.generate([{"prompt": p, "multi_modal_data": {"image": it.image}} for p, it in zip(PROMPTS, ITEMS)],
                           params, use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
    for o, (ref_toks, ref_lp) in zip(out, reference(transformers_model, "lpm-only", 64)):
        assert list(o.outputs[0].token_ids) == ref_toks
        for t, lp in o.outputs[0].logprobs[0].items():
            assert abs(lp.logprob - ref_lp[t].item()) < 1e-4
