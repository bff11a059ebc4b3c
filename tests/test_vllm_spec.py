"""The vLLM integration's settings, checked without vLLM (they run in the main test environment too)."""

from __future__ import annotations

import json

import pytest
import torch

from learnpruner.integrations.vllm import ARCHITECTURES, check_vllm_version, overrides
from learnpruner.integrations.vllm.stage1 import Stage1Runner, Stage1Spec, supported_methods


def test_overrides_name_the_pruned_architecture_and_carry_the_spec():
    ov = overrides("llava", "learnpruner", 64, lpm="/some/lpm")
    assert ov == {"architectures": ["LearnPrunerLlavaForConditionalGeneration"],
                  "learnpruner": {"method": "learnpruner", "tokens": 64, "ratio": None,
                                  "options": {"lpm": "/some/lpm"}}}
    assert json.loads(overrides("llava", "divprune", ratio=0.25, as_json=True))["learnpruner"]["ratio"] == 0.25
    spec = Stage1Spec.from_config(ov["learnpruner"])
    assert spec.runs_as == "lpm-only" and spec.kept(576) == 64 and "stage 1 only" in spec.describe()
    assert Stage1Spec.check("divprune", ratio=0.25).kept(2880) == 720


@pytest.mark.parametrize("kwargs,match", [
    ({"family": "blip"}, r"family 'blip' has no vLLM integration; accepted: internvl, llava, llava_next"),
    ({"method": "nope"}, r"unknown method 'nope'"),
    ({"method": "fastv"}, r"'fastv' drops visual tokens inside the LLM, which vLLM cannot run"),
    ({"method": "sparsevlm"}, r"inside the LLM"),
    ({"method": "visionzip"}, r"'visionzip' reads the vision encoder's \[CLS\] attention"),
    ({"method": "cdpruner", "fallback": "instruction"}, r"reads the prompt"),
    ({"tokens": 0}, r"tokens"),
    ({"tokens": 8, "ratio": 0.5}, r"give tokens= or ratio=, not both"),
    ({"positions": "original"}, r"only positions='contiguous'"),
    ({"family": "qwen2_5_vl", "positions": "contiguous"}, r"original 3-D \(M-RoPE\) positions; only "
                                                          r"positions='original'"),
    ({"diversity": 2.0}, r"diversity"),
])
def test_bad_settings_are_refused_naming_the_value(kwargs, match):
    kw = {"family": "llava", "method": "learnpruner", "tokens": 32, **kwargs}
    with pytest.raises(ValueError, match=match):
        overrides(kw.pop("family"), kw.pop("method"), kw.pop("tokens"), **kw)


def test_supported_methods_are_the_stage1_ones_without_cls():
    names = supported_methods()
    assert {"learnpruner", "divprune", "random", "cdpruner", "none"} <= set(names)
    assert not {"fastv", "visionzip", "vispruner", "pyramiddrop", "dart", "sparsevlm"} & set(names)


def test_spec_in_the_config_is_checked():
    with pytest.raises(ValueError, match=r"unknown keys \['budget'\]"):
        Stage1Spec.from_config({"method": "learnpruner", "budget": "paper"})
    with pytest.raises(ValueError, match="must be a dict"):
        Stage1Spec.from_config("learnpruner")
    assert Stage1Spec.from_config(None) is None


def test_untested_vllm_versions_are_refused():
    check_vllm_version("0.32.0")
    with pytest.raises(RuntimeError, match=r"tested on vLLM 0.32.x; this is vLLM 0.40.1"):
        check_vllm_version("0.40.1")
    assert set(ARCHITECTURES) >= {"llava"}


def test_runner_runs_the_registered_rule_itself():
    """The runner's kept set is the rule's own (the transformers engine's) for the same features and LPM."""
    from learnpruner import selection as sel
    from learnpruner.lpm import LearnablePruningModule, LPMConfig

    torch.manual_seed(0)
    lpm = LearnablePruningModule(LPMConfig(feature_dim=16, family="llava", feature_layer=-2)).eval()
    feats = torch.randn(3, 40, 16)
    runner = Stage1Runner(Stage1Spec.check("learnpruner", 10), lpm, project=lambda x: x)
    kept = runner.select(feats)
    assert torch.equal(kept, sel.lpm_select(lpm(feats), feats, 10, 0.1))
    div = Stage1Runner(Stage1Spec.check("divprune", 12), None, project=lambda x: x * 2).select(feats)
    assert div.shape == (3, 12) and torch.all(div[:, 1:] > div[:, :-1])
    assert Stage1Runner(Stage1Spec.check("divprune", 40), None, project=lambda x: x).select(feats) is None


def test_qwen_keeps_original_positions_and_budgets_per_item():
    ov = overrides("qwen2_5_vl", "learnpruner", 142, lpm="/some/lpm")
    assert ov["architectures"] == ["LearnPrunerQwen2_5_VLForConditionalGeneration"]
    spec = Stage1Spec.from_config(ov["learnpruner"], family="qwen2_5_vl")
    assert spec.positions == "original" and "3-D M-RoPE" in spec.describe()
    assert [spec.kept(n) for n in (1280, 142, 60)] == [142, 142, 60]  # an item below the budget keeps all
    assert overrides("qwen2_5_vl", "divprune", 64, positions="original")["learnpruner"]["options"] == {
        "positions": "original"}


def test_a_served_config_is_checked_once_per_entry():
    from types import SimpleNamespace

    from learnpruner.integrations.vllm.stage1 import spec_of

    config = SimpleNamespace(learnpruner=overrides("llava", "divprune", 64)["learnpruner"])
    spec = spec_of(config, "llava")
    assert spec_of(SimpleNamespace(**vars(config)), "llava") is spec  # the processor asks per request: no re-validation
    assert [spec.kept(n) for n in (576, 2880, 40, 576)] == [64, 64, 40, 64]
    assert spec_of(config, "qwen2_5_vl") is not spec  # another family's numbering is another spec
    with pytest.raises(ValueError, match=r"need hf_overrides\['learnpruner'\]"):
        spec_of(SimpleNamespace(), "llava")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        spec_of(SimpleNamespace(learnpruner={"method": "nope", "tokens": 8}), "llava")
