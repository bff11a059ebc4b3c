"""LLaVA-NeXT (AnyRes): ragged visual tokens through every method, against the unmodified transformers model.

Tiny random configs built offline: CLIP at 56 px (16 tokens per crop), grid pinpoints up to 2x2 crops,
so a 112x112 image has 80 visual tokens (+ 8 row newlines) and a 60x150 one 48 (+ 4).
"""

from __future__ import annotations

import pytest
import torch
from harness import layer_lengths
from helpers import method_options, next_inputs, next_processor, tiny_llava_next

import learnpruner
from learnpruner.adapters import adapter_for
from learnpruner.budget import split_evenly
from learnpruner.engine import STRUCTURE

torch.set_num_threads(1)

METHODS = sorted(learnpruner.METHODS)
PRUNED = [m for m in METHODS if m != "none"]
BUDGET = 32


@pytest.fixture(scope="module")
def model():
    return tiny_llava_next()


@pytest.fixture(scope="module")
def processor():
    return next_processor()


@pytest.fixture(scope="module")
def inp(processor):
    return next_inputs(processor)


@pytest.fixture(autouse=True)
def _unpatch(model):
    yield
    if learnpruner.is_pruned(model):
        learnpruner.remove(model)


def _single(inp, i):
    real = inp["attention_mask"][i].bool()
    return {"input_ids": inp["input_ids"][i:i + 1, real], "attention_mask": inp["attention_mask"][i:i + 1, real],
            "pixel_values": inp["pixel_values"][i:i + 1], "image_sizes": inp["image_sizes"][i:i + 1]}


@torch.no_grad()
def test_packed_order_maps_every_placeholder_to_its_crop_and_patch(model, inp):
    """Projecting the rows ``encode`` gives reproduces the model's own packed image features exactly."""
    ad = adapter_for(model)
    visual = ad.encode(inp["pixel_values"], image_sizes=inp["image_sizes"])
    packed = model.model.get_image_features(inp["pixel_values"], inp["image_sizes"]).pooler_output
    assert [f.shape[0] for f in visual.features] == [80, 48]
    for feats, slots, ref in zip(visual.features, visual.slots, packed):
        assert slots.shape[0] == ref.shape[0]
        newline = slots == STRUCTURE
        torch.testing.assert_close(ad.project(feats), ref[~newline], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ref[newline], model.model.image_newline.expand(int(newline.sum()), -1))
    assert visual.crops[0].unique().tolist() == [0, 1, 2, 3, 4]  # base crop + a 2x2 grid
    assert visual.crops[1].unique().tolist() == [0, 1, 2]  # base crop + a 1x2 grid (padding rows removed)


@torch.no_grad()
@pytest.mark.parametrize("method", METHODS)
def test_full_budget_is_identical_to_unpatched(model, inp, method):
    ref = model(**inp).logits
    ref_gen = model.generate(**inp, max_new_tokens=3, do_sample=False)
    learnpruner.apply(model, method, tokens=80, **method_options(method))
    assert torch.equal(model(**inp).logits, ref)
    assert torch.equal(model.generate(**inp, max_new_tokens=3, do_sample=False), ref_gen)


@torch.no_grad()
@pytest.mark.parametrize("method", PRUNED)
def test_each_image_follows_its_own_schedule(model, inp, method):
    learnpruner.apply(model, method, tokens=BUDGET, **method_options(method))
    model(**inp)
    st = learnpruner.stats(model)
    assert [im.count for im in st.images] == [80, 48]
    assert [im.structure for im in st.images] == [8, 4]
    for im in st.images:
        assert im.tokens_per_layer == im.schedule.per_layer()
        assert abs(im.average_tokens - min(BUDGET, im.count)) <= 1.0
        chain = ([im.stage1_kept] if im.stage1_kept is not None else []) + im.llm_kept
        for a, b in zip(chain, chain[1:]):
            assert set(b.tolist()) <= set(a.tolist())
    assert st.average_tokens == pytest.approx(sum(im.average_tokens for im in st.images) / 2)
    # the hidden states each layer receives hold exactly the scheduled tokens (one sample at a time)
    for i, im in enumerate(st.images):
        single = _single(inp, i)
        with layer_lengths(model) as lengths:
            model(**single)
        s = single["input_ids"].shape[1]
        assert lengths == [s - im.count + k for k in im.schedule.per_layer()]


