"""Stage-1 peer methods (VisionZip, VisPruner, DivPrune, CDPruner) and LearnPruner's ablations."""

from __future__ import annotations

import math

import pytest
import torch
from harness import check_batched_equals_single, check_cached_equals_stepwise, check_schedule_followed
from helpers import IMAGE_TOKEN, make_inputs, n_visual, tiny_llava

import learnpruner
from learnpruner import selection as sel
from learnpruner.peers import vision_select as vs

torch.set_num_threads(1)

PEERS = [
    ("visionzip", {"tokens": 12}),
    ("vispruner", {"tokens": 12}),
    ("divprune", {"tokens": 12}),
    ("cdpruner", {"tokens": 12}),
    ("lpm-only", {"tokens": 12, "lpm": "random"}),
    ("scope", {"tokens": 12}),
    ("mmr", {"tokens": 12, "lpm": "random"}),
    ("learnpruner-set", {"tokens": 12, "lpm": "random"}),
    ("cls-text", {"tokens": 16}),
    ("text-only", {"tokens": 40}),
]
IDS = [m for m, _ in PEERS]
MERGING = {"visionzip"}  # merged rows are not replayed by fixed_selection
SHAPES = [("llama", "default", 2), ("mistral", "full", 4)]


# --- the selection rules on hand-built examples ---------------------------------------------------------


@pytest.mark.parametrize("tokens,split", [(64, (54, 10)), (128, (108, 20)), (192, (162, 30)), (32, (27, 5))])
def test_visionzip_split_follows_the_official_ratio(tokens, split):
    assert vs.visionzip_split(tokens) == split
    assert vs.visionzip_split(12, contextual=0) == (12, 0)


def test_visionzip_keeps_dominant_tokens_and_merges_the_rest_into_uniform_targets():
    feats = torch.tensor([[1, 0], [2, .1], [5, 5], [3, 0], [0, 1], [6, 6], [.1, 2], [0, 4]], dtype=torch.float)[None]
    scores = torch.tensor([[0.1, 0.1, 0.9, 0.1, 0.1, 0.8, 0.1, 0.1]])
    # dominant {2, 5}; remaining [0, 1, 3, 4, 6, 7], stride 6 // 2 = 3 -> targets 0 and 4;
    # 1 and 3 are closest to 0, 6 and 7 to 4
    kept, rep, mask = vs.visionzip_select(scores, feats, feats, 2, 2)
    assert kept.tolist() == [[0, 2, 4, 5]] and mask.tolist() == [[True, False, True, False]]
    torch.testing.assert_close(rep[0, 0], torch.tensor([1 + 2.5, 0.05]))  # official: target + mean(assigned)
    torch.testing.assert_close(rep[0, 2], torch.tensor([0.05, 1 + 3.0]))
    _, rep, _ = vs.visionzip_select(scores, feats, feats, 2, 2, merge="mean")
    torch.testing.assert_close(rep[0, 0], torch.tensor([2.0, 0.1 / 3]))
    torch.testing.assert_close(rep[0, 2], torch.tensor([0.1 / 3, 7 / 3]))
    # +inf forces a token (the official code always keeps [CLS]); the metric decides the assignment
    forced = scores.clone()
    forced[0, 7] = float("inf")
    kept, _, _ = vs.visionzip_select(forced, feats, feats, 2, 2)
    assert 7 in kept[0].tolist() and 5 not in kept[0].tolist()
    with pytest.raises(ValueError, match="merge"):
        vs.visionzip_select(scores, feats, feats, 2, 2, merge="sum")


def test_vispruner_keeps_important_tokens_and_removes_duplicates_of_the_rest():
    feats = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 0, 0], [1, .01, 0], [0, 0, 1], [0, 1, 0],
                          [.01, 1, 0]], dtype=torch.float)[None]
    scores = torch.arange(8, 0, -1, dtype=torch.float)[None]
    # 3 important (0, 1, 2); residual 3..7 -> A = {3, 5, 7}, B = {4, 6}: 3 and 7 duplicate B and go
    assert vs.vispruner_select(scores, feats, 6, 0.5).tolist() == [[0, 1, 2, 4, 5, 6]]
    assert vs.vispruner_select(scores, feats, 6, 1.0).tolist() == [[0, 1, 2, 3, 4, 5]]
    g = torch.Generator().manual_seed(0)
    f, s = torch.randn(2, 61, 5, generator=g), torch.rand(2, 61, generator=g)
    for k in (1, 7, 30, 60):
        kept = vs.vispruner_select(s, f, k, 0.5)
        assert kept.shape == (2, k) and torch.all(kept.diff(dim=1) > 0)
        top = sel.topk_sorted(s, int(k * 0.5))
        assert all(set(t.tolist()) <= set(r.tolist()) for t, r in zip(top, kept))


