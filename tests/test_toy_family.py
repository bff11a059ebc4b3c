"""``register_adapter`` from user code: a toy family defined outside the package (LLaVA's model under a class of its
own, with an adapter written as one small class, and no benchmark view of its own) is registered at run time, and
every tool of the package runs on it unchanged: apply/generate/stats/remove, eval with intervals, LPM training,
calibration-free adaptive checks, the benchmark. (That a new layout is a family's own files is shown by
LLaVA-OneVision and InternVL3: tests/test_family_llava_onevision.py, tests/test_family_internvl.py.)"""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaForConditionalGeneration

import learnpruner
from learnpruner import adapters
from learnpruner.adapters.llava import LlavaAdapter


class ToyVLMForConditionalGeneration(LlavaForConditionalGeneration):
    """The toy family's model class: LLaVA's parts under a name of its own."""


class ToyAdapter(LlavaAdapter):
    """The toy family's adapter file, in full: its name and its model class (its parts are LLaVA's)."""

    family = "toy"
    model_classes = ("ToyVLMForConditionalGeneration",)


@pytest.fixture
def toy(monkeypatch):
    from learnpruner.testbed.model import build_config, build_processor

    monkeypatch.setattr(adapters.base, "ADAPTERS", list(adapters.ADAPTERS))  # the registration ends with the test
    adapters.register_adapter(ToyAdapter)
    processor = build_processor()
    torch.manual_seed(0)
    model = ToyVLMForConditionalGeneration(build_config(processor.tokenizer, tiny=True)).eval()
    return model, processor


def test_the_toy_family_gets_its_own_adapter(toy):
    model, _ = toy
    assert type(adapters.adapter_for(model)) is ToyAdapter
    assert "toy" in adapters.families_of(learnpruner.get_method("learnpruner"))
    with pytest.raises(TypeError, match="subclass of learnpruner.adapters.Adapter"):
        adapters.register_adapter(int)


def test_apply_generate_stats_remove_on_the_toy_family(toy):
    from learnpruner.testbed.shapes import generate_item

    model, processor = toy
    item = generate_item("test", 0)
    inputs = processor(images=[item.image], text=[f"USER: <image>\n{item.question} ASSISTANT:"], return_tensors="pt")
    with torch.no_grad():
        plain = model(**inputs).logits
        learnpruner.apply(model, "learnpruner", tokens=576, lpm="random")  # keeps every token: the plain model
        torch.testing.assert_close(model(**inputs).logits, plain, rtol=1e-4, atol=1e-5)
        learnpruner.remove(model)
        learnpruner.apply(model, "divprune", tokens=32)
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert learnpruner.stats(model).average_tokens == 32
    learnpruner.remove(model)
    assert not learnpruner.is_pruned(model)


def test_eval_train_and_bench_run_on_the_toy_family(toy, tmp_path):
    from learnpruner.bench import run_bench
    from learnpruner.evaluation import evaluate, load_items
    from learnpruner.training import ShapesRecords, TrainConfig, train_lpm

    model, processor = toy
    recs = evaluate(model, processor, load_items("shapesvqa", 8), ["none", "random"], [32], tmp_path / "eval",
                    batch_size=8, progress=False)
    assert {r["method"] for r in recs} == {"none", "random"} and all("ci" in r for r in recs)
    cfg = TrainConfig(tokens=64, steps=2, batch_size=2, lr=1e-3, warmup=1, ckpt_every=2, hidden_dim=16, seed=0)
    lpm = train_lpm(model, processor, ShapesRecords(), tmp_path / "lpm", cfg, progress=False)
    assert lpm.config.family == "toy"
    records = run_bench(model=model, methods="none,learnpruner", tokens="64", batch_sizes="1", new_tokens=2,
                        repeats=1, warmup=0, progress=False)
    assert {r["family"] for r in records} == {"toy"}
