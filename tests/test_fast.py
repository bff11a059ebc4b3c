"""The fast decode path (static KV buffers, capturable step) against the plain path."""

from __future__ import annotations

import pytest
import torch
from helpers import make_inputs, tiny_llava

import learnpruner
from learnpruner.engine import decode_static as fast

torch.set_num_threads(1)

CASES = [
    ("learnpruner", {"tokens": 16, "lpm": "random"}),  # stage 1 + one LLM drop
    ("fastv", {"tokens": 40}),  # one LLM drop
    ("random", {"tokens": 10}),  # stage 1 only
    ("pyramiddrop", {"tokens": 30}),  # three LLM drops: four layer groups
    ("sparsevlm", {"tokens": 20}),  # three drops with recycled rows
]


def _generate(model, inp, **kw):
    with torch.no_grad():
        return model.generate(**inp, max_new_tokens=6, do_sample=False, output_scores=True,
                              return_dict_in_generate=True, **kw)


def _plain_and_fast(model, inp, method, opts):
    """Greedy generations of the same pruned model on the plain and on the fast path, and the fast cache."""
    learnpruner.apply(model, method, **opts)
    plain = _generate(model, inp)
    learnpruner.remove(model)
    learnpruner.apply(model, method, fast=True, **opts)
    quick = _generate(model, inp)
    assert torch.equal(plain.sequences, quick.sequences)
    cache = quick.past_key_values if hasattr(quick, "past_key_values") else quick.cache
    return plain, quick, cache._learnpruner_static


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("method,opts", CASES, ids=[c[0] for c in CASES])
def test_fast_decode_equals_the_plain_path(impl, method, opts):
    model = tiny_llava(attn=impl, seed=2)
    plain, quick, static = _plain_and_fast(model, make_inputs(model), method, opts)  # a padded batch of two
    for a, b in zip(plain.scores, quick.scores):
        finite = torch.isfinite(a)
        assert torch.equal(finite, torch.isfinite(b))
        torch.testing.assert_close(a[finite], b[finite], atol=1e-5, rtol=1e-5)
    # the static buffers really are in use, one kept length per layer group
    assert static.generated == 5 and int(static.step) == 5
    assert len(set(static.base)) == len(static.prefix)


def test_buffers_grow_when_full(monkeypatch):
    monkeypatch.setattr(fast, "CAPACITY_STEP", 2)
    model = tiny_llava(seed=3)
    _, _, static = _plain_and_fast(model, make_inputs(model), "learnpruner", {"tokens": 16, "lpm": "random"})
    assert static.capacity >= 6


def test_fast_needs_sdpa_or_eager():
    model = tiny_llava(seed=4)
    model.model.language_model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="fast=True supports attn_implementation 'sdpa' and 'eager'"):
        learnpruner.apply(model, "fastv", tokens=40, fast=True)
    assert not learnpruner.is_pruned(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_decode_equals_the_plain_path():
    model = tiny_llava(seed=5).cuda()
    inp = {k: v.cuda() for k, v in make_inputs(model).items()}
    _, _, static = _plain_and_fast(model, inp, "learnpruner", {"tokens": 16, "lpm": "random"})
    assert len(static.graphs) == 1 and static.graphs.captures == 1
