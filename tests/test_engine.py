"""The engine against the unmodified transformers model, on tiny random LLaVA configs."""

from __future__ import annotations

import pytest
import torch
from harness import check_batched_equals_single, check_cached_equals_stepwise, check_schedule_followed
from helpers import IMAGE_TOKEN, make_inputs, n_visual, tiny_llava

import learnpruner
from learnpruner.engine import SEGMENTS_ATTR

torch.set_num_threads(1)

# (text model, vision_feature_select_strategy, kv heads): GQA, Mistral, Qwen2, "full" strategy
SHAPES = [("llama", "default", 2), ("mistral", "full", 4), ("qwen2", "default", 1)]
PRUNING = [
    ("learnpruner", {"tokens": 16, "lpm": "random"}),
    ("fastv", {"tokens": 40}),
    ("random", {"tokens": 12, "seed": 3}),
]


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: "-".join(map(str, s)))
def model(request):
    text, strategy, kv = request.param
    return tiny_llava(text=text, strategy=strategy, kv_heads=kv)


@pytest.fixture(autouse=True)
def _unpatch(model):
    yield
    if learnpruner.is_pruned(model):
        learnpruner.remove(model)


def _full_budget(method, opts, n):
    opts = dict(opts)
    opts["tokens"] = n
    return method, opts


@torch.no_grad()
@pytest.mark.parametrize("method,opts", [("none", {})] + PRUNING)
def test_full_budget_is_identical_to_unpatched(model, method, opts):
    inp = make_inputs(model)
    ref = model(**inp).logits
    ref_gen = model.generate(**inp, max_new_tokens=4, do_sample=False)
    method, opts = _full_budget(method, opts, n_visual(model))
    learnpruner.apply(model, method, **opts)
    assert torch.equal(model(**inp).logits, ref)
    assert torch.equal(model.generate(**inp, max_new_tokens=4, do_sample=False), ref_gen)


@torch.no_grad()
@pytest.mark.parametrize("method,opts", PRUNING)
def test_remove_restores_identical_outputs(model, method, opts):
    inp = make_inputs(model)
    cls = type(model)
    ref = model(**inp).logits
    learnpruner.apply(model, method, **opts)
    assert not torch.equal(model(**inp).logits[:, -1], ref[:, -1])
    learnpruner.remove(model)
    assert type(model) is cls and not learnpruner.is_pruned(model)
    assert torch.equal(model(**inp).logits, ref)


@pytest.mark.parametrize("method,opts", PRUNING)
def test_each_layer_processes_the_scheduled_tokens(model, method, opts):
    learnpruner.apply(model, method, **opts)
    check_schedule_followed(model, make_inputs(model), opts["tokens"])


@pytest.mark.parametrize("method,opts", PRUNING[:2])
def test_batched_equals_per_sample(model, method, opts):
    learnpruner.apply(model, method, **opts)
    check_batched_equals_single(model, make_inputs(model, prompts_len=(4, 11), after=(6, 2)), new_tokens=4)


@pytest.mark.parametrize("method,opts", PRUNING)
def test_cached_generation_equals_stepwise_recomputation(model, method, opts):
    learnpruner.apply(model, method, **opts)
    check_cached_equals_stepwise(model, make_inputs(model), steps=5)


