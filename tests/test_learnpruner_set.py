"""learnpruner-set: the coverage rule with a learned quality and place weight, its coordinates in every family, its
REINFORCE training (gamma and the quality move, the module ships what it learned, the untrained start is a point of
the curve), and its plan reading what the module ships."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import make_inputs, tiny_llava

import learnpruner
from learnpruner import selection as sel
from learnpruner.engine.layout import grid_coords
from learnpruner.peers import vision_select as vs
from learnpruner.testbed.model import build_model, build_processor
from learnpruner.training import ShapesRecords, TrainConfig, train_lpm

torch.set_num_threads(1)


def test_grid_coords_are_cell_centres_in_minus_one_one():
    c = grid_coords(torch.tensor([0, 1, 2, 3, -1]), 2, 2)
    assert c.tolist() == [[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5], [0.0, 0.0]]
    assert grid_coords(torch.arange(6), 2, 3)[5].tolist() == pytest.approx([0.5, 2 / 3])
    with pytest.raises(ValueError, match="positive grid"):
        grid_coords(torch.arange(2), 0, 2)


def test_coverage_without_quality_or_place_is_divprune():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(3, 40, 8, generator=g)
    for k in (1, 5, 17, 40):
        assert torch.equal(sel.coverage_greedy(sel.coverage_similarity(f), k), vs.divprune_select(f, k))


def test_place_weight_separates_lookalikes_far_apart():
    # tokens 0 and 1 look the same but lie at opposite corners; 2 differs a little and lies beside 0
    f = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.8, 0.6]]])
    xy = torch.tensor([[[-1.0, -1.0], [1.0, 1.0], [-0.9, -1.0]]])
    plain = sel.coverage_similarity(f)
    placed = sel.coverage_similarity(f, xy, 1.0)
    assert plain[0, 0, 1] == pytest.approx(1.0) and placed[0, 0, 1] < placed[0, 0, 2]
    # appearance alone keeps {0 or 1, 2}; with place both copies count
    assert sel.coverage_greedy(plain, 2)[0].tolist() in ([0, 2], [1, 2])
    assert 0 in sel.coverage_greedy(placed, 2)[0].tolist() or 1 in sel.coverage_greedy(placed, 2)[0].tolist()
    assert sel.coverage_similarity(f, xy, 0.0).allclose(plain)
    # quality moves a pick: a large bonus on token 1 makes it the first
    q = torch.tensor([[0.0, 5.0, 0.0]])
    assert 1 in sel.coverage_greedy(plain, 1, q)[0].tolist()


def test_the_policy_draws_distinct_tokens_with_its_exact_log_probability():
    g = torch.Generator().manual_seed(1)
    f, q = torch.randn(2, 12, 4, generator=g), torch.randn(2, 12, generator=g)
    sim = sel.coverage_similarity(f)
    kept, logp = sel.coverage_sample(sim, 4, q, tau=0.5, generator=torch.Generator().manual_seed(2))
    assert kept.shape == (2, 4) and all(len(set(r)) == 4 for r in kept.tolist())
    assert torch.all(logp < 0)
    # at a tiny temperature the policy is the greedy rule
    cold, _ = sel.coverage_sample(sim, 4, q, tau=1e-4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(cold, sel.coverage_greedy(sim, 4, q))
    # the log-probability is differentiable in the quality and in gamma
    qq = q.clone().requires_grad_(True)
    gamma = torch.tensor(0.5, requires_grad=True)
    xy = torch.rand(2, 12, 2, generator=g)
    _, lp = sel.coverage_sample(sel.coverage_similarity(f, xy, gamma), 4, qq, 0.5, torch.Generator().manual_seed(4))
    lp.sum().backward()
    assert qq.grad.abs().sum() > 0 and gamma.grad.abs() > 0
    with pytest.raises(ValueError, match="tau"):
        sel.coverage_sample(sim, 2, q, tau=0.0)


@torch.no_grad()
def test_the_rule_reads_the_adapters_coordinates_and_the_module_options():
    model = tiny_llava(seed=2)
    inp = make_inputs(model)
    learnpruner.apply(model, "learnpruner-set", tokens=6, lpm="random", beta=0.0, gamma=0.0)
    model(**inp)
    divprune_like = learnpruner.stats(model).stage1_kept.clone()
    learnpruner.remove(model)
    learnpruner.apply(model, "learnpruner-set", tokens=6, lpm="random", beta=0.0, gamma=3.0)
    model(**inp)
    assert not torch.equal(learnpruner.stats(model).stage1_kept, divprune_like)  # place changed the set
    learnpruner.remove(model)
    with pytest.raises(ValueError, match="gamma must be a number"):
        learnpruner.apply(model, "learnpruner-set", tokens=6, lpm="random", gamma=-1)


@pytest.fixture(scope="module")
def processor():
    return build_processor()


def test_training_moves_gamma_and_quality_and_ships_them(processor, tmp_path):
    model = build_model(processor.tokenizer, tiny=True, seed=0).eval()
    cfg = TrainConfig(tokens=16, steps=6, batch_size=2, lr=5e-2, warmup=1, ckpt_every=3, hidden_dim=16, seed=0,
                      method="learnpruner-set", tau=0.05, policy_samples=3, gamma=0.5)
    lpm = train_lpm(model, processor, ShapesRecords(), tmp_path, cfg, progress=False)
    meta = json.loads((tmp_path / "lpm.json").read_text())
    gamma = meta["extra"]["options"]["gamma"]
    assert gamma != pytest.approx(0.5) and math.isfinite(gamma) and meta["extra"]["options"]["beta"] == 0.1
    assert lpm.mlp[-1].weight.abs().sum() > 0  # the zero-initialised quality moved
    hist = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["history"]
    assert len(hist) == 6 and all(math.isfinite(h["loss"]) for h in hist) and "gamma" in hist[-1]
    # apply reads the learned gamma from the module it ships in
    plan = learnpruner.resolve(model, "learnpruner-set", 16, lpm=str(tmp_path))
    assert plan.options["gamma"] == pytest.approx(gamma) and plan.sources["gamma"] == "lpm.json"
    # resume continues exactly
    again = tmp_path / "again"
    train_lpm(model, processor, ShapesRecords(), again, cfg, progress=False, stop_after=3)
    train_lpm(model, processor, ShapesRecords(), again, cfg, progress=False, resume=True)
    assert json.loads((again / "lpm.json").read_text())["extra"]["options"]["gamma"] == pytest.approx(gamma)


def test_cli_train_refuses_settings_the_policy_cannot_use(tmp_path, capsys):
    from learnpruner.cli import main

    base = ["train", "--model", "shapes-tiny", "--data", "shapesvqa", "--out", str(tmp_path / "o"), "--steps", "1"]
    assert main([*base, "--method", "divprune"]) == 2
    assert "has no learned stage-1 module to train; accepted: " in capsys.readouterr().err
    assert main([*base, "--method", "learnpruner-set", "--policy-samples", "1"]) == 2
    assert "--policy-samples must be at least 2" in capsys.readouterr().err
    assert main([*base, "--method", "learnpruner-set", "--stage2"]) == 2
    assert "drop --stage2" in capsys.readouterr().err


def test_feature_cache_resumes_holds_coordinates_and_feeds_a_validation_curve(processor, tmp_path):
    from learnpruner.training.features import build_cache

    model = build_model(processor.tokenizer, tiny=True, seed=0).eval()
    folder = tmp_path / "fc"
    cache = build_cache(folder, model, processor, ShapesRecords(), 3, batch_size=2, progress=False)
    assert len(cache) == 3
    cache = build_cache(folder, model, processor, ShapesRecords(), 5, batch_size=2, progress=False)  # extends it
    assert len(cache) == 5
    rec = cache.record(cache.records[4])
    n = rec["features"].shape[0]
    assert rec["coords"].shape == (n, 2) and rec["coords"].abs().max() < 1
    with pytest.raises(ValueError, match="another model or other data"):
        build_cache(folder, model, processor, ShapesRecords(seed=1), 6, progress=False)
    val = build_cache(tmp_path / "val", model, processor, ShapesRecords(split="val"), 4, progress=False)
    cfg = TrainConfig(tokens=16, steps=4, batch_size=2, lr=5e-2, warmup=1, ckpt_every=2, hidden_dim=16, seed=0,
                      method="learnpruner-set", tau=0.05, policy_samples=2, val_every=2, gamma_grid=(0.2, 1.5),
                      gamma_records=4)
    train_lpm(model, processor, ShapesRecords(), tmp_path / "run", cfg, progress=False, features=cache, val=val)
    extra = json.loads((tmp_path / "run" / "lpm.json").read_text())["extra"]
    fit = extra["gamma_fit"]
    assert fit["records"] == 4 and [r["gamma"] for r in fit["grid"]] == [0.2, 1.5]
    assert all(math.isfinite(r["ce"]) and 0 <= r["accuracy"] <= 1 for r in fit["grid"])
    meta = extra["validation"]
    # the untrained start (coverage alone) is a point of the curve, so training can only be kept if it helped
    assert [p["step"] for p in meta["curve"]] == [0, 2, 4] and meta["chosen_step"] in (0, 2, 4)
    assert (tmp_path / "run" / "curve.png").stat().st_size > 1000
