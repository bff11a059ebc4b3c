"""`learnpruner bench` on tiny models: end to end, FLOPs against FlopCounterMode, KV-cache bytes, bad input.

No timing is asserted: only that every field is there and the counts are right.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_llava, tiny_llava_next
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
    plan = bench._plan(tiny_llava(layers=8), ["none", "fastv"], [48, 8], n=64)  # 112 px: 64 tokens
    assert [(m, t, s is None) for m, t, s, _ in plan] == [("none", 64, False), ("fastv", 48, False),
                                                          ("fastv", 8, True)]
    assert "at least 17" in plan[-1][3]


@pytest.mark.parametrize("kwargs,message", [
    ({"arch": "llava-9b"}, "unknown arch 'llava-9b'; accepted: internvl3-8b, internvl3-mid, internvl3-tiny, llava-"),
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
                    ("none", True, "learnpruner engine, fast path (static prefill and decode)"),
                    ("learnpruner", True, "learnpruner engine, fast path (static prefill and decode)")]
    assert recs[2]["like_for_like_e2e_speedup"] == pytest.approx(recs[1]["e2e_ms"] / recs[2]["e2e_ms"])
    assert recs[2]["e2e_speedup"] == pytest.approx(recs[0]["e2e_ms"] / recs[2]["e2e_ms"])


def test_an_arch_too_large_for_the_device_fails_before_allocating(monkeypatch):
    from learnpruner import bench
    from learnpruner.bench import archs

    monkeypatch.setattr(archs, "_available_bytes", lambda device: 2**30)
    with pytest.raises(ValueError, match=r"--arch llava-1.5-7b needs 2\d\.\d GiB .* has 1.0 GiB free"):
        bench.build_arch("llava-1.5-7b", torch.float32, "cpu")


# --- LLaVA-NeXT ---------------------------------------------------------------------------------------


def _measured(records):
    return [r for r in records if "skipped" not in r]


def test_bench_cli_end_to_end_on_a_tiny_next_arch(tmp_path, capsys):
    """llava-next-tiny: a 112x112 image is 5 crops of 56 px, 80 visual tokens + 8 row newlines."""
    out = tmp_path / "bench"
    rc = main(["bench", "--arch", "llava-next-tiny", "--methods", "none,fastv,learnpruner", "--tokens", "32,16",
               "--new-tokens", "3", "--text-tokens", "12", "--repeats", "1", "--warmup", "0", "--variants", "2",
               "--device", "cpu", "--out", str(out), "--no-progress"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "one 112x112 image (5 crops): 80 visual tokens + 8 structure tokens" in stdout
    assert "fastv tokens=16 batch=1: skipped (fastv prunes at LLM layer 2 of 8" in stdout
    records = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["tokens"], "skipped" in r) for r in records] == [
        ("none", 80, False), ("fastv", 32, False), ("fastv", 16, True), ("learnpruner", 32, False),
        ("learnpruner", 16, False)]
    cfg = bench.arch_config("llava-next-tiny")
    for r in _measured(records):
        assert (r["family"], r["image_size"], r["crops"], r["visual_tokens"], r["structure_tokens"]) == (
            "llava_next", [112, 112], 5, 80, 8)
        assert all(k in r for k in FIELDS), sorted(set(FIELDS) - set(r))
        [image] = r["images"]  # one image per sample, batch 1
        assert (image["count"], image["structure"]) == (80, 8)
        assert image["tokens_per_layer"] == r["tokens_per_layer"] and image["avg_visual_tokens"] == r[
            "avg_visual_tokens"]
        assert abs(r["avg_visual_tokens"] - r["tokens"]) <= 1.0
        sched = learnpruner.get_method(r["method"]).schedule(r["tokens"], 80, 8, {})
        assert r["tokens_per_layer"] == sched.per_layer()
        assert r["flops"] == bench.analytic_flops(cfg, sched, 1, 12)
        # the cache holds text + newlines + each layer's visual tokens, exactly
        assert r["kv_cache_bytes"] == bench.analytic_kv_bytes(cfg, sched, 1, 12, dtype=torch.float32)
        assert r["prefill_ms"] > 0 and r["vision_ms"] > 0 and r["ideal_prefill_ms"] > 0
        assert r["prefill_speedup"] is not None and r["flops_ratio"] <= 1.0
    lp = [r for r in records if r["method"] == "learnpruner"]
    assert lp[0]["images"][0]["tokens_per_layer"] == [55, 55, 55, 18, 18, 18, 18, 18]
    assert lp[1]["kv_cache_bytes"] < lp[0]["kv_cache_bytes"] < records[0]["kv_cache_bytes"]


def test_run_bench_on_a_next_model_instance_reports_every_image():
    model = tiny_llava_next(layers=4)
    records = bench.run_bench(model=model, methods="none,fastv,learnpruner", tokens=[48], batch_sizes=[2],
                              new_tokens=2, text_tokens=8, repeats=1, warmup=0, variants=1, device="cpu",
                              progress=False)
    assert [(r["method"], r["tokens"]) for r in records] == [("none", 80), ("fastv", 48), ("learnpruner", 48)]
    for r in records:
        assert len(r["images"]) == 2 and all(i["count"] == 80 and i["structure"] == 8 for i in r["images"])
        assert all(abs(i["avg_visual_tokens"] - r["tokens"]) <= 1.0 for i in r["images"])
    assert records[0]["images"][0]["tokens_per_layer"] == [80] * 4
    assert records[1]["flops_ratio"] < 1.0 and records[2]["flops_ratio"] < 1.0
    assert not learnpruner.is_pruned(model)


def test_next_inputs_and_geometry_come_from_the_family_view():
    from learnpruner.bench.geometry import ItemGeometry, bench_for

    ad = bench_for(tiny_llava_next(layers=2))
    assert ad.item_geometry() == ItemGeometry(size=(112, 112), crops=5, tokens=80, structure=8)
    assert ad.item_geometry((60, 150)) == ItemGeometry(size=(60, 150), crops=3, tokens=48, structure=4)
    images = ad.random_images(2, generator=torch.Generator().manual_seed(0))
    assert images["pixel_values"].shape == (2, 5, 3, 56, 56) and images["image_sizes"].tolist() == [[112, 112]] * 2
    assert ad.vision_module() is ad.model.model.vision_tower
    inputs, start = bench._make_inputs(ad.model, 2, 10, 1, "cpu", torch.float32)
    assert start == 5 and inputs[0]["input_ids"].shape == (2, 10 + 88)
    assert int((inputs[0]["input_ids"] == ad.image_token_id).sum()) == 2 * 88
    llava = bench_for(tiny_llava(layers=2))
    assert llava.item_geometry() == ItemGeometry(size=(112, 112), crops=1, tokens=64, structure=0)
    assert llava.bench_budgets() == [64, 21, 7] and ad.bench_budgets() == [80, 18, 9, 4]


def test_next_analytic_flops_equal_a_hand_count():
    """llava-next-tiny, config only: CLIP 56 px / 14 (16 patches + [CLS] = 17 positions), width 64, MLP 128,
    2 layers; LLaMA width 128, 4 heads of 32, 2 KV heads, SwiGLU 256, 8 layers, vocab 512. A 112x112 image:
    5 crops, 80 visual tokens, 8 newlines. Schedule: 55 tokens after stage 1, 18 from layer 3; 20 text tokens."""
    from learnpruner.budget import Schedule

    sched = Schedule(n=80, num_layers=8, r1=55, drops=((3, 18),))
    # vision, per crop: conv 2*16*(3*14*14)*64 = 1_204_224; per layer 2*17*(4*64*64 + 2*64*128) + 4*17*17*64
    # = 1_114_112 + 73_984 = 1_188_096, 2 layers; (1_204_224 + 2 * 1_188_096) * 5 crops = 17_902_080
    vision = 17_902_080
    # projector on the 55 kept rows: 2*55*(64*128 + 128*128) = 2_703_360
    projector = 2_703_360
    # LLM per token per layer 2*(q 128*128 + k,v 2*128*64 + o 128*128 + MLP 3*128*256) = 294_912;
    # layers 0-2: 20 text + 8 newlines + 55 = 83 tokens: 83*294_912 + 4*83*83*128 = 28_004_864 (x3);
    # layers 3-7: 20 + 8 + 18 = 46 tokens: 46*294_912 + 4*46*46*128 = 14_649_344 (x5)
    llm = 3 * 28_004_864 + 5 * 14_649_344
    assert llm == 157_261_312
    lm_head = 2 * 128 * 512  # the last position
    expected = {"vision": vision, "projector": projector, "llm": llm, "lm_head": lm_head}
    cfg = bench.arch_config("llava-next-tiny")
    assert bench.flops_breakdown(cfg, sched, 1, 20) == expected
    assert bench.flops_breakdown(cfg, sched, 2, 20) == {k: 2 * v for k, v in expected.items()}
    assert bench.analytic_flops(cfg, sched, 1, 20) == 177_997_824
    # a smaller image: pass its geometry (a 60x150 image: 3 crops, 48 tokens, 4 newlines)
    ad = bench.arch_adapter(cfg)
    small = ad.item_geometry((60, 150))
    parts = bench.flops_breakdown(ad, Schedule(n=48, num_layers=8), 1, 20, image=small)
    assert parts["vision"] == 3 * vision // 5
    assert parts["llm"] == 8 * (72 * 294_912 + 4 * 72 * 72 * 128)  # 20 + 4 + 48 tokens
    with pytest.raises(ValueError, match="the schedule is for 48-token images, the image has 80"):
        bench.flops_breakdown(cfg, Schedule(n=48, num_layers=8), 1, 20)


@torch.no_grad()
@pytest.mark.parametrize("method,opts", CASES)
def test_next_analytic_flops_match_flop_counter(method, opts):
    model = tiny_llava_next()
    inputs = bench._make_inputs(model, 2, TEXT, 1, "cpu", torch.float32, seed=1)[0][0]
    learnpruner.apply(model, method, **opts)
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter:
        model(**inputs, use_cache=False)
    measured = counter.get_total_flops() - sum(counter.get_flop_counts().get("LearnablePruningModule", {}).values())
    st = learnpruner.stats(model)
    assert [(i.count, i.structure) for i in st.images] == [(80, 8), (80, 8)]
    assert bench.analytic_flops(model, st.schedule, 2, TEXT, lm_head="all") == pytest.approx(measured, rel=FLOPS_RTOL)


def test_next_7b_arch_is_the_real_architecture_without_weights():
    """llava-hf/llava-v1.6-vicuna-7b-hf, built as a config and a meta-device model (no weights allocated)."""
    from learnpruner.budget import Schedule

    cfg = bench.arch_config("llava-next-7b")
    vc, tc = cfg.vision_config, cfg.text_config
    assert cfg.model_type == "llava_next"
    assert (vc.hidden_size, vc.num_hidden_layers, vc.num_attention_heads, vc.intermediate_size, vc.image_size,
            vc.patch_size) == (1024, 24, 16, 4096, 336, 14)
    assert (tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads, tc.num_key_value_heads,
            tc.intermediate_size, tc.vocab_size) == (4096, 32, 32, 32, 11008, 32064)
    assert cfg.image_grid_pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy, cfg.image_token_id) == (-2, "default", 32000)
    ad = bench.arch_adapter("llava-next-7b")
    assert all(p.is_meta for p in ad.model.parameters())
    geo = ad.item_geometry()
    assert (geo.size, geo.crops, geo.tokens, geo.structure, geo.placeholders) == ((672, 672), 5, 2880, 48, 2928)
    assert ad.num_visual_tokens() == 2880 and ad.bench_budgets() == [2880, 640, 320, 160]
    assert 7.0e9 < sum(p.numel() for p in ad.model.parameters()) < 7.1e9
    full = Schedule(n=2880, num_layers=32)
    parts = bench.flops_breakdown(cfg, full, 1, 64)
    # the same CLIP tower as LLaVA-1.5-7B, run on 5 crops; the projector on all 2880 rows
    assert parts["vision"] == 5 * bench.flops_breakdown("llava-1.5-7b", Schedule(n=576, num_layers=32), 1, 64)[
        "vision"]
    assert parts["projector"] == 2 * 2880 * (1024 * 4096 + 4096 * 4096)
    # bf16 KV cache: 32 layers x (K, V) x 32 heads x (64 text + 48 newlines + 2880) x 128 x 2 bytes
    assert bench.analytic_kv_bytes(cfg, full, 1, 64) == 32 * 2 * 32 * 2992 * 128 * 2 == 1_568_669_696
    # 2880 -> 160 visual tokens per image (learnpruner: 275 after stage 1, 91 from layer 12) leaves the vision
    # tower and about an eighth of the prefill
    lp160 = learnpruner.get_method("learnpruner").schedule(160, 2880, 32, {})
    assert (lp160.r1, lp160.drops) == (275, ((12, 91),))
    ratio = bench.analytic_flops(cfg, lp160, 1, 64) / bench.analytic_flops(cfg, full, 1, 64)
    assert 0.11 < ratio < 0.13


def test_bench_and_cli_share_a_command_registry_without_an_import_cycle():
    import subprocess
    import sys

    code = ("import sys, learnpruner.bench; assert 'learnpruner.cli' not in sys.modules; "
            "from learnpruner import cli, commands; assert cli.COMMANDS is commands.COMMANDS; "
            "assert 'bench' in cli.COMMANDS")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bench_runs_on_a_tiny_qwen_arch():
    records = bench.run_bench(arch="qwen2.5-vl-tiny", methods="none,learnpruner", tokens="64", batch_sizes="1",
                        new_tokens=2, repeats=1, warmup=0, progress=False)
    lp = next(r for r in records if r["method"] == "learnpruner")
    assert lp["family"] == "qwen2_5_vl" and lp["flops"] < next(r for r in records if r["method"] == "none")["flops"]
    assert abs(lp["avg_visual_tokens"] - 64) <= 1


def test_bench_measures_a_qwen_video_item():
    from learnpruner.adapters import qwen2_5_vl_bench as bq
    from learnpruner.budget import Schedule

    records = bench.run_bench(arch="qwen2.5-vl-tiny", methods="none,learnpruner", tokens="114", batch_sizes="1",
                              new_tokens=2, repeats=1, warmup=0, progress=False, item="video")
    none = next(r for r in records if r["method"] == "none")
    lp = next(r for r in records if r["method"] == "learnpruner")
    cfg = bq.QWEN_ARCHS["qwen2.5-vl-tiny"]()
    grid = bq.video_grid(cfg, *bq.BENCH_VIDEO)
    assert lp["item"] == "video" and lp["visual_tokens"] == bq.grid_tokens(cfg, grid) == 1024 and lp["crops"] == 4
    assert abs(lp["avg_visual_tokens"] - 114) <= 1
    # analytic figures of the video, and the measured cache equal to the analytic one
    assert none["flops_breakdown"]["vision"] == bq.vision_flops(cfg, grid)
    full = Schedule(n=1024, num_layers=cfg.text_config.num_hidden_layers)
    assert none["kv_cache_bytes"] == bq.analytic_kv_bytes(cfg, [full], 64, dtype=torch.float32)
    assert lp["kv_cache_bytes"] < none["kv_cache_bytes"]
    assert "8-frame video (448x448 frames, 4 temporal groups)" in bench.speed_table(records)


@pytest.mark.parametrize("arch,item,needle", [("llava-tiny", "video", "llava benchmarks hold image samples"),
                                              ("qwen2.5-vl-tiny", "audio", "'image' or 'video'")])
def test_bench_refuses_an_item_the_family_cannot_hold(arch, item, needle):
    with pytest.raises(ValueError, match=needle):
        bench.run_bench(arch=arch, item=item, progress=False)


def test_bench_item_leaves_the_view_as_it_was():
    ad = bench.arch_adapter("qwen2.5-vl-tiny")
    video = ad.bench_item("video")
    assert video is not ad and video.bench_kind == "video" and ad.bench_kind == "image"
    assert video.item_geometry().crops == 4 and ad.item_geometry().crops == 1
    assert ad.bench_item(None) is ad


def test_every_figure_has_its_spread_and_no_time_is_negative_and_no_op_rows_get_no_speedup():
    model = tiny_llava(layers=4)
    records = bench.run_bench(model=model, methods="none,random", tokens=[64, 16], batch_sizes=[1], new_tokens=3,
                              text_tokens=8, repeats=2, warmup=0, variants=1, device="cpu", progress=False)
    by = {(r["method"], r["tokens"]): r for r in records}
    for r in records:
        assert r["prefill_ms_min"] <= r["prefill_ms"] <= r["prefill_ms_max"]
        assert r["e2e_ms_min"] <= r["e2e_ms"] <= r["e2e_ms_max"]
        assert r["decode_ms_per_token"] >= 0 and len(r["first_token_ms_all"]) == 2
    noop = by[("random", 64)]  # keeps every one of the 64 tokens
    assert noop["prunes"] is False and noop["prefill_speedup"] is None and noop["e2e_speedup"] is None
    assert by[("random", 16)]["prunes"] is True and by[("random", 16)]["prefill_speedup"] > 0
    table = bench.speed_table(records)
    assert "| random (prunes nothing: every token kept) | 64 |" in table
    assert "(min-max)" in table and len(table.splitlines()[0].split("|")) - 2 == 11
    assert len(bench.speed_table(records, full=True).splitlines()[0].split("|")) - 2 == 20


def test_bench_arch_list_prints_every_registered_architecture(capsys):
    assert main(["bench", "--arch", "list"]) == 0
    out = capsys.readouterr().out
    named = [name for line in out.splitlines() for name in line.split(": ", 1)[1].split(", ")]
    assert sorted(named) == sorted(bench.ARCHS) and "llava_onevision: llava-onevision-7b" in out


def test_the_adapter_is_the_engines_interface_and_every_family_registers_itself():
    from learnpruner.adapters import ADAPTERS, Adapter
    from learnpruner.bench.geometry import BENCH_FAMILIES, BenchFamily, bench_for
    from learnpruner.integrations.vllm import ARCHITECTURES, POSITIONS

    for name in ("item_geometry", "random_images", "vision_flops", "projector_flops", "bench_item", "bench_region",
                 "bench_note", "bench_budgets", "prompt_inputs", "bench_token_id", "bench_kind"):
        assert not hasattr(Adapter, name), name
    assert set(BENCH_FAMILIES) == {a.family for a in ADAPTERS}
    assert set(bench.ARCHS) == {name for cls in BENCH_FAMILIES.values() for name in cls.archs}
    assert set(ARCHITECTURES) == set(POSITIONS) == {s.key for a in ADAPTERS for s in a.served}

    class Lone(Adapter):  # a family with no benchmark view of its own, registered nowhere
        family = "lone"

    view = bench_for(Lone(tiny_llava(layers=2)))
    assert type(view) is BenchFamily and view.family == "lone"
    with pytest.raises(NotImplementedError, match="describes no benchmark item"):
        view.item_geometry()