@torch.no_grad()
def test_decode_attends_to_exactly_the_kept_set(model):
    """The cache carries the compacted masks; later layers hold only stage-2 tokens."""
    inp = make_inputs(model)
    learnpruner.apply(model, "learnpruner", tokens=16, lpm="random")
    out = model(**inp, use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    st = learnpruner.stats(model)
    cached = getattr(cache, SEGMENTS_ATTR)
    n, s = n_visual(model), inp["input_ids"].shape[1]
    (start1, mask1), (start2, mask2) = cached.segments
    assert (start1, start2) == (0, st.schedule.layer)
    assert mask1.shape[1] == s - n + st.schedule.r1
    assert mask2.shape[1] == s - n + st.schedule.r2
    # same padding count as the prompt: compaction removed only visual tokens
    assert torch.equal(mask1.sum(1), inp["attention_mask"].sum(1) - n + st.schedule.r1)


@torch.no_grad()
def test_sampling_is_reproducible_and_kv_cache_optional(model):
    inp = make_inputs(model)
    learnpruner.apply(model, "learnpruner", tokens=16, lpm="random")
    torch.manual_seed(0)
    a = model.generate(**inp, max_new_tokens=4, do_sample=True, top_k=5)
    torch.manual_seed(0)
    b = model.generate(**inp, max_new_tokens=4, do_sample=True, top_k=5)
    assert torch.equal(a, b)
    d = model.generate(**inp, max_new_tokens=4, do_sample=False, use_cache=True)
    st = learnpruner.stats(model)
    # without a cache every step is a new prefill; over the same kept sets it gives the same tokens
    with learnpruner.fixed_selection(model, st.stage1_kept, st.stage2_kept):
        c = model.generate(**inp, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(c, d)


@torch.no_grad()
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("rule", ["text", "last"])
def test_stage2_scores_equal_eager_attention_probabilities(impl, rule):
    model = tiny_llava(attn=impl, seed=1)
    ref = tiny_llava(attn="eager", seed=1)
    inp = make_inputs(model, seed=2)
    n = n_visual(model)
    layer = 3
    if rule == "text":
        learnpruner.apply(model, "learnpruner", tokens=8, lpm="random", r1=n, r2=6, layer=layer)
    else:
        learnpruner.apply(model, "fastv", tokens=8, r2=6, layer=layer)
    model(**inp)
    scores = learnpruner.stats(model).stage2_scores
    probs = ref(**inp, output_attentions=True).attentions[layer - 1].float()  # [b, h, s, s]
    ids, mask = inp["input_ids"], inp["attention_mask"].bool()
    for i in range(ids.shape[0]):
        is_img = ids[i] == IMAGE_TOKEN
        last_img = int(is_img.nonzero().max())
        rows = torch.arange(ids.shape[1])
        q = (rows > last_img) & mask[i] if rule == "text" else rows == ids.shape[1] - 1
        expected = probs[i][:, q][:, :, is_img].mean(dim=(0, 1))
        torch.testing.assert_close(scores[i], expected, atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_right_padding_forward_matches_per_sample():
    model = tiny_llava(seed=4)
    inp = make_inputs(model, padding="right")
    learnpruner.apply(model, "learnpruner", tokens=16, lpm="random")
    out = model(**inp)
    pos = learnpruner.stats(model).kept_positions
    for i in range(2):
        real = inp["attention_mask"][i].bool()
        single = {k: v[i:i + 1, real] for k, v in inp.items() if k != "pixel_values"}
        single["pixel_values"] = inp["pixel_values"][i:i + 1]
        ref = model(**single).logits[0]
        rows = (pos[i] >= 0) & real[pos[i].clamp(min=0)]
        torch.testing.assert_close(out.logits[i, rows], ref, atol=1e-4, rtol=1e-4)


def test_two_models_pruned_differently_in_one_process():
    a, b = tiny_llava(seed=5), tiny_llava(seed=5)
    inp = make_inputs(a)
    learnpruner.apply(a, "learnpruner", tokens=16, lpm="random")
    learnpruner.apply(b, "fastv", tokens=40)
    with torch.no_grad():
        a(**inp)
        b(**inp)
    assert learnpruner.stats(a).tokens_per_layer[0] == learnpruner.stats(a).schedule.r1
    assert learnpruner.stats(b).stage1_kept is None
    c = tiny_llava(seed=5)
    assert not learnpruner.is_pruned(c) and type(c) is not type(a)


def test_labels_give_a_loss_on_the_pruned_sequence():
    model = tiny_llava(seed=6)
    inp = make_inputs(model, padding="right")
    labels = inp["input_ids"].masked_fill(inp["input_ids"] == IMAGE_TOKEN, -100)
    labels = labels.masked_fill(inp["attention_mask"] == 0, -100)
    ref = model(**inp, labels=labels).loss
    learnpruner.apply(model, "learnpruner", tokens=16, lpm="random")
    with torch.no_grad():
        loss = model(**inp, labels=labels).loss
    assert torch.isfinite(loss) and loss > 0
    learnpruner.remove(model)
    learnpruner.apply(model, "learnpruner", tokens=n_visual(model), lpm="random")
    torch.testing.assert_close(model(**inp, labels=labels).loss, ref)


def test_static_cache_is_refused_clearly():
    model = tiny_llava(layers=4, seed=8)
    learnpruner.apply(model, "learnpruner", tokens=16, lpm="random")
    with pytest.raises(ValueError, match="needs a DynamicCache.*StaticCache"):
        model.generate(**make_inputs(model), max_new_tokens=2, cache_implementation="static")


@torch.no_grad()
def test_forward_time_vision_options_reach_the_tower():
    """``vision_feature_layer`` given to the forward (an adapter's ``vision_options``) steers the pruned model's
    tower as it steers the unmodified one: at a budget that keeps every token the logits match, and differ from
    the default layer's."""
    model = tiny_llava(seed=3)
    inp = make_inputs(model)
    ref_last = model(**inp, vision_feature_layer=-1).logits
    ref_default = model(**inp).logits
    learnpruner.apply(model, "random", tokens=n_visual(model))
    try:
        got = model(**inp, vision_feature_layer=-1).logits
    finally:
        learnpruner.remove(model)
    torch.testing.assert_close(got, ref_last, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, ref_default, atol=1e-3)
