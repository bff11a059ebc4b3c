"""Training the LPM: the loss falls, the STE passes gradients, resume is exact, bad records are skipped;
LLaVA-NeXT trains on every crop of images of different sizes; prompts come from the chat template."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import next_inputs, next_processor, tiny_llava_next
from PIL import Image

import learnpruner
from learnpruner.adapters import adapter_for
from learnpruner.testbed.model import build_model, build_processor
from learnpruner.training import (
    GATED_ATTENTION,
    JsonlRecords,
    ShapesRecords,
    TrainConfig,
    _collate,
    _encode,
    _register_gated_attention,
    _Targets,
    chat_messages,
    hard_keep_mask,
    prompt_embeddings,
    step_loss,
    train_lpm,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def processor():
    return build_processor()


def _model(processor, seed=0):
    return build_model(processor.tokenizer, tiny=True, seed=seed).eval()


def _cfg(**kw):
    base = dict(tokens=64, steps=8, batch_size=2, lr=3e-3, warmup=1, ckpt_every=2, hidden_dim=16, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def test_loss_falls_over_a_few_dozen_steps(processor, tmp_path):
    model = _model(processor)
    train_lpm(model, processor, ShapesRecords(), tmp_path, _cfg(steps=30, lr=1e-2), progress=False)
    hist = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["history"]
    def mean(key, part):
        return sum(h[key] for h in part) / len(part)

    # the VLM is random and frozen, so the answer loss barely moves; the keep-ratio term must fall
    assert mean("loss", hist[-5:]) < 0.9 * mean("loss", hist[:5])
    assert mean("ratio", hist[-5:]) < 0.2 * mean("ratio", hist[:5])
    # the kept fraction moves toward the target r1 / n
    target = json.loads((tmp_path / "lpm.json").read_text())["extra"]["keep_ratio"]
    assert abs(hist[-1]["kept"] - target) < abs(hist[0]["kept"] - target)


def _batch(processor, ad, examples):
    return _collate([_encode(ex, processor, ad, 4096) for ex in examples], processor.tokenizer.pad_token_id)


def _gated_setup(processor):
    """A frozen tiny model on the gated attention, a 2-example ShapesVQA batch and a fresh LPM."""
    model = _model(processor)
    ad = adapter_for(model)
    _register_gated_attention()
    model.set_attn_implementation({"text_config": GATED_ATTENTION})
    model.requires_grad_(False)
    records = ShapesRecords()
    batch = _batch(processor, ad, [records.get(i) for i in range(2)])
    lpm = learnpruner.LearnablePruningModule(learnpruner.LPMConfig(feature_dim=ad.feature_dim(), hidden_dim=16))
    return model, ad, batch, lpm


def test_straight_through_estimator_gives_the_lpm_gradients(processor):
    model, ad, batch, lpm = _gated_setup(processor)
    loss, parts = step_loss(model, ad, lpm, batch, rho=0.2, cfg=TrainConfig(ratio_weight=0.0))
    parts["keep_prob"].retain_grad()
    loss.backward()
    g = parts["keep_prob"].grad
    dropped = parts["keep_prob"] <= 0.5
    assert dropped.any() and (~dropped).any()
    # the answer loss alone reaches the gates of kept AND dropped tokens
    assert g[dropped].abs().sum() > 0 and g[~dropped].abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lpm.parameters())


def test_hard_keep_masks():
    p = torch.tensor([[0.9, 0.2, 0.6, 0.4, 0.7], [0.1, 0.3, 0.2, 0.8, 0.05]])
    assert hard_keep_mask(p, 0.4, "threshold").tolist() == [[1, 0, 1, 0, 1], [0, 0, 0, 1, 0]]
    # topk: exactly round(0.4 * 5) = 2 per image, the two most probable, whatever their values
    assert hard_keep_mask(p, 0.4, "topk").tolist() == [[1, 0, 0, 0, 1], [0, 1, 0, 1, 0]]
    with pytest.raises(ValueError, match="accepted: threshold, topk"):
        hard_keep_mask(p, 0.4, "top-k")
    # padded per-image tables (images of different counts): padding is never kept, each row has its own target
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    assert hard_keep_mask(p, [0.4, 0.7], "topk", valid).tolist() == [[1, 0, 0, 0, 1], [0, 1, 1, 0, 0]]
    assert hard_keep_mask(p, 0.4, "threshold", valid).tolist() == [[1, 0, 1, 0, 1], [0, 0, 0, 0, 0]]


def test_topk_mask_trains_the_ranking(processor, tmp_path):
    model, ad, batch, lpm = _gated_setup(processor)
    loss, parts = step_loss(model, ad, lpm, batch, rho=0.2, cfg=TrainConfig(mask="topk"))
    assert torch.allclose(parts["kept"], torch.tensor(round(0.2 * 576) / 576))  # the inference count, every image
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lpm.parameters())
    with pytest.raises(ValueError, match="unknown mask 'soft'"):
        train_lpm(model, processor, ShapesRecords(), tmp_path, _cfg(mask="soft"), progress=False)


def test_gated_attention_with_a_hard_gate_equals_removing_the_tokens(processor):
    """Forward value of the STE gate: dropped keys are excluded exactly."""
    model = _model(processor, seed=1)
    ad = adapter_for(model)
    records = ShapesRecords()
    batch = _batch(processor, ad, [records.get(5)])
    keep = torch.zeros(576, dtype=torch.bool)
    keep[::7] = True
    _register_gated_attention()
    model.set_attn_implementation({"text_config": GATED_ATTENTION})
    with torch.no_grad():
        embeds, _, _ = prompt_embeddings(model, ad, batch)
        ph = batch["input_ids"] == ad.image_token_id
        gate = torch.ones(ph.shape)
        gate[ph] = keep.float()
        gated = model(inputs_embeds=embeds, learnpruner_gate=gate).logits[0, -1]
        model.set_attn_implementation({"text_config": "eager"})
        rows = ~ph[0] | gate[0].bool()
        pos = torch.arange(ph.shape[1])[rows][None]
        removed = model(inputs_embeds=embeds[:, rows], position_ids=pos,
                        attention_mask=torch.ones(1, int(rows.sum()), dtype=torch.long)).logits[0, -1]
    torch.testing.assert_close(gated, removed, atol=1e-5, rtol=1e-4)


def test_resumed_run_ends_with_the_same_weights(processor, tmp_path):
    cfg = _cfg(steps=6)
    full = train_lpm(_model(processor), processor, ShapesRecords(), tmp_path / "a", cfg, progress=False)
    train_lpm(_model(processor), processor, ShapesRecords(), tmp_path / "b", cfg, progress=False, stop_after=3)
    assert not (tmp_path / "b" / "lpm.json").exists()  # interrupted: no final LPM yet
    before = (tmp_path / "b" / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match="mask: 'threshold' in the checkpoint, 'topk' now"):
        train_lpm(_model(processor), processor, ShapesRecords(), tmp_path / "b", _cfg(steps=6, mask="topk"),
                  resume=True, progress=False)
    assert (tmp_path / "b" / "checkpoint.pt").read_bytes() == before  # refused, nothing touched
    resumed = train_lpm(_model(processor), processor, ShapesRecords(), tmp_path / "b", cfg, resume=True,
                        progress=False)
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    # the saved LPM loads and prunes the model it was trained for
    model = _model(processor)
    learnpruner.apply(model, "learnpruner", tokens=64, lpm=tmp_path / "b")
    assert learnpruner.stats(model) is None


def test_bad_records_are_skipped_and_counted(processor, tmp_path):
    img = tmp_path / "ok.png"
    Image.new("RGB", (336, 336), (120, 30, 30)).save(img)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    good = {"image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nwhat color is the square?"},
                                                 {"from": "gpt", "value": "red"}]}
    records = [
        good,
        {"image": "missing.png", "conversations": good["conversations"]},
        {"image": "broken.png", "conversations": good["conversations"]},
        {"image": "ok.png", "conversations": [{"from": "human", "value": "no tag"}, {"from": "gpt", "value": "x"}]},
        {"conversations": good["conversations"]},
        {"image": "ok.png", "conversations": [{"from": "human", "value": "<image>\n" + "red " * 3000},
                                              {"from": "gpt", "value": "red"}]},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n{not json\n")
    data = JsonlRecords(path, tmp_path)
    cfg = _cfg(steps=2, batch_size=2, max_length=1024)
    train_lpm(_model(processor), processor, data, tmp_path / "out", cfg, progress=False)
    assert data.skipped == {"missing or unreadable image": 2, "no <image> tag": 1, "no image": 1,
                            "too long": 1, "malformed record": 1}
    assert (tmp_path / "out" / "lpm.safetensors").is_file()


def test_accelerate_runtime_matches_the_plain_loop(processor, tmp_path):
    pytest.importorskip("accelerate")
    cfg = _cfg(steps=3)
    plain = train_lpm(_model(processor), processor, ShapesRecords(), tmp_path / "plain", cfg, progress=False)
    # device=None hands placement to accelerate (what `accelerate launch` uses); on this CPU: one process
    acc = train_lpm(_model(processor), processor, ShapesRecords(), tmp_path / "acc", cfg, progress=False,
                    device=None)
    for (k, a), (_, b) in zip(plain.state_dict().items(), acc.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)


def test_two_process_ddp_on_cpu_equals_one_process_with_the_doubled_batch(tmp_path):
    """`torchrun` with 2 CPU processes (gloo): each sees half the batch, the averaged gradients
    reproduce one process with the whole batch."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    pytest.importorskip("accelerate")
    common = ["-m", "learnpruner.cli", "train", "--model", "tiny-random-llava", "--data", "shapesvqa",
              "--tokens", "64", "--steps", "2", "--hidden-dim", "16", "--ckpt-every", "2", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *common, "--batch-size", "2", "--out", str(tmp_path / "ddp")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("LPM written") == 1  # rank 0 reports
    one = subprocess.run([sys.executable, *common, "--batch-size", "4", "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = load_file(tmp_path / "ddp" / "lpm.safetensors"), load_file(tmp_path / "one" / "lpm.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


# ------------------------------------------------------------------------------------------------ LLaVA-NeXT


def _noise(h, w, seed):
    pixels = (torch.rand(h, w, 3, generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8)
    return Image.fromarray(pixels.numpy())


def _next_records(tmp_path):
    """Two LLaVA records whose images have different sizes (80 and 48 visual tokens on the tiny NeXT)."""
    _noise(112, 112, 0).save(tmp_path / "square.png")
    _noise(60, 150, 1).save(tmp_path / "wide.png")
    records = [
        {"image": "square.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat colour is the circle ?"}, {"from": "gpt", "value": "red"}]},
        {"image": "wide.png", "conversations": [
            {"from": "human", "value": "how many squares ?\n<image>"}, {"from": "gpt", "value": "two"},
            {"from": "human", "value": "what colour is the square ?"}, {"from": "gpt", "value": "blue"}]},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    return JsonlRecords(tmp_path / "data.json")


@pytest.fixture(scope="module")
def next_proc():
    return next_processor()


def test_prompts_come_from_the_processors_chat_template(processor, next_proc, tmp_path):
    """The tokenized prompt of a record is exactly the processor's own chat-template output (NeXT: the image's
    placeholders expanded for its size); the labels are the answers and their end token."""
    data = _next_records(tmp_path)
    for proc, model in ((next_proc, tiny_llava_next(layers=2)), (processor, _model(processor))):
        ad = adapter_for(model)
        for index in (0, 1):
            ex = data.get(index)
            enc = _encode(ex, proc, ad, 4096)
            messages = chat_messages(ex)
            messages[0]["content"] = [dict(c, image=ex.image) if c["type"] == "image" else c
                                      for c in messages[0]["content"]]
            own = proc.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
            first = next(i for i, v in enumerate(enc.labels) if v != -100)
            assert enc.input_ids[:first] == own["input_ids"][0].tolist()
            assert torch.equal(enc.visual["pixel_values"], own["pixel_values"])
            answers = proc.tokenizer.convert_ids_to_tokens([v for v in enc.labels if v != -100])
            assert answers == (["red", "</s>"] if index == 0 else ["two", "</s>", "blue", "</s>"])
            # the whole conversation, as the processor renders and tokenizes it
            whole = proc(images=[ex.image], text=[proc.apply_chat_template(chat_messages(ex))])["input_ids"][0]
            assert enc.input_ids == list(whole)
        if "image_sizes" in ad.visual_inputs:
            assert enc.visual["image_sizes"].tolist() == [[60, 150]]
            assert sum(ad.placeholders(torch.tensor([enc.input_ids]))[0]) == 48 + 4  # its tokens and row newlines


def test_training_refuses_a_processor_without_a_chat_template(tmp_path):
    proc = next_processor()
    proc.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        train_lpm(tiny_llava_next(layers=2), proc, ShapesRecords(), tmp_path, _cfg(tokens=16), progress=False)


def test_next_batch_of_two_sizes_pads_per_image_tables(next_proc, tmp_path):
    """Images of 80 and 48 tokens in one batch: the prompt embeddings are the model's own, the per-image
    tables are padded with a validity mask, each image keeps its own target and the LPM gets gradients."""
    model = tiny_llava_next()
    ad = adapter_for(model)
    data = _next_records(tmp_path)
    batch = _batch(next_proc, ad, [data.get(0), data.get(1)])
    assert batch["pixel_values"].shape[:2] == (2, 5) and batch["image_sizes"].tolist() == [[112, 112], [60, 150]]
    with torch.no_grad():
        embeds, visual, _ = prompt_embeddings(model, ad, batch)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes")}
        torch.testing.assert_close(model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits,
                                   model(**inputs).logits, atol=1e-5, rtol=1e-4)
    assert visual.counts() == [80, 48]
    _register_gated_attention()
    model.set_attn_implementation({"text_config": GATED_ATTENTION})
    model.requires_grad_(False)
    lpm = learnpruner.LearnablePruningModule(learnpruner.LPMConfig(feature_dim=ad.feature_dim(), hidden_dim=16,
                                                                   family=ad.family))
    targets = _Targets(16, ad.text_config.num_hidden_layers)
    loss, parts = step_loss(model, ad, lpm, batch, targets, TrainConfig(mask="topk"))
    assert parts["keep_prob"].shape == (2, 80) and parts["valid"].sum(dim=1).tolist() == [80, 48]
    assert bool(torch.isfinite(loss))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lpm.parameters())
    # topk keeps exactly each image's inference r1 (28 of 80, 28 of 48): the mean kept fraction says so
    assert targets.r1(80) == targets.r1(48) == 28
    torch.testing.assert_close(parts["kept"], torch.tensor((28 / 80 + 28 / 48) / 2))
    # an image within the budget is not pruned at inference: never gated, no keep-ratio term
    lpm.zero_grad()
    targets = _Targets(40, ad.text_config.num_hidden_layers)
    assert targets.r1(80) == 69 and targets.r1(48) is None
    loss, parts = step_loss(model, ad, lpm, batch, targets, TrainConfig(mask="topk"))
    parts["keep_prob"].retain_grad()
    loss.backward()
    torch.testing.assert_close(parts["target"], torch.tensor(69 / 80))
    torch.testing.assert_close(parts["kept"], torch.tensor(69 / 80))
    g = parts["keep_prob"].grad
    assert g[0].abs().sum() > 0 and g[1].abs().sum() == 0


def test_next_trains_on_all_crops_and_apply_uses_the_saved_lpm(processor, next_proc, tmp_path):
    model = tiny_llava_next()
    cfg = _cfg(tokens=16, steps=12, lr=1e-2)
    trained = train_lpm(model, next_proc, _next_records(tmp_path), tmp_path / "out", cfg, progress=False)
    hist = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)["history"]
    assert len(hist) == 12 and all(math.isfinite(h["loss"]) for h in hist)
    assert hist[-1]["loss"] < hist[0]["loss"] and hist[-1]["ratio"] < hist[0]["ratio"]
    meta = json.loads((tmp_path / "out" / "lpm.json").read_text())
    ad = adapter_for(model)
    assert (meta["family"], meta["feature_dim"], meta["feature_layer"]) == ("llava_next", ad.feature_dim(), -2)
    assert model.config.text_config._attn_implementation == "sdpa"  # the gated attention is gone again

    learnpruner.apply(model, "learnpruner", tokens=16, lpm=tmp_path / "out")
    try:
        used = model._learnpruner.lpm
        for (k, a), (_, b) in zip(trained.state_dict().items(), used.state_dict().items()):
            assert torch.equal(a, b), k
        inp = next_inputs(next_proc)
        with torch.no_grad():
            model(**inp)
        st = learnpruner.stats(model)
        assert [im.count for im in st.images] == [80, 48]
        assert [im.stage1_kept.shape[0] for im in st.images] == [28, 28]
    finally:
        learnpruner.remove(model)
    # an LLaVA-1.5 model refuses it
    with pytest.raises(ValueError, match="llava_next"):
        learnpruner.apply(_model(processor), "learnpruner", tokens=64, lpm=tmp_path / "out")


def test_cli_train_on_a_next_model(next_proc, tmp_path, capsys):
    from learnpruner.cli import main

    folder = tmp_path / "tiny-next"
    tiny_llava_next(layers=2).save_pretrained(folder)
    next_proc.save_pretrained(folder)
    _next_records(tmp_path)
    rc = main(["train", "--model", str(folder), "--data", str(tmp_path / "data.json"), "--tokens", "16",
               "--steps", "2", "--batch-size", "2", "--hidden-dim", "8", "--max-length", "512", "--device", "cpu",
               "--out", str(tmp_path / "out")])
    assert rc == 0 and "LPM written" in capsys.readouterr().out
    meta = json.loads((tmp_path / "out" / "lpm.json").read_text())
    assert meta["family"] == "llava_next" and meta["extra"]["train_config"]["max_length"] == 512


def test_budget_range_samples_each_steps_budget_and_trains_toward_it(processor, tmp_path):
    cfg = _cfg(steps=6, mask="topk", budget_range=(16, 192))
    budgets = [cfg.step_tokens(s) for s in range(200)]
    assert budgets == [cfg.step_tokens(s) for s in range(200)]  # seeded by step: a resumed run draws the same
    assert min(budgets) >= 16 and max(budgets) <= 192 and len(set(budgets)) > 50
    assert sum(b <= 55 for b in budgets) > 0.4 * len(budgets)  # log-uniform: as much mass below sqrt(16 * 192)
    model = _model(processor)
    layers = model.config.text_config.num_hidden_layers
    train_lpm(model, processor, ShapesRecords(), tmp_path, cfg, progress=False)
    hist = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["history"]
    expected = [_Targets(cfg.step_tokens(s), layers)(576) for s in range(6)]
    torch.testing.assert_close(torch.tensor([h["target"] for h in hist]), torch.tensor(expected, dtype=torch.float32))
    assert json.loads((tmp_path / "lpm.json").read_text())["extra"]["budget_range"] == [16, 192]
    assert _cfg().step_tokens(7) == 64  # without a range: always --tokens


def test_stage2_in_the_training_forward_is_the_inference_forward(processor):
    """With ``stage2=True`` the training forward (top-k stage 1) picks the tokens the engine's stage 2 picks for
    the same stage-1 set, and its answer loss equals the pruned model's."""
    from learnpruner.engine.prefill import table_kept

    model, ad, batch, lpm = _gated_setup(processor)
    targets = _Targets(32, model.config.text_config.num_hidden_layers)
    with torch.no_grad():
        _, parts = step_loss(model, ad, lpm, batch, targets, TrainConfig(mask="topk", stage2=True, ratio_weight=0.0))
        _, alone = step_loss(model, ad, lpm, batch, targets, TrainConfig(mask="topk", ratio_weight=0.0))
    chosen = parts["stage2_chosen"]
    assert chosen.sum(dim=1).tolist() == [targets.drop(576)[1]] * 2  # r2 per image, from the kept stage-1 set
    assert not bool((chosen & ~parts["hard"].bool()).any())
    assert not torch.isclose(parts["ce"], alone["ce"])  # stage 2 changes the forward
    model.set_attn_implementation({"text_config": "eager"})
    kept1 = table_kept(parts["hard"].bool())
    learnpruner.apply(model, "learnpruner", tokens=32, lpm=lpm)
    try:
        with torch.no_grad():
            for i in range(2):  # inference: sample i's prompt alone (up to its first answer token), same stage-1 set
                end = int((batch["labels"][i] != -100).nonzero()[0])
                prompt = {"input_ids": batch["input_ids"][i:i + 1, :end],
                          "pixel_values": batch["pixel_values"][i:i + 1]}
                with learnpruner.fixed_selection(model, kept1[i:i + 1]):
                    model(**prompt)
                assert torch.equal(learnpruner.stats(model).llm_kept[0][0], table_kept(chosen)[i])
            # and the answer loss of the whole batch through the engine with both kept sets equals training's
            with learnpruner.fixed_selection(model, kept1, table_kept(chosen)):
                out = model(**batch)
    finally:
        learnpruner.remove(model)
    torch.testing.assert_close(out.loss, parts["ce"], atol=1e-5, rtol=1e-5)


def test_stage2_flag_trains_and_is_recorded(processor, tmp_path, capsys):
    cfg = _cfg(steps=2, mask="topk", stage2=True, tokens=32)
    train_lpm(_model(processor), processor, ShapesRecords(), tmp_path, cfg, progress=False)
    assert json.loads((tmp_path / "lpm.json").read_text())["extra"]["train_config"]["stage2"] is True
    with pytest.raises(ValueError, match="stage2=True needs the per-count training targets"):
        model, ad, batch, lpm = _gated_setup(processor)
        step_loss(model, ad, lpm, batch, 0.2, TrainConfig(stage2=True))


def test_layer_flag_sets_the_stage2_layer_and_the_lpm_ships_it(processor, tmp_path):
    assert _Targets(32, 8).drop(576)[0] == 3 and _Targets(32, 8, 5).drop(576)[0] == 5

    def model():  # a 4-layer text model: K = round(12 * 4 / 32) = 2 by default
        return build_model(processor.tokenizer, text={"num_hidden_layers": 4}, tiny=True, seed=0).eval()

    cfg = _cfg(steps=1, mask="topk", stage2=True, layer=3, tokens=32, ckpt_every=1)
    train_lpm(model(), processor, ShapesRecords(), tmp_path / "run", cfg, progress=False)
    assert json.loads((tmp_path / "run" / "lpm.json").read_text())["extra"]["options"] == {"layer": 3}
    m = model()
    learnpruner.apply(m, "learnpruner", tokens=32, lpm=str(tmp_path / "run"))
    assert m._learnpruner.schedule(576).drops[0][0] == 3  # apply uses the K the LPM was trained for
    learnpruner.remove(m)
    with pytest.raises(ValueError, match=r"layer must lie in 1..3 \(the LLM's layers after the first\), got 4"):
        train_lpm(m, processor, ShapesRecords(), tmp_path / "bad", _cfg(layer=4), progress=False)


def test_distillation_term_is_the_kl_to_the_unpruned_model(processor):
    """``distill_weight``: KL(unpruned || pruned) on the answer tokens, zero when nothing is pruned, and part of
    the loss with its weight (it reaches the LPM's parameters)."""
    model, ad, batch, lpm = _gated_setup(processor)
    cfg = TrainConfig(mask="topk", ratio_weight=0.0, distill_weight=0.5)
    with torch.no_grad():
        _, whole = step_loss(model, ad, lpm, batch, 1.0, cfg)  # keeps every token: the student is the teacher
    loss, parts = step_loss(model, ad, lpm, batch, 0.1, cfg)
    # (sdpa teacher against eager student: a KL of about 5e-8 when nothing is pruned, 3e-4 at 10% kept)
    assert whole["kl"].abs() < 1e-6 and parts["kl"] > 1e-5
    torch.testing.assert_close(loss.detach(), parts["ce"] + 0.5 * parts["kl"])
    (loss - parts["ce"]).backward()  # the KL term alone
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lpm.parameters())
    assert parts["kl"] == pytest.approx(float(step_loss(model, ad, lpm, batch, 0.1, cfg)[1]["kl"]), rel=1e-5)