@torch.no_grad()
@pytest.mark.parametrize("method", PRUNED)
def test_padded_batch_of_different_sizes_equals_each_alone(model, inp, method):
    learnpruner.apply(model, method, tokens=BUDGET, **method_options(method))
    if method == "random":
        pytest.skip("random draws new indices per forward")
    batched = model(**inp)
    st = learnpruner.stats(model)
    gen = model.generate(**inp, max_new_tokens=3, do_sample=False)
    width = inp["input_ids"].shape[1]
    for i in range(2):
        single = _single(inp, i)
        out = model(**single)
        s1 = learnpruner.stats(model)
        a, b = st.images[i], s1.images[0]
        assert (a.stage1_kept is None) == (b.stage1_kept is None)
        if a.stage1_kept is not None:
            assert torch.equal(a.stage1_kept, b.stage1_kept)
        for x, y in zip(a.llm_kept, b.llm_kept, strict=True):
            assert torch.equal(x, y)
        torch.testing.assert_close(batched.logits[i, -1], out.logits[0, -1], atol=1e-4, rtol=1e-4)
        g = model.generate(**single, max_new_tokens=3, do_sample=False)
        assert torch.equal(g[0, single["input_ids"].shape[1]:], gen[i, width:])


@torch.no_grad()
@pytest.mark.parametrize("method", ["learnpruner", "fastv", "sparsevlm", "visionzip", "pyramiddrop"])
def test_cached_generation_equals_stepwise_recomputation(model, inp, method):
    # merged rows are not replayed by fixed_selection (only the kept sets): run the mergers without merging
    unmerged = {"sparsevlm": {"recycle": False}, "visionzip": {"contextual": 0}}
    learnpruner.apply(model, method, tokens=BUDGET, **method_options(method), **unmerged.get(method, {}))
    steps = 3
    banned = [model.config.image_token_id, model.generation_config.eos_token_id]  # no early stop: every step counts
    gen = model.generate(**inp, max_new_tokens=steps, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, suppress_tokens=banned)
    st = learnpruner.stats(model)
    new = gen.sequences[:, inp["input_ids"].shape[1]:]
    with learnpruner.fixed_selection(model, st.stage1_kept, st.llm_kept):
        for t in range(steps):
            ids = torch.cat([inp["input_ids"], new[:, :t]], dim=1)
            mask = torch.cat([inp["attention_mask"], torch.ones_like(new[:, :t])], dim=1)
            pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, pixel_values=inp["pixel_values"],
                           image_sizes=inp["image_sizes"], use_cache=False).logits[:, -1]
            torch.testing.assert_close(logits, gen.logits[t], atol=1e-4, rtol=1e-4)
            logits[:, banned] = float("-inf")
            assert torch.equal(logits.argmax(-1), new[:, t]), f"step {t}"


