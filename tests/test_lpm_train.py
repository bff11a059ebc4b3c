"""Training the LPM: the loss falls, the STE passes gradients, resume is exact, bad records are skipped."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import learnpruner
from learnpruner.adapters import adapter_for
from learnpruner.lpm_train import (
    GATED_ATTENTION,
    LlavaRecords,
    ShapesRecords,
    TrainConfig,
    _collate,
    _encode,
    _register_gated_attention,
    hard_keep_mask,
    step_loss,
    train_lpm,
)
from learnpruner.testbed.model import build_model, build_processor

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


def _gated_setup(processor):
    """A frozen tiny model on the gated attention, a 2-example ShapesVQA batch and a fresh LPM."""
    model = _model(processor)
    ad = adapter_for(model)
    _register_gated_attention()
    model.set_attn_implementation({"text_config": GATED_ATTENTION})
    model.requires_grad_(False)
    records = ShapesRecords()
    examples = [(ex.image, *_encode(ex, processor.tokenizer, ad.image_token_id, 576, 4096))
                for ex in (records.get(i) for i in range(2))]
    batch = _collate(examples, processor.image_processor, processor.tokenizer.pad_token_id)
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
    ex = records.get(5)
    ids, labels = _encode(ex, processor.tokenizer, ad.image_token_id, 576, 4096)
    batch = _collate([(ex.image, ids, labels)], processor.image_processor, 0)
    keep = torch.zeros(576, dtype=torch.bool)
    keep[::7] = True
    _register_gated_attention()
    model.set_attn_implementation({"text_config": GATED_ATTENTION})
    with torch.no_grad():
        feats = ad.vision_features(batch["pixel_values"])
        embeds = ad.language_model.embed_tokens(batch["input_ids"])
        ph = batch["input_ids"] == ad.image_token_id
        embeds = embeds.masked_scatter(ph[..., None], ad.project(feats).reshape(-1, embeds.shape[-1]))
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
    data = LlavaRecords(path, tmp_path)
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
