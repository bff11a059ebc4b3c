"""`learnpruner bench` on tiny models: end to end, FLOPs against FlopCounterMode, KV-cache bytes, bad input.

No timing is asserted: only that every field is there and the counts are right.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_llava
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

import learnpruner
from learnpruner import bench
from learnpruner.cli import main

torch.set_num_threads(1)

FIELDS = ("method", "tokens", "batch_size", "prefill_ms", "decode_ms_per_token", "e2e_ms", "ideal_prefill_ms",
          "peak_mem_bytes", "kv_cache_bytes", "flops", "vision_ms", "stage1_ms", "llm_select_ms", "overhead",
          "device", "dtype", "torch", "transformers")
# analytic FLOPs leave out selection work (scores, the LPM) and RoPE's tiny matmul: allow 2%
FLOPS_RTOL = 0.02
TEXT = 20


def test_bench_cli_end_to_end_on_a_tiny_arch(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = main(["bench", "--arch", "llava-tiny", "--methods", "fastv,learnpruner", "--tokens", "48,24",
               "--batch-sizes", "1", "--new-tokens", "3", "--text-tokens", "16", "--repeats", "2", "--warmup", "1",
               "--variants", "2", "--device", "cpu", "--out", str(out), "--no-progress"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "| method | tokens | batch |" in stdout
    assert "lpm='random'" in stdout and "not available on CPU" in stdout
    records = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["tokens"], r["batch_size"]) for r in records] == [
        ("fastv", 48, 1), ("fastv", 24, 1), ("learnpruner", 48, 1), ("learnpruner", 24, 1)]
    for r in records:
        assert all(k in r for k in FIELDS), sorted(set(FIELDS) - set(r))
        assert f"| {r['method']} | {r['tokens']} | 1 |" in stdout
        assert r["peak_mem_bytes"] is None and r["device_type"] == "cpu"
        assert r["prefill_ms"] > 0 and r["e2e_ms"] > 0 and r["ideal_prefill_ms"] > 0 and r["vision_ms"] > 0
        assert abs(r["avg_visual_tokens"] - r["tokens"]) <= 1.0
        assert r["overhead"] == pytest.approx(r["prefill_ms"] / r["ideal_prefill_ms"])
        assert r["prefill_speedup"] is None  # `none` was not measured
    lp = [r for r in records if r["method"] == "learnpruner"]
    assert lp[1]["flops"] < lp[0]["flops"] and lp[1]["kv_cache_bytes"] < lp[0]["kv_cache_bytes"]
    assert lp[1]["stage1_ms"] > 0 and lp[1]["llm_select_ms"] > 0
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_bench_api_with_a_model_instance_and_none_baseline():
    model = tiny_llava(layers=4)
    records = bench.run_bench(model=model, methods="none,random", tokens=[16], batch_sizes=[2], new_tokens=2,
                              text_tokens=8, repeats=1, warmup=0, variants=1, device="cpu", progress=False)
    assert [(r["method"], r["tokens"]) for r in records] == [("none", 64), ("random", 16)]
    assert records[0]["prefill_speedup"] == 1.0 and records[1]["prefill_speedup"] > 0
    assert records[1]["flops_ratio"] < 1.0
    assert not learnpruner.is_pruned(model)


def _inputs(model, batch=2):
    inputs, _ = bench._make_inputs(model, batch, TEXT, 1, "cpu", torch.float32, seed=1)
    return inputs[0]


CASES = [("none", {}), ("random", {"tokens": 24}), ("fastv", {"tokens": 24}),
         ("learnpruner", {"tokens": 24, "lpm": "random"})]


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


# FlopCounterMode knows the CUDA SDPA kernels; on CPU SDPA runs the op below, counted the same way
CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


@torch.no_grad()
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method,opts", CASES)
def test_analytic_flops_match_flop_counter(method, opts, attn):
    """Both count a plain model(**inputs): every position through the lm_head (lm_head='all').

    Attention counts full non-causal q x kv in both (FlopCounterMode's SDPA formula; eager attention
    computes the full score matrix).
    """
    model = tiny_llava(attn=attn)
    inputs = _inputs(model)
    learnpruner.apply(model, method, **opts)
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter:
        model(**inputs, use_cache=False)
    # selection work is not in the analytic count: take the LPM's matmuls out (the score matmuls of the
    # LLM stage are a few q rows x kv, far below the tolerance)
    measured = counter.get_total_flops() - sum(counter.get_flop_counts().get("LearnablePruningModule", {}).values())
    sched = learnpruner.stats(model).schedule
    assert learnpruner.stats(model).tokens_per_layer == sched.per_layer()
    analytic = bench.analytic_flops(model.config, sched, 2, TEXT, lm_head="all")
    assert analytic == pytest.approx(measured, rel=FLOPS_RTOL)
    # "last" (the generate prefill) differs only by the lm_head over the other positions
    last = bench.analytic_flops(model.config, sched, 2, TEXT, lm_head="last")
    h, v = model.config.text_config.hidden_size, model.config.text_config.vocab_size
    assert analytic - last == 2 * 2 * h * v * (TEXT + sched.per_layer()[-1] - 1)


@torch.no_grad()
@pytest.mark.parametrize("method,opts", CASES)
def test_kv_cache_bytes_are_the_cache_tensors(method, opts):
    model = tiny_llava()
    inputs = _inputs(model)
    learnpruner.apply(model, method, **opts)
    out = model(**inputs, use_cache=True)
    cache = bench._output_cache(out)
    sched = learnpruner.stats(model).schedule
    tc = model.config.text_config
    hd = tc.hidden_size // tc.num_attention_heads
    # per layer: keys + values, [batch, kv heads, text + visual tokens of that layer, head dim], float32
    expected = sum(2 * 2 * tc.num_key_value_heads * (TEXT + v) * hd * 4 for v in sched.per_layer())
    assert bench.kv_cache_bytes(cache) == expected
    actual = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))
    assert bench.kv_cache_bytes(cache) == actual


def test_build_arch_configs_and_fast_random_weights():
    cfg = bench.arch_config("llava-1.5-7b")
    vc, tc = cfg.vision_config, cfg.text_config
    assert (vc.hidden_size, vc.num_hidden_layers, vc.num_attention_heads, vc.intermediate_size) == (1024, 24, 16, 4096)
    assert (vc.image_size // vc.patch_size) ** 2 == 576
    assert (tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads, tc.intermediate_size, tc.vocab_size) == (
        4096, 32, 32, 11008, 32064)
    tc13 = bench.arch_config("llava-1.5-13b").text_config
    assert (tc13.hidden_size, tc13.num_hidden_layers, tc13.num_attention_heads, tc13.intermediate_size) == (
        5120, 40, 40, 13824)
    mid = bench.arch_config("llava-mid")
    assert (mid.vision_config.image_size // mid.vision_config.patch_size) ** 2 == 576
    model = bench.build_arch("llava-tiny", torch.bfloat16, "cpu")
    params = list(model.parameters())
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in params)
    assert 0.005 < model.lm_head.weight.float().std().item() < 0.05
    out = model(**{k: v.to(torch.bfloat16) if v.is_floating_point() else v
                   for k, v in bench._make_inputs(model, 1, 8, 1, "cpu", torch.bfloat16)[0][0].items()})
    assert torch.isfinite(out.logits).all()


def test_unreachable_budget_is_skipped_with_its_reason():
    plan = bench._plan(["none", "fastv"], [48, 8], n=64, num_layers=8)
    assert [(m, t, s is None) for m, t, s, _ in plan] == [("none", 64, False), ("fastv", 48, False),
                                                          ("fastv", 8, True)]
    assert "at least 17" in plan[-1][3]


@pytest.mark.parametrize("kwargs,message", [
    ({"arch": "llava-9b"}, "unknown arch 'llava-9b'; accepted: llava-1.5-7b"),
    ({"arch": "llava-tiny", "methods": "none,bogus"}, "unknown method 'bogus'; known methods:"),
    ({"arch": "llava-tiny", "tokens": "64,0"}, "tokens must be a positive integer"),
    ({"arch": "llava-tiny", "tokens": "64,abc"}, "tokens: 'abc' is not a valid value"),
    ({"arch": "llava-tiny", "batch_sizes": "1,0"}, "batch sizes must be positive integers, got 0"),
    ({"arch": "llava-tiny", "batch_sizes": "-2"}, "batch sizes must be positive integers, got -2"),
    ({"arch": "llava-tiny", "new_tokens": 0}, "new_tokens must be an integer >= 1, got 0"),
    ({}, "give exactly one of model"),
])
def test_bad_input_fails_clearly(kwargs, message):
    with pytest.raises(ValueError, match=None) as err:
        bench.run_bench(progress=False, **kwargs)
    assert message in str(err.value)


def test_cli_bad_input_exits_2_naming_the_value(tmp_path, capsys):
    rc = main(["bench", "--arch", "nope", "--out", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "unknown arch 'nope'" in err and "llava-mid" in err
    assert main(["bench", "--arch", "llava-tiny", "--batch-sizes", "0", "--out", str(tmp_path)]) == 2
    assert "batch sizes must be positive integers, got 0" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_fast_flag_measures_the_fast_path_and_both_baselines(tmp_path):
    from learnpruner.bench import run_bench

    recs = run_bench(arch="llava-tiny", methods="none,learnpruner", tokens="24", batch_sizes="1", new_tokens=3,
                     repeats=1, warmup=0, variants=1, progress=False, device="cpu", fast=True)
    rows = [(r["method"], r["fast"], r["path"]) for r in recs]
    assert rows == [("none", False, "plain transformers (unpatched)"),
                    ("none", True, "learnpruner engine, fast decode path"),
                    ("learnpruner", True, "learnpruner engine, fast decode path")]
    assert recs[2]["like_for_like_e2e_speedup"] == pytest.approx(recs[1]["e2e_ms"] / recs[2]["e2e_ms"])
    assert recs[2]["e2e_speedup"] == pytest.approx(recs[0]["e2e_ms"] / recs[2]["e2e_ms"])


def test_an_arch_too_large_for_the_device_fails_before_allocating(monkeypatch):
    from learnpruner import bench

    monkeypatch.setattr(bench, "_available_bytes", lambda device: 2**30)
    with pytest.raises(ValueError, match=r"--arch llava-1.5-7b needs 2\d\.\d GiB .* has 1.0 GiB free"):
        bench.build_arch("llava-1.5-7b", torch.float32, "cpu")
