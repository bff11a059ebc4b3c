"""Selection rules, budgets, the LPM file format and input validation."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_inputs, n_visual, tiny_llava

import learnpruner
from learnpruner import selection as sel
from learnpruner.budget import check_tokens, default_layer, single_drop, two_stage
from learnpruner.lpm import LearnablePruningModule, LPMConfig

torch.set_num_threads(1)


def test_topk_sorted_is_ascending_and_breaks_ties_to_lower_index():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.9, 0.2]])
    assert sel.topk_sorted(scores, 3).tolist() == [[1, 2, 3]]
    assert sel.topk_sorted(torch.zeros(1, 4), 2).tolist() == [[0, 1]]
    with pytest.raises(ValueError, match="k must be in"):
        sel.topk_sorted(scores, 6)


def test_maxmin_adds_the_token_least_similar_to_the_selected_set():
    # unit vectors at angles 0, 10, 90, 180, 95 degrees
    angles = torch.tensor([0.0, 10.0, 90.0, 180.0, 95.0]) * torch.pi / 180
    feats = torch.stack([angles.cos(), angles.sin()], dim=-1)[None]
    # from {0}: 180 deg is least similar (cos -1); then among {1, 2, 4}: token 2 (90) and 4 (95)
    # have max-sim to {0, 3} of cos(90)=0 and max(cos 95, cos 85)=0.087 -> token 2 first
    assert sel.maxmin_extend(feats, torch.tensor([[0]]), 1).tolist() == [[0, 3]]
    assert sel.maxmin_extend(feats, torch.tensor([[0]]), 2).tolist() == [[0, 2, 3]]
    # then token 1 (10 deg from token 0) beats token 4 (only 5 deg from token 2)
    assert sel.maxmin_extend(feats, torch.tensor([[0]]), 3).tolist() == [[0, 1, 2, 3]]
    # with nothing selected, it starts from the token least similar on average (180 deg)
    assert sel.maxmin_extend(feats, torch.zeros(1, 0, dtype=torch.long), 1).tolist() == [[3]]


def test_lpm_select_splits_importance_and_diversity():
    prob = torch.tensor([[0.9, 0.8, 0.7, 0.1, 0.05, 0.0]])
    feats = torch.tensor([[[1.0, 0], [1, 0.01], [1, 0.02], [0, 1], [1, 0.03], [-1, 0]]])
    # k=5, diversity 0.2 -> 4 by probability (0,1,2,3), 1 by max-min: token 5 (opposite of 0)
    assert sel.lpm_select(prob, feats, 5, diversity=0.2).tolist() == [[0, 1, 2, 3, 5]]
    assert sel.lpm_select(prob, feats, 3, diversity=0.0).tolist() == [[0, 1, 2]]


def test_random_select_is_seeded():
    a = sel.random_select(2, 50, 7, torch.Generator().manual_seed(1))
    b = sel.random_select(2, 50, 7, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (2, 7) and torch.all(a.diff(dim=1) > 0)


def test_attention_probs_match_a_causal_softmax():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    full = (q @ k.transpose(-1, -2)) * 0.5
    full = full.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    got = sel.attention_probs(q[:, :, [2, 4]], k, 0.5, torch.tensor([[2, 4]]), torch.ones(1, 5, dtype=torch.bool))
    torch.testing.assert_close(got, full[:, :, [2, 4]])


@pytest.mark.parametrize("tokens,r1,r2", [(64, 111, 37), (32, 55, 18), (128, 220, 73)])
def test_learnpruner_budget_split_matches_the_paper(tokens, r1, r2):
    s = two_stage(tokens, 576, 32, 12)
    assert (s.r1, s.r2, s.layer) == (r1, r2, 12)
    assert abs(s.average - tokens) < 1.0


def test_budget_edges():
    assert two_stage(576, 576, 32, 12).is_noop
    s = two_stage(400, 576, 32, 12)  # r1 would exceed n: stage 1 keeps all
    assert s.r1 is None and abs(s.average - 400) < 1
    assert single_drop(64, 576, 32, 2, "fastv").r2 == 30
    with pytest.raises(ValueError, match="at least 37 visual tokens.*tokens=32"):
        single_drop(32, 576, 32, 2, "fastv")
    assert default_layer(32, 12) == 12 and default_layer(8, 12) == 3 and default_layer(40, 12) == 15


@pytest.mark.parametrize("bad", [0, -3, 2.5, "64", True, None])
def test_bad_budgets_fail_clearly(bad):
    with pytest.raises(ValueError, match="tokens must be a positive integer"):
        check_tokens(bad)
    model = tiny_llava(layers=4)
    if bad is not None:  # apply(tokens=None) means "not given": the default budget, or ratio=
        with pytest.raises(ValueError, match="tokens must be a positive integer"):
            learnpruner.apply(model, "random", tokens=bad)
    assert not learnpruner.is_pruned(model)


def test_budget_at_least_the_token_count_is_a_noop():
    model = tiny_llava(layers=4)
    inp = make_inputs(model)
    with torch.no_grad():
        ref = model(**inp).logits
        learnpruner.apply(model, "learnpruner", tokens=10 * n_visual(model), lpm="random")
        assert torch.equal(model(**inp).logits, ref)
    st = learnpruner.stats(model)
    assert st.stage1_kept is None and st.stage2_kept is None and st.schedule.is_noop


def test_bad_arguments_fail_clearly():
    model = tiny_llava(layers=4)
    with pytest.raises(ValueError, match="unknown method 'fastvv'; known methods: .*fastv"):
        learnpruner.apply(model, "fastvv")
    with pytest.raises(ValueError, match=r"give tokens= or ratio=, not both"):
        learnpruner.apply(model, "fastv", tokens=40, ratio=0.5)
    with pytest.raises(ValueError, match="layer must be in \\[1, 3\\].*got 9"):
        learnpruner.apply(model, "learnpruner", tokens=16, lpm="random", layer=9)
    with pytest.raises(ValueError, match="needs a Learnable Pruning Module"):
        learnpruner.apply(model, "learnpruner", tokens=16)
    with pytest.raises(ValueError, match="option diversity must be"):
        learnpruner.apply(model, "learnpruner", tokens=16, lpm="random", diversity=2)
    with pytest.raises(TypeError, match="does not support Linear"):
        learnpruner.apply(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="not pruned"):
        learnpruner.remove(model)
    learnpruner.apply(model, "none")
    with pytest.raises(ValueError, match="already pruned"):
        learnpruner.apply(model, "none")


def test_lpm_that_does_not_fit_the_model_fails_clearly(tmp_path):
    model = tiny_llava(layers=4)  # CLIP width 32
    wrong_width = LearnablePruningModule(LPMConfig(feature_dim=48, family="llava"))
    with pytest.raises(ValueError, match="features of width 48.*gives width 32"):
        learnpruner.apply(model, "learnpruner", tokens=16, lpm=wrong_width)
    wrong_family = LearnablePruningModule(LPMConfig(feature_dim=32, family="qwen2_5_vl"))
    with pytest.raises(ValueError, match="trained for model family 'qwen2_5_vl'"):
        learnpruner.apply(model, "learnpruner", tokens=16, lpm=wrong_family)
    with pytest.raises(FileNotFoundError, match="no LPM at"):
        learnpruner.apply(model, "learnpruner", tokens=16, lpm=tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "lpm.json").write_text(json.dumps({"format": "other"}))
    (tmp_path / "bad" / "lpm.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="is not a learnpruner LPM"):
        learnpruner.apply(model, "learnpruner", tokens=16, lpm=tmp_path / "bad")
    assert not learnpruner.is_pruned(model)


def test_saved_and_reloaded_lpm_selects_identical_tokens(tmp_path):
    model = tiny_llava(layers=4)
    inp = make_inputs(model)
    torch.manual_seed(3)
    lpm = LearnablePruningModule(LPMConfig(feature_dim=32, hidden_dim=16, family="llava", num_tokens=64))
    lpm.save(tmp_path / "lpm")
    assert sorted(p.name for p in (tmp_path / "lpm").iterdir()) == ["lpm.json", "lpm.safetensors"]
    kept = []
    for source in (lpm, tmp_path / "lpm", tmp_path / "lpm" / "lpm.safetensors"):
        learnpruner.apply(model, "learnpruner", tokens=16, lpm=source)
        with torch.no_grad():
            model(**inp)
        kept.append(learnpruner.stats(model).stage1_kept)
        learnpruner.remove(model)
    assert torch.equal(kept[0], kept[1]) and torch.equal(kept[0], kept[2])


def test_mismatched_image_tokens_fail_clearly():
    model = tiny_llava(layers=4)
    inp = make_inputs(model)
    inp["pixel_values"] = inp["pixel_values"][:1]
    learnpruner.apply(model, "fastv", tokens=40)
    with pytest.raises(ValueError, match="128 image tokens in input_ids, 1 image"):
        model(**inp)


@torch.no_grad()
@pytest.mark.parametrize("strategy", ["default", "full"])
def test_cls_attention_equals_eager_clip_attention(strategy):
    model = tiny_llava(layers=4, strategy=strategy, seed=7)
    from learnpruner.adapters import adapter_for

    ad = adapter_for(model)
    pixel_values = make_inputs(model)["pixel_values"]
    feats, extras = ad.vision_features(pixel_values, cls_attention=True)
    cls = extras["cls"]
    assert extras["keys"].shape == (2, n_visual(model), 32 // 4)
    assert torch.equal(feats, ad.vision_features(pixel_values))
    tower = model.model.vision_tower
    tower.set_attn_implementation("eager")
    attn = tower(pixel_values, output_attentions=True).attentions[-2]  # layer producing hidden_states[-2]
    expected = attn[:, :, 0].mean(dim=1)
    expected = expected[:, 1:] if strategy == "default" else expected
    assert cls.shape == (2, n_visual(model))
    torch.testing.assert_close(cls, expected, atol=1e-6, rtol=1e-5)
