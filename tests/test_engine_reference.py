"""Checks the rest of the suite did not make: each one fails under a small bug that the suite used to let pass.

Expected values are computed here independently (plain loops, the unpatched vision tower, no-cache
recomputations), not with the functions under test.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import IMAGE_TOKEN, PAD, VOCAB, make_inputs, n_visual, tiny_llava

import learnpruner
from learnpruner import LearnablePruningModule, LPMConfig

torch.set_num_threads(1)


def _cache(out):
    return out.cache if hasattr(out, "cache") else out.past_key_values


# --- 1. LearnPruner's stage 1: top keep-probabilities plus the max-min diversity fill ------------------------


def _expected_stage1(keep_prob: torch.Tensor, feats: torch.Tensor, r1: int, diversity: float = 0.1) -> list[list[int]]:
    """Per image: the ``r1 - round(diversity * r1)`` most probable tokens, then, one at a time, the unkept token
    whose largest cosine similarity to the kept ones is smallest (farthest point), until ``r1`` are kept."""
    fill = round(diversity * r1)
    out = []
    for p, f in zip(keep_prob, feats):
        kept = sorted(range(len(p)), key=lambda j: -float(p[j]))[: r1 - fill]
        f = f.double()
        sim = F.cosine_similarity(f[:, None, :], f[None, :, :], dim=-1)  # [n, n]
        for _ in range(fill):
            rest = [j for j in range(len(p)) if j not in kept]
            kept.append(min(rest, key=lambda j: max(float(sim[j, i]) for i in kept)))
        out.append(sorted(kept))
    return out


@torch.no_grad()
@pytest.mark.parametrize("opts", [{"tokens": 16}, {"tokens": 24, "r1": 40}], ids=["default-schedule", "r1=40"])
def test_learnpruner_stage1_keeps_the_top_tokens_plus_the_diversity_fill(opts):
    model = tiny_llava(seed=7)
    inp = make_inputs(model)
    learnpruner.apply(model, "learnpruner", lpm="random", **opts)
    model(**inp)
    st = learnpruner.stats(model)
    r1 = st.schedule.r1
    assert round(0.1 * r1) >= 3  # the fill is not empty
    # features at the vision feature layer (-2), [CLS] left out (strategy "default"), from the tower itself
    hidden = model.model.vision_tower(inp["pixel_values"], output_hidden_states=True).hidden_states
    feats = hidden[-2][:, 1:]
    keep_prob = model._learnpruner.lpm(feats)
    expected = _expected_stage1(keep_prob, feats, r1)
    assert st.stage1_kept.tolist() == expected
    # the fill matters here: plain top-r1 by keep-probability is another set
    top = [sorted(torch.argsort(p, descending=True)[:r1].tolist()) for p in keep_prob]
    assert top != expected


# --- 2. decode steps without position_ids continue at the original prompt length ----------------------------


@torch.no_grad()
@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
def test_decode_without_position_ids_continues_at_the_prompt_length(fast):
    model = tiny_llava(seed=11)
    inp = make_inputs(model, prompts_len=(6,), after=(5,))  # one sample: no padding, no mask needed
    ids, pixels = inp["input_ids"], inp["pixel_values"]
    s, steps = ids.shape[1], 3
    learnpruner.apply(model, "learnpruner", tokens=16, lpm="random", fast=fast)

    def greedy(logits):
        logits = logits.clone()
        logits[:, IMAGE_TOKEN] = float("-inf")
        return logits.argmax(-1, keepdim=True)

    out = model(input_ids=ids, pixel_values=pixels, use_cache=True)
    st = learnpruner.stats(model)
    assert st.stage1_kept.shape[1] < n_visual(model)  # a pruned prefill: the cache is shorter than the prompt
    cache, tokens, implicit = _cache(out), [greedy(out.logits[:, -1])], []
    for _ in range(steps):  # neither position_ids nor attention_mask
        logits = model(input_ids=tokens[-1], past_key_values=cache).logits[:, -1]
        implicit.append(logits)
        tokens.append(greedy(logits))

    # the same steps with explicit position ids: the original prompt length, then one more per token
    cache = _cache(model(input_ids=ids, pixel_values=pixels, use_cache=True))
    for t in range(steps):
        logits = model(input_ids=tokens[t], past_key_values=cache, position_ids=torch.tensor([[s + t]])).logits
        torch.testing.assert_close(implicit[t], logits[:, -1], atol=1e-5, rtol=0, msg=lambda m, t=t: f"step {t}: {m}")
    # and a no-cache recomputation over the prefill's kept sets
    with learnpruner.fixed_selection(model, st.stage1_kept, st.llm_kept):
        for t in range(steps):
            full = torch.cat([ids, *tokens[: t + 1]], dim=1)
            ref = model(input_ids=full, pixel_values=pixels, use_cache=False).logits[:, -1]
            torch.testing.assert_close(implicit[t], ref, atol=1e-5, rtol=0, msg=lambda m, t=t: f"step {t}: {m}")


# --- 3. rows that keep different counts (2 images vs 1 image in one batch) ------------------------------------


def _multi_image_inputs(model, images=(2, 1), seed=0):
    """A left-padded batch of prompts ``[text]([image][text])*k`` with ``k`` images per sample."""
    g = torch.Generator().manual_seed(seed)
    n = n_visual(model)
    seqs = []
    for k in images:
        ids = [1] + torch.randint(2, VOCAB - 1, (4,), generator=g).tolist()
        for _ in range(k):
            ids += [IMAGE_TOKEN] * n + torch.randint(2, VOCAB - 1, (3,), generator=g).tolist()
        seqs.append(ids)
    width = max(map(len, seqs))
    input_ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, ids in enumerate(seqs):
        input_ids[i, width - len(ids):] = torch.tensor(ids)
        mask[i, width - len(ids):] = 1
    size = model.config.vision_config.image_size
    pixel_values = torch.randn(sum(images), 3, size, size, generator=g)
    return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": pixel_values}


@torch.no_grad()
@pytest.mark.parametrize("method,opts", [("learnpruner", {"tokens": 16, "lpm": "random"}), ("fastv", {"tokens": 40})])
def test_batch_of_two_image_and_one_image_samples_equals_each_sample_alone(method, opts):
    images = (2, 1)
    model = tiny_llava(seed=12)
    inp = _multi_image_inputs(model, images)
    learnpruner.apply(model, method, **opts)
    batched = model(**inp)
    st = learnpruner.stats(model)
    # min_new_tokens: a sample that meets EOS alone would stop early, but is padded on in the batch
    kw = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    gen = model.generate(**inp, **kw)
    width, first = inp["input_ids"].shape[1], 0
    for i, k in enumerate(images):
        real = inp["attention_mask"][i].bool()
        single = {"input_ids": inp["input_ids"][i:i + 1, real], "attention_mask": inp["attention_mask"][i:i + 1, real],
                  "pixel_values": inp["pixel_values"][first:first + k]}
        out = model(**single)
        s1 = learnpruner.stats(model)
        for a, b in zip([st.stage1_kept, *st.llm_kept], [s1.stage1_kept, *s1.llm_kept]):
            if a is not None:  # one row per image
                assert torch.equal(a[first:first + k], b)
        torch.testing.assert_close(batched.logits[i, -1], out.logits[0, -1], atol=1e-4, rtol=1e-4)
        alone = model.generate(**single, **kw)
        assert torch.equal(alone.sequences[0, single["input_ids"].shape[1]:], gen.sequences[i, width:])
        for t, (a, b) in enumerate(zip(gen.logits, alone.logits, strict=True)):
            torch.testing.assert_close(a[i], b[0], atol=1e-4, rtol=1e-4, msg=lambda m, t=t: f"step {t}: {m}")
        first += k


# --- 5. the LPM's keep probability is the softmax's class 1 ----------------------------------------------------


@torch.no_grad()
def test_lpm_keep_probability_is_softmax_class_one():
    lpm = LearnablePruningModule(LPMConfig(feature_dim=2, hidden_dim=2))
    first, last = lpm.mlp[0], lpm.mlp[2]
    first.weight.copy_(torch.eye(2))
    first.bias.zero_()
    # logit of class 0 (drop) = GELU(x1), logit of class 1 (keep) = GELU(x0) + 0.25
    last.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    last.bias.copy_(torch.tensor([0.0, 0.25]))
    x = torch.tensor([[[3.0, 0.0], [0.0, 3.0], [1.0, 1.0], [-2.0, 0.5]]])  # [1, n=4, d=2]
    p = lpm(x)
    assert p.shape == (1, 4)
    g = F.gelu(x)
    keep, drop = g[..., 0] + 0.25, g[..., 1]
    expected = torch.exp(keep) / (torch.exp(keep) + torch.exp(drop))
    torch.testing.assert_close(p, expected, atol=1e-6, rtol=1e-6)
    assert p[0, 0] > 0.9 and p[0, 1] < 0.1 and p[0, 2] > 0.5 and p[0, 3] < 0.5  # class 1 wins for tokens 0 and 2
    torch.testing.assert_close(p, torch.softmax(lpm.logits(x), dim=-1)[..., 1])
