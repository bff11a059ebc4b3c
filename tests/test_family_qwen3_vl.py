"""Qwen3-VL (dense and MoE): images and video with interleaved M-RoPE and DeepStack, against the unmodified model.

Tiny random configs built offline (``helpers.tiny_qwen3``): a 3-block tower with 16 px patches and DeepStack taps
after blocks 0 and 2 (added after LLM layers 0 and 1), an 8-layer text model with q/k norms. The DeepStack
mergers' output weights are scaled up (``scale``) so that their additions move the logits: at init they hide
under 1e-4. Grids are in 16 px patches: an 8x8 image has 16 tokens, a 4x12 one 12; a video of 3 temporal
groups of 4x8 patches 24, written group by group after a timestamp, as Qwen3-VL's processor writes it.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from harness import layer_lengths
from helpers import method_options, qwen3_inputs, qwen3_single, tiny_qwen3

# Qwen2.5-VL's prompts and method lists (grids in patches, 16 px here; a video is written group by group here)
from test_family_qwen2_5_vl import CLS_METHODS, COUNTS, FULL, ITEMS_PER_SAMPLE, METHODS, PROMPTS, RATIO

import learnpruner
from learnpruner.adapters import adapter_for

torch.set_num_threads(1)

SCALE = 30.0


@pytest.fixture(scope="module")
def model():
    return tiny_qwen3(scale=SCALE)


@pytest.fixture(scope="module")
def batches(model):
    return {kind: qwen3_inputs(model, prompts, seed=i) for i, (kind, prompts) in enumerate(PROMPTS.items())}


@pytest.fixture(autouse=True)
def _unpatch(model):
    yield
    if learnpruner.is_pruned(model):
        learnpruner.remove(model)


def _banned(model):
    return [model.config.image_token_id, model.config.video_token_id, model.generation_config.eos_token_id]


def _encode(ad, inp):
    return ad.encode(inp.get("pixel_values"), input_ids=inp["input_ids"], image_grid_thw=inp.get("image_grid_thw"),
                     pixel_values_videos=inp.get("pixel_values_videos"), video_grid_thw=inp.get("video_grid_thw"))


def _own_features(model, inp, kind):
    """The model's own merged rows and DeepStack features per item, in prompt order (transformers before 5.18
    returns each tap's features of all items as one tensor)."""
    main, taps = [], None
    for pixels, grid, fn in (("pixel_values", "image_grid_thw", model.model.get_image_features),
                             ("pixel_values_videos", "video_grid_thw", model.model.get_video_features)):
        if pixels not in inp:
            continue
        out = fn(inp[pixels], inp[grid])
        sizes = (inp[grid].prod(-1) // 4).tolist()
        main += list(out.pooler_output)
        per_tap = [list(t) if isinstance(t, (list, tuple)) else list(torch.split(t, sizes))
                   for t in out.deepstack_features]
        taps = per_tap if taps is None else [a + b for a, b in zip(taps, per_tap)]
    if kind == "mixed":  # images [0, 1], then the video: prompt order is image 0, video, image 1
        order = [0, 2, 1]
        main = [main[i] for i in order]
        taps = [[tap[i] for i in order] for tap in taps]
    return main, taps


# --------------------------------------------------------------------------------------------------
# encode


@torch.no_grad()
@pytest.mark.parametrize("kind", list(PROMPTS))
def test_encode_rows_and_deepstack_streams_projected_equal_the_models_own(model, batches, kind):
    inp = batches[kind]
    ad = adapter_for(model)
    visual = _encode(ad, inp)
    assert type(ad).__name__ == "Qwen3VLAdapter" and visual.counts() == COUNTS[kind]
    assert all(f.shape[-1] == ad.feature_dim() == 4 * 32 for f in visual.features)
    main, taps = _own_features(model, inp, kind)
    for feats, ref in zip(visual.features, main, strict=True):
        torch.testing.assert_close(ad.project(feats), ref, atol=1e-6, rtol=1e-6)
    assert len(visual.streams) == 2
    for j, (stream, tap) in enumerate(zip(visual.streams, taps, strict=True)):
        for rows, ref in zip(stream, tap, strict=True):
            torch.testing.assert_close(ad.project_stream(j, rows), ref, atol=1e-6, rtol=1e-6)
    frames = {"images": [[0], [0]], "video": [[0, 1, 2], [0, 1]], "mixed": [[0], [0, 1, 2], [0]]}[kind]
    assert [c.unique().tolist() for c in visual.crops] == frames


@torch.no_grad()
def test_rope_positions_equal_get_rope_index_with_timestamped_video(model, batches):
    inp = batches["mixed"]
    ad = adapter_for(model)
    expected, deltas = model.model.get_rope_index(inp["input_ids"], inp["mm_token_type_ids"],
                                                  image_grid_thw=inp["image_grid_thw"],
                                                  video_grid_thw=inp["video_grid_thw"],
                                                  attention_mask=inp["attention_mask"])
    text = torch.arange(inp["input_ids"].shape[1])[None]
    visual = {k: inp[k] for k in ("image_grid_thw", "video_grid_thw")}
    got = ad.rope_positions(inp["input_ids"], inp["attention_mask"], text, visual, None)
    valid = inp["attention_mask"].bool()
    assert torch.equal(got[:, valid], expected[:, valid])
    # the video's groups are separated by text (timestamps): its positions are not one block
    assert int(deltas[1]) != int(deltas[0])


# --------------------------------------------------------------------------------------------------
# parity, schedules, batches, cache


@torch.no_grad()
@pytest.mark.parametrize("kind", list(PROMPTS))
@pytest.mark.parametrize("method", METHODS)
def test_full_budget_is_identical_to_unpatched(model, batches, kind, method):
    inp = batches[kind]
    ref = model(**inp).logits
    ref_gen = model.generate(**inp, max_new_tokens=3, do_sample=False, suppress_tokens=_banned(model))
    learnpruner.apply(model, method, tokens=FULL, **method_options(method))
    assert torch.equal(model(**inp).logits, ref)
    assert torch.equal(model.generate(**inp, max_new_tokens=3, do_sample=False, suppress_tokens=_banned(model)),
                       ref_gen)


@torch.no_grad()
@pytest.mark.parametrize("method", ["none", "learnpruner", "fastv"])
def test_moe_full_budget_parity_and_pruned_generation(method):
    moe = tiny_qwen3(moe=True, scale=SCALE)
    inp = qwen3_inputs(moe, PROMPTS["mixed"], seed=5)
    ref = moe(**inp).logits
    learnpruner.apply(moe, method, tokens=FULL, **method_options(method))
    assert torch.equal(moe(**inp).logits, ref)
    learnpruner.remove(moe)
    learnpruner.apply(moe, method, ratio=RATIO, **method_options(method))
    out = moe.generate(**inp, max_new_tokens=3, do_sample=False, suppress_tokens=_banned(moe))
    assert out.shape == (2, inp["input_ids"].shape[1] + 3)
    if method != "none":
        assert all(abs(im.average_tokens - RATIO * im.count) <= 1.0 for im in learnpruner.stats(moe).images)


@torch.no_grad()
@pytest.mark.parametrize("kind", list(PROMPTS))
@pytest.mark.parametrize("method", ["learnpruner", "divprune", "fastv", "pyramiddrop", "dart", "sparsevlm"])
def test_each_item_follows_its_own_schedule(model, batches, kind, method):
    inp = batches[kind]
    learnpruner.apply(model, method, ratio=RATIO, **method_options(method))
    model(**inp)
    st = learnpruner.stats(model)
    assert [im.count for im in st.images] == COUNTS[kind]
    for im in st.images:
        assert im.tokens_per_layer == im.schedule.per_layer()
        assert abs(im.average_tokens - RATIO * im.count) <= 1.0
    first = 0
    for i, count in enumerate(ITEMS_PER_SAMPLE[kind]):
        single = qwen3_single(inp, i)
        with layer_lengths(model) as lengths:
            model(**single)
        items = st.images[first:first + count]
        s = single["input_ids"].shape[1]
        assert lengths == [s - sum(im.count for im in items) + sum(layer) for layer in
                           zip(*(im.schedule.per_layer() for im in items))]
        first += count


@torch.no_grad()
@pytest.mark.parametrize("kind", list(PROMPTS))
@pytest.mark.parametrize("method", ["learnpruner", "divprune", "fastv", "dart"])
def test_padded_batch_equals_each_alone(model, batches, kind, method):
    inp = batches[kind]
    learnpruner.apply(model, method, ratio=RATIO, **method_options(method))
    batched = model(**inp)
    st = learnpruner.stats(model)
    gen = model.generate(**inp, max_new_tokens=3, do_sample=False, suppress_tokens=_banned(model))
    width = inp["input_ids"].shape[1]
    first = 0
    for i, count in enumerate(ITEMS_PER_SAMPLE[kind]):
        single = qwen3_single(inp, i)
        out = model(**single)
        for a, b in zip(st.images[first:first + count], learnpruner.stats(model).images, strict=True):
            assert (a.stage1_kept is None) == (b.stage1_kept is None)
            if a.stage1_kept is not None:
                assert torch.equal(a.stage1_kept, b.stage1_kept)
            for x, y in zip(a.llm_kept, b.llm_kept, strict=True):
                assert torch.equal(x, y)
        torch.testing.assert_close(batched.logits[i, -1], out.logits[0, -1], atol=1e-4, rtol=1e-4)
        g = model.generate(**single, max_new_tokens=3, do_sample=False, suppress_tokens=_banned(model))
        assert torch.equal(g[0, single["input_ids"].shape[1]:], gen[i, width:])
        first += count


@torch.no_grad()
@pytest.mark.parametrize("kind", ["video", "mixed"])
@pytest.mark.parametrize("method", ["learnpruner", "fastv", "pyramiddrop", "divprune"])
def test_cached_generation_equals_stepwise_recomputation(model, batches, kind, method):
    """Greedy decoding with the pruned cache equals recomputing every step without a cache over the same kept
    sets: decode steps continue at the unpruned prompt's 3-D positions, and DeepStack touches the prefill only."""
    inp = batches[kind]
    learnpruner.apply(model, method, ratio=RATIO, **method_options(method))
    steps, banned = 3, _banned(model)
    gen = model.generate(**inp, max_new_tokens=steps, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, suppress_tokens=banned)
    st = learnpruner.stats(model)
    new = gen.sequences[:, inp["input_ids"].shape[1]:]
    with learnpruner.fixed_selection(model, st.stage1_kept, st.llm_kept):
        for t in range(steps):
            step = dict(inp)
            step["input_ids"] = torch.cat([inp["input_ids"], new[:, :t]], dim=1)
            step["attention_mask"] = torch.cat([inp["attention_mask"], torch.ones_like(new[:, :t])], dim=1)
            step["mm_token_type_ids"] = torch.cat([inp["mm_token_type_ids"], torch.zeros_like(new[:, :t])], dim=1)
            logits = model(**step, use_cache=False).logits[:, -1]
            torch.testing.assert_close(logits, gen.logits[t], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_fast_path_equals_plain(model, batches):
    inp = batches["mixed"]
    kw = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True,
              suppress_tokens=_banned(model))
    learnpruner.apply(model, "learnpruner", ratio=RATIO, lpm="random")
    plain = model.generate(**inp, **kw)
    learnpruner.remove(model)
    learnpruner.apply(model, "learnpruner", ratio=RATIO, lpm="random", fast=True)
    fast = model.generate(**inp, **kw)
    assert torch.equal(fast.sequences, plain.sequences)
    for a, b in zip(fast.logits, plain.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# DeepStack: one selection for the main embedding and every stream


class _LayerTaps:
    """Each decoder layer's output (forward hook) and input (pre-hook) for one forward."""

    def __init__(self, model, layers):
        self.outputs, self.inputs, self.handles = {}, {}, []
        lm = model.model.language_model
        for i in layers:
            self.handles.append(lm.layers[i].register_forward_hook(
                lambda m, a, o, i=i: self.outputs.__setitem__(i, (o[0] if isinstance(o, tuple) else o).clone())))
            self.handles.append(lm.layers[i + 1].register_forward_pre_hook(
                lambda m, a, i=i: self.inputs.__setitem__(i + 1, a[0].clone())))

    def close(self):
        for h in self.handles:
            h.remove()


def _traced(model, inp, layer):
    """A pruned forward (stage 1 keeps 10 per item, stage 2 keeps 4 before ``layer``) with layer 0's input and, for
    layers 0 and 1, their outputs and the next layers' inputs; and the stats."""
    learnpruner.apply(model, "learnpruner", lpm="random", r1=10, r2=4, layer=layer)
    lm = model.model.language_model
    inputs0 = {}
    handle = lm.layers[0].register_forward_pre_hook(lambda m, a: inputs0.__setitem__(0, a[0].clone()))
    rec = _LayerTaps(model, [0, 1])
    try:
        model(**inp, use_cache=False)
    finally:
        rec.close()
        handle.remove()
    st = learnpruner.stats(model)
    learnpruner.remove(model)
    return inputs0[0][0], rec, st


@torch.no_grad()
def test_pruned_tokens_deepstack_features_never_reach_the_llm_kept_ones_do_at_their_rows(model, batches):
    """What the engine adds after layer ``j`` (the input of layer ``j+1`` minus the output of layer ``j``) is, row
    for row, tap ``j``'s features of the tokens still present and zero elsewhere. The rows are those holding the
    same tokens' main embeddings (layer 0's input). With stage 2 before layer 1, tap 1 reaches the stage-2 kept
    tokens only."""
    inp = qwen3_single(batches["mixed"], 1)  # a video and an image, no padding
    main, taps = _own_features(model, inp, "images")
    main, taps = [main[1], main[0]], [[t[1], t[0]] for t in taps]  # prompt order: video, image
    # stage 2 after both DeepStack layers: taps 0 and 1 reach the stage-1 kept tokens, at their rows
    x0, rec, st = _traced(model, inp, layer=3)
    kept1 = [im.stage1_kept for im in st.images]
    assert all(k.shape[0] == 10 for k in kept1)
    own_main = torch.cat([m[k] for m, k in zip(main, kept1)])
    rows = torch.stack([(x0 - r).abs().amax(-1).argmin() for r in own_main])
    torch.testing.assert_close(x0[rows], own_main, atol=1e-5, rtol=1e-5)
    others = torch.ones(x0.shape[0], dtype=torch.bool)
    others[rows] = False
    for j in (0, 1):
        add = rec.inputs[j + 1][0] - rec.outputs[j][0]
        torch.testing.assert_close(add[rows], torch.cat([t[k] for t, k in zip(taps[j], kept1)]), atol=1e-4,
                                   rtol=1e-4)
        assert float(add[others].abs().max()) == 0.0  # text rows get nothing; dropped tokens have no row at all
        assert float(add[rows].abs().amax(-1).min()) > 1e-2  # the features are large enough to be seen
    # stage 2 before layer 1: tap 1 reaches the 4 stage-2 kept tokens of each item only
    _, rec, st = _traced(model, inp, layer=1)
    kept2 = [im.llm_kept[0] for im in st.images]
    assert all(k.shape[0] == 4 for k in kept2)
    add1 = rec.inputs[2][0] - rec.outputs[1][0]
    present = add1.abs().amax(-1) > 0
    expected = torch.cat([t[k] for t, k in zip(taps[1], kept2)])
    assert int(present.sum()) == expected.shape[0] == 8
    torch.testing.assert_close(add1[present], expected, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_without_deepstack_the_pruned_output_differs():
    """The DeepStack additions matter on this model: zeroing the taps' mergers moves the pruned logits (so the
    tests above could fail)."""
    m = tiny_qwen3(scale=SCALE, layers=4)
    inp = qwen3_inputs(m, PROMPTS["images"], seed=2)
    learnpruner.apply(m, "learnpruner", ratio=RATIO, lpm="random")
    ref = m(**inp).logits[:, -1]
    for merger in m.model.visual.deepstack_merger_list:
        merger.linear_fc2.weight.zero_()
        merger.linear_fc2.bias.zero_()
    assert float((m(**inp).logits[:, -1] - ref).abs().max()) > 1e-2


# --------------------------------------------------------------------------------------------------
# stage-2 scores with q/k norms


@torch.no_grad()
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_stage2_scores_equal_eager_attention(impl):
    """Stage 2's text-to-visual scores (layer K-1's normalised queries and keys, RoPE applied) equal the unmodified
    eager text model's attention probabilities on the stage-1 sequence, with the DeepStack additions of layer 0."""
    model, ref = tiny_qwen3(attn=impl, seed=1, scale=SCALE), tiny_qwen3(attn="eager", seed=1, scale=SCALE)
    inp = qwen3_single(qwen3_inputs(model, PROMPTS["images"], seed=3), 0)
    layer = 3
    learnpruner.apply(model, "learnpruner", tokens=6, lpm="random", r1=10, r2=4, layer=layer)
    model(**inp)
    st = learnpruner.stats(model)
    ad = adapter_for(ref)
    ids = inp["input_ids"][0]
    visual = _encode(ad, inp)
    placeholder = ad.placeholders(ids[None])[0].nonzero()[:, 0]
    kept1 = st.images[0].stage1_kept
    keep = torch.ones_like(ids, dtype=torch.bool)
    dropped = torch.ones(placeholder.shape[0], dtype=torch.bool)
    dropped[kept1] = False
    keep[placeholder[dropped]] = False
    embeds = ref.model.language_model.embed_tokens(ids[None])
    embeds[0, placeholder] = ad.project(visual.features[0]).to(embeds.dtype)
    rope, _ = ref.model.get_rope_index(inp["input_ids"], inp["mm_token_type_ids"], image_grid_thw=inp["image_grid_thw"])
    text = torch.arange(ids.shape[0])[None, None]
    pos = torch.cat([text, rope])[:, :, keep]
    vis_mask = torch.zeros_like(ids, dtype=torch.bool)
    vis_mask[placeholder[kept1]] = True
    deepstack = [ad.project_stream(j, s[0][kept1]) for j, s in enumerate(visual.streams)]
    out = ref.model.language_model(inputs_embeds=embeds[:, keep], position_ids=pos,
                                   attention_mask=torch.ones(1, int(keep.sum()), dtype=torch.long),
                                   visual_pos_masks=vis_mask[keep][None], deepstack_visual_embeds=deepstack,
                                   output_attentions=True)
    probs = out.attentions[layer - 1][0].float()
    cols = vis_mask[keep]
    last_visual = int(cols.nonzero().max())
    q = torch.arange(cols.shape[0]) > last_visual
    expected = probs[:, q][:, :, cols].mean(dim=(0, 1))
    torch.testing.assert_close(st.stage2_scores[0, kept1], expected, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# refusals, training, bench


@pytest.mark.parametrize("method", CLS_METHODS)
def test_methods_reading_cls_are_refused_naming_the_method(model, method):
    with pytest.raises(ValueError, match=rf"{method}.*qwen3_vl has no \[CLS\]"):
        learnpruner.apply(model, method, ratio=RATIO)


def test_contiguous_positions_are_refused(model):
    with pytest.raises(ValueError, match="positions='contiguous' is not available for qwen3_vl"):
        learnpruner.apply(model, "fastv", ratio=RATIO, positions="contiguous")


def test_budget_above_an_items_count_keeps_it_whole(model, batches):
    inp = batches["images"]
    learnpruner.apply(model, "divprune", tokens=14)
    with torch.no_grad():
        model(**inp)
    counts = [(im.count, im.average_tokens) for im in learnpruner.stats(model).images]
    assert counts == [(16, 14), (12, 12)]


def _stand_in_processor():
    """Qwen2.5-VL's torchvision-free stand-in (tests/test_family_qwen2_5_vl.py) with Qwen3-VL's 16 px patches (64x64
    to 128x128 px images: 4 to 16 tokens)."""
    from test_family_qwen2_5_vl import ImageProcessorStandIn
    from transformers import Qwen2VLImageProcessorPil

    processor = ImageProcessorStandIn()
    processor.images = Qwen2VLImageProcessorPil(size={"shortest_edge": 4096, "longest_edge": 16384}, patch_size=16)
    processor.batch_decode = processor.tokenizer.batch_decode
    return processor


def test_eval_runs_on_qwen3_with_intervals(tmp_path):
    from learnpruner.evaluation import evaluate, load_items

    model = tiny_qwen3(layers=4, scale=SCALE)
    recs = evaluate(model, _stand_in_processor(), load_items("shapesvqa", 6), ["none", "divprune", "learnpruner"],
                    [8], tmp_path / "eval", batch_size=3, progress=False,
                    method_options={"learnpruner": {"lpm": "random"}})
    assert {r["method"] for r in recs} == {"none", "divprune", "learnpruner"} and all("ci" in r for r in recs)
    assert all(r["status"] == "ok" and r["n"] == 6 for r in recs)


def test_lpm_trains_on_qwen3_images_and_apply_uses_it(tmp_path):
    from learnpruner.training import ShapesRecords, TrainConfig, train_lpm

    model = tiny_qwen3(layers=4, scale=SCALE)
    processor = _stand_in_processor()
    cfg = TrainConfig(tokens=6, steps=3, batch_size=2, lr=3e-3, warmup=1, ckpt_every=3, hidden_dim=16, mask="topk")
    trained = train_lpm(model, processor, ShapesRecords(), tmp_path, cfg, progress=False)
    hist = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["history"]
    assert len(hist) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    assert trained.config.family == "qwen3_vl" and trained.config.feature_dim == 4 * 32
    learnpruner.apply(model, "learnpruner", ratio=0.5, lpm=str(tmp_path))
    inp = qwen3_inputs(model, [["what", ("image", (4, 4)), "colour"]])
    with torch.no_grad():
        model(**inp)
    im = learnpruner.stats(model).images[0]
    assert im.count == 4 and im.stage1_kept is not None


@torch.no_grad()
def test_training_forward_adds_the_deepstack_features():
    """The training forward (embeddings in, DeepStack added by hooks) gives the model's own logits with pixels."""
    from learnpruner.engine.layout import fill_streams
    from learnpruner.engine.sequence import layer_additions
    from learnpruner.training import prompt_embeddings, rotary_positions

    model = tiny_qwen3(layers=4, scale=SCALE)
    inp = qwen3_inputs(model, PROMPTS["mixed"], seed=4)
    ad = adapter_for(model)
    embeds, visual, layout = prompt_embeddings(model, ad, inp)
    adds = fill_streams(ad, visual, [None] * visual.num_images, embeds, layout.vis >= 0)
    with layer_additions(ad, adds):
        got = model(inputs_embeds=embeds, attention_mask=inp["attention_mask"], **rotary_positions(ad, inp)).logits
    ref = model(**inp).logits
    valid = inp["attention_mask"].bool()
    torch.testing.assert_close(got[valid], ref[valid], atol=1e-5, rtol=1e-5)
    without = model(inputs_embeds=embeds, attention_mask=inp["attention_mask"], **rotary_positions(ad, inp)).logits
    assert float((without[valid] - ref[valid]).abs().max()) > 1e-2


@torch.no_grad()
@pytest.mark.parametrize("method", ["none", "random"])
def test_bench_analytic_flops_and_kv_bytes_equal_the_measured(method):
    """FlopCounterMode on the eager model equals the analytic FLOPs (tower, every merger on the kept rows, LLM,
    head); the cache after the pruned prefill holds the analytic bytes."""
    from test_family_qwen2_5_vl import transformers_below
    from torch.utils.flop_counter import FlopCounterMode

    from learnpruner.adapters import qwen3_vl_bench as b3

    model = tiny_qwen3(attn="eager")
    inp = qwen3_single(qwen3_inputs(model, [["user :", ("image", (10, 24)), "squares ?"]]), 0)
    grids = [tuple(inp["image_grid_thw"][0].tolist())]
    learnpruner.apply(model, method, ratio=0.5, **method_options(method))
    with FlopCounterMode(display=False) as counter:
        out = model(**inp, logits_to_keep=1, use_cache=True)
    st = learnpruner.stats(model)
    schedules = [im.schedule for im in st.images]
    text = inp["input_ids"].shape[1] - sum(im.count for im in st.images)
    parts = b3.flops_breakdown(model.config, schedules, grids, text)
    extra = 0
    if transformers_below("5.18"):  # 5.17's text rotary embedding is a batched matmul: 2 x 3 x s x head_dim/2
        extra = 2 * 3 * inp["input_ids"].shape[1] * 8
    assert counter.get_total_flops() == sum(parts.values()) + extra
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert held == b3.analytic_kv_bytes(model.config, schedules, text, dtype=torch.float32)


def test_bench_8b_architecture_written_out():
    from learnpruner.adapters import qwen3_vl_bench as b3

    cfg = b3.QWEN3_ARCHS["qwen3-vl-8b"]()
    assert b3.image_grid(cfg, *b3.BENCH_IMAGE) == (1, 64, 80)
    assert b3.grid_tokens(cfg, (1, 64, 80)) == 1280
    # tower: conv 2*5120*1152*1536 + 27 blocks x (dense 2*5120*(4*1152^2 + 2*1152*4304) + attention 4*5120^2*1152)
    conv = 2 * 5120 * 1152 * 1536
    block = 2 * 5120 * (4 * 1152 ** 2 + 2 * 1152 * 4304) + 4 * 5120 ** 2 * 1152
    assert b3.vision_flops(cfg, (1, 64, 80)) == conv + 27 * block
    assert b3.merger_flops(cfg, 10) == 4 * 2 * 10 * (4608 ** 2 + 4608 * 4096)  # main + 3 DeepStack mergers


def test_bench_runs_on_the_tiny_architecture():
    from learnpruner import bench
    from learnpruner.adapters import qwen3_vl_bench as b3

    records = bench.run_bench(arch="qwen3-vl-tiny", methods="none,learnpruner", tokens="64", batch_sizes="1",
                              new_tokens=2, repeats=1, warmup=0, progress=False)
    none = next(r for r in records if r["method"] == "none")
    lp = next(r for r in records if r["method"] == "learnpruner")
    cfg = b3.QWEN3_ARCHS["qwen3-vl-tiny"]()
    assert lp["family"] == "qwen3_vl" and lp["visual_tokens"] == 1280 and abs(lp["avg_visual_tokens"] - 64) <= 1
    assert none["flops_breakdown"]["vision"] == b3.vision_flops(cfg, (1, 64, 80))
    assert lp["flops"] < none["flops"] and lp["kv_cache_bytes"] < none["kv_cache_bytes"]


def test_bench_video_item_laid_out_group_by_group_with_timestamps():
    """A Qwen3-VL bench video: four temporal groups, each its own placeholder run after its timestamp text, as the
    processor writes it; the engine reads it as one item; the analytic KV bytes (the timestamps counted as text)
    equal the measured cache, for the unpruned and the pruned prefill."""
    from learnpruner import bench
    from learnpruner.adapters import qwen3_vl_bench as b3
    from learnpruner.bench.inputs import _make_inputs
    from learnpruner.budget import Schedule

    records = bench.run_bench(arch="qwen3-vl-tiny", methods="none,learnpruner", tokens="114", batch_sizes="1",
                              new_tokens=2, repeats=1, warmup=0, progress=False, item="video")
    none = next(r for r in records if r["method"] == "none")
    lp = next(r for r in records if r["method"] == "learnpruner")
    cfg = b3.QWEN3_ARCHS["qwen3-vl-tiny"]()
    assert lp["item"] == "video" and lp["visual_tokens"] == 1024 and lp["crops"] == 4
    assert abs(lp["avg_visual_tokens"] - 114) <= 1
    assert none["flops_breakdown"]["vision"] == b3.vision_flops(cfg, (4, 32, 32))
    full = Schedule(n=1024, num_layers=cfg.text_config.num_hidden_layers)
    assert none["kv_cache_bytes"] == b3.analytic_kv_bytes(cfg, [full], 64 + 4 * b3.GROUP_TEXT, dtype=torch.float32)
    assert lp["kv_cache_bytes"] < none["kv_cache_bytes"]
    assert "8-frame video (512x512 frames, 4 temporal groups): 1024 visual tokens + 32 timestamp" in \
        bench.speed_table(records)

    model = tiny_qwen3()
    from learnpruner.bench.geometry import bench_for

    ad = bench_for(model, "video")
    [inp], start = _make_inputs(ad, 2, 12, 1, "cpu", torch.float32)
    ids = inp["input_ids"][0].tolist()
    runs = [len(list(r)) for token, r in itertools.groupby(ids) if token == model.config.video_token_id]
    assert runs == [256] * 4 and len(ids) == 12 + 1024 + 4 * b3.GROUP_TEXT and start == 5
    assert ids.count(model.config.vision_start_token_id) == 4 and inp["video_grid_thw"].tolist() == [[4, 32, 32]] * 2
    learnpruner.apply(model, "learnpruner", ratio=0.25, lpm="random")
    with torch.no_grad():
        model(**inp)
    items = learnpruner.stats(model).images
    assert [im.count for im in items] == [1024] * 2 and all(abs(im.average_tokens - 256) <= 1 for im in items)


def test_lmms_eval_accepts_a_qwen3_folder_and_refuses_cls_methods_by_name(tmp_path):
    """The lmms-eval model's early check (a weightless skeleton from the folder's config) takes Qwen3-VL."""
    from learnpruner.integrations.lmms_eval.config import check_model, parse_model_args

    folder = tmp_path / "qwen3"
    tiny_qwen3().config.save_pretrained(folder)
    check_model(parse_model_args(str(folder), method="fastv", ratio=0.5))
    with pytest.raises(ValueError, match="visionzip.*qwen3_vl"):
        check_model(parse_model_args(str(folder), method="visionzip", ratio=0.5))


def test_budgets_are_met_per_item_where_items_have_their_own_counts(model, batches, tmp_path):
    """apply() cannot know a Qwen item's count: a budget the nominal 1280-token image cannot reach is accepted and
    met by a 16-token image at the forward, and refused there, naming the item's count, when that item cannot
    reach it; eval records such a cell as unreachable with that reason."""
    from learnpruner.evaluation import evaluate, load_items

    inp = batches["images"]
    learnpruner.apply(model, "fastv", tokens=8)
    with torch.no_grad():
        model(**inp)
    assert [(im.count, round(im.average_tokens)) for im in learnpruner.stats(model).images] == [(16, 8), (12, 8)]
    learnpruner.remove(model)
    learnpruner.apply(model, "fastv", tokens=2)
    with pytest.raises(ValueError, match="at least 5 visual tokens for 16-token images; got tokens=2"):
        with torch.no_grad():
            model(**inp)
    learnpruner.remove(model)
    recs = evaluate(model, _stand_in_processor(), load_items("shapesvqa", 3), ["fastv"], [1, 8], tmp_path / "eval",
                    batch_size=3, progress=False)
    by = {r["tokens"]: r for r in recs}
    assert by[8]["status"] == "ok" and by[8]["n"] == 3
    assert by[1]["status"] == "unreachable" and "got tokens=1" in by[1]["reason"]
