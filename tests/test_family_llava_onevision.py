"""LLaVA-OneVision (SigLIP, AnyRes with anyres_max_9, videos pooled 2x2): every method against the unmodified
transformers model.

Tiny random configs built offline: SigLIP at 56 px (16 tokens per crop, no [CLS]), grid pinpoints up to 2x2
crops, so a 112x112 image has 80 visual tokens (+ 8 row newlines) and a 60x150 one 48 (+ 4); a 4-frame video is
4 x 2 x 2 = 16 pooled tokens (+ 1 newline). With 4x4-crop pinpoints a 224x224 image exceeds anyres_max_9 and the
model interpolates its grid. Prompts are built by hand (the placeholder counts from the model's own features):
the OneVision processor needs a video processor, which needs torchvision.
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
from helpers import method_options, tiny_llava_onevision

import learnpruner
from learnpruner.adapters import adapter_for
from learnpruner.engine import STRUCTURE
from learnpruner.testbed.model import build_tokenizer

torch.set_num_threads(1)

METHODS = sorted(m for m in learnpruner.METHODS if not learnpruner.get_method(m).needs_cls)
NEEDS_CLS = sorted(m for m in learnpruner.METHODS if learnpruner.get_method(m).needs_cls)
PRUNED = [m for m in METHODS if m != "none"]
BUDGET = 32
TOK = build_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_llava_onevision()


@pytest.fixture(autouse=True)
def _unpatch(model):
    yield
    if learnpruner.is_pruned(model):
        learnpruner.remove(model)


def _prompt(model, placeholders: list[tuple[int, int]], question: str) -> list[int]:
    """``<s> user : <item>... question assistant :`` with each item's ``(token id, placeholder count)``."""
    ids = [TOK.bos_token_id] + TOK.encode("user :", add_special_tokens=False)
    for token, count in placeholders:
        ids += [token] * count
    return ids + TOK.encode(question + " assistant :", add_special_tokens=False)


def _batch(rows: list[list[int]]) -> dict:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), TOK.pad_token_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):  # left padding, as generate wants
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def image_inputs(model, sizes=((112, 112), (60, 150)), per_prompt=None, seed=0,
                 questions=("what colour is the circle ?", "how many squares ?")) -> dict:
    """A left-padded batch of prompts holding images of the given ``(height, width)`` sizes (``per_prompt`` images
    each, default one), with ``pixel_values`` ``[images, 5, 3, 56, 56]``, ``image_sizes`` and, for several images
    in a prompt, ``batch_num_images``."""
    g = torch.Generator().manual_seed(seed)
    per = per_prompt or [1] * len(sizes)
    image_sizes = torch.tensor([list(s) for s in sizes])
    crops = max(adapter_for(model)._num_crops(image_sizes, None))  # the processor pads every image to the most
    pixel_values = torch.randn(len(sizes), crops, 3, 56, 56, generator=g)
    extra = {} if per_prompt is None else {"batch_num_images": torch.tensor(per)}
    with torch.no_grad():
        lengths = [int(f.shape[0]) for f in model.model.get_image_features(
            pixel_values, image_sizes, **extra).pooler_output]
    rows, k = [], 0
    for j, count in enumerate(per):
        rows.append(_prompt(model, [(model.config.image_token_id, n) for n in lengths[k:k + count]],
                            questions[j % len(questions)]))
        k += count
    return {**_batch(rows), "pixel_values": pixel_values, "image_sizes": image_sizes, **extra}


def video_inputs(model, frames: int = 4, seed: int = 0) -> dict:
    """Two prompts: a video alone, and an image then a video (items in prompt order)."""
    g = torch.Generator().manual_seed(seed)
    videos = torch.randn(2, frames, 3, 56, 56, generator=g)
    per_video = frames * 4 + 1  # 2x2 pooled tokens per frame, one newline after the video
    image_sizes = torch.tensor([[112, 112]])
    pixel_values = torch.randn(1, adapter_for(model)._num_crops(image_sizes, None)[0], 3, 56, 56, generator=g)
    with torch.no_grad():
        image = int(model.model.get_image_features(pixel_values, image_sizes).pooler_output[0].shape[0])
    video_id, image_id = model.config.video_token_id, model.config.image_token_id
    rows = [_prompt(model, [(video_id, per_video)], "what moves ?"),
            _prompt(model, [(image_id, image), (video_id, per_video)], "is the circle in the video ?")]
    return {**_batch(rows), "pixel_values": pixel_values, "image_sizes": image_sizes, "pixel_values_videos": videos}


