"""Qwen2.5-VL: images and video with 3-D rotary positions (M-RoPE), against the unmodified transformers model.

Tiny random configs built offline (see ``helpers.tiny_qwen``): a windowed vision tower (56 px windows, so
window order differs from raster order), a 2x2 patch merger, and an 8-layer text model with
``mrope_section`` [2, 3, 3]. Grids are in 14 px patches: an 8x8 image has 16 tokens, a 4x12 one 12, a video
of 3 temporal groups of 4x8 patches 24 (3 frame groups of 8), one of 2 groups of 4x4 patches 8.
"""

from __future__ import annotations

import pytest
import torch
from harness import layer_lengths
from helpers import make_inputs, method_options, qwen_inputs, qwen_single, qwen_tokenizer, tiny_llava, tiny_qwen

import learnpruner
from learnpruner.adapters import adapter_for
from learnpruner.adapters.qwen2_5_vl import ROPE_DELTAS_ATTR

torch.set_num_threads(1)

CLS_METHODS = sorted(m for m in learnpruner.METHODS if learnpruner.get_method(m).needs_cls)
METHODS = [m for m in sorted(learnpruner.METHODS) if m not in CLS_METHODS]
PRUNED = [m for m in METHODS if m != "none"]
RATIO = 0.5
FULL = 1280  # tokens: at least every item's count (and the adapter's nominal count): a no-op

PROMPTS = {
    # a padded batch of images of different sizes (16 and 12 tokens)
    "images": [["user :", ("image", (8, 8)), "what colour is the circle ?", "assistant :"],
               ["user :", ("image", (4, 12)), "how many squares ?", "assistant :"]],
    # videos of 3 and 2 temporal groups (24 and 8 tokens)
    "video": [["user :", ("video", (3, 4, 8)), "what colour is the circle ?", "assistant :"],
              ["user :", ("video", (2, 4, 4)), "how many squares ?", "assistant :"]],
    # images and a video interleaved: items in prompt order are image (16), video (24), image (12)
    "mixed": [["user :", ("image", (8, 8)), "what colour is the circle ?", "assistant :"],
              ["user :", ("video", (3, 4, 8)), "how many squares ?", ("image", (4, 12)), "is it red ?",
               "assistant :"]],
}
COUNTS = {"images": [16, 12], "video": [24, 8], "mixed": [16, 24, 12]}
ITEMS_PER_SAMPLE = {"images": [1, 1], "video": [1, 1], "mixed": [1, 2]}


@pytest.fixture(scope="module")
def model():
    return tiny_qwen()


@pytest.fixture(scope="module")
def batches(model):
    return {kind: qwen_inputs(model, prompts, seed=i) for i, (kind, prompts) in enumerate(PROMPTS.items())}


@pytest.fixture(autouse=True)
def _unpatch(model):
    yield
    if learnpruner.is_pruned(model):
        learnpruner.remove(model)


def _options(method):
    return method_options(method)


def _banned(model):
    return [model.config.image_token_id, model.config.video_token_id, model.generation_config.eos_token_id]


# --------------------------------------------------------------------------------------------------
# encode: features, items, order


@torch.no_grad()
@pytest.mark.parametrize("kind", list(PROMPTS))
def test_encode_rows_projected_equal_the_models_own_features_in_prompt_order(model, batches, kind):
    inp = batches[kind]
    ad = adapter_for(model)
    visual = ad.encode(inp.get("pixel_values"), input_ids=inp["input_ids"], image_grid_thw=inp.get("image_grid_thw"),
                       pixel_values_videos=inp.get("pixel_values_videos"), video_grid_thw=inp.get("video_grid_thw"))
    assert visual.counts() == COUNTS[kind]
    assert all(f.shape[-1] == ad.feature_dim() == 4 * 32 for f in visual.features)
    images = list(model.model.get_image_features(inp["pixel_values"], inp["image_grid_thw"]).pooler_output) \
        if "pixel_values" in inp else []
    videos = list(model.model.get_video_features(inp["pixel_values_videos"], inp["video_grid_thw"]).pooler_output) \
        if "pixel_values_videos" in inp else []
    expected = [images[0], videos[0], images[1]] if kind == "mixed" else images + videos
    for feats, ref in zip(visual.features, expected, strict=True):
        torch.testing.assert_close(ad.project(feats), ref, atol=1e-6, rtol=1e-6)
    for feats, slots in zip(visual.features, visual.slots):
        assert torch.equal(slots, torch.arange(feats.shape[0]))
    frames = {"images": [[0], [0]], "video": [[0, 1, 2], [0, 1]], "mixed": [[0], [0, 1, 2], [0]]}[kind]
    assert [c.unique().tolist() for c in visual.crops] == frames
    if kind == "video":
        assert torch.equal(visual.patches[0], torch.arange(24) % 8)