def test_divprune_starts_from_the_most_isolated_token_then_max_min():
    # unit vectors at 0, 2, 4, 179, 180 and 100 degrees: 100 has the farthest nearest neighbour (79 deg)
    angles = torch.tensor([0.0, 2.0, 4.0, 179.0, 180.0, 100.0]) * math.pi / 180
    feats = torch.stack([angles.cos(), angles.sin()], dim=-1)[None]
    assert vs.divprune_first(feats).tolist() == [5]
    # then 0 (least similar to 100), then 180 (least similar to {0, 100}), then 4
    assert vs.divprune_select(feats, 1).tolist() == [[5]]
    assert vs.divprune_select(feats, 3).tolist() == [[0, 4, 5]]
    assert vs.divprune_select(feats, 4).tolist() == [[0, 2, 4, 5]]
    # the generic start (lowest mean similarity) would pick 180 degrees instead
    assert sel.maxmin_extend(feats, torch.zeros(1, 0, dtype=torch.long), 1).tolist() == [[4]]


def test_dpp_greedy_picks_the_largest_marginal_determinant():
    kernel = torch.tensor([[1.0, 0.9, 0.0], [0.9, 1.0, 0.0], [0.0, 0.0, 0.5]])[None]
    # first the largest diagonal (0, ties to the lower index); then 2 (gain 0.5) beats 1 (gain 1 - 0.81)
    assert vs.dpp_greedy(kernel, 2).tolist() == [[0, 2]]
    assert vs.dpp_greedy(kernel, 3).tolist() == [[0, 1, 2]]
    # against a brute-force greedy on log-determinants
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 20, generator=g, dtype=torch.float64)
    rel = torch.rand(12, generator=g, dtype=torch.float64) + 0.1
    L = vs.conditional_kernel(x[None], rel[None])[0].double()
    chosen = []
    for _ in range(6):
        gains = [torch.logdet(L[chosen + [j]][:, chosen + [j]]) if j not in chosen else -math.inf for j in range(12)]
        chosen.append(int(torch.tensor(gains).argmax()))
    assert vs.dpp_greedy(L[None], 6).tolist() == [sorted(chosen)]
    # a rank-deficient kernel still yields k distinct tokens
    low = vs.conditional_kernel(torch.randn(1, 10, 2, generator=g), torch.ones(1, 10))
    assert vs.dpp_greedy(low, 10).tolist() == [list(range(10))]
    # ... and past the rank, by quality: rank 2, so 2 greedy picks, then the largest relevances
    feats = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0], [1.0, 1.0], [1.0, -1.0]]])
    rel = torch.tensor([[0.3, 0.2, 1.0, 0.9, 0.5, 0.4]])
    kern = vs.conditional_kernel(feats, rel)
    first2 = vs.dpp_greedy(kern, 2)[0].tolist()
    assert first2 == [2, 3]  # the two most relevant, nearly orthogonal tokens
    assert vs.dpp_greedy(kern, 4).tolist() == [[2, 3, 4, 5]]  # then 0.5 and 0.4, not the remaining gains' noise
    # a wide, rank-64 kernel at CDPruner's scale: 192 distinct tokens (float32 used to repeat some)
    x = torch.randn(2, 576, 64, generator=g)
    kern = vs.conditional_kernel(x, vs.normalize_relevance(torch.randn(2, 576, generator=g)))
    assert all(len(set(row)) == 192 for row in vs.dpp_greedy(kern, 192).tolist())


def test_scope_picks_by_saliency_times_coverage_gain():
    # three near-duplicates of one direction, two of another, one orthogonal token
    feats = torch.tensor([[1, 0, 0], [1, .05, 0], [1, 0, .05], [0, 1, 0], [0, 1, .05], [0, 0, 1]], dtype=torch.float)
    feats = feats[None]
    # without saliency: the first pick covers the largest cluster, then the next largest
    first = vs.scope_select(feats, 1)[0].tolist()
    assert first[0] in (0, 1, 2)
    two = vs.scope_select(feats, 2)[0].tolist()
    assert two[1] in (3, 4)
    # saliency on the lone token wins the first pick (gain 1 * 10 > gain ~3 * 1)
    sal = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 10.0]])
    assert 5 in vs.scope_select(feats, 1, sal)[0].tolist()
    # alpha = 0 ignores saliency
    assert vs.scope_select(feats, 1, sal, alpha=0.0).tolist() == vs.scope_select(feats, 1).tolist()
    # against a brute-force greedy on the coverage-gain objective
    g = torch.Generator().manual_seed(2)
    f, s = torch.randn(1, 15, 4, generator=g), torch.rand(1, 15, generator=g)
    sim = torch.nn.functional.normalize(f[0], dim=-1) @ torch.nn.functional.normalize(f[0], dim=-1).T
    cover, chosen = torch.zeros(15), []
    for _ in range(5):
        gain = (sim - cover[:, None]).clamp(min=0).sum(0) * s[0]
        gain[chosen] = -math.inf
        j = int(gain.argmax())
        chosen.append(j)
        cover = torch.maximum(cover, sim[j])
    assert vs.scope_select(f, 5, s).tolist() == [sorted(chosen)]
    with pytest.raises(ValueError, match="k must be"):
        vs.scope_select(f, 16)


