"""Trust: bad LPM files, bad apply() inputs and model moves give clear errors or just work."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_inputs, n_visual, tiny_llava

import learnpruner
from learnpruner import LearnablePruningModule, LPMConfig


@pytest.fixture()
def lpm_dir(tmp_path):
    torch.manual_seed(0)
    LearnablePruningModule(LPMConfig(feature_dim=32, hidden_dim=8)).save(tmp_path)
    return tmp_path


def test_truncated_lpm_weights_are_refused_clearly(lpm_dir):
    weights = lpm_dir / "lpm.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        LearnablePruningModule.load(lpm_dir)


@pytest.mark.parametrize("content", ["[1, 2]", "{not json", '"learnpruner-lpm"'])
def test_lpm_metadata_that_is_not_an_object_is_refused_clearly(lpm_dir, content):
    (lpm_dir / "lpm.json").write_text(content)
    with pytest.raises(ValueError, match="lpm.json"):
        LearnablePruningModule.load(lpm_dir)


def test_lpm_metadata_disagreeing_with_the_tensors_is_refused_clearly(lpm_dir):
    meta = json.loads((lpm_dir / "lpm.json").read_text())
    meta["feature_dim"] = 48
    (lpm_dir / "lpm.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"does not match .*feature_dim=48"):
        LearnablePruningModule.load(lpm_dir)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_lpm_weights_are_refused_on_load(tmp_path, value):
    lpm = LearnablePruningModule(LPMConfig(feature_dim=32, hidden_dim=8))
    with torch.no_grad():
        lpm.mlp[2].bias[1] = value
    lpm.save(tmp_path)
    with pytest.raises(ValueError, match=r"NaN or infinite values in mlp\.2\.bias"):
        LearnablePruningModule.load(tmp_path)


@pytest.mark.parametrize("thing", ["not a model", None, 3])
def test_apply_to_something_else_than_a_model_names_it(thing):
    with pytest.raises(TypeError, match="apply takes a transformers model instance"):
        learnpruner.apply(thing, method="fastv", tokens=8)


@pytest.mark.parametrize("key", ["r1", "r2"])
def test_zero_r1_r2_are_refused_like_zero_tokens(key):
    model = tiny_llava(layers=4)
    with pytest.raises(ValueError, match=f"option {key} must be a positive integer, got 0"):
        learnpruner.apply(model, method="learnpruner", tokens=8, lpm="random", **{key: 0})
    assert not learnpruner.is_pruned(model)


@pytest.mark.parametrize("key", ["r1", "r2"])
def test_r1_r2_above_the_image_token_count_are_refused(key):
    model = tiny_llava(layers=4)
    n = n_visual(model)
    with pytest.raises(ValueError, match=rf"option {key}={n + 5} exceeds the image's {n} visual tokens"):
        learnpruner.apply(model, method="learnpruner", tokens=8, lpm="random", **{key: n + 5})


def test_lpm_follows_a_dtype_move_of_the_model():
    model = tiny_llava(layers=4)
    inp = make_inputs(model)
    learnpruner.apply(model, method="learnpruner", tokens=8, lpm="random")
    with torch.no_grad():
        ref = model(**inp).logits
        kept = learnpruner.stats(model).stage1_kept
        model.to(torch.float64)
        inp64 = {**inp, "pixel_values": inp["pixel_values"].double()}
        out = model(**inp64).logits
    assert out.dtype == torch.float64
    assert next(model._learnpruner.lpm.parameters()).dtype == torch.float64  # the LPM moved with the model
    assert torch.equal(learnpruner.stats(model).stage1_kept, kept)
    torch.testing.assert_close(out.float(), ref, atol=1e-4, rtol=1e-4)