@torch.no_grad()
def test_window_order_is_undone(model, batches):
    """The 8x8 image spans 4 windows of the tower, so its window order is not raster order; rows still match."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as mq

    vis = model.model.visual
    grid = batches["images"]["image_grid_thw"][:1]
    fn = getattr(mq, "get_vision_window_index", None)
    if fn is not None:
        window_index, _ = fn(grid, spatial_merge_size=2, window_size=vis.window_size, patch_size=14, kwargs={})
    else:
        window_index, _ = vis.get_window_index(grid)
    assert not torch.equal(window_index, torch.arange(16))


def test_mismatched_placeholders_are_refused(model, batches):
    inp = dict(batches["mixed"])
    inp["input_ids"] = inp["input_ids"].clone()
    first = (inp["input_ids"] == model.config.video_token_id).nonzero()[0]
    inp["input_ids"][first[0], first[1]] = model.config.image_token_id  # a video placeholder read as image
    with pytest.raises(ValueError, match="features and tokens do not match"):
        adapter_for(model).encode(inp["pixel_values"], input_ids=inp["input_ids"],
                                  image_grid_thw=inp["image_grid_thw"],
                                  pixel_values_videos=inp["pixel_values_videos"],
                                  video_grid_thw=inp["video_grid_thw"])


# --------------------------------------------------------------------------------------------------
# parity, schedules, batches


@torch.no_grad()
@pytest.mark.parametrize("kind", list(PROMPTS))
@pytest.mark.parametrize("method", METHODS)
def test_full_budget_is_identical_to_unpatched(model, batches, kind, method):
    inp = batches[kind]
    ref = model(**inp).logits
    ref_gen = model.generate(**inp, max_new_tokens=4, do_sample=False, suppress_tokens=_banned(model))
    learnpruner.apply(model, method, tokens=FULL, **_options(method))
    assert torch.equal(model(**inp).logits, ref)
    assert torch.equal(model.generate(**inp, max_new_tokens=4, do_sample=False, suppress_tokens=_banned(model)),
                       ref_gen)


@torch.no_grad()
@pytest.mark.parametrize("kind", list(PROMPTS))
@pytest.mark.parametrize("method", PRUNED)
def test_each_item_follows_its_own_schedule(model, batches, kind, method):
    inp = batches[kind]
    learnpruner.apply(model, method, ratio=RATIO, **_options(method))
    model(**inp)
    st = learnpruner.stats(model)
    assert [im.count for im in st.images] == COUNTS[kind]
    for im in st.images:
        assert im.structure == 0
        assert im.tokens_per_layer == im.schedule.per_layer()
        assert abs(im.average_tokens - RATIO * im.count) <= 1.0
        chain = ([im.stage1_kept] if im.stage1_kept is not None else []) + im.llm_kept
        for a, b in zip(chain, chain[1:]):
            assert set(b.tolist()) <= set(a.tolist())
    # the hidden states each layer receives hold exactly the scheduled tokens of the sample's items
    first = 0
    for i, count in enumerate(ITEMS_PER_SAMPLE[kind]):
        single = qwen_single(inp, i)
        with layer_lengths(model) as lengths:
            model(**single)
        items = st.images[first:first + count]
        s = single["input_ids"].shape[1]
        assert lengths == [s - sum(im.count for im in items) + sum(layer) for layer in
                           zip(*(im.schedule.per_layer() for im in items))]
        first += count


@torch.no_grad()
@pytest.mark.parametrize("kind", list(PROMPTS))
@pytest.mark.parametrize("method", [m for m in PRUNED if m != "random"])
def test_padded_batch_equals_each_alone(model, batches, kind, method):
    inp = batches[kind]
    learnpruner.apply(model, method, ratio=RATIO, **_options(method))
    batched = model(**inp)
    st = learnpruner.stats(model)
    gen = model.generate(**inp, max_new_tokens=3, do_sample=False, suppress_tokens=_banned(model))
    width = inp["input_ids"].shape[1]
    first = 0
    for i, count in enumerate(ITEMS_PER_SAMPLE[kind]):
        single = qwen_single(inp, i)
        out = model(**single)
        alone = learnpruner.stats(model).images
        for a, b in zip(st.images[first:first + count], alone, strict=True):
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
@pytest.mark.parametrize("kind", list(PROMPTS))
@pytest.mark.parametrize("method", ["learnpruner", "fastv", "sparsevlm", "pyramiddrop", "divprune", "dart"])
def test_cached_generation_equals_stepwise_recomputation(model, batches, kind, method):
    """Greedy decoding with the pruned cache equals recomputing every step without a cache over the same kept
    sets (``fixed_selection``): the decode steps' 3-D positions continue where the unpruned prompt ends."""
    inp = batches[kind]
    unmerged = {"sparsevlm": {"recycle": False}}
    learnpruner.apply(model, method, ratio=RATIO, **_options(method), **unmerged.get(method, {}))
    steps, banned = 4, _banned(model)
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
            logits[:, banned] = float("-inf")
            assert torch.equal(logits.argmax(-1), new[:, t]), f"step {t}"


