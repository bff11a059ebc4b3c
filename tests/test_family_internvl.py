"""InternVL3 (InternViT tiles, pixel shuffle, a per-token projector): every method against the unmodified
transformers model.

Tiny random configs built offline: InternViT at 112 px (64 patches plus a class token, pixel-shuffled to 16
tokens per tile), a Qwen2 LLM. An image is its tiles: one run of placeholders between ``<img>`` and ``</img>``
(plain text here); prompts are built by hand (the InternVL processor needs a video processor, which needs
torchvision).
"""

from __future__ import annotations

import pytest
import torch
from harness import (
    check_batched_equals_single,
    check_cached_equals_stepwise,
    check_fast_equals_plain,
    check_stage2_scores_equal_eager,
    layer_lengths,
)
from helpers import method_options, tiny_internvl

import learnpruner
from learnpruner.adapters import adapter_for
from learnpruner.testbed.model import build_tokenizer

torch.set_num_threads(1)

METHODS = sorted(m for m in learnpruner.METHODS if not learnpruner.get_method(m).needs_cls)
NEEDS_CLS = sorted(m for m in learnpruner.METHODS if learnpruner.get_method(m).needs_cls)
PRUNED = [m for m in METHODS if m != "none"]
BUDGET = 24
TOK = build_tokenizer()
PER_TILE = 16


@pytest.fixture(scope="module")
def model():
    return tiny_internvl()


@pytest.fixture(autouse=True)
def _unpatch(model):
    yield
    if learnpruner.is_pruned(model):
        learnpruner.remove(model)


def inputs(model, tiles=((3,), (2,)), seed=0, questions=("what colour is the circle ?", "how many squares ?")) -> dict:
    """A left-padded batch; prompt ``j`` holds images of ``tiles[j]`` tiles each, ``<img>`` ... ``</img>`` around
    each (two plain text ids), and ``pixel_values`` every tile in prompt order."""
    g = torch.Generator().manual_seed(seed)
    start, end = len(TOK), len(TOK) + 1
    rows = []
    for j, images in enumerate(tiles):
        ids = [TOK.bos_token_id] + TOK.encode("user :", add_special_tokens=False)
        for c in images:
            ids += [start] + [model.config.image_token_id] * (c * PER_TILE) + [end]
        rows.append(ids + TOK.encode(questions[j % len(questions)] + " assistant :", add_special_tokens=False))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), TOK.pad_token_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    total = sum(sum(t) for t in tiles)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(total, 3, 112, 112, generator=g)}


@pytest.fixture(scope="module")
def inp(model):
    return inputs(model)


def _single(inp, i, tiles=((3,), (2,))):
    real = inp["attention_mask"][i].bool()
    first = sum(sum(t) for t in tiles[:i])
    return {"input_ids": inp["input_ids"][i:i + 1, real], "attention_mask": inp["attention_mask"][i:i + 1, real],
            "pixel_values": inp["pixel_values"][first:first + sum(tiles[i])]}


@torch.no_grad()
def test_projecting_the_rows_encode_gives_is_the_models_own_features(model):
    ad = adapter_for(model)
    inp = inputs(model, tiles=((3, 1), (2,)))
    visual = ad.encode(inp["pixel_values"], input_ids=inp["input_ids"])
    ref = model.model.get_image_features(inp["pixel_values"]).pooler_output  # [tiles, 16, hidden]
    assert visual.counts() == [48, 16, 32] and [int(c.max()) + 1 for c in visual.crops] == [3, 1, 2]
    torch.testing.assert_close(torch.cat([ad.project(f) for f in visual.features]), ref.flatten(0, 1), atol=0, rtol=0)
    with pytest.raises(ValueError, match="the prompt holds placeholders for 6 tiles, pixel_values 5"):
        ad.encode(inp["pixel_values"][:5], input_ids=inp["input_ids"])


