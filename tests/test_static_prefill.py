"""The fast prefill (static shapes, segments between selections) against the plain prefill, on the CPU.

On a CPU the static-shape code runs without capture. A simulated capture (:class:`_ReplayGraph`) then checks
what a CUDA graph needs of each captured function: it replays the function *captured first* on whatever inputs
are copied in, so a segment that read anything of its call other than its tensor inputs would give the first
prompt's answer for the second one.
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_inputs, next_inputs, next_processor, qwen_inputs, tiny_llava, tiny_llava_next, tiny_qwen
from torch.utils import _pytree as pytree

import learnpruner
from learnpruner.engine.graphs import GraphCache, graphed_modules
from learnpruner.engine.prefill_static import BUCKET, bucket_length

torch.set_num_threads(1)

# every kind of schedule: none, stage 1 only, one LLM drop, stage 1 + one drop, three drops, recycled rows
CASES = [
    ("none", {}),
    ("random", {"tokens": 10, "seed": 1}),
    ("fastv", {"tokens": 40}),
    ("learnpruner", {"tokens": 16, "lpm": "random"}),
    ("pyramiddrop", {"tokens": 30}),
    ("sparsevlm", {"tokens": 20}),
]


def _prefill(model, inp, method, opts, fast):
    learnpruner.apply(model, method, fast=fast, **opts)
    try:
        with torch.no_grad():
            out = model(**inp, use_cache=True, logits_to_keep=0)
        st = learnpruner.stats(model)
    finally:
        learnpruner.remove(model)
    cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
    return out.logits, st, cache


def _assert_same_stats(a, b):
    assert a.tokens_per_layer == b.tokens_per_layer
    assert torch.equal(a.kept_positions, b.kept_positions)
    for x, y in ((a.stage1_kept, b.stage1_kept), (a.stage2_scores, b.stage2_scores)):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
    assert len(a.llm_kept) == len(b.llm_kept) and all(torch.equal(x, y) for x, y in zip(a.llm_kept, b.llm_kept))
    assert [i.tokens_per_layer for i in a.images] == [i.tokens_per_layer for i in b.images]


def _assert_fast_equals_plain(model, inp, method, opts):
    plain, st_plain, _ = _prefill(model, inp, method, opts, fast=False)
    quick, st_fast, cache = _prefill(model, inp, method, opts, fast=True)
    assert quick.shape == plain.shape
    orig = st_plain.kept_positions  # [b, s'] original index of each row, -1 for padding
    real = (orig >= 0) & inp["attention_mask"].gather(1, orig.clamp(min=0)).bool()
    torch.testing.assert_close(quick[real], plain[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(quick[:, -1], plain[:, -1], atol=1e-5, rtol=1e-5)
    _assert_same_stats(st_plain, st_fast)
    # the first layer group really ran on the bucketed length
    assert cache.layers[0].keys.shape[-2] % BUCKET == 0
    return plain, quick


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("method,opts", CASES, ids=[c[0] for c in CASES])
def test_static_prefill_equals_the_plain_path(impl, method, opts):
    model = tiny_llava(attn=impl, seed=2)
    _assert_fast_equals_plain(model, make_inputs(model), method, opts)  # a left-padded batch of two


@pytest.mark.parametrize("method,opts", [("learnpruner", {"tokens": 24, "lpm": "random"}), ("fastv", {"tokens": 60})])
def test_static_prefill_on_llava_next_images_of_different_sizes(method, opts):
    model = tiny_llava_next(seed=1)
    _assert_fast_equals_plain(model, next_inputs(next_processor()), method, opts)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_static_prefill_on_qwen_images_and_a_video(impl):
    model = tiny_qwen(attn=impl, seed=1)
    inp = qwen_inputs(model, [["user :", ("image", (8, 8)), "what colour is the circle ?", "assistant :"],
                              ["user :", ("video", (3, 4, 8)), "how many squares ?", ("image", (4, 12)),
                               "is it red ?", "assistant :"]], seed=3)
    _assert_fast_equals_plain(model, inp, "learnpruner", {"tokens": 8, "lpm": "random"})


def test_bucket_length():
    assert [bucket_length(n) for n in (0, 1, 64, 65, 128, 129)] == [64, 64, 64, 128, 128, 192]
    assert bucket_length(10, bucket=8) == 16
    with pytest.raises(ValueError, match="length >= 0 and bucket >= 1"):
        bucket_length(-1)


# --------------------------------------------------------------------------------------------------
# a simulated capture: what a CUDA graph would replay


class _ReplayGraph:
    """Stands in for a captured CUDA graph: ``replay`` runs the function captured first on the static inputs and
    writes its results into the static outputs (the same tensors the first call returned)."""

    def __init__(self, fn, inputs, outputs):
        self.fn, self.inputs, self.outputs = fn, inputs, outputs

    def replay(self):
        fresh = self.fn(*self.inputs)
        for static, value in zip(pytree.tree_leaves(self.outputs), pytree.tree_leaves(fresh)):
            static.copy_(value)


@pytest.fixture
def simulated_capture(monkeypatch):
    def capture(self, fn, args, reset=None):
        inputs = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        outputs = fn(*inputs)
        if reset is not None:  # a real capture records without running; this one ran once
            reset()
        self.captures += 1
        return {"graph": _ReplayGraph(fn, inputs, outputs), "inputs": inputs, "outputs": outputs}

    monkeypatch.setattr(GraphCache, "_capturable", lambda self, tensors: self.enabled and bool(tensors))
    monkeypatch.setattr(GraphCache, "_capture", capture)


def test_graph_cache_replays_copies_and_stays_bounded(simulated_capture):
    cache = GraphCache(max_graphs=2)
    calls = []

    def double(x, y):
        calls.append(1)
        return {"sum": x + y, "twice": [2 * x]}

    a, b = torch.ones(3), torch.full((3,), 2.0)
    out = cache.run("k", double, a, b)
    assert torch.equal(out["sum"], torch.full((3,), 3.0)) and cache.captures == 1
    out2 = cache.run("k", double, b, b)  # the same shapes: a replay on the new inputs
    assert torch.equal(out2["sum"], torch.full((3,), 4.0)) and torch.equal(out2["twice"][0], 2 * b)
    assert torch.equal(out["sum"], torch.full((3,), 3.0))  # what the caller held is a copy, not the static output
    assert cache.captures == 1
    cache.run("k", double, torch.ones(4), torch.ones(4))  # new shapes: a new graph
    cache.run("other", double, a, b)  # a new key: a third graph, the least recently used one goes
    assert cache.captures == 3 and len(cache) == 2
    cache.run("k", double, a, b)  # evicted: captured again
    assert cache.captures == 4 and len(cache) == 2


def test_graph_cache_runs_plainly_when_disabled_or_off_cuda():
    cache = GraphCache(enabled=False)
    assert torch.equal(cache.run("k", torch.add, torch.ones(2), torch.ones(2)), torch.full((2,), 2.0))
    assert len(cache) == 0 and cache.captures == 0
    assert len(GraphCache()._graphs) == 0 and not GraphCache()._capturable([torch.ones(1)])  # CPU tensors
    with pytest.raises(ValueError, match="max_graphs must be a positive integer, got 0"):
        GraphCache(max_graphs=0)


def test_graphed_modules_patch_only_the_instances_and_restore_them():
    model = tiny_llava(seed=1)
    tower = model.model.vision_tower
    pixels = torch.randn(1, 3, model.config.vision_config.image_size, model.config.vision_config.image_size)
    with torch.no_grad():
        ref = tower(pixels, output_hidden_states=True).hidden_states[-2]
        cache = GraphCache()
        with graphed_modules(cache, [tower]):
            assert "forward" in tower.__dict__  # the instance, not its class
            got = tower(pixels, output_hidden_states=True).hidden_states[-2]
        assert "forward" not in tower.__dict__
    torch.testing.assert_close(got, ref)


def _patched_prefill_records(model, inputs, method, opts):
    """Prefill logits (last position) and kept positions of each input on the fast path under a simulated capture,
    and how many graphs that took."""
    learnpruner.apply(model, method, fast=True, **opts)
    state = model._learnpruner
    out = []
    try:
        with torch.no_grad():
            for inp in inputs:
                logits = model(**inp, use_cache=True, logits_to_keep=1).logits
                out.append((logits, learnpruner.stats(model).kept_positions))
        drops = len(learnpruner.stats(model).schedule.drops)
    finally:
        learnpruner.remove(model)
    return out, state.graphs.captures, drops


REPLAY_CASES = [("learnpruner", {"tokens": 16, "lpm": "random"}), ("pyramiddrop", {"tokens": 30})]


@pytest.mark.parametrize("method,opts", REPLAY_CASES)
def test_replayed_segments_and_vision_give_the_second_prompt_its_own_answer(simulated_capture, method, opts):
    model = tiny_llava(seed=2)
    first, second = make_inputs(model, seed=0), make_inputs(model, seed=1)  # same shapes, other tokens and pixels
    replayed, captures, drops = _patched_prefill_records(model, [first, second], method, opts)
    # one graph for the vision tower and one per LLM segment, captured for the first prompt, replayed for the second
    assert drops >= 1 and captures == 1 + (1 + drops)
    for (logits, kept), inp in zip(replayed, (first, second)):
        learnpruner.apply(model, method, **opts)
        with torch.no_grad():
            plain = model(**inp, use_cache=True, logits_to_keep=1).logits
        kept_plain = learnpruner.stats(model).kept_positions
        learnpruner.remove(model)
        torch.testing.assert_close(logits, plain, atol=1e-5, rtol=1e-5)
        assert torch.equal(kept, kept_plain)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_prefill_equals_the_plain_path():
    model = tiny_llava(seed=5).cuda()
    inputs = [{k: v.cuda() for k, v in make_inputs(model, seed=s).items()} for s in (0, 1)]
    opts = {"tokens": 16, "lpm": "random"}
    learnpruner.apply(model, "learnpruner", fast=True, **opts)
    with torch.no_grad():
        quick = [model(**inp, use_cache=True, logits_to_keep=1).logits for inp in inputs]  # capture, then replay
    captures = model._learnpruner.graphs.captures
    learnpruner.remove(model)
    assert captures == 3  # the vision tower and the two LLM segments, captured once for both prompts
    learnpruner.apply(model, "learnpruner", **opts)
    with torch.no_grad():
        for inp, q in zip(inputs, quick):
            torch.testing.assert_close(q, model(**inp, use_cache=True, logits_to_keep=1).logits, atol=1e-4, rtol=1e-4)
    learnpruner.remove(model)


@pytest.mark.parametrize("method,opts", REPLAY_CASES)
def test_graph_keys_tell_a_fixed_selection_from_a_readout(simulated_capture, monkeypatch, method, opts):
    """A segment that ends at a readout layer returns that layer's q/k; under a fixed selection no readout runs.
    Each must have its own graph: keys are unique per schedule and readout. A forward under a fixed selection
    first, then a normal one (the order in which a shared key would replay the wrong graph), give the plain
    path's answer."""
    seen: dict = {}
    real_run = GraphCache.run

    def recording_run(self, key, fn, *args):
        out = real_run(self, key, fn, *args)
        sig = (key, tuple((tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else a for a in args))
        shape = pytree.tree_structure(out)
        assert seen.setdefault(sig, shape) == shape, f"graph key {key} serves two different segments"
        return out

    monkeypatch.setattr(GraphCache, "run", recording_run)
    model = tiny_llava(seed=2)
    inp = make_inputs(model, seed=0)
    learnpruner.apply(model, method, **opts)
    with torch.no_grad():
        plain = model(**inp, use_cache=True, logits_to_keep=1).logits
    st = learnpruner.stats(model)
    learnpruner.remove(model)
    learnpruner.apply(model, method, fast=True, **opts)
    try:
        with torch.no_grad(), learnpruner.fixed_selection(model, st.stage1_kept, st.llm_kept):
            fixed = model(**inp, use_cache=True, logits_to_keep=1).logits
        with torch.no_grad():
            normal = model(**inp, use_cache=True, logits_to_keep=1).logits
        kept = learnpruner.stats(model).kept_positions
    finally:
        learnpruner.remove(model)
    torch.testing.assert_close(fixed, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(normal, plain, atol=1e-5, rtol=1e-5)
    assert torch.equal(kept, st.kept_positions)
    readout_keys = {k[0] for k in seen if k[0][0] == "llm"}
    assert any(k[3] is None for k in readout_keys) and any(k[3] is not None for k in readout_keys)


def test_graph_cache_resets_what_a_warm_up_changed(simulated_capture):
    """The decode step advances its cache position as it runs; ``reset`` puts it back after capturing, so the
    first replay writes where the step would have (one capture path for prefill segments and decode)."""
    cache, position = GraphCache(max_graphs=1), torch.zeros((), dtype=torch.long)
    before = position.clone()

    def step(x):
        position.add_(1)
        return x * 2

    out = cache.run("decode", step, torch.ones(2), reset=lambda: position.copy_(before))
    assert torch.equal(out, torch.full((2,), 2.0)) and int(position) == 1  # captured, reset, then replayed once