@torch.no_grad()
@pytest.mark.parametrize("fast", [False, True])
def test_decode_steps_without_position_ids_continue_at_the_original_length(model, batches, fast):
    """A hand-written decode loop (no position ids) matches generate(): text position = original length plus
    generated tokens, rotary position = that plus the cached rope_deltas; the pruned cache length would be off."""
    inp = qwen_single(batches["video"], 0)  # one sample, no padding: generate's positions equal the loop's
    learnpruner.apply(model, "learnpruner", ratio=RATIO, lpm="random", fast=fast)
    steps, banned = 4, _banned(model)
    gen = model.generate(**inp, max_new_tokens=steps, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, suppress_tokens=banned)
    out = model(**inp, use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    s = inp["input_ids"].shape[1]
    # the cache length is no decode position: pruned, it is shorter than the prompt; on the fast path its first
    # layers also hold the prefill's bucket padding (a multiple of 64 rows)
    length = cache.get_seq_length()
    assert length % 64 == 0 and length != s if fast else length < s
    deltas = getattr(cache, ROPE_DELTAS_ATTR)
    assert int(deltas) != 0  # the video's positions compress: decode positions differ from the text positions
    mask = inp["attention_mask"]
    logits = out.logits[:, -1]
    for t in range(steps):
        torch.testing.assert_close(logits, gen.logits[t], atol=1e-4, rtol=1e-4)
        nxt = gen.sequences[:, s + t:s + t + 1]
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        out = model(input_ids=nxt, attention_mask=mask, cache=cache, use_cache=True)
        logits = out.logits[:, -1]


@torch.no_grad()
@pytest.mark.parametrize("kind", ["video", "mixed"])
def test_fast_decode_equals_plain(model, batches, kind):
    inp = batches[kind]
    kw = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True,
              suppress_tokens=_banned(model))
    learnpruner.apply(model, "learnpruner", ratio=RATIO, lpm="random")
    plain = model.generate(**inp, **kw)
    learnpruner.remove(model)
    learnpruner.apply(model, "learnpruner", ratio=RATIO, lpm="random", fast=True)
    fast = model.generate(**inp, **kw)
    assert torch.equal(fast.sequences, plain.sequences)
    for a, b in zip(fast.logits, plain.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_position_id_forms_give_the_same_forward(model, batches):
    """No position ids, generate's [4, b, s] (text row + M-RoPE rows) and [3, b, s] give the same pruned forward;
    without an attention mask the pruned sequence still carries one (gaps are no packed-sequence boundaries)."""
    inp = batches["mixed"]
    rope, _ = model.model.get_rope_index(inp["input_ids"], inp["mm_token_type_ids"],
                                         image_grid_thw=inp["image_grid_thw"], video_grid_thw=inp["video_grid_thw"],
                                         second_per_grid_ts=inp["second_per_grid_ts"],
                                         attention_mask=inp["attention_mask"])
    text = (inp["attention_mask"].cumsum(-1) - 1).masked_fill(inp["attention_mask"] == 0, 0)
    learnpruner.apply(model, "learnpruner", ratio=RATIO, lpm="random")
    ref = model(**inp).logits[:, -1]
    four = model(**inp, position_ids=torch.cat([text[None], rope])).logits[:, -1]
    three = model(**inp, position_ids=rope).logits[:, -1]
    torch.testing.assert_close(four, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(three, ref, atol=1e-5, rtol=1e-5)
    single = qwen_single(inp, 1)
    with_mask = model(**single, use_cache=False).logits[:, -1]
    without = model(**{k: v for k, v in single.items() if k != "attention_mask"}, use_cache=False).logits[:, -1]
    torch.testing.assert_close(without, with_mask, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# stage-2 scores


@torch.no_grad()
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["images", "mixed"])
def test_stage2_scores_equal_eager_attention(impl, kind):
    model, ref = tiny_qwen(attn=impl, seed=1), tiny_qwen(attn="eager", seed=1)
    inp = qwen_inputs(model, PROMPTS[kind], seed=3)
    layer = 3
    learnpruner.apply(model, "learnpruner", tokens=6, lpm="random", r1=10, r2=4, layer=layer)
    model(**inp)
    st = learnpruner.stats(model)
    ad = adapter_for(model)
    first = 0
    for i, count in enumerate(ITEMS_PER_SAMPLE[kind]):
        single = qwen_single(inp, i)
        ids = single["input_ids"][0]
        visual = ad.encode(single.get("pixel_values"), input_ids=single["input_ids"],
                           image_grid_thw=single.get("image_grid_thw"),
                           pixel_values_videos=single.get("pixel_values_videos"),
                           video_grid_thw=single.get("video_grid_thw"))
        placeholder = ad.placeholders(ids[None])[0].nonzero()[:, 0]
        item = torch.cat([torch.full((f.shape[0],), j) for j, f in enumerate(visual.features)])
        slot = torch.cat(visual.slots)
        keep = torch.ones_like(ids, dtype=torch.bool)
        kept1 = [st.images[first + j].stage1_kept for j in range(count)]
        dropped = torch.tensor([not bool((kept1[j] == s).any()) for j, s in zip(item.tolist(), slot.tolist())])
        keep[placeholder[dropped]] = False
        # the unmodified eager text model on the stage-1 sequence, at the unpruned prompt's 3-D positions
        embeds = ref.model.language_model.embed_tokens(ids[None])
        embeds[0, placeholder] = torch.cat([ad.project(f) for f in visual.features]).to(embeds.dtype)
        rope, _ = model.model.get_rope_index(single["input_ids"], single["mm_token_type_ids"],
                                             image_grid_thw=single.get("image_grid_thw"),
                                             video_grid_thw=single.get("video_grid_thw"),
                                             second_per_grid_ts=single.get("second_per_grid_ts"))
        text = torch.arange(ids.shape[0])[None, None]
        pos = torch.cat([text, rope])[:, :, keep]
        out = ref.model.language_model(inputs_embeds=embeds[:, keep], position_ids=pos,
                                       attention_mask=torch.ones(1, int(keep.sum()), dtype=torch.long),
                                       output_attentions=True)
        probs = out.attentions[layer - 1][0].float()  # [h, s', s']
        col_item = torch.full_like(ids, -1)
        col_slot = torch.full_like(ids, -1)
        col_item[placeholder], col_slot[placeholder] = item, slot
        col_item, col_slot = col_item[keep], col_slot[keep]
        last_visual = int((col_item >= 0).nonzero().max())
        q = torch.arange(col_item.shape[0]) > last_visual
        for j in range(count):
            cols = col_item == j
            expected = probs[:, q][:, :, cols].mean(dim=(0, 1))
            scores = st.stage2_scores[first + j, col_slot[cols]]
            torch.testing.assert_close(scores, expected, atol=1e-6, rtol=1e-5)
        first += count


# --------------------------------------------------------------------------------------------------
# budgets and errors


@torch.no_grad()
def test_token_budgets_are_per_image_and_per_video(model, batches):
    inp = batches["mixed"]
    learnpruner.apply(model, "learnpruner", tokens=8, lpm="random")
    model(**inp)
    st = learnpruner.stats(model)
    assert [im.count for im in st.images] == [16, 24, 12]
    for im in st.images:
        assert abs(im.average_tokens - 8) <= 1.0
    learnpruner.remove(model)
    learnpruner.apply(model, "divprune", ratio=0.25)
    model(**inp)
    assert [im.tokens_per_layer[0] for im in learnpruner.stats(model).images] == [4, 6, 3]


@pytest.mark.parametrize("method", CLS_METHODS)
def test_methods_reading_cls_are_refused_naming_the_method(model, method):
    with pytest.raises(ValueError, match=rf"method '{method}' reads the vision encoder's \[CLS\] attention, but "
                                         r"qwen2_5_vl has no \[CLS\] token; methods that run on qwen2_5_vl: ") as e:
        learnpruner.apply(model, method, tokens=8)
    assert not learnpruner.is_pruned(model)
    listed = str(e.value).split("methods that run on qwen2_5_vl: ")[1].split(", ")
    assert listed == METHODS


def test_lpm_of_another_family_or_width_is_refused(model):
    other = learnpruner.LearnablePruningModule(learnpruner.LPMConfig(feature_dim=128, family="llava"))
    with pytest.raises(ValueError, match="trained for model family 'llava', but the model is 'qwen2_5_vl'"):
        learnpruner.apply(model, "learnpruner", tokens=8, lpm=other)
    narrow = learnpruner.LearnablePruningModule(learnpruner.LPMConfig(feature_dim=32, family="qwen2_5_vl",
                                                                      feature_layer=-1))
    with pytest.raises(ValueError, match="expects vision features of width 32, but .* gives width 128"):
        learnpruner.apply(model, "learnpruner", tokens=8, lpm=narrow)
    assert not learnpruner.is_pruned(model)


@torch.no_grad()
def test_images_from_the_pil_image_processor(model):
    """Pixel values and grids from the stock (PIL) image processor: 112x112 px gives 16 tokens per image."""
    from PIL import Image
    from transformers import Qwen2VLImageProcessorPil

    proc = Qwen2VLImageProcessorPil(size={"shortest_edge": 3136, "longest_edge": 12544})
    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())
              for h, w in ((112, 112), (60, 150))]
    pix = proc(images=images, return_tensors="pt")
    counts = (pix["image_grid_thw"].prod(-1) // 4).tolist()
    assert counts[0] == 16
    tok = qwen_tokenizer()
    cfg = model.config
    rows = [[tok.bos_token_id, cfg.vision_start_token_id] + [cfg.image_token_id] * n + [cfg.vision_end_token_id]
            + tok.convert_tokens_to_ids("what colour is the circle ?".split()) for n in counts]
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    inp = {"input_ids": ids, "attention_mask": (ids != tok.pad_token_id).long(),
           "mm_token_type_ids": (ids == cfg.image_token_id).int(), "pixel_values": pix["pixel_values"],
           "image_grid_thw": pix["image_grid_thw"]}
    ref = model.generate(**inp, max_new_tokens=3, do_sample=False, suppress_tokens=_banned(model))
    learnpruner.apply(model, "learnpruner", tokens=FULL, lpm="random")
    assert torch.equal(model.generate(**inp, max_new_tokens=3, do_sample=False, suppress_tokens=_banned(model)), ref)
    learnpruner.remove(model)
    learnpruner.apply(model, "learnpruner", tokens=4, lpm="random")
    model.generate(**inp, max_new_tokens=3, do_sample=False, suppress_tokens=_banned(model))
    st = learnpruner.stats(model)
    assert [im.count for im in st.images] == counts
    assert all(abs(im.average_tokens - 4) <= 1.0 for im in st.images)


# --------------------------------------------------------------------------------------------------
# benchmark pieces (learnpruner.adapters.qwen2_5_vl_bench)


def test_bench_7b_architecture_geometry_flops_and_cache_written_out():
    from learnpruner.adapters import qwen2_5_vl_bench as bq
    from learnpruner.budget import Schedule

    cfg = bq.qwen_config()
    vc, tc = cfg.vision_config, cfg.text_config
    assert (vc.depth, vc.hidden_size, vc.intermediate_size, vc.num_heads, vc.window_size, vc.out_hidden_size) == \
        (32, 1280, 3420, 16, 112, 3584)
    assert list(vc.fullatt_block_indexes) == [7, 15, 23, 31]
    assert (tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads, tc.num_key_value_heads,
            tc.intermediate_size, tc.vocab_size) == (3584, 28, 28, 4, 18944, 152064)
    image = bq.image_grid(cfg, *bq.BENCH_IMAGE)
    video = bq.video_grid(cfg, *bq.BENCH_VIDEO)
    assert image == (1, 64, 80) and bq.grid_tokens(cfg, image) == 1280
    assert video == (4, 32, 32) and bq.grid_tokens(cfg, video) == 1024
    # 80 windows of 8x8 patches (64x80 patches: 8 x 10 windows); video: 4 groups x 4 x 4 windows
    assert bq.window_lengths(cfg, image) == [64] * 80 and bq.window_lengths(cfg, video) == [64] * 64
    patches, d, inter = 5120, 1280, 3420
    conv = 2 * patches * d * 3 * 2 * 14 * 14
    dense = 2 * patches * (4 * d * d + 3 * d * inter)
    windowed, full = 80 * 4 * 64 ** 2 * d, 4 * patches ** 2 * d
    assert bq.vision_flops(cfg, image) == conv + 32 * dense + 28 * windowed + 4 * full == 7_050_100_736_000
    assert bq.merger_flops(cfg, 1280) == 2 * 1280 * (5120 * 5120 + 5120 * 3584) == 114_085_068_800
    # KV cache (bf16): 28 layers x keys and values x 4 heads x 128 x (64 text + 1280 visual) x 2 bytes
    none = Schedule(n=1280, num_layers=28)
    assert bq.analytic_kv_bytes(cfg, [none], 64) == 28 * 2 * 4 * 128 * 1344 * 2 == 77_070_336
    parts = bq.flops_breakdown(cfg, [none], [image], 64)
    assert parts["vision"] == 7_050_100_736_000 and parts["lm_head"] == 2 * 3584 * 152064


def test_bench_tiny_window_lengths_and_flops_written_out():
    from learnpruner.adapters import qwen2_5_vl_bench as bq

    cfg = tiny_qwen().config  # 56 px windows (2x2 merged tokens = 16 patches), blocks 0 and 2 windowed, 1 full
    # 10x24 patches: 5x12 merged tokens -> windows of 2 rows (x2) and 1 row (x1) by 6 columns of 2
    assert bq.window_lengths(cfg, (1, 10, 24)) == [16] * 12 + [8] * 6
    conv = 2 * 64 * 32 * 1176  # 8x8 patches, 32 wide
    dense = 2 * 64 * (4 * 32 * 32 + 3 * 32 * 64)
    windowed, full = 4 * (4 * 16 ** 2 * 32), 4 * 64 ** 2 * 32
    assert bq.vision_flops(cfg, (1, 8, 8)) == conv + 3 * dense + 2 * windowed + full == 9_535_488
    assert bq.merger_flops(cfg, 16) == 2 * 16 * (128 * 128 + 128 * 64) == 786_432


@torch.no_grad()
@pytest.mark.parametrize("method", ["none", "random"])
def test_bench_analytic_flops_and_kv_bytes_equal_the_measured(method):
    """FlopCounterMode on the eager model (attention as matmuls, so counted) equals the analytic FLOPs of an image
    plus a video (window edges included); the cache after the pruned prefill holds the analytic bytes."""
    from torch.utils.flop_counter import FlopCounterMode

    from learnpruner.adapters import qwen2_5_vl_bench as bq

    model = tiny_qwen(attn="eager")
    inp = qwen_single(qwen_inputs(model, [["user :", ("video", (2, 8, 12)), "how many", ("image", (10, 24)),
                                           "squares ?"]]), 0)
    grids = [tuple(inp["video_grid_thw"][0].tolist()), tuple(inp["image_grid_thw"][0].tolist())]
    learnpruner.apply(model, method, ratio=0.5, **({"seed": 1} if method == "random" else {}))
    with FlopCounterMode(display=False) as counter:
        out = model(**inp, logits_to_keep=1, use_cache=True)
    st = learnpruner.stats(model)
    schedules = [im.schedule for im in st.images]
    text = inp["input_ids"].shape[1] - sum(im.count for im in st.images)
    parts = bq.flops_breakdown(model.config, schedules, grids, text)
    extra = 0
    if transformers_below("5.18"):  # 5.17's text rotary embedding is a batched matmul: 2 x 3 x s x head_dim/2
        extra = 2 * 3 * inp["input_ids"].shape[1] * 8
    assert counter.get_total_flops() == sum(parts.values()) + extra
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert held == bq.analytic_kv_bytes(model.config, schedules, text, dtype=torch.float32)


def transformers_below(version: str) -> bool:
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__) < Version(version)


