"""The resolved plan: one place where a method, a budget, its options and its LPM become a schedule."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import learnpruner
from learnpruner import evaluation as ev
from learnpruner.bench.run import _plan as bench_plan
from learnpruner.budget import UnreachableBudget
from learnpruner.hub import load
from learnpruner.methods import ABLATIONS, METHODS

torch.set_num_threads(1)
BUDGETS = (192, 128, 64, 32)


@pytest.fixture(scope="module")
def tiny():
    return load("tiny-random-llava")


def _extra(name: str) -> dict:
    return {"lpm": "random"} if learnpruner.get_method(name).needs_lpm else {}


def test_every_method_at_every_budget_gets_one_schedule_from_its_plan(tiny, tmp_path, always_blue):
    """Through ``resolve``: apply, bench, eval and vLLM's stage-1 spec all run the plan's schedule."""
    from learnpruner.integrations.vllm.stage1 import Stage1Spec, supported_methods

    model, processor = tiny
    n = 576
    served = set(supported_methods())
    items = ev.load_items("shapesvqa", limit=1)
    checked = 0
    for name in sorted({**METHODS, **ABLATIONS}):
        for budget in ("average", "paper"):
            for t in BUDGETS:
                try:
                    plan = learnpruner.resolve(model, name, t, budget=budget, **_extra(name))
                except UnreachableBudget:
                    with pytest.raises(UnreachableBudget):
                        learnpruner.apply(model, name, tokens=t, budget=budget, **_extra(name))
                    continue
                schedule = plan.schedule(n)
                learnpruner.apply(model, name, tokens=t, budget=budget, **_extra(name))
                try:
                    assert model._learnpruner.plan.schedule(n) == schedule
                    assert model._learnpruner.plan.as_dict() == plan.as_dict()
                finally:
                    learnpruner.remove(model)
                if budget == "average":
                    [(_, _, bench_schedule, _)] = bench_plan(model, [name], [t], n) if name != "none" else [
                        bench_plan(model, [name], [t], n)[0]]
                    assert bench_schedule == (schedule if name != "none" else plan.schedule(n))
                    if name in served:  # vLLM runs the stage-1 form (learnpruner as lpm-only): that method's plan
                        spec = Stage1Spec.check(name, t)
                        runs = learnpruner.resolve(model, spec.runs_as, t, **_extra(spec.runs_as)).schedule(n)
                        served_schedule = spec.plan.schedule(n)  # the processor's plan: counts, at any depth
                        assert (served_schedule.r1, served_schedule.drops) == (runs.r1, runs.drops)
                        assert spec.kept(n) == (runs.r1 or n)
                        if spec.runs_as == name:
                            assert runs == schedule
                checked += 1
    assert checked > 60
    out = tmp_path / "out"
    for name in ("learnpruner", "divprune", "fastv", "random"):
        ev.evaluate(model, processor, items, [name], [192], out, method_options={name: _extra(name)},
                    progress=False)
        setup = json.loads((out / "preds" / f"{name}@192.setup.json").read_text())
        assert setup["plan"] == learnpruner.resolve(model, name, 192, **_extra(name)).as_dict()


def test_a_plan_holds_every_option_with_its_source_and_the_lpm_hash(tiny, tmp_path):
    from learnpruner import LearnablePruningModule, LPMConfig
    from learnpruner.adaptive import save_lpm_options

    model, _ = tiny
    LearnablePruningModule(LPMConfig(feature_dim=96, num_tokens=576)).save(tmp_path)
    save_lpm_options(tmp_path, {"layer": 4})
    plan = learnpruner.resolve(model, "learnpruner", 64, lpm=str(tmp_path), diversity=0.2)
    assert dict(plan.options) == {"r1": None, "r2": None, "layer": 4, "diversity": 0.2, "positions": "original"}
    assert dict(plan.sources) == {"r1": "default", "r2": "default", "layer": "lpm.json", "diversity": "caller",
                                  "positions": "default"}
    assert plan.lpm["path"] == str(tmp_path.resolve()) and len(plan.lpm["sha256"]) == 64
    assert plan.schedule(576).drops[0][0] == 4
    assert learnpruner.resolve(model, "learnpruner", 64, lpm=str(tmp_path), layer=2).sources["layer"] == "caller"
    fastv = learnpruner.resolve(model, "fastv", 192)
    assert fastv.options["layer"] == 2 and fastv.lpm is None  # FastV's own default, not LearnPruner's
    assert learnpruner.resolve(model, "dart", 192).options["layer"] == 1  # round(2 * 8 / 32): scaled with depth
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.tokens = 32
    with pytest.raises(TypeError):
        plan.options["layer"] = 5
    learnpruner.apply(model, plan)
    try:
        inputs = {"input_ids": torch.tensor([[4] * 576 + [5, 6]]), "pixel_values": torch.zeros(1, 3, 336, 336)}
        with torch.no_grad():
            model(**inputs)
        assert learnpruner.stats(model).plan is plan
    finally:
        learnpruner.remove(model)
    with pytest.raises(ValueError, match="takes the plan as resolved"):
        learnpruner.apply(model, plan, tokens=32)


def test_resolve_refuses_what_apply_refuses_naming_it(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="does not take option"):
        learnpruner.resolve(model, "fastv", 192, diversity=0.1)
    with pytest.raises(ValueError, match="option diversity must be a number in"):
        learnpruner.resolve(model, "learnpruner", 64, lpm="random", diversity=2)
    with pytest.raises(ValueError, match=r"'divprune' does not take option\(s\) \['lpm'\]"):
        learnpruner.resolve(model, "divprune", 64, lpm="random")
    with pytest.raises(ValueError, match="needs a Learnable Pruning Module"):
        learnpruner.resolve(model, "learnpruner", 64)
    with pytest.raises(ValueError, match="budget must be one of"):
        learnpruner.resolve(model, "divprune", 64, budget="mean")
    assert learnpruner.resolve("qwen2_5_vl", "divprune", 64).family == "qwen2_5_vl"
