"""Adaptive budgets: the LPM's keep decisions set each image's count; the dataset average meets the budget."""

from __future__ import annotations

import pytest
import torch
from helpers import make_inputs, n_visual, tiny_llava

import learnpruner
from learnpruner.adapters import adapter_for
from learnpruner.adaptive import THRESHOLDS, adaptive_threshold, calibrate, save_thresholds
from learnpruner.engine.prefill import adaptive_schedule

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = tiny_llava(layers=4, seed=3)
    torch.manual_seed(0)
    lpm = learnpruner.LearnablePruningModule(learnpruner.LPMConfig(feature_dim=32, hidden_dim=8))
    folder = tmp_path_factory.mktemp("lpm")
    lpm.save(folder)
    batches = [make_inputs(model, seed=s) for s in range(3)]  # 6 images
    return model, lpm, folder, batches


def _probs(model, lpm, batches):
    ad = adapter_for(model)
    with torch.no_grad():
        return [p for b in batches for p in lpm(ad.encode(b["pixel_values"]).features)]


def test_calibrated_threshold_meets_the_average_stage1_count(setup):
    model, lpm, folder, batches = setup
    n = n_visual(model)
    thresholds = calibrate(model, lpm, batches, [16, 8])
    for t, threshold in thresholds.items():
        r1 = learnpruner.get_method("learnpruner").schedule(t, n, 4, {}).r1
        counts = [max(1, int((p > threshold).sum())) for p in _probs(model, lpm, batches)]
        assert abs(sum(counts) - 6 * r1) <= 1  # the dataset average is the fixed schedule's r1
    assert thresholds[8] > thresholds[16]  # a smaller budget needs a higher bar
    save_thresholds(folder, thresholds)
    loaded = learnpruner.LearnablePruningModule.load(folder)
    assert loaded.config.extra[THRESHOLDS] == {str(k): v for k, v in thresholds.items()}


def test_adaptive_budget_keeps_what_the_lpm_decides_per_image(setup):
    model, lpm, folder, batches = setup
    thresholds = calibrate(model, lpm, batches, [16])
    save_thresholds(folder, thresholds)
    learnpruner.apply(model, "learnpruner", tokens=16, budget="adaptive", lpm=str(folder))
    try:
        inp = batches[0]
        with torch.no_grad():
            model(**inp)
        st = learnpruner.stats(model)
        probs = _probs(model, lpm, [inp])
        base = learnpruner.get_method("learnpruner").schedule(16, n_visual(model), 4, {})
        for im, p in zip(st.images, probs):
            k = max(1, int((p > thresholds[16]).sum()))
            assert im.schedule == adaptive_schedule(base, k)
            assert im.tokens_per_layer == im.schedule.per_layer()
            if im.stage1_kept is not None:
                assert len(im.stage1_kept) == k
        assert len({im.schedule for im in st.images}) > 1 or len(st.images) == 1
    finally:
        learnpruner.remove(model)


def test_adaptive_schedule_scales_stage2_with_stage1():
    base = learnpruner.get_method("learnpruner").schedule(64, 576, 32, {})  # 111 / 37 at layer 12
    s = adaptive_schedule(base, 60)
    assert s.r1 == 60 and s.drops == ((12, 20),)
    assert adaptive_schedule(base, 1).drops == ((12, 1),)
    assert adaptive_schedule(base, 576).r1 is None


def test_adaptive_budget_refuses_what_it_cannot_do(setup):
    model, lpm, folder, _ = setup
    with pytest.raises(ValueError, match=r"no adaptive threshold for tokens=7 \(calibrated: "):
        learnpruner.apply(model, "learnpruner", tokens=7, budget="adaptive", lpm=str(folder))
    with pytest.raises(ValueError, match="whose stage 1 is a Learnable Pruning Module.*'fastv' has none"):
        learnpruner.apply(model, "fastv", tokens=40, budget="adaptive")
    with pytest.raises(ValueError, match="takes tokens=T .* not ratio="):
        adaptive_threshold(learnpruner.get_method("learnpruner"), lpm, None, 0.5)
    assert not learnpruner.is_pruned(model)


def test_options_shipped_with_the_lpm_are_its_defaults(tmp_path):
    from learnpruner.adaptive import save_lpm_options

    model = tiny_llava(layers=8, seed=3)
    learnpruner.LearnablePruningModule(learnpruner.LPMConfig(feature_dim=32, hidden_dim=8)).save(tmp_path)
    n = n_visual(model)

    def drop_layer(method, **options):
        learnpruner.apply(model, method, tokens=8, lpm=str(tmp_path), **options)
        try:
            return model._learnpruner.schedule(n).drops
        finally:
            learnpruner.remove(model)

    assert drop_layer("learnpruner")[0][0] == 3  # round(12 * 8 / 32)
    save_lpm_options(tmp_path, {"layer": 5})
    assert drop_layer("learnpruner")[0][0] == 5  # the shipped setting
    assert drop_layer("learnpruner", layer=2)[0][0] == 2  # an explicit option wins
    assert drop_layer("lpm-only") == ()  # a method without that option ignores it
    with pytest.raises(ValueError, match="LPM options must be plain values"):
        save_lpm_options(tmp_path, {"lpm": "elsewhere"})
