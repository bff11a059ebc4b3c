"""DART, PyramidDrop and SparseVLM: selection rules on hand tensors, then the engine harness."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from harness import check_batched_equals_single, check_cached_equals_stepwise, check_schedule_followed
from helpers import IMAGE_TOKEN, make_inputs, n_visual, tiny_llava

import learnpruner
from learnpruner.methods import get_method
from learnpruner.peers.llm import (
    dart_keep,
    dpc_knn_merge,
    recycle_counts,
    sparsevlm_scores,
    sparsevlm_select,
    text_raters,
)
from learnpruner.rules import LLM_RULES, LLMContext, LLMRule
from learnpruner.selection import topk_sorted

torch.set_num_threads(1)

PEERS = [
    ("dart", {"tokens": 24}),
    ("pyramiddrop", {"tokens": 30}),
    ("sparsevlm", {"tokens": 20}),
]


# --------------------------------------------------------------------------------------------------
# selection rules on hand-built tensors


def test_dart_keeps_pivots_and_least_duplicated_tokens():
    # 6 visual tokens in 2D; token 0 has the largest key norm (the image pivot)
    vis = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0], [0.7, 0.7], [1.0, 0.05]])
    norm = torch.tensor([5.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    avail = torch.ones(6, dtype=torch.bool)
    # one image pivot, no text: the 2 tokens least similar to token 0 are 3 (cos -1) and 2 (cos 0)
    assert dart_keep(vis, norm, avail, 3, pivot_image=1, pivot_text=0).tolist() == [0, 2, 3]
    # a text pivot along +y: it takes the token least similar to it among those left (3 goes first to pivot 0)
    text, tnorm = torch.tensor([[0.0, 1.0], [5.0, 5.0]]), torch.tensor([3.0, 1.0])
    kept = dart_keep(vis, norm, avail, 3, text, tnorm, pivot_image=1, pivot_text=1)
    assert kept.tolist() == [0, 3, 5]  # pivot 0 -> 3 (cos -1); text pivot (0, 1) -> 5 (cos 0.05) over 1 (0.11)
    # absent tokens are never chosen, and k is capped by what is present
    avail[3] = False
    assert 3 not in dart_keep(vis, norm, avail, 4, pivot_image=1, pivot_text=0).tolist()
    assert len(dart_keep(vis, norm, avail, 10, pivot_image=1, pivot_text=0)) == 5


def _dart_ctx(keys: torch.Tensor | None, **options) -> LLMContext:
    """One sample: 4 visual tokens then one instruction token; hidden rows in 2D (the final norm is the identity)."""
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-0.6, -0.8], [0.7, 0.7], [0.0, 1.0]]])
    vis = torch.tensor([[0, 1, 2, 3, -1]])
    img = torch.tensor([[0, 0, 0, 0, -1]])
    options = {**get_method("dart").defaults(8), **options}  # a plan's options: every one resolved
    adapter = SimpleNamespace(language_model=SimpleNamespace(norm=torch.nn.Identity()))
    return LLMContext(hidden, vis, img, None, None, 1, 4, 2, options, adapter, input_embeds=hidden, keys=keys)


def test_dart_pivots_follow_the_l1_norm_of_the_previous_layers_keys():
    assert LLM_RULES["dart"].keys and LLM_RULES["dart"].query is None  # the engine hands it layer K-1's keys
    rule = LLM_RULES["dart"].fn
    # keys [b=1, kv_heads=2, s=5, head_dim=3]: token 0 has one large entry in head 0 (L1 10, L2 10); token 1 is
    # spread over both heads with negative entries (L1 12, L2 4.9): by the L1 norm over all heads token 1 is
    # the pivot, by L2 or by head 0 alone it would be token 0
    keys = torch.zeros(1, 2, 5, 3)
    keys[0, 0, 0] = torch.tensor([10.0, 0.0, 0.0])
    keys[0, :, 1] = -2.0
    keys[0, :, 2:4] = 0.5
    # one image pivot: token 1 (0, 1) is kept with the token least similar to it, 2 (cos -0.8)
    assert rule(_dart_ctx(keys, pivot_image=1, pivot_text=0), 2).kept.tolist() == [[1, 2]]
    keys[0, 1, 0] = 3.0  # token 0 now leads (L1 19): it pivots, and 2 (cos -0.6) is the least similar to it
    assert rule(_dart_ctx(keys, pivot_image=1, pivot_text=0), 2).kept.tolist() == [[0, 2]]
    keys[0, :, 3] = 5.0  # token 3 (0.7, 0.7) leads: 2 is the least similar (cos -0.99), then 0/1 are not needed
    assert rule(_dart_ctx(keys, pivot_image=1, pivot_text=0), 2).kept.tolist() == [[2, 3]]
    # the instruction token's key norm makes it a text pivot: with 2 pivots and k=3 the text pivot (0, 1)
    # takes the least similar remaining token
    keys[0, :, 4] = 1.0
    assert rule(_dart_ctx(keys, pivot_image=1, pivot_text=1), 3).kept.tolist() == [[0, 2, 3]]
    with pytest.raises(RuntimeError, match="keys=True"):
        rule(_dart_ctx(None), 2)


def test_pyramiddrop_stages_and_last_token_ranking():
    m = get_method("pyramiddrop")
    assert m.stage2 == "last"
    official = m.schedule(270, 576, 32, {})
    assert official.drops == ((8, 288), (16, 144), (24, 72))  # lambda = 0.5
    assert m.schedule(1, 576, 32, {"lam": 0.5}).drops == official.drops
    for t in (192, 200, 400):
        s = m.schedule(t, 576, 32, {})
        assert [layer for layer, _ in s.drops] == [8, 16, 24] and abs(s.average - t) <= 0.5
    assert [layer for layer, _ in m.schedule(40, 64, 8, {}).drops] == [2, 4, 6]  # scaled with depth
    with pytest.raises(ValueError, match="at least 145"):
        m.schedule(128, 576, 32, {})
    assert abs(m.schedule(64, 576, 32, {"layers": (2, 8, 16)}).average - 64) <= 0.5


def test_text_raters_pick_instruction_tokens_related_to_the_image():
    vis = torch.tensor([[4.0, 0.0], [3.0, 0.0], [5.0, 0.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.0], [0.0, -1.0]])
    assert text_raters(vis, text).tolist() == [True, False, True, False]
    assert text_raters(vis, torch.zeros(0, 2)).numel() == 0


def _sparsevlm_ctx(state, layer, present, text_embeds, attention, scratch=None) -> LLMContext:
    """One sample: the present visual tokens (of 4, input embeddings along +x) then 2 instruction tokens."""
    m = len(present)
    vis = torch.tensor([present + [-1, -1]])
    img = torch.tensor([[0] * m + [-1, -1]])
    embeds = torch.cat([torch.tensor([[4.0, 0.0], [3.0, 0.0], [5.0, 0.0], [4.0, 0.0]])[present], text_embeds])[None]
    attention = torch.tensor(attention)[None]  # [1, q=2, s]
    scores = torch.full((1, 4), float("-inf"))
    scores[0, present] = attention[0, :, :m].mean(0)  # the engine's mean over every query row
    return LLMContext(torch.randn(1, m + 2, 2), vis, img, None, scores, 1, 4, layer, state.options, input_embeds=embeds,
                      attention=attention, query_index=torch.tensor([[m, m + 1]]),
                      query_valid=torch.ones(1, 2, dtype=torch.bool), scratch={} if scratch is None else scratch)


def test_sparsevlm_scores_with_the_text_raters_attention():
    rule = LLM_RULES["sparsevlm"].fn
    state = SimpleNamespace(options={"recycle": False})
    toward, away = torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), torch.tensor([[-1.0, 0.0], [1.0, 0.0]])
    # instruction row 0 looks at visual 1 and 2, row 1 at 0 and 3; averaged over both rows 0 and 3 lead
    att = [[0.1, 0.3, 0.25, 0.05, 0.2, 0.0], [0.4, 0.0, 0.0, 0.5, 0.05, 0.05]]
    ctx = _sparsevlm_ctx(state, 3, [0, 1, 2, 3], toward, att)
    assert topk_sorted(ctx.scores, 2).tolist() == [[0, 3]]
    # row 0's input embedding points at the image (+x): it is the only rater, and its attention decides
    assert text_raters(ctx.input_embeds[0, :4], ctx.input_embeds[0, 4:]).tolist() == [True, False]
    torch.testing.assert_close(sparsevlm_scores(ctx)[0], torch.tensor(att[0][:4]))
    assert rule(ctx, 2).kept.tolist() == [[1, 2]]
    # the same attention with the embeddings swapped: row 1 rates
    forward = {}  # what the drops of one forward share
    assert rule(_sparsevlm_ctx(state, 3, [0, 1, 2, 3], away, att, forward), 2).kept.tolist() == [[0, 3]]
    # as official the raters are chosen once per forward, at the first drop, and reused at the later ones:
    # at layer 7 (visual 1, 2, 3 left) the embeddings would make row 0 rate again, but row 1 still does
    att2 = [[0.3, 0.05, 0.2, 0.4, 0.05], [0.0, 0.6, 0.0, 0.3, 0.1]]
    assert rule(_sparsevlm_ctx(state, 7, [1, 2, 3], toward, att2, forward), 2).kept.tolist() == [[1, 2]]  # row 1
    # a new forward chooses them afresh
    forward = {}
    assert rule(_sparsevlm_ctx(state, 3, [0, 1, 2, 3], toward, att, forward), 2).kept.tolist() == [[1, 2]]
    assert rule(_sparsevlm_ctx(state, 7, [1, 2, 3], toward, att2, forward), 2).kept.tolist() == [[1, 3]]  # row 0


def test_sparsevlm_recycles_pruned_tokens_into_kept_slots():
    assert recycle_counts(576, 300) == (291, 9)  # 276 pruned -> 83 recycled -> 9 merged, as official
    assert recycle_counts(10, 10) == (10, 0)
    torch.manual_seed(0)
    n = 40
    rows = torch.randn(n, 8)
    scores = torch.arange(n, dtype=torch.float)  # later tokens score higher
    scores[:3] = float("-inf")  # already pruned
    kept, replace, mask = sparsevlm_select(scores, rows, 12)
    k, c = recycle_counts(37, 12)
    assert (k, c) == (11, 1) and kept.shape == (12,) and int(mask.sum()) == c
    assert torch.all(kept.diff() > 0) and not bool(torch.isin(kept, torch.arange(3)).any())
    top = set(range(n - k, n))
    assert set(kept[~mask].tolist()) == top  # the top-k by score keep their own rows
    assert torch.equal(replace[~mask], rows[kept[~mask]])
    # the merged token is the mean of the recycled pool (top 30% of the pruned by score), at a pool member
    pool = list(range(n - k - (int(0.3 * (37 - k)) + 1), n - k))
    assert kept[mask].item() in pool
    torch.testing.assert_close(replace[mask][0], rows[pool].mean(0))
    # no recycling: plain top-k
    kept2, rep2, _ = sparsevlm_select(scores, rows, 12, recycle=False)
    assert rep2 is None and kept2.tolist() == list(range(n - 12, n))


def test_dpc_knn_merge_separates_clusters():
    x = torch.cat([torch.zeros(5, 3), torch.full((4, 3), 10.0)]) + torch.linspace(0, 0.1, 9)[:, None]
    centers, merged = dpc_knn_merge(x, 2)
    assert sorted(c < 5 for c in centers.tolist()) == [False, True]
    torch.testing.assert_close(merged[centers < 5][0], x[:5].mean(0))
    torch.testing.assert_close(merged[centers >= 5][0], x[5:].mean(0))


def test_reached_averages_for_llava_shape():
    for name, expected in (("dart", [192, 128, 64]), ("sparsevlm", [192, 128, 64]), ("pyramiddrop", [192])):
        for t in expected:
            assert abs(get_method(name).schedule(t, 576, 32, {}).average - t) <= 0.5
    for name in ("dart", "sparsevlm"):
        with pytest.raises(ValueError):
            get_method(name).schedule(32, 576, 32, {})


# --------------------------------------------------------------------------------------------------
# the engine harness on tiny random LLaVA models


@pytest.fixture(scope="module")
def model():
    return tiny_llava(layers=8, kv_heads=2)


@pytest.fixture(autouse=True)
def _unpatch(model):
    yield
    if learnpruner.is_pruned(model):
        learnpruner.remove(model)


@torch.no_grad()
@pytest.mark.parametrize("method", [m for m, _ in PEERS])
def test_full_budget_is_identical_to_unpatched(model, method):
    inp = make_inputs(model)
    ref = model(**inp).logits
    ref_gen = model.generate(**inp, max_new_tokens=3, do_sample=False)
    learnpruner.apply(model, method, tokens=n_visual(model))
    assert torch.equal(model(**inp).logits, ref)
    assert torch.equal(model.generate(**inp, max_new_tokens=3, do_sample=False), ref_gen)


@pytest.mark.parametrize("method,opts", PEERS)
def test_each_layer_processes_the_scheduled_tokens(model, method, opts):
    learnpruner.apply(model, method, **opts)
    st = check_schedule_followed(model, make_inputs(model), opts["tokens"])
    assert len(st.llm_kept) == len(st.schedule.drops)


@pytest.mark.parametrize("method,opts", [PEERS[0], PEERS[1], ("sparsevlm", {"tokens": 20, "recycle": False})])
def test_cached_generation_equals_stepwise_recomputation(model, method, opts):
    learnpruner.apply(model, method, **opts)
    check_cached_equals_stepwise(model, make_inputs(model))


@pytest.mark.parametrize("method,opts", PEERS)
def test_batched_equals_per_sample(model, method, opts):
    inp = make_inputs(model, prompts_len=(4, 11), after=(6, 2))
    learnpruner.apply(model, method, **opts)
    # DART ranks pivots by the L1 norm of keys after RoPE, which (unlike attention) depends on absolute
    # positions: a left-padded batch must carry the positions each sample has on its own
    pos = (inp["attention_mask"].cumsum(-1) - 1).clamp(min=0) if method == "dart" else None
    check_batched_equals_single(model, inp, position_ids=pos)


@torch.no_grad()
def test_sparsevlm_recycled_rows_enter_the_sequence(model):
    """One unpadded prompt: the input of the first drop layer is the previous layer's output at the kept
    positions, except exactly the recycled slots, which hold merged rows; the cache keeps them."""
    inp = make_inputs(model, prompts_len=(6,), after=(5,))
    learnpruner.apply(model, "sparsevlm", tokens=20)
    layers = model.model.language_model.layers
    first = get_method("sparsevlm").schedule(20, n_visual(model), len(layers), {}).drops[0][0]
    seen = {}
    h1 = layers[first - 1].register_forward_hook(
        lambda m, a, o: seen.__setitem__("prev", o[0] if isinstance(o, tuple) else o)
    )
    h2 = layers[first].register_forward_pre_hook(
        lambda m, args, kw: seen.__setitem__("next", args[0] if args else kw["hidden_states"]), with_kwargs=True
    )
    out = model(**inp, use_cache=True)
    h1.remove()
    h2.remove()
    st = learnpruner.stats(model)
    ids = inp["input_ids"][0]
    is_img = ids == IMAGE_TOKEN
    vis = torch.cumsum(is_img.long(), 0) - 1
    keep = ~is_img.clone()
    keep[is_img] = torch.isin(vis[is_img], st.llm_kept[0][0])
    prev, nxt = seen["prev"][0, keep], seen["next"][0]
    differs = (prev - nxt).abs().amax(-1) > 0
    m = int(is_img.sum())
    _, c = recycle_counts(m, st.schedule.drops[0][1])
    assert c >= 1 and int(differs.sum()) == c and bool(is_img[keep][differs].all())
    # decoding continues from the cache built with the recycled rows
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    nxt_ids = out.logits[:, -1].argmax(-1, keepdim=True)
    step = model(input_ids=nxt_ids, attention_mask=torch.ones(1, ids.numel() + 1, dtype=torch.long),
                 past_key_values=cache, use_cache=True)
    assert torch.isfinite(step.logits).all()


@torch.no_grad()
def test_rules_read_the_previous_layers_keys_and_the_llm_input(model, monkeypatch):
    """In the engine, DART's ctx.keys are layer K-1's keys after RoPE and SparseVLM's ctx.input_embeds are the
    LLM's input embeddings (what their raters and pivots are computed from)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    inp = make_inputs(model, prompts_len=(6,), after=(5,))
    lm = model.model.language_model
    seen = {}
    for name in ("dart", "sparsevlm"):
        orig = LLM_RULES[name]

        def spy(ctx, k, fn=orig.fn):
            seen.setdefault("ctx", ctx)
            return fn(ctx, k)

        monkeypatch.setitem(LLM_RULES, name, LLMRule(spy, orig.query, orig.keys))
        tokens = 24 if name == "dart" else 20
        learnpruner.apply(model, name, tokens=tokens)
        first = get_method(name).schedule(tokens, n_visual(model), len(lm.layers), {}).drops[0][0]
        h0 = lm.layers[0].register_forward_pre_hook(
            lambda m, args, kw: seen.__setitem__("in", args[0] if args else kw["hidden_states"]), with_kwargs=True)
        hk = lm.layers[first - 1].self_attn.k_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("k", o))
        seen.pop("ctx", None)
        model(**inp)
        h0.remove()
        hk.remove()
        learnpruner.remove(model)
        ctx = seen["ctx"]
        assert ctx.layer == first
        assert torch.equal(ctx.input_embeds, seen["in"])
        if name == "dart":
            hd = lm.layers[0].self_attn.head_dim
            k = seen["k"].view(1, seen["k"].shape[1], -1, hd).transpose(1, 2)
            cos, sin = lm.rotary_emb(k, torch.arange(k.shape[2])[None])
            torch.testing.assert_close(ctx.keys, apply_rotary_pos_emb(k, k, cos, sin)[1])
        else:
            assert ctx.attention.shape == (1, 5, ctx.hidden.shape[1]) and bool(ctx.query_valid.all())