def test_mmr_starts_from_the_most_important_then_trades_importance_for_novelty():
    feats = torch.tensor([[1, 0], [1, .01], [0, 1], [.7, .7]], dtype=torch.float)[None]
    imp = torch.tensor([[1.0, 0.95, 0.5, 0.0]])
    assert vs.mmr_select(feats, imp, 1).tolist() == [[0]]
    # 1 is nearly as important as 0 but a duplicate: 0.5 * 0.95 - 0.5 * 1.0 < 0.5 * 0.5 - 0.5 * 0.0
    assert vs.mmr_select(feats, imp, 2).tolist() == [[0, 2]]
    # lam = 1: importance alone (top-k); lam = 0: after the first, novelty alone
    assert vs.mmr_select(feats, imp, 2, lam=1.0).tolist() == [[0, 1]]
    assert vs.mmr_select(feats, imp, 3, lam=0.0).tolist() == [[0, 2, 3]]
    with pytest.raises(ValueError, match="lam"):
        vs.mmr_select(feats, imp, 2, lam=1.5)


def test_relevance_normalisation_and_theta():
    r = vs.normalize_relevance(torch.tensor([[-1.0, 0.0, 1.0], [2.0, 2.0, 2.0]]))
    torch.testing.assert_close(r[0], torch.tensor([1e-6 / 2, 0.5 + 5e-7, 1.0 + 5e-7]))
    assert torch.all(torch.isfinite(r[1]))
    e = vs.normalize_relevance(torch.tensor([[0.0, 1.0]]), theta=0.5)
    torch.testing.assert_close(e, torch.exp(0.5 * torch.tensor([[1e-6, 1.0 + 1e-6]])))
    # relevance scales the kernel: a relevant token beats an equally diverse irrelevant one
    feats = torch.eye(3)[None]
    assert vs.dpp_greedy(vs.conditional_kernel(feats, torch.tensor([[0.2, 1.0, 0.5]])), 1).tolist() == [[1]]


def test_text_only_schedule_and_validation():
    m = learnpruner.get_method("text-only")
    s = m.schedule(300, 576, 32, {})
    assert s.layer == 12 and abs(s.average - 300) < 1 and s.r1 is None
    with pytest.raises(ValueError, match="at least 217"):
        m.schedule(64, 576, 32, {})
    assert m.schedule(64, 576, 32, {"layer": 2}).r2 == 30
    model = tiny_llava()
    for method, bad in (("visionzip", {"merge": "x"}), ("visionzip", {"contextual": 99}),
                        ("vispruner", {"important_ratio": 2}), ("cdpruner", {"theta": 1.0}),
                        ("divprune", {"features": "x"}), ("cls-text", {"diversity": 0.1})):
        with pytest.raises(ValueError):
            learnpruner.apply(model, method, tokens=12, **bad)
        assert not learnpruner.is_pruned(model)


def test_every_method_documents_paper_and_defaults():
    for name, _ in PEERS:
        doc = learnpruner.get_method(name).doc
        assert len(doc) > 200, name
    for name, cite in (("visionzip", "CVPR 2025"), ("vispruner", "ICCV 2025"), ("divprune", "CVPR 2025"),
                       ("cdpruner", "2025"), ("lpm-only", "2604.23950"), ("scope", "NeurIPS 2025"),
                       ("mmr", "2602.13315")):
        assert cite in learnpruner.get_method(name).doc


# --- the shared harness on tiny random LLaVA models ------------------------------------------------------


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: "-".join(map(str, s)))
def model(request):
    text, strategy, kv = request.param
    return tiny_llava(text=text, strategy=strategy, kv_heads=kv)


@pytest.fixture(autouse=True)
def _unpatch():
    yield
    for m in list(_APPLIED):
        if learnpruner.is_pruned(m):
            learnpruner.remove(m)
    _APPLIED.clear()


_APPLIED: list = []


def _apply(model, method, opts):
    _APPLIED.append(model)
    return learnpruner.apply(model, method, **opts)