@torch.no_grad()
@pytest.mark.parametrize("method", METHODS)
def test_full_budget_is_identical_to_unpatched(model, inp, method):
    ref = model(**inp).logits
    ref_gen = model.generate(**inp, max_new_tokens=3, do_sample=False)
    learnpruner.apply(model, method, tokens=48, **method_options(method))
    assert torch.equal(model(**inp).logits, ref)
    assert torch.equal(model.generate(**inp, max_new_tokens=3, do_sample=False), ref_gen)


@torch.no_grad()
@pytest.mark.parametrize("method", PRUNED)
def test_each_image_follows_its_own_schedule(model, inp, method):
    learnpruner.apply(model, method, tokens=BUDGET, **method_options(method))
    model(**inp)
    st = learnpruner.stats(model)
    assert [im.count for im in st.images] == [48, 32]
    for im in st.images:
        assert im.tokens_per_layer == im.schedule.per_layer()
        assert abs(im.average_tokens - min(BUDGET, im.count)) <= 1.0
    for i, im in enumerate(st.images):
        single = _single(inp, i)
        with layer_lengths(model) as lengths:
            model(**single)
        s = single["input_ids"].shape[1]
        assert lengths == [s - im.count + k for k in im.schedule.per_layer()]


@torch.no_grad()
@pytest.mark.parametrize("method", [m for m in PRUNED if m != "random"])
def test_padded_batch_of_different_sizes_equals_each_alone(model, inp, method):
    learnpruner.apply(model, method, tokens=BUDGET, **method_options(method))
    pos = (inp["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # as generate numbers a padded row (DART: key norms)
    check_batched_equals_single(model, inp, position_ids=pos, alone=_single)


@torch.no_grad()
@pytest.mark.parametrize("method", ["learnpruner", "fastv", "divprune", "pyramiddrop"])
def test_cached_generation_equals_stepwise_recomputation(model, inp, method):
    learnpruner.apply(model, method, tokens=BUDGET, **method_options(method))
    banned = [model.config.image_token_id, model.generation_config.eos_token_id]
    check_cached_equals_stepwise(model, inp, steps=3, visual=dict(pixel_values=inp["pixel_values"]),
                                 banned=banned)


@torch.no_grad()
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_stage2_scores_equal_eager_attention(impl, inp):
    model, ref = tiny_internvl(attn=impl, seed=1), tiny_internvl(attn="eager", seed=1)
    learnpruner.apply(model, "learnpruner", tokens=8, lpm="random", r1=24, r2=6, layer=3)
    with torch.no_grad():
        model(**inp)
    slots = [torch.arange(48), torch.arange(32)]  # every placeholder is a token (no structure)
    check_stage2_scores_equal_eager(model, ref, inp, _single, 3, slots, lambda one: model.model.get_image_features(
        one["pixel_values"]).pooler_output.flatten(0, 1))


@pytest.mark.parametrize("method", NEEDS_CLS)
def test_a_method_that_reads_the_cls_token_is_refused_by_name(model, method):
    with pytest.raises(ValueError, match=f"method '{method}' reads the vision encoder's \\[CLS\\] attention, but "
                                         "internvl has no \\[CLS\\] token"):
        learnpruner.apply(model, method, tokens=BUDGET, **method_options(method))


@torch.no_grad()
@pytest.mark.parametrize("method,opts", [("learnpruner", {"tokens": 16, "lpm": "random"}), ("fastv", {"tokens": 30}),
                                         ("learnpruner-set", {"tokens": 16, "lpm": "random"})])
def test_the_fast_path_generates_what_the_plain_path_does(model, inp, method, opts):
    check_fast_equals_plain(model, inp, method, opts)


# --- the benchmark --------------------------------------------------------------------------------------------

def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    from torch.utils import flop_counter

    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def test_internvl3_8b_arch_has_the_real_dims_and_six_tiles_plus_a_thumbnail():
    from learnpruner import bench

    cfg = bench.arch_config("internvl3-8b")
    vc, tc = cfg.vision_config, cfg.text_config
    assert (vc.hidden_size, vc.num_hidden_layers, vc.num_attention_heads, vc.intermediate_size) == (1024, 24, 16, 4096)
    assert (tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads, tc.num_key_value_heads,
            tc.intermediate_size) == (3584, 28, 28, 4, 18944)
    ad = bench.arch_adapter("internvl3-8b")
    assert all(p.is_meta for p in ad.model.parameters())
    assert 7.9e9 < sum(p.numel() for p in ad.model.parameters()) < 8.1e9
    geo = ad.item_geometry()
    assert (geo.crops, geo.tokens, geo.text, ad.feature_dim()) == (7, 1792, 2, 4096)
    assert ad.bench_budgets() == [1792, 597, 199]


@torch.no_grad()
@pytest.mark.parametrize("method,opts", [("none", {}), ("fastv", {"tokens": 60}), ("random", {"tokens": 24}),
                                         ("learnpruner", {"tokens": 24, "lpm": "random", "diversity": 0.0})])
def test_analytic_flops_and_kv_bytes_match_the_measured_ones(method, opts):
    from torch.utils.flop_counter import FlopCounterMode

    from learnpruner import bench

    model = bench.build_arch("internvl3-tiny")
    inputs = bench._make_inputs(model, 2, 20, 1, "cpu", torch.float32, seed=1)[0][0]
    learnpruner.apply(model, method, **opts)
    cpu_sdpa = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    with FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter:
        model(**inputs, use_cache=False)
    measured = counter.get_total_flops() - sum(counter.get_flop_counts().get("LearnablePruningModule", {}).values())
    st = learnpruner.stats(model)
    assert [im.count for im in st.images] == [7 * 16] * 2
    assert bench.analytic_flops(model, st.schedule, 2, 20, lm_head="all") == pytest.approx(measured, rel=0.02)
    cache = bench._output_cache(model(**inputs, use_cache=True))
    assert bench.kv_cache_bytes(cache) == bench.analytic_kv_bytes(model, st.schedule, 2, 20, dtype=torch.float32)
    learnpruner.remove(model)


def test_bench_runs_on_the_tiny_arch():
    from learnpruner import bench

    records = bench.run_bench(arch="internvl3-tiny", methods="none,divprune", tokens="24", batch_sizes="1",
                              new_tokens=2, text_tokens=8, repeats=1, warmup=0, progress=False)
    assert {r["family"] for r in records} == {"internvl"} and all(r["kv_cache_bytes"] > 0 for r in records)


def test_eval_and_lpm_training_run_on_internvl(tmp_path):
    from helpers import internvl_processor

    from learnpruner.evaluation import evaluate, load_items
    from learnpruner.training import ShapesRecords, TrainConfig, train_lpm

    model = tiny_internvl(layers=4)
    processor = internvl_processor(model)
    recs = evaluate(model, processor, load_items("shapesvqa", 4), ["none", "divprune", "learnpruner-set"], [8],
                    tmp_path / "eval", batch_size=2, progress=False,
                    method_options={"learnpruner-set": {"lpm": "random"}})
    assert {r["method"] for r in recs} == {"none", "divprune", "learnpruner-set"}
    assert all(r["status"] == "ok" and r["n"] == 4 and "ci" in r for r in recs)
    cfg = TrainConfig(tokens=8, steps=3, batch_size=2, lr=3e-3, warmup=1, ckpt_every=3, hidden_dim=16, mask="topk")
    trained = train_lpm(model, processor, ShapesRecords(), tmp_path / "lpm", cfg, progress=False)
    hist = torch.load(tmp_path / "lpm" / "checkpoint.pt", weights_only=True)["history"]
    assert len(hist) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    assert trained.config.family == "internvl" and trained.config.feature_dim == 4 * 32  # pixel-shuffled width
    learnpruner.apply(model, "learnpruner", tokens=8, lpm=str(tmp_path / "lpm"))
    with torch.no_grad():
        model(**inputs(model))
    assert [im.count for im in learnpruner.stats(model).images] == [48, 32]
