"""Tests of the ShapesVQA testbed: generator, processor/model round trip, resumable training."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch

from learnpruner.testbed import shapes as S
from learnpruner.testbed.model import (
    NUM_IMAGE_TOKENS,
    build_model,
    build_processor,
    encode_conversation,
    question_prompt,
    save,
)
from recipes.testbed.recipe import TestbedConfig
from recipes.testbed.targets import curriculum_cap, vqa_accuracy
from recipes.testbed.train import Trainer

torch.set_num_threads(1)


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def processor():
    return build_processor()


@pytest.fixture(scope="module")
def hand_scene():
    objects = [
        S.SceneObject("circle", "red", 34, 60, 60),
        S.SceneObject("star", "blue", 44, 200, 60),
        S.SceneObject("square", "green", 34, 60, 200),
        S.SceneObject("circle", "green", 24, 250, 250),
        S.SceneObject("triangle", "yellow", 34, 300, 120),
    ]
    boxes = [S.TextBox("K", 150, 280)]
    return S.render_scene(objects, boxes, seed=5)


# ------------------------------------------------------------------------------------------- generator


def test_generator_deterministic():
    a, b = S.generate_item("test", 3), S.generate_item("test", 3)
    assert _png(a.image) == _png(b.image)
    assert (a.question, a.answer, a.qtype, a.objects) == (b.question, b.answer, b.qtype, b.objects)
    c = S.generate_item("test", 4)
    assert _png(a.image) != _png(c.image)
    assert a.image.size == (336, 336) and a.image.mode == "RGB"
    t1 = next(S.train_stream(seed=1, start_index=7))
    t2 = S.generate_item("train", 7, seed=1, all_questions=True)
    assert _png(t1.image) == _png(t2.image) and t1.qas == t2.qas


def test_hand_verified_answers(hand_scene):
    objs, boxes = hand_scene.objects, hand_scene.boxes
    expected = {
        "what color is the star?": "blue",
        "what color is the square?": "green",
        "what shape is the red object?": "circle",
        "what shape is the yellow object?": "triangle",
        "how many circles are there?": "two",
        "how many triangles are there?": "one",
        "how many hexagons are there?": "zero",
        "is there a red circle?": "yes",
        "is there a blue circle?": "no",
        "is the red circle left of the blue star?": "yes",
        "is the blue star left of the red circle?": "no",
        "is the blue star above the green square?": "yes",
        "is the green circle below the yellow triangle?": "yes",
        "is the green square right of the green circle?": "no",
        "what is written in the box?": "k",
    }
    for q, a in expected.items():
        assert S.answer_question(q, objs, boxes) == a, q
    for bad in ("what color is the circle?", "what shape is the green object?",
                "is the red circle above the blue star?", "what is this?"):
        with pytest.raises(ValueError):
            S.answer_question(bad, objs, boxes)
    px = np.asarray(hand_scene.image)
    assert px[60, 200, 2] > 180 and px[60, 200, 0] < 110  # blue star centre
    assert px[60, 60, 0] > 180 and px[60, 60, 2] < 110  # red circle centre


def test_patch_labels_hand_scene(hand_scene):
    lab = hand_scene.labels
    assert set(lab) == {"kind", "color", "shape", "char", "center", "id"}
    assert all(v.shape == (24, 24) for v in lab.values())
    r, c = 60 // 14, 200 // 14
    assert lab["kind"][r, c] == 1 and S.COLOR_NAMES[lab["color"][r, c] - 1] == "blue"
    assert S.SHAPES[lab["shape"][r, c] - 1] == "star" and lab["center"][r, c] == 1
    assert lab["kind"][280 // 14, 150 // 14] == 2 and S.CHARS[lab["char"][280 // 14, 150 // 14] - 1] == "K"
    assert lab["kind"][0, 23] == 0 and lab["kind"][12, 10] == 0  # empty regions
    assert lab["center"].sum() == len(hand_scene.objects)


def test_generated_items_consistent():
    items = [S.generate_item("train", i, seed=3, all_questions=True) for i in range(40)]
    for it in items:
        objs = [S.SceneObject(**o) for o in it.objects]
        boxes = [S.TextBox(**b) for b in it.boxes]
        assert S.MIN_OBJECTS <= len(objs) <= S.MAX_OBJECTS
        for q, a, qt in it.qas:
            assert S.answer_question(q, objs, boxes) == a and qt in S.QTYPES
            assert a == a.lower() and len(a.split()) == 1
        for o in objs:  # label at each object's centre patch is that object
            r, c = o.y // 14, o.x // 14
            assert it.labels["kind"][r, c] == 1
            assert S.COLOR_NAMES[it.labels["color"][r, c] - 1] == o.color
            assert S.SHAPES[it.labels["shape"][r, c] - 1] == o.shape
        fg = it.labels["kind"] > 0
        assert 0.01 < fg.mean() < 0.35  # mostly uninformative background


def test_yes_no_balanced():
    answers = {"exist": [], "position": []}
    for i in range(80):
        for _, a, qt in S.generate_item("train", i, seed=11, all_questions=True).qas:
            if qt in answers:
                answers[qt].append(a == "yes")
    for qt, v in answers.items():
        assert len(v) > 50, qt
        assert 0.35 < np.mean(v) < 0.65, (qt, np.mean(v))


def test_splits():
    assert S.SPLIT_SIZES["test"] >= 1000 and 400 <= S.SPLIT_SIZES["val"] <= 600
    val, test = S.load_split("val", 12), S.load_split("test", 12)
    assert len(val) == 12 and [it.qtype for it in test[:6]] == list(S.QTYPES)
    assert _png(val[0].image) == _png(S.load_split("val", 1)[0].image)
    seeds = {sp: {S.item_seed(sp, i) for i in range(n)} for sp, n in (("val", 500), ("test", 1200))}
    train = {S.item_seed("train", i, 0) for i in range(20000)}
    assert not (seeds["val"] & seeds["test"]) and not (train & (seeds["val"] | seeds["test"]))
    assert {_png(it.image) for it in val}.isdisjoint({_png(it.image) for it in test})
    with pytest.raises(ValueError):
        S.load_split("train", 3)


def test_to_jsonl(tmp_path):
    path = S.to_jsonl(S.load_split("val", 3), str(tmp_path))
    rows = [json.loads(line) for line in open(path)]
    assert len(rows) == 3 and set(rows[0]) == {"id", "image", "question", "answer", "qtype"}
    assert os.path.exists(tmp_path / rows[0]["image"]) and not os.path.isabs(rows[0]["image"])


# ----------------------------------------------------------------------------------------------- model


def test_processor_and_tokenizer(processor):
    it = S.generate_item("test", 0)
    enc = processor(images=it.image, text=question_prompt(it.question), return_tensors="pt")
    img_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((enc["input_ids"] == img_id).sum()) == NUM_IMAGE_TOKENS == 576
    assert enc["pixel_values"].shape == (1, 3, 336, 336)
    tok = processor.tokenizer
    assert tok.decode(tok("Is there a RED star?", add_special_tokens=False)["input_ids"]) == "is there a red star ?"
    assert tok.unk_token_id not in tok(it.question)["input_ids"]
    ids, labels = encode_conversation(tok, [(it.question, it.answer), ("is there a red star?", "no")])
    assert ids[: enc["input_ids"].shape[1]] == enc["input_ids"][0].tolist()
    kept = [i for i, y in zip(ids, labels) if y != -100]
    assert tok.decode(kept, skip_special_tokens=True) == f"{it.answer} no"
    chat = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": it.question}]}],
        add_generation_prompt=True)
    assert chat == question_prompt(it.question)


def test_generate_and_roundtrip(processor, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = build_model(tokenizer=processor.tokenizer, tiny=True, seed=0).eval()
    items = S.load_split("val", 2)
    enc = processor(images=[it.image for it in items], text=[question_prompt(it.question) for it in items],
                    return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    words = processor.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    vocab = set(processor.tokenizer.get_vocab())
    assert all(w in vocab for t in words for w in t.split())
    save(model, processor, str(tmp_path))
    assert os.path.getsize(tmp_path / "model.safetensors") < 25e6
    m2 = LlavaForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    p2 = AutoProcessor.from_pretrained(str(tmp_path))
    enc2 = p2(images=[it.image for it in items], text=[question_prompt(it.question) for it in items],
              return_tensors="pt", padding=True)
    assert torch.equal(enc["input_ids"], enc2["input_ids"]) and torch.equal(enc["pixel_values"], enc2["pixel_values"])
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, m2(**enc2).logits)
    res = vqa_accuracy(m2, p2, items)
    assert set(res) >= {"accuracy", "per_qtype"} and 0.0 <= res["accuracy"] <= 1.0


def test_default_model_size():
    model = build_model()
    n = sum(p.numel() for p in model.parameters())
    assert n * 4 <= 25e6 and model.config.text_config.num_hidden_layers >= 8
    assert model.config.vision_feature_layer == -2 and model.config.vision_config.image_size == 336


# ------------------------------------------------------------------------------------------------ train


def _cfg(out: str, **kw) -> TestbedConfig:
    kw = {"lr_vision_b": 1e-4, "steps_b": 3, "warmup": 1, **kw}
    return TestbedConfig(out=out, steps_a=2, batch_size_a=2, batch_size=2, ckpt_every=1,
                       eval_every=100, eval_n=2, test_n=2, tiny=True, seed=1, **kw)


def test_curriculum():
    assert curriculum_cap(0, 100) == 3 and curriculum_cap(100, 100) == 8 and curriculum_cap(5, 0) == 8


def test_train_resume_matches_uninterrupted(tmp_path):
    full = Trainer(_cfg(str(tmp_path / "full")))
    metrics = full.run(progress=False)
    assert os.path.exists(tmp_path / "full" / "model.safetensors") and "test" in metrics
    assert json.load(open(tmp_path / "full" / "metrics.json"))["test"]["n"] == 2

    part = Trainer(_cfg(str(tmp_path / "part")))
    while part.stage == "a":  # interrupt in the middle of stage (b)
        part.train_step()
        if part.step == part.cfg.steps_a:
            part._next_stage()
    part.train_step()
    part.save_checkpoint()
    assert not os.path.exists(part.ckpt_path + ".tmp")
    resumed = Trainer(_cfg(str(tmp_path / "part")))
    resumed.load_checkpoint()
    assert (resumed.stage, resumed.step, resumed.pos) == ("b", 1, 2)
    resumed.run(progress=False)
    for (k, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    ck = torch.load(resumed.ckpt_path, weights_only=True)
    assert ck["stage"] == "done"


def test_patch_loss_position_weight_scales_only_the_row_column_terms():
    import torch.nn.functional as F

    from recipes.testbed.targets import PatchHeads, patch_loss

    torch.manual_seed(0)
    n, grid = 2, 24
    logits = {k: torch.randn(n, grid * grid, c) for k, c in PatchHeads.SPEC.items()}
    labels = {"kind": torch.randint(0, 3, (n, grid * grid)), "center": torch.randint(0, 2, (n, grid * grid)),
              "color": torch.randint(0, 3, (n, grid * grid)), "shape": torch.randint(0, 3, (n, grid * grid)),
              "char": torch.randint(0, 3, (n, grid * grid))}
    pos = torch.arange(grid * grid)
    position = (F.cross_entropy(logits["row"].flatten(0, 1), (pos // grid).repeat(n))
                + F.cross_entropy(logits["col"].flatten(0, 1), (pos % grid).repeat(n)))
    without, _ = patch_loss(logits, labels, position_weight=0.0)
    with_half, _ = patch_loss(logits, labels)
    torch.testing.assert_close(with_half - without, 0.5 * position)


def test_relevant_objects_hand_scene(hand_scene):
    objs, boxes = hand_scene.objects, hand_scene.boxes
    expected = {
        "what color is the star?": [1],
        "what shape is the red object?": [0],
        "how many circles are there?": [0, 3],
        "how many hexagons are there?": [],
        "is there a red circle?": [0],
        "is there a blue circle?": [],
        "is the red circle left of the blue star?": [0, 1],
        "what is written in the box?": [5],
    }
    for q, want in expected.items():
        assert S.relevant_objects(q, objs, boxes) == want, q
    ids = hand_scene.labels["id"]
    assert ids[60 // 14, 200 // 14] == 2 and ids[280 // 14, 150 // 14] == 6 and ids[0, 23] == 0
    assert set(np.unique(ids)) == set(range(len(objs) + len(boxes) + 1))
    with pytest.raises(ValueError, match="unknown question"):
        S.relevant_objects("what is this?", objs, boxes)


def test_referents_hand_scene(hand_scene):
    objs, boxes = hand_scene.objects, hand_scene.boxes
    expected = {
        "what color is the star?": [("star", [1])],
        "what shape is the red object?": [("red", [0])],
        "how many circles are there?": [("circles", [0, 3])],
        "how many hexagons are there?": [],
        "is there a red circle?": [("circle", [0])],
        "is there a blue circle?": [],
        "is the green circle below the green square?": [("circle", [3]), ("square", [2])],
        "what is written in the box?": [("box", [5])],
    }
    for q, want in expected.items():
        assert S.referents(q, objs, boxes) == want, q
        assert sorted({i for _, idx in want for i in idx}) == sorted(S.relevant_objects(q, objs, boxes)), q


def test_grounding_targets_and_loss(processor):
    from recipes.testbed.targets import collate_vqa, grounding_loss, grounding_targets

    items = [S.generate_item("train", i, seed=2, all_questions=True) for i in range(3)]
    batch = collate_vqa(items, processor, max_questions=6)
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    t = grounding_targets(items, batch["input_ids"], batch["labels"], tok, image_id, 6)
    want = []
    for it in items:
        objs = [S.SceneObject(**o) for o in it.objects]
        boxes = [S.TextBox(**x) for x in it.boxes]
        want += [w for q, _, _ in it.qas[:6] for w, _ in S.referents(q, objs, boxes)]
    ids = batch["input_ids"]
    assert len(want) > 3 and tok.convert_ids_to_tokens(ids[t["rows"], t["queries"]].tolist()) == want
    for r, m in zip(t["rows"], t["masks"]):
        assert (ids[r][m] == image_id).all() and 0 < m.sum() < 576
    # all attention on the referred tokens -> zero loss; uniform -> log(seq / referred) on average
    bsz, seq = ids.shape
    attn = torch.zeros(bsz, 2, seq, seq)
    for r, q, m in zip(t["rows"], t["queries"], t["masks"]):
        attn[r, :, q] = m.float() / m.sum()
    assert grounding_loss(attn, t, heads=2).item() == pytest.approx(0.0, abs=1e-6)
    uniform = torch.full((bsz, 2, seq, seq), 1.0 / seq)
    expect = float(np.mean([-np.log(m.sum().item() / seq) for m in t["masks"]]))
    assert grounding_loss(uniform, t, heads=1).item() == pytest.approx(expect, rel=1e-5)


def test_grounding_attention_matches_sdpa_and_returns_weights():
    """The training-only attention dispatch gives the same logits as SDPA and exposes one layer's weights."""
    cfg = _cfg("/nonexistent")
    tr = Trainer(cfg)
    tr._next_stage()  # stage (b) with the grounding dispatch installed on layer 1 -> use layer 0 here
    model = tr.model
    layers = model.model.language_model.layers
    layers[cfg.grounding_layer].self_attn.__dict__.pop("_learnpruner_ground")
    layers[0].self_attn._learnpruner_ground = True
    items = [S.generate_item("train", i, seed=1, all_questions=True) for i in range(2)]
    batch = collate_vqa_for_test(items, tr.processor)
    seen = []
    h = layers[0].self_attn.register_forward_hook(lambda _m, _a, o: seen.append(o[1]))
    with torch.no_grad():
        a = model(**batch).logits
    h.remove()
    assert seen[0] is not None and torch.allclose(seen[0].sum(-1), torch.ones(()), atol=1e-5)
    model.set_attn_implementation({"text_config": "sdpa"})
    with torch.no_grad():
        b = model(**batch).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def collate_vqa_for_test(items, processor):
    from recipes.testbed.targets import collate_vqa

    return collate_vqa(items, processor, max_questions=2)