@torch.no_grad()
@pytest.mark.parametrize("method,opts", PEERS, ids=IDS)
def test_full_budget_is_identical_to_unpatched(model, method, opts):
    inp = make_inputs(model)
    ref = model(**inp).logits
    ref_gen = model.generate(**inp, max_new_tokens=3, do_sample=False)
    _apply(model, method, {**opts, "tokens": n_visual(model)})
    assert torch.equal(model(**inp).logits, ref)
    assert torch.equal(model.generate(**inp, max_new_tokens=3, do_sample=False), ref_gen)


@pytest.mark.parametrize("method,opts", PEERS, ids=IDS)
def test_each_layer_processes_the_scheduled_tokens(model, method, opts):
    _apply(model, method, opts)
    st = check_schedule_followed(model, make_inputs(model), opts["tokens"])
    if method == "visionzip" and model.config.vision_feature_select_strategy == "full":
        assert torch.all(st.stage1_kept[:, 0] == 0)  # [CLS] is always a dominant token


@pytest.mark.parametrize("method,opts", PEERS, ids=IDS)
def test_cached_generation_equals_recomputation(model, method, opts):
    inp = make_inputs(model)
    _apply(model, method, opts)
    if method in MERGING:
        # merged rows are not replayed by fixed_selection; the selection depends on the image alone, so every
        # uncached step re-selects the same merged set
        with torch.no_grad():
            kw = dict(max_new_tokens=4, do_sample=False, suppress_tokens=[IMAGE_TOKEN])
            assert torch.equal(model.generate(**inp, **kw), model.generate(**inp, **kw, use_cache=False))
        return
    check_cached_equals_stepwise(model, inp)


@pytest.mark.parametrize("method,opts", PEERS, ids=IDS)
def test_batched_equals_per_sample(model, method, opts):
    _apply(model, method, opts)
    check_batched_equals_single(model, make_inputs(model, prompts_len=(4, 11), after=(6, 2)))


@torch.no_grad()
def test_cdpruner_follows_the_instruction_and_ignores_right_padding():
    model = tiny_llava(seed=3)
    inp = make_inputs(model, prompts_len=(4, 11), after=(6, 2), padding="right")
    _apply(model, "cdpruner", {"tokens": 8, "fallback": "instruction"})  # the relevance path
    model(**inp)
    batched = learnpruner.stats(model).stage1_kept
    kept = []
    for i in range(2):
        real = inp["attention_mask"][i].bool()
        model(input_ids=inp["input_ids"][i:i + 1, real], pixel_values=inp["pixel_values"][i:i + 1])
        kept.append(learnpruner.stats(model).stage1_kept[0])
        assert torch.equal(batched[i], kept[-1])
    # another instruction for the same image changes the kept set (the relevance term is conditional)
    ids = inp["input_ids"][:1, inp["attention_mask"][0].bool()].clone()
    changed = False
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        ids[0, -6:] = torch.randint(2, IMAGE_TOKEN, (6,), generator=g)
        model(input_ids=ids, pixel_values=inp["pixel_values"][:1])
        changed |= not torch.equal(learnpruner.stats(model).stage1_kept[0], kept[0])
    assert changed


def test_visionzip_uses_head_mean_keys_when_the_engine_provides_them():
    from types import SimpleNamespace

    from learnpruner.rules import STAGE1_RULES, VisionContext

    feats = torch.tensor([[1, 0], [2, .1], [5, 5], [3, 0], [0, 1], [6, 6], [.1, 2], [0, 4]], dtype=torch.float)[None]
    cls = torch.tensor([[0.1, 0.1, 0.9, 0.1, 0.1, 0.8, 0.1, 0.1]])
    # keys send 1 and 3 to target 4, 6 and 7 to target 0 (the features say the opposite); two heads, mean = key
    key = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 1], [0, 1], [1, 1], [1, 0], [1, 0]], dtype=torch.float)[None]
    keys = torch.stack([key + 0.3, key - 0.3], dim=2)  # [1, n, heads, hd]
    from learnpruner import get_method

    opts = {**get_method("visionzip").defaults(32), "contextual": 2}  # a plan's options: every one resolved
    adapter = SimpleNamespace(cls_row_in_features=lambda: False)
    rule = STAGE1_RULES["visionzip"]
    plain = rule(VisionContext(feats, opts, adapter, cache={"cls": cls}), 4)
    keyed = rule(VisionContext(feats, opts, adapter, cache={"cls": cls, "keys": keys}), 4)
    assert plain.kept.tolist() == keyed.kept.tolist() == [[0, 2, 4, 5]]
    torch.testing.assert_close(plain.replace[0, 0], torch.tensor([1 + 2.5, 0.05]))
    torch.testing.assert_close(keyed.replace[0, 0], torch.tensor([1 + 0.05, 3.0]))  # target 0 + mean(6, 7)
    torch.testing.assert_close(keyed.replace[0, 2], torch.tensor([2.5, 1 + 0.05]))  # target 4 + mean(1, 3)