def test_bench_adapter_helpers_and_random_pixels():
    from learnpruner.adapters import qwen2_5_vl_bench as bq
    from learnpruner.bench.geometry import bench_for

    model = tiny_qwen()
    ad = bench_for(model)
    geo = ad.item_geometry()
    assert geo.size == (896, 1120) and geo.tokens == 1280 and geo.crops == 1 and geo.structure == 0
    images = ad.random_images(2, generator=torch.Generator().manual_seed(0), image_size=(112, 112))
    assert images["pixel_values"].shape == (2 * 64, 1176) and images["image_grid_thw"].tolist() == [[1, 8, 8]] * 2
    assert ad.vision_flops(ad.item_geometry((112, 112))) == bq.vision_flops(model.config, (1, 8, 8))
    assert ad.projector_flops(16) == bq.merger_flops(model.config, 16)
    from learnpruner.bench.inputs import _make_inputs

    assert bq.random_pixels(model.config, 2, video=(4, 56, 84))["video_grid_thw"].tolist() == [[2, 4, 6]] * 2
    # the benchmark's prompt around the adapter's pixels (8 frames of 448x448: 4 groups of 16x16 tokens)
    [video], start = _make_inputs(ad.bench_item("video"), 2, 12, 1, "cpu", torch.float32)
    assert video["video_grid_thw"].tolist() == [[4, 32, 32]] * 2 and start == 5
    assert video["input_ids"].shape == (2, 12 + 1024) and int((video["mm_token_type_ids"] == 2).sum()) == 2048
    learnpruner.apply(model, "learnpruner", ratio=0.5, lpm="random")
    with torch.no_grad():
        model(**video)
    assert [im.count for im in learnpruner.stats(model).images] == [1024, 1024]


QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'video' %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% else %}"
    "ASSISTANT: {% for c in m['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


class ImageProcessorStandIn:
    """Qwen2.5-VL's processor without torchvision (the stock one needs it for its video half): the PIL image
    processor at 112 px (16 tokens), ``<|image_pad|>`` expanded per image grid; videos laid out as the stock video
    processor does, from the same image processor (:meth:`_video`); the chat template rendered by the
    tokenizer."""

    image_token, video_token = "<|image_pad|>", "<|video_pad|>"

    def __init__(self):
        from transformers import Qwen2VLImageProcessorPil

        self.tokenizer = qwen_tokenizer()
        self.chat_template = QWEN_CHAT_TEMPLATE
        self.images = Qwen2VLImageProcessorPil(size={"shortest_edge": 3136, "longest_edge": 12544})

    def __call__(self, text, images=None, videos=None, return_tensors="pt", **kwargs):
        from transformers import BatchFeature

        texts = [text] if isinstance(text, str) else list(text)
        out = {}
        if images:
            px = self.images(images=images if isinstance(images, list) else [images], return_tensors="pt")
            out.update(px)
            texts = self._expand(texts, self.image_token, (px["image_grid_thw"].prod(-1) // 4).tolist())
        if videos:
            rows, grids = zip(*(self._video(frames) for frames in videos))
            out.update(pixel_values_videos=torch.cat(rows), video_grid_thw=torch.stack(grids),
                       second_per_grid_ts=torch.ones(len(videos)))
            texts = self._expand(texts, self.video_token, [int(g.prod()) // 4 for g in grids])
        out.update(self.tokenizer(texts, return_tensors=return_tensors, padding=True))
        return BatchFeature(out)

    @staticmethod
    def _expand(texts, token, counts):
        counts = iter(counts)
        texts = [t.replace(token, "\0") for t in texts]
        return ["".join(p + (token * next(counts) if k < t.count("\0") else "") for k, p in enumerate(t.split("\0")))
                for t in texts]

    def _video(self, frames):
        """A video's pixel rows as the stock video processor lays them out, from the image processor: each frame
        alone gives its patch rows (``[n, C, 2, 14, 14]`` with the frame repeated over the temporal patch); frame
        pairs ``2g, 2g + 1`` fill temporal group ``g``'s two slots. Returns the rows and the grid ``(t, h, w)``."""
        from PIL import Image

        per_frame = self.images(images=[Image.fromarray(f) for f in frames], return_tensors="pt")
        n = int(per_frame["image_grid_thw"][0].prod())
        single = per_frame["pixel_values"].view(len(frames), n, 3, 2, 14, 14)[:, :, :, 0]  # [T, n, C, 14, 14]
        pairs = single.view(len(frames) // 2, 2, n, 3, 14, 14).permute(0, 2, 3, 1, 4, 5)  # [t, n, C, 2, 14, 14]
        t, h, w = len(frames) // 2, *per_frame["image_grid_thw"][0, 1:].tolist()
        return pairs.reshape(t * n, -1), torch.tensor([t, h, w])

    def apply_chat_template(self, messages, add_generation_prompt=False, **kwargs):
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)


def test_lpm_trains_on_qwen_images_and_apply_uses_it(tmp_path):
    from learnpruner.training import ShapesRecords, TrainConfig, train_lpm

    model, processor = tiny_qwen(layers=4), ImageProcessorStandIn()
    cfg = TrainConfig(tokens=6, steps=3, batch_size=2, lr=3e-3, warmup=1, ckpt_every=3, hidden_dim=16, mask="topk")
    trained = train_lpm(model, processor, ShapesRecords(), tmp_path, cfg, progress=False)
    hist = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["history"]
    assert len(hist) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    assert trained.config.family == "qwen2_5_vl" and trained.config.feature_dim == 4 * 32
    learnpruner.apply(model, "learnpruner", ratio=0.5, lpm=str(tmp_path))
    inp = qwen_inputs(model, [["what", ("image", (4, 4)), "colour"]])
    with torch.no_grad():
        model(**inp)
    im = learnpruner.stats(model).images[0]
    assert im.count == 4 and im.stage1_kept is not None
    assert torch.equal(next(model._learnpruner.lpm.parameters()).cpu(), next(trained.parameters()).cpu())


def test_training_forwards_get_the_3d_positions_of_the_prompt():
    from learnpruner.adapters import adapter_for
    from learnpruner.training import rotary_positions

    model = tiny_qwen(layers=2)
    inp = qwen_inputs(model, [["a", ("image", (4, 6)), "b c"], [("image", (4, 4)), "d"]], padding="right")
    expected, _ = model.model.get_rope_index(inp["input_ids"], inp["mm_token_type_ids"],
                                             image_grid_thw=inp["image_grid_thw"], attention_mask=inp["attention_mask"])
    got = rotary_positions(adapter_for(model), inp)["position_ids"]
    assert torch.equal(got, expected)
    llava = tiny_llava(layers=2)
    assert rotary_positions(adapter_for(llava), make_inputs(llava)) == {}  # 1-D RoPE: the model's own default


def test_video_stand_in_lays_out_pixels_as_the_model_reads_them():
    """The stand-in's video rows: a video of one frame repeated is the image of that frame, row for row."""
    import numpy as np
    from PIL import Image

    proc = ImageProcessorStandIn()
    frame = np.random.default_rng(0).integers(0, 255, (112, 112, 3), dtype=np.uint8)
    rows, grid = proc._video(np.stack([frame, frame]))
    image = proc.images(images=[Image.fromarray(frame)], return_tensors="pt")
    assert grid.tolist() == image["image_grid_thw"][0].tolist()
    torch.testing.assert_close(rows, image["pixel_values"])


def test_lpm_trains_on_qwen_video_records(tmp_path):
    """Video records (frames from a file) train an LPM on Qwen2.5-VL: each video is one item of all its temporal
    groups, placeholders expanded through the chat template, 3-D positions from the model's own rules."""
    import json

    import numpy as np

    from learnpruner.adapters import adapter_for
    from learnpruner.testbed.shapes import generate_item
    from learnpruner.training import JsonlRecords, TrainConfig, _collate, _encode, prompt_embeddings, train_lpm
    from learnpruner.video import write_video

    pytest.importorskip("av")
    model, processor = tiny_qwen(layers=4), ImageProcessorStandIn()
    write_video(tmp_path / "clip.mp4", [np.asarray(generate_item("test", i).image.resize((112, 112)))
                                        for i in range(4)])
    conv = [{"from": "human", "value": "<video>\nhow many squares ?"}, {"from": "gpt", "value": "two"}]
    (tmp_path / "data.jsonl").write_text(json.dumps({"video": "clip.mp4", "conversations": conv}) + "\n")
    data = JsonlRecords(tmp_path / "data.jsonl", num_frames=4)
    ad = adapter_for(model)
    enc = _encode(data.get(0), processor, ad, 4096)
    assert enc.visual["video_grid_thw"].tolist() == [[2, 8, 8]]  # 4 frames: 2 temporal groups of 4x4 tokens
    _, visual, _ = prompt_embeddings(model, ad, _collate([enc], 0))
    assert visual.counts() == [32]
    cfg = TrainConfig(tokens=8, steps=2, batch_size=1, lr=3e-3, warmup=1, ckpt_every=2, hidden_dim=16, mask="topk")
    trained = train_lpm(model, processor, data, tmp_path / "run", cfg, progress=False)
    hist = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["history"]
    assert len(hist) == 2 and all(np.isfinite(h["loss"]) for h in hist)
    assert trained.config.family == "qwen2_5_vl"


@torch.no_grad()
@pytest.mark.parametrize("form", ["none", "3d", "4d"])
def test_decode_after_a_prefill_given_3d_positions_continues_where_the_unpruned_model_does(model, batches, form):
    """A pruned prefill caches ``rope_deltas`` (for a hand-written decode loop that gives 2-D or no position ids):
    whatever position ids the prefill got, they equal the unpruned model's own (``get_rope_index``), and the decode
    steps give the same logits."""
    inp = batches["mixed"]  # left-padded: the deltas differ per row
    rope, deltas = model.model.get_rope_index(inp["input_ids"], inp["mm_token_type_ids"],
                                              image_grid_thw=inp["image_grid_thw"],
                                              video_grid_thw=inp["video_grid_thw"],
                                              second_per_grid_ts=inp["second_per_grid_ts"],
                                              attention_mask=inp["attention_mask"])
    mask = inp["attention_mask"]
    text = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    given = {"none": {}, "3d": {"position_ids": rope}, "4d": {"position_ids": torch.cat([text[None], rope])}}[form]

    def run(prefill_kwargs):
        learnpruner.apply(model, "learnpruner", ratio=RATIO, lpm="random")
        try:
            out = model(**inp, use_cache=True, **prefill_kwargs)
            cache = out.cache if hasattr(out, "cache") else out.past_key_values
            cached = getattr(cache, ROPE_DELTAS_ATTR).clone()
            logits, m = [out.logits[:, -1]], mask
            nxt = torch.full((mask.shape[0], 1), 5)
            for t in range(3):
                m = torch.cat([m, torch.ones_like(nxt)], dim=1)
                step = {} if t % 2 == 0 else {"position_ids": text[:, -1:] + 1 + t}  # no ids, then 2-D ids
                out = model(input_ids=nxt, attention_mask=m, cache=cache, use_cache=True, **step)
                logits.append(out.logits[:, -1])
        finally:
            learnpruner.remove(model)
        return cached, logits

    cached, logits = run(given)
    assert torch.equal(cached.view(-1), deltas.view(-1).to(cached.dtype))
    _, reference = run({})
    for a, b in zip(logits, reference, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