def test_vision_from_starts_stage_b_with_that_tower(tmp_path):
    src = Trainer(_cfg(str(tmp_path / "src"), lr_vision_b=0.0))
    src.train_step()
    src._next_stage()
    src.save_checkpoint()
    dst = Trainer(_cfg(str(tmp_path / "dst"), lr_vision_b=0.0, vision_from=str(tmp_path / "src"),
                       whiten_projector=False))
    assert (dst.stage, dst.step) == ("b", 0)
    for (k, a), (_, b) in zip(src.vision.state_dict().items(), dst.vision.state_dict().items()):
        assert torch.equal(a, b), k
    fresh = Trainer(_cfg(str(tmp_path / "fresh"), lr_vision_b=0.0, whiten_projector=False))
    torch.testing.assert_close(fresh.model.model.multi_modal_projector.state_dict(),
                               dst.model.model.multi_modal_projector.state_dict())
    src.cfg.lr_vision_b = 1e-4
    src.save_checkpoint()
    with pytest.raises(ValueError, match="lr_vision_b"):
        Trainer(_cfg(str(tmp_path / "dst2"), vision_from=str(tmp_path / "src")))


def test_whiten_projector_folds_standardisation_into_linear_1():
    import copy

    from recipes.testbed.recipe import STAGE_A_SEED_OFFSET

    tr = Trainer(_cfg("/nonexistent"))
    lin = tr.model.model.multi_modal_projector.linear_1
    before = copy.deepcopy(lin)
    tr._whiten_projector(n_images=4)
    items = [S.generate_item("train", i, tr.cfg.seed + STAGE_A_SEED_OFFSET) for i in range(4)]
    pix = tr.processor.image_processor([it.image for it in items], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        f = tr.vision(pix, output_hidden_states=True).hidden_states[-2][:, 1:].flatten(0, 1)
        mu, sigma = f.mean(0), f.std(0).clamp_min(1e-3)
        torch.testing.assert_close(lin(f), before((f - mu) / sigma), atol=1e-4, rtol=1e-4)


def test_question_targets_cover_each_turns_question(processor):
    from recipes.testbed.targets import collate_vqa, question_targets

    items = [S.generate_item("train", i, seed=4, all_questions=True) for i in range(2)]
    batch = collate_vqa(items, processor, max_questions=6)
    tok = processor.tokenizer
    t = question_targets(items, batch["input_ids"], batch["labels"], tok, 6)
    qs = [q for it in items for q, _, _ in it.qas[:6]]
    assert len(t["rows"]) == len(qs)
    for r, q, m, text in zip(t["rows"], t["queries"], t["masks"], qs):
        assert tok.decode(batch["input_ids"][r][m]) == tok.decode(tok(text, add_special_tokens=False)["input_ids"])
        assert batch["labels"][r, q] == -100 and batch["labels"][r, q + 1] != -100


def test_answer_targets_point_at_everything_the_answer_depends_on(processor):
    from recipes.testbed.targets import answer_targets, collate_vqa

    items = [S.generate_item("train", i, seed=6, all_questions=True) for i in range(3)]
    batch = collate_vqa(items, processor, max_questions=6)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    t = answer_targets(items, batch["input_ids"], batch["labels"], image_id, 6)
    want = 0
    for it in items:
        objs = [S.SceneObject(**o) for o in it.objects]
        boxes = [S.TextBox(**x) for x in it.boxes]
        want += sum(bool(S.relevant_objects(q, objs, boxes)) for q, _, _ in it.qas[:6])
    assert len(t["rows"]) == want > 0
    ids, lab = batch["input_ids"], batch["labels"]
    for r, q, m in zip(t["rows"], t["queries"], t["masks"]):
        assert lab[r, q] == -100 and lab[r, q + 1] != -100  # q predicts the first answer token
        assert (ids[r][m] == image_id).all() and 0 < m.sum() < 576


def test_worker_processes_give_the_same_stream(tmp_path):
    a = Trainer(_cfg(str(tmp_path / "a"), workers=2))
    b = Trainer(_cfg(str(tmp_path / "b")))
    try:
        for tr in (a, b):
            tr._next_stage()
        first = [a._items(2), a._items(3)]
        a.pos = 1  # a resume elsewhere in the stream restarts the workers there
        again = a._items(2)
        want = b._items(5)
        got = first[0] + first[1]
        assert [(x.index, x.qas) for x in got] == [(x.index, x.qas) for x in want]
        assert all(_png(x.image) == _png(y.image) for x, y in zip(got, want))
        assert [x.index for x in again] == [1, 2]
    finally:
        a.close()


def test_attention_losses_are_trained_and_bad_layers_refused(tmp_path):
    tr = Trainer(_cfg(str(tmp_path / "a"), grounding_layer=1, question_layer=0))
    tr._next_stage()
    layers = tr.model.model.language_model.layers
    assert layers[0].self_attn._learnpruner_ground and layers[1].self_attn._learnpruner_ground
    st = tr.train_step()
    assert {"ground", "answer", "question"} <= set(st) and all(np.isfinite(st[k]) for k in st)
    off = Trainer(_cfg(str(tmp_path / "b"), grounding_weight=0.0, answer_weight=0.0, question_weight=0.0))
    off._next_stage()
    assert not {"ground", "answer", "question"} & set(off.train_step())
    with pytest.raises(ValueError, match="--grounding-layer 5 is not a decoder layer"):
        Trainer(_cfg(str(tmp_path / "c"), grounding_layer=5))._next_stage()


def test_training_time_token_dropping(tmp_path, processor):
    from recipes.testbed.targets import _subset_targets, collate_vqa, keep_visual, question_targets

    tr = Trainer(_cfg(str(tmp_path / "k"), visual_keep=40))
    tr._next_stage()
    items = tr._items(2)
    batch = collate_vqa(items, tr.processor, tr.cfg.max_questions)
    ids, image_id = batch["input_ids"], tr.model.config.image_token_id
    index = keep_visual(items, ids, image_id, 40, torch.Generator().manual_seed(0))
    assert index.shape == (2, ids.shape[1] - NUM_IMAGE_TOKENS + 40)
    for b, it in enumerate(items):
        row = index[b]
        assert torch.all(row[1:] > row[:-1])  # original order
        kept = ids[b, row]
        assert (kept == image_id).sum() == 40
        assert torch.equal(kept[kept != image_id], ids[b][ids[b] != image_id])  # every text token stays
        img_pos = (ids[b] == image_id).nonzero().flatten()
        fg = img_pos[torch.from_numpy(it.labels["id"].reshape(-1) > 0)]
        assert 0 < len(fg) and (torch.isin(fg, row).all() if len(fg) <= 40 else torch.isin(row, fg).sum() == 40)

    # keeping everything through the embedding path reproduces the stock forward exactly
    tr.model.eval()
    full = torch.arange(ids.shape[1]).expand(2, -1)
    with torch.no_grad():
        want = tr.model(**batch).loss
        got = tr.model(**tr._embed_kept(batch, full, tr._projected(batch["pixel_values"]))).loss
    torch.testing.assert_close(got, want)

    assert torch.equal(keep_visual(items, ids, image_id, 0, torch.Generator()), full)  # 0 keeps everything

    # the last --full-frac of the steps see every token again
    late = Trainer(_cfg(str(tmp_path / "f"), visual_keep=40, steps_b=10, full_frac=0.3))
    assert [late.visual_keep_at(s) for s in (0, 6, 7, 9)] == [40, 40, 0, 0]
    for bad, msg in ((dict(visual_keep=-1), "--visual-keep -1 is invalid"),
                     (dict(full_frac=1.5), "--full-frac 1.5 is invalid"),
                     (dict(align_weight=-0.1), "--align-weight -0.1 is invalid")):
        with pytest.raises(ValueError, match=msg):
            Trainer(_cfg(str(tmp_path / "bad"), **bad))

    # attention targets follow their tokens
    q = question_targets(items, ids, batch["labels"], tr.processor.tokenizer, tr.cfg.max_questions)
    sub = _subset_targets(q, index)
    assert torch.equal(ids[q["rows"], q["queries"]], ids[sub["rows"], index[sub["rows"], sub["queries"]]])
    assert torch.equal(q["masks"].sum(1), sub["masks"].sum(1))

    # the dropping stream is seeded and checkpointed
    a, b = (Trainer(_cfg(str(tmp_path / n), visual_keep=40)) for n in ("x", "y"))
    for t in (a, b):
        t._next_stage()
    assert a.train_step()["loss"] == b.train_step()["loss"]
    a.save_checkpoint()
    assert torch.equal(torch.load(a.ckpt_path, weights_only=True)["keep_gen"], a._keep_gen.get_state())


def test_word_alignment_targets_and_loss(tmp_path, processor, hand_scene):
    from recipes.testbed.targets import align_loss, word_targets

    item = S.VQAItem(split="test", index=0, image=hand_scene.image, question="what is written in the box?",
                     answer="k", qtype="read", qas=[], labels=hand_scene.labels,
                     objects=[], boxes=[])
    w = word_targets([item], processor.tokenizer)
    names = processor.tokenizer.convert_ids_to_tokens
    red_circle = S.GRID * (60 // S.PATCH) + 60 // S.PATCH  # the patch under the red circle's centre
    box = S.GRID * (280 // S.PATCH) + 150 // S.PATCH
    assert names(w[red_circle].tolist()) == ["red", "circle"]
    assert names(w[box].tolist()) == ["k", "k"]
    assert (w[torch.from_numpy(hand_scene.labels["kind"].reshape(-1) == 0)] == -100).all()

    tr = Trainer(_cfg(str(tmp_path / "al"), align_weight=0.5, visual_keep=40))
    tr._next_stage()
    st = tr.train_step()
    assert np.isfinite(st["align"]) and st["align"] > 0
    feats = tr._projected(processor.image_processor([hand_scene.image], return_tensors="pt")["pixel_values"])
    loss = align_loss(tr.model, feats, w)
    loss.backward()
    assert tr.model.model.multi_modal_projector.linear_2.weight.grad.abs().sum() > 0
    assert align_loss(tr.model, feats, torch.full_like(w, -100)).item() == 0.0


def test_resume_with_the_vision_tower_newly_trainable(tmp_path):
    a = Trainer(_cfg(str(tmp_path / "r"), lr_vision_b=0.0, steps_b=10, warmup=2))
    a._next_stage()
    a.train_step()
    a.train_step()
    a.save_checkpoint()
    b = Trainer(_cfg(str(tmp_path / "r"), lr_vision_b=1e-4, steps_b=10, warmup=2))
    b.load_checkpoint()
    factor = b.sched.lr_lambdas[0](2)
    assert [g["lr"] for g in b.opt.param_groups] == pytest.approx([1e-3 * factor, 1e-4 * factor])
    before = next(b.vision.parameters()).detach().clone()
    b.train_step()
    assert not torch.equal(before, next(b.vision.parameters()))
    assert b.sched.get_last_lr()[1] == pytest.approx(1e-4 * b.sched.lr_lambdas[0](3))
    b.save_checkpoint()
    with pytest.raises(ValueError, match="--lr-vision-b set back to 0"):
        Trainer(_cfg(str(tmp_path / "r"), lr_vision_b=0.0, steps_b=10, warmup=2)).load_checkpoint()
