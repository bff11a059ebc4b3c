"""The ShapesVQA model and LPM shipped inside the package (skipped in a build that ships without them)."""

from __future__ import annotations

import json

import pytest
import torch

import learnpruner
from learnpruner.hub import BUILTIN_MODELS

SHIPPED = BUILTIN_MODELS["shapes-tiny"]
pytestmark = pytest.mark.skipif(not (SHIPPED / "config.json").is_file(), reason="shapes-tiny is not shipped")


@pytest.fixture(scope="module")
def shipped():
    from learnpruner.hub import load

    torch.set_num_threads(1)
    return load("shapes-tiny")


def test_shipped_model_answers_and_pruning_matters(shipped, tmp_path):
    from learnpruner.evaluation import evaluate, load_items

    model, processor = shipped
    items = load_items("shapesvqa", 48)
    recs = evaluate(model, processor, items, ["none", "random"], [32], tmp_path, batch_size=16, progress=False)
    acc = {r["method"]: r["accuracy"] for r in recs}
    assert acc["none"] >= 0.7, acc  # the full test split is >= 0.80 (README); 48 items leave room for noise
    assert acc["none"] - acc["random"] >= 0.1, acc


def test_shipped_lpm_is_the_default_and_beats_random_pruning(shipped, tmp_path):
    from learnpruner.evaluation import evaluate, load_items

    model, processor = shipped
    assert (SHIPPED / "learnpruner-lpm" / "lpm.json").is_file()
    learnpruner.apply(model, "learnpruner", tokens=32)  # no lpm= : the model folder's own
    try:
        assert learnpruner.is_pruned(model)
    finally:
        learnpruner.remove(model)
    items = load_items("shapesvqa", 48)
    recs = evaluate(model, processor, items, ["learnpruner", "random"], [32], tmp_path, batch_size=16, progress=False)
    acc = {r["method"]: r["accuracy"] for r in recs}
    assert acc["learnpruner"] - acc["random"] >= 0.2, acc  # about 40 points on the full test split (README)


@torch.no_grad()
def test_shipped_lpm_keeps_the_foreground(shipped):
    """The shipped LPM's keep-probability ranks object and character patches above background ones (the
    ground truth of each scene): an LPM whose keep class were inverted would rank them below."""
    import numpy as np

    from learnpruner.adapters import adapter_for
    from learnpruner.lpm import LearnablePruningModule
    from learnpruner.testbed.shapes import load_split

    model, processor = shipped
    lpm = LearnablePruningModule.load(SHIPPED / "learnpruner-lpm").eval()
    items = load_split("val", 8)
    pixels = processor.image_processor([it.image for it in items], return_tensors="pt")["pixel_values"]
    feats = adapter_for(model).encode(pixels).features  # [8, 576, d] before the projector
    prob = lpm(feats).numpy()
    fg = np.stack([(it.labels["kind"] > 0).reshape(-1) for it in items])
    # AUROC: how often a foreground patch outranks a background patch of the same image
    auroc = np.mean([(p[f][:, None] > p[~f][None, :]).mean() for p, f in zip(prob, fg)])
    assert auroc > 0.8, auroc
    top = np.argsort(-prob, axis=1)[:, :32]
    assert np.mean([f[t].mean() for f, t in zip(fg, top)]) > 0.5 > fg.mean()


FULL = BUILTIN_MODELS["shapes-tiny-full"]


@pytest.mark.skipif(not (FULL / "config.json").is_file(), reason="shapes-tiny-full is not shipped")
def test_shapes_tiny_full_loads_in_float32_on_cpu_answers_and_pruning_matters(tmp_path):
    from learnpruner.evaluation import evaluate, load_items
    from learnpruner.hub import load

    model, processor = load("shapes-tiny-full")
    assert model.dtype == torch.float32  # stored in float16, computed in float32 on a CPU
    assert load("shapes-tiny-full", dtype="float16")[0].dtype == torch.float16
    recs = evaluate(model, processor, load_items("shapesvqa", 48), ["none", "random"], [32], tmp_path,
                    batch_size=16, progress=False)
    acc = {r["method"]: r["accuracy"] for r in recs}
    assert acc["none"] >= 0.75, acc  # 89.0% on the full test split (its README)
    assert acc["none"] - acc["random"] >= 0.25, acc  # 51.7 points on the full test split


@pytest.mark.skipif(not (FULL / "learnpruner-lpm" / "lpm.json").is_file(), reason="no LPM shipped")
def test_shapes_tiny_full_ships_its_own_lpm_trained_on_it():
    """The LPM in shapes-tiny-full's folder fits it, records the model it was trained on, and ranks foreground
    patches (objects and characters) above background ones, as a useful stage 1 must."""
    import json

    import numpy as np

    from learnpruner.adapters import adapter_for
    from learnpruner.hub import load, model_fingerprint
    from learnpruner.lpm import LearnablePruningModule
    from learnpruner.testbed.shapes import load_split

    model, processor = load("shapes-tiny-full")
    meta = json.loads((FULL / "learnpruner-lpm" / "lpm.json").read_text())["extra"]
    assert meta["trained_on"]["model"] == "shapes-tiny-full"
    assert meta["trained_on"]["fingerprint"] == model_fingerprint(model)["fingerprint"]
    lpm = LearnablePruningModule.load(FULL / "learnpruner-lpm").eval()
    ad = adapter_for(model)
    lpm.check_compatible("llava", ad.feature_dim(), ad.feature_layer())
    items = load_split("val", 8)
    pixels = processor.image_processor([it.image for it in items], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        prob = lpm(ad.encode(pixels).features).numpy()
    fg = np.stack([(it.labels["kind"] > 0).reshape(-1) for it in items])
    auroc = np.mean([(p[f][:, None] > p[~f][None, :]).mean() for p, f in zip(prob, fg)])
    assert auroc > 0.8, auroc


@pytest.mark.parametrize("model_name", ["shapes-tiny-full", "shapes-tiny"])
def test_both_models_ship_a_learnpruner_set_module_that_apply_finds(model_name):
    import learnpruner
    from learnpruner.hub import BUILTIN_MODELS, load

    folder = BUILTIN_MODELS[model_name] / "learnpruner-set"
    meta = json.loads((folder / "lpm.json").read_text())["extra"]
    assert meta["options"]["gamma"] == 0.5 and "note" in meta  # the card says what was chosen and why
    assert meta["validation"]["chosen_step"] == 0  # the curve's best point: the untrained start
    model, _ = load(model_name)
    plan = learnpruner.resolve(model, "learnpruner-set", 32)
    assert plan.lpm["path"] == str(folder.resolve()) and plan.sources["gamma"] == "lpm.json"