@pytest.fixture(scope="module")
def inp(model):
    return image_inputs(model)


def _single(inp, i):
    real = inp["attention_mask"][i].bool()
    return {"input_ids": inp["input_ids"][i:i + 1, real], "attention_mask": inp["attention_mask"][i:i + 1, real],
            "pixel_values": inp["pixel_values"][i:i + 1], "image_sizes": inp["image_sizes"][i:i + 1]}


@torch.no_grad()
@pytest.mark.parametrize("pinpoints", [None, [[224, 224]]])
def test_encode_gives_the_models_own_rows_with_newlines_as_structure(pinpoints):
    """The rows ``encode`` gives are the model's projected, packed (and, past anyres_max_9, interpolated) image
    features and its pooled video features; the newlines are structure."""
    model = tiny_llava_onevision(pinpoints=pinpoints)
    ad = adapter_for(model)
    sizes = ((112, 112), (60, 150)) if pinpoints is None else ((224, 224), (224, 224))
    inp = image_inputs(model, sizes)
    visual = ad.encode(inp["pixel_values"], input_ids=inp["input_ids"], image_sizes=inp["image_sizes"])
    packed = model.model.get_image_features(inp["pixel_values"], inp["image_sizes"]).pooler_output
    for feats, slots, ref in zip(visual.features, visual.slots, packed):
        newline = slots == STRUCTURE
        assert slots.shape[0] == ref.shape[0]
        torch.testing.assert_close(ad.project(feats), ref[~newline], atol=0, rtol=0)
        torch.testing.assert_close(ref[newline], model.model.image_newline.expand(int(newline.sum()), -1))
    if pinpoints is None:
        assert visual.counts() == [80, 48] and [int((s < 0).sum()) for s in visual.slots] == [8, 4]
    else:  # 16 crops of 16 tokens exceed 9 crops' worth: the 16x16 grid is interpolated to 12x12
        assert visual.counts() == [16 + 144] * 2 and [int((s < 0).sum()) for s in visual.slots] == [12, 12]
    video = video_inputs(model)
    visual = ad.encode(None, input_ids=video["input_ids"][:1], pixel_values_videos=video["pixel_values_videos"][:1])
    ref = model.model.get_video_features(video["pixel_values_videos"][:1]).pooler_output[0]
    assert visual.counts() == [16] == [ad.video_tokens(4)] and int((visual.slots[0] < 0).sum()) == 1
    # (the video's newline: the last row of get_video_features from transformers 5.2x, added in forward before)
    torch.testing.assert_close(visual.features[0], ref[:16], atol=0, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("method", METHODS)
def test_full_budget_is_identical_to_unpatched(model, inp, method):
    ref = model(**inp).logits
    ref_gen = model.generate(**inp, max_new_tokens=3, do_sample=False)
    learnpruner.apply(model, method, tokens=80, **method_options(method))
    assert torch.equal(model(**inp).logits, ref)
    assert torch.equal(model.generate(**inp, max_new_tokens=3, do_sample=False), ref_gen)


@torch.no_grad()
@pytest.mark.parametrize("method", ["none", "learnpruner", "divprune", "learnpruner-set", "fastv"])
def test_videos_and_mixed_prompts_at_a_full_budget_are_identical_to_unpatched(model, method):
    inp = video_inputs(model)
    ref = model(**inp).logits
    ref_gen = model.generate(**inp, max_new_tokens=3, do_sample=False)
    learnpruner.apply(model, method, tokens=80, **method_options(method))
    assert torch.equal(model(**inp).logits, ref)
    assert torch.equal(model.generate(**inp, max_new_tokens=3, do_sample=False), ref_gen)
    assert [im.count for im in learnpruner.stats(model).images] == [16, 80, 16]  # video | image, video


@torch.no_grad()
def test_several_images_in_one_prompt_and_an_interpolated_grid_at_a_full_budget():
    """Several images in a prompt are not patched (base crop only, one newline each); a grid past anyres_max_9 is
    interpolated: both equal the unmodified model."""
    for pinpoints, sizes, per in ((None, ((112, 112), (60, 150), (150, 60)), [2, 1]),
                                  ([[224, 224]], ((224, 224), (224, 224)), None)):
        model = tiny_llava_onevision(pinpoints=pinpoints, layers=4)
        inp = image_inputs(model, sizes, per_prompt=per)
        ref = model(**inp).logits
        learnpruner.apply(model, "divprune", tokens=400)
        assert torch.equal(model(**inp).logits, ref)
        learnpruner.remove(model)


@torch.no_grad()
@pytest.mark.parametrize("method", PRUNED)
def test_each_item_follows_its_own_schedule(model, inp, method):
    learnpruner.apply(model, method, tokens=BUDGET, **method_options(method))
    model(**inp)
    st = learnpruner.stats(model)
    assert [im.count for im in st.images] == [80, 48]
    assert [im.structure for im in st.images] == [8, 4]
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
    banned = [model.config.image_token_id, model.config.video_token_id, model.generation_config.eos_token_id]
    visual = {"pixel_values": inp["pixel_values"], "image_sizes": inp["image_sizes"]}
    check_cached_equals_stepwise(model, inp, steps=3, visual=visual, banned=banned)


@torch.no_grad()
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_stage2_scores_equal_eager_attention(impl, inp):
    model, ref = tiny_llava_onevision(attn=impl, seed=1), tiny_llava_onevision(attn="eager", seed=1)
    learnpruner.apply(model, "learnpruner", tokens=8, lpm="random", r1=48, r2=6, layer=3)
    with torch.no_grad():
        model(**inp)
    visual = adapter_for(model).encode(inp["pixel_values"], input_ids=inp["input_ids"], image_sizes=inp["image_sizes"])
    def packed(one):
        return model.model.get_image_features(one["pixel_values"], one["image_sizes"]).pooler_output[0]

    check_stage2_scores_equal_eager(model, ref, inp, _single, 3, visual.slots, packed)


@pytest.mark.parametrize("method", NEEDS_CLS)
def test_a_method_that_reads_the_cls_token_is_refused_by_name(model, method):
    with pytest.raises(ValueError, match=f"method '{method}' reads the vision encoder's \\[CLS\\] attention, but "
                                         "llava_onevision has no \\[CLS\\] token"):
        learnpruner.apply(model, method, tokens=BUDGET, **method_options(method))


# --- the benchmark: the 7B architecture without weights, analytic FLOPs and KV against measured ones -------------

def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    from torch.utils import flop_counter

    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def test_onevision_7b_arch_has_the_real_dims_and_its_largest_image_and_video():
    """llava-hf/llava-onevision-qwen2-7b-ov-hf's dimensions, as a config and a meta-device model (no weights)."""
    from learnpruner import bench

    cfg = bench.arch_config("llava-onevision-7b")
    vc, tc = cfg.vision_config, cfg.text_config
    assert (vc.hidden_size, vc.num_hidden_layers, vc.num_attention_heads, vc.intermediate_size, vc.image_size,
            vc.patch_size) == (1152, 26, 16, 4304, 384, 14)
    assert (tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads, tc.num_key_value_heads,
            tc.intermediate_size) == (3584, 28, 28, 4, 18944)
    ad = bench.arch_adapter("llava-onevision-7b")
    assert all(p.is_meta for p in ad.model.parameters())
    assert 8.0e9 < sum(p.numel() for p in ad.model.parameters()) < 8.1e9
    geo = ad.item_geometry()  # 2304x2304: 1 + 36 crops; the 162x162 grid interpolated to 81x81 (anyres_max_9)
    assert (geo.size, geo.crops, geo.tokens, geo.structure) == ((2304, 2304), 37, 729 + 81 * 81, 81)
    assert ad.num_visual_tokens() == 7290 and ad.bench_budgets() == [7290, 810, 405, 202]
    video = bench.arch_adapter("llava-onevision-7b", "video").item_geometry()
    assert (video.crops, video.tokens, video.structure) == (8, 8 * 14 * 14, 1)


@torch.no_grad()
@pytest.mark.parametrize("kind", ["image", "video"])
@pytest.mark.parametrize("method,opts", [("none", {}), ("fastv", {"tokens": 48}), ("random", {"tokens": 24}),
                                         ("learnpruner", {"tokens": 24, "lpm": "random", "diversity": 0.0})])
def test_analytic_flops_and_kv_bytes_match_the_measured_ones(kind, method, opts):
    """A plain model(**inputs) on two items (the bench's inputs): FlopCounterMode (SDPA counted full non-causal, as
    the analytic count) and the cache tensors after prefill, against the analytic figures. Selection work is not
    in the analytic count: the LPM's matmuls are taken out, and LearnPruner runs without its diversity fill (its
    similarity matmul on 160 rows of the LLM's width would be 3% of this tiny model's FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    from learnpruner import bench
    from learnpruner.bench.geometry import bench_for

    model = bench.build_arch("llava-onevision-tiny")
    view = bench_for(model, kind)
    inputs = bench._make_inputs(view, 2, 20, 1, "cpu", torch.float32, seed=1)[0][0]
    learnpruner.apply(model, method, **opts)
    cpu_sdpa = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    with FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter:
        model(**inputs, use_cache=False)
    measured = counter.get_total_flops() - sum(counter.get_flop_counts().get("LearnablePruningModule", {}).values())
    st = learnpruner.stats(model)
    geo = view.item_geometry()
    assert [(im.count, im.structure) for im in st.images] == [(geo.tokens, geo.structure)] * 2
    analytic = bench.analytic_flops(view, st.schedule, 2, 20, lm_head="all")
    assert analytic == pytest.approx(measured, rel=0.02)
    cache = bench._output_cache(model(**inputs, use_cache=True))
    assert bench.kv_cache_bytes(cache) == bench.analytic_kv_bytes(view, st.schedule, 2, 20, dtype=torch.float32)
    learnpruner.remove(model)


def test_bench_runs_on_the_tiny_arch_for_images_and_videos():
    from learnpruner import bench

    for item in ("image", "video"):
        records = bench.run_bench(arch="llava-onevision-tiny", item=item, methods="none,divprune", tokens="18",
                                  batch_sizes="1", new_tokens=2, text_tokens=8, repeats=1, warmup=0, progress=False)
        assert {r["family"] for r in records} == {"llava_onevision"} and {r["item"] for r in records} == {item}
        assert all(r["kv_cache_bytes"] > 0 for r in records)


@torch.no_grad()
@pytest.mark.parametrize("method,opts", [("learnpruner", {"tokens": 16, "lpm": "random"}), ("fastv", {"tokens": 40}),
                                         ("learnpruner-set", {"tokens": 16, "lpm": "random"})])
def test_the_fast_path_generates_what_the_plain_path_does(model, method, opts):
    check_fast_equals_plain(model, video_inputs(model), method, opts)  # an image and two videos, padded


def test_eval_and_lpm_training_run_on_onevision(tmp_path):
    from helpers import onevision_processor

    from learnpruner.evaluation import evaluate, load_items
    from learnpruner.training import ShapesRecords, TrainConfig, train_lpm

    model = tiny_llava_onevision(layers=4)
    processor = onevision_processor(model)
    recs = evaluate(model, processor, load_items("shapesvqa", 4), ["none", "divprune", "learnpruner-set"], [16],
                    tmp_path / "eval", batch_size=2, progress=False,
                    method_options={"learnpruner-set": {"lpm": "random"}})
    assert {r["method"] for r in recs} == {"none", "divprune", "learnpruner-set"}
    assert all(r["status"] == "ok" and r["n"] == 4 and "ci" in r for r in recs)
    cfg = TrainConfig(tokens=16, steps=3, batch_size=2, lr=3e-3, warmup=1, ckpt_every=3, hidden_dim=16, mask="topk")
    trained = train_lpm(model, processor, ShapesRecords(), tmp_path / "lpm", cfg, progress=False)
    hist = torch.load(tmp_path / "lpm" / "checkpoint.pt", weights_only=True)["history"]
    assert len(hist) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    assert trained.config.family == "llava_onevision" and trained.config.feature_dim == 64  # projected rows
    learnpruner.apply(model, "learnpruner", tokens=16, lpm=str(tmp_path / "lpm"))
    with torch.no_grad():
        model(**image_inputs(model))
    assert [im.count for im in learnpruner.stats(model).images] == [80, 48]