@torch.no_grad()
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_stage2_scores_equal_eager_attention(impl, processor, inp):
    model, ref = tiny_llava_next(attn=impl, seed=1), tiny_llava_next(attn="eager", seed=1)
    layer = 3
    learnpruner.apply(model, "learnpruner", tokens=8, lpm="random", r1=48, r2=6, layer=layer)
    model(**inp)
    st = learnpruner.stats(model)
    kept1 = [im.stage1_kept for im in st.images]
    # the reference: the unmodified eager model on the stage-1 sequence (dropped placeholders removed)
    visual = adapter_for(model).encode(inp["pixel_values"], image_sizes=inp["image_sizes"])
    image_id = model.config.image_token_id
    for i in range(2):
        single = _single(inp, i)
        ids = single["input_ids"][0]
        slots = visual.slots[i]
        placeholder = (ids == image_id).nonzero()[:, 0]
        keep = torch.ones_like(ids, dtype=torch.bool)
        dropped = (slots >= 0) & ~torch.isin(slots, kept1[i] if kept1[i] is not None else slots)
        keep[placeholder[dropped]] = False
        packed = model.model.get_image_features(single["pixel_values"], single["image_sizes"]).pooler_output[0]
        embeds = ref.model.language_model.embed_tokens(ids[None])
        embeds[0, placeholder] = packed.to(embeds.dtype)
        pos = torch.arange(ids.shape[0])[None]
        out = ref.model.language_model(inputs_embeds=embeds[:, keep], position_ids=pos[:, keep],
                                       attention_mask=torch.ones(1, int(keep.sum()), dtype=torch.long),
                                       output_attentions=True)
        probs = out.attentions[layer - 1][0].float()  # [h, s', s']
        kept_ids = ids[keep]
        kept_slots = torch.full_like(ids, -1)
        kept_slots[placeholder] = slots
        kept_slots = kept_slots[keep]
        last_image = int((kept_ids == image_id).nonzero().max())
        q = torch.arange(kept_ids.shape[0]) > last_image
        visual_cols = kept_slots >= 0
        expected = probs[:, q][:, :, visual_cols].mean(dim=(0, 1))
        scores = st.stage2_scores[i, kept_slots[visual_cols]]
        torch.testing.assert_close(scores, expected, atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_several_images_per_prompt_in_a_padded_batch(model, processor):
    inp = next_inputs(processor, sizes=((112, 112), (60, 150), (150, 60)), images_per_prompt=[2, 1])
    learnpruner.apply(model, "learnpruner", tokens=16, lpm="random")
    batched = model(**inp)
    st = learnpruner.stats(model)
    assert [im.count for im in st.images] == [80, 48, 48]
    for im in st.images:
        assert im.tokens_per_layer == im.schedule.per_layer()
    real = inp["attention_mask"][1].bool()
    single = {"input_ids": inp["input_ids"][1:, real], "attention_mask": inp["attention_mask"][1:, real],
              "pixel_values": inp["pixel_values"][2:], "image_sizes": inp["image_sizes"][2:]}
    alone = model(**single)
    a, b = learnpruner.stats(model).images[0], st.images[2]
    assert torch.equal(a.stage1_kept, b.stage1_kept) and torch.equal(a.llm_kept[0], b.llm_kept[0])
    torch.testing.assert_close(batched.logits[1, -1], alone.logits[0, -1], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_ratio_keeps_a_fraction_of_each_image(model, inp):
    learnpruner.apply(model, "learnpruner", ratio=0.25, lpm="random")
    model(**inp)
    st = learnpruner.stats(model)
    for im in st.images:
        assert abs(im.average_tokens - 0.25 * im.count) <= 1.0
    learnpruner.remove(model)
    learnpruner.apply(model, "visionzip", ratio=0.5)
    model(**inp)
    assert [im.tokens_per_layer[0] for im in learnpruner.stats(model).images] == [40, 24]


@pytest.mark.parametrize("kwargs,match", [
    ({"ratio": 0.0}, r"ratio must be a number in \(0, 1\].*got 0.0"),
    ({"ratio": 1.5}, r"ratio must be a number in \(0, 1\].*got 1.5"),
    ({"ratio": "half"}, r"ratio must be a number in \(0, 1\].*got 'half'"),
    ({"ratio": 0.5, "tokens": 32}, r"give tokens= or ratio=, not both"),
])
def test_bad_budgets_are_refused_naming_the_value(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        learnpruner.apply(model, "fastv", **kwargs)
    assert not learnpruner.is_pruned(model)


def test_lpm_of_another_family_is_refused(model, tmp_path):
    lpm = learnpruner.LearnablePruningModule(learnpruner.LPMConfig(feature_dim=32, family="llava"))
    with pytest.raises(ValueError, match="trained for model family 'llava', but the model is 'llava_next'"):
        learnpruner.apply(model, "learnpruner", tokens=16, lpm=lpm)


@torch.no_grad()
def test_image_text_to_text_pipeline_runs_pruned(model, processor):
    from PIL import Image
    from transformers import pipeline

    learnpruner.apply(model, "learnpruner", tokens=BUDGET, lpm="random")
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    image = Image.new("RGB", (150, 60), (200, 30, 30))
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "what colour is the circle ?"}]}]
    out = pipe(text=messages, generate_kwargs={"max_new_tokens": 3, "do_sample": False}, return_full_text=False)
    st = learnpruner.stats(model)
    assert st.images[0].count == 56 - 8 and st.images[0].average_tokens == pytest.approx(BUDGET, abs=1.0)
    inputs = processor(images=[image], text=[processor.apply_chat_template(messages, add_generation_prompt=True)],
                       return_tensors="pt")
    direct = model.generate(**inputs, max_new_tokens=3, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert out[0]["generated_text"].strip() == processor.decode(direct, skip_special_tokens=True).strip()


def test_split_evenly_fills_small_parts_first_and_never_overflows():
    assert split_evenly(32, [16, 16, 16, 16, 16]) == [7, 7, 6, 6, 6]
    assert split_evenly(30, [16, 4, 16]) == [13, 4, 13]
    assert split_evenly(100, [3, 5]) == [3, 5]


@torch.no_grad()
def test_visionzip_compresses_each_crop_alone_as_officially(model, inp):
    learnpruner.apply(model, "visionzip", tokens=20)
    model(**inp)
    st = learnpruner.stats(model)
    visual = adapter_for(model).encode(inp["pixel_values"], image_sizes=inp["image_sizes"])
    for im, crops in zip(st.images, visual.crops):
        per_crop = torch.bincount(crops[im.stage1_kept], minlength=int(crops.max()) + 1)
        sizes = torch.bincount(crops).tolist()
        assert per_crop.tolist() == split_evenly(20, sizes)


def test_cli_generate_and_eval_accept_a_next_model(model, processor, tmp_path, capsys):
    from learnpruner.cli import main

    folder = tmp_path / "tiny-next"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    overlay = tmp_path / "kept.png"
    rc = main(["generate", "--model", str(folder), "--image", "shapesvqa:1", "--method", "visionzip", "--ratio", "0.25",
               "--max-new-tokens", "2", "--overlay", str(overlay)])
    out = capsys.readouterr().out
    assert rc == 0 and overlay.stat().st_size > 0
    assert "visual tokens: 80 (+8 row newlines, kept as structure)" in out and "kept 20 of 80" in out
    rc = main(["eval", "--model", str(folder), "--data", "shapesvqa", "--limit", "2", "--methods", "none,fastv",
               "--tokens", "40", "--out", str(tmp_path / "eval")])
    assert rc == 0 and (tmp_path / "eval" / "results.json").is_file()


@torch.no_grad()
def test_layout_view_hides_other_groups_images_as_structure():
    """A rule running on one group of images sees the other groups' visual rows as structure: never selectable,
    never instruction (text after the last image)."""
    from learnpruner.engine import TEXT
    from learnpruner.engine.layout import Layout, instruction_rows

    # one sample: image 0 (3 tokens), image 1 (5 tokens), then 3 instruction tokens
    vis = torch.tensor([[TEXT, 0, 1, 2, TEXT, 0, 1, 2, 3, 4, TEXT, TEXT, TEXT]])
    img = torch.tensor([[-1, 0, 0, 0, -1, 1, 1, 1, 1, 1, -1, -1, -1]])
    layout = Layout(vis=vis, img=img, counts=[3, 5], groups={3: [0], 5: [1]})
    vis_g, img_g = layout.view(vis, img, [0])
    assert vis_g[0, 5:10].eq(STRUCTURE).all() and img_g[0, 5:10].eq(-1).all()
    assert torch.equal(vis_g[0, :5], vis[0, :5]) and torch.equal(img_g[0, 1:4], torch.zeros(3, dtype=torch.long))
    assert torch.equal(instruction_rows(vis_g, None), instruction_rows(vis, None))
    vis_1, img_1 = layout.view(vis, img, [1])
    assert vis_1[0, 1:4].eq(STRUCTURE).all() and img_1[0, 5:10].eq(0).all()
    assert torch.equal(instruction_rows(vis_1, None), instruction_rows(vis, None))


@torch.no_grad()
@pytest.mark.parametrize("method", ["learnpruner", "sparsevlm"])
def test_stage2_of_images_of_two_sizes_in_one_prompt_equals_eager_attention(processor, method):
    """Two images of different token counts (two groups) in one prompt: each image's stage-2 scores are the
    eager attention of the instruction (the text after the second image) to its kept rows, and each kept set is
    the top of its scores."""
    model, ref = tiny_llava_next(attn="sdpa", seed=1), tiny_llava_next(attn="eager", seed=1)
    inp = next_inputs(processor, sizes=((112, 112), (60, 150)), images_per_prompt=[2])
    layer = 3
    opts = {"lpm": "random", "r1": 40, "r2": 6} if method == "learnpruner" else {}
    learnpruner.apply(model, method, tokens=24, layer=layer, **opts) if method == "learnpruner" else \
        learnpruner.apply(model, method, tokens=24)
    model(**inp)
    st = learnpruner.stats(model)
    assert [im.count for im in st.images] == [80, 48]
    visual = adapter_for(model).encode(inp["pixel_values"], image_sizes=inp["image_sizes"])
    ids = inp["input_ids"][0]
    image_id = model.config.image_token_id
    placeholder = (ids == image_id).nonzero()[:, 0]
    slots = torch.cat(visual.slots)
    owner = torch.cat([torch.full((len(s),), i) for i, s in enumerate(visual.slots)])
    keep = torch.ones_like(ids, dtype=torch.bool)
    for i, im in enumerate(st.images):
        if im.stage1_kept is not None:
            mine = owner == i
            dropped = mine & (slots >= 0) & ~torch.isin(slots, im.stage1_kept)
            keep[placeholder[dropped]] = False
    packed = torch.cat(list(model.model.get_image_features(inp["pixel_values"], inp["image_sizes"]).pooler_output))
    embeds = ref.model.language_model.embed_tokens(ids[None])
    embeds[0, placeholder] = packed.to(embeds.dtype)
    pos = torch.arange(ids.shape[0])[None]
    drop_layer = st.images[0].schedule.drops[0][0]
    out = ref.model.language_model(inputs_embeds=embeds[:, keep], position_ids=pos[:, keep],
                                   attention_mask=torch.ones(1, int(keep.sum()), dtype=torch.long),
                                   output_attentions=True)
    probs = out.attentions[drop_layer - 1][0].float()
    kept_ids = ids[keep]
    kept_slots, kept_owner = torch.full_like(ids, -1), torch.full_like(ids, -1)
    kept_slots[placeholder], kept_owner[placeholder] = slots, owner
    kept_slots, kept_owner = kept_slots[keep], kept_owner[keep]
    last_image = int((kept_ids == image_id).nonzero().max())
    q = torch.arange(kept_ids.shape[0]) > last_image
    for i, im in enumerate(st.images):
        cols = (kept_owner == i) & (kept_slots >= 0)
        expected = probs[:, q][:, :, cols].mean(dim=(0, 1))
        torch.testing.assert_close(st.stage2_scores[i, kept_slots[cols]], expected, atol=1e-6, rtol=1e-5)
        if method == "learnpruner":  # text attention: the kept set is the top-r2 of those scores
            r2 = len(im.llm_kept[0])
            top = kept_slots[cols][expected.topk(r2).indices].sort().values
            assert torch.equal(im.llm_kept[0].sort().values, top)


@torch.no_grad()
def test_token_counts_the_adapter_reports_are_the_ones_it_encodes(model, processor):
    """``num_visual_tokens`` (the largest image) and ``item_geometry`` (per size: tokens, row newlines, crops)
    equal what ``encode`` gives for images of those sizes, as the budgets and the benchmark rely on them."""
    from learnpruner.bench.geometry import bench_for

    ad, view = adapter_for(model), bench_for(model)
    sizes = ((112, 112), (60, 150), (150, 60), view.largest_image_size())
    inp = next_inputs(processor, sizes=sizes, images_per_prompt=[1, 1, 1, 1])
    visual = ad.encode(inp["pixel_values"], image_sizes=inp["image_sizes"])
    assert visual.counts()[:2] == [80, 48]
    for size, count, slots in zip(sizes, visual.counts(), visual.slots):
        geo = view.item_geometry(size)
        assert (geo.tokens, geo.structure) == (count, int((slots == STRUCTURE).sum())), size
    assert ad.num_visual_tokens() == visual.counts()[-1] == max(visual.counts())
