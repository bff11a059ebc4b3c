"""Checks every pruning method must pass, shared by the engine and peer-method tests."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from helpers import IMAGE_TOKEN, n_visual

import learnpruner


@contextmanager
def layer_lengths(model):
    """Records the sequence length of the hidden states each decoder layer receives."""
    lengths, handles = [], []
    for layer in model.model.language_model.layers:
        handles.append(layer.register_forward_pre_hook(
            lambda m, args, kw: lengths.append((args[0] if args else kw["hidden_states"]).shape[1]),
            with_kwargs=True,
        ))
    try:
        yield lengths
    finally:
        for h in handles:
            h.remove()


def _cache(out):
    return out.cache if hasattr(out, "cache") else out.past_key_values


def check_schedule_followed(model, inp, tokens: int):
    """Each decoder layer processes exactly the scheduled visual tokens (one image per prompt), measured on
    the hidden states it receives; the KV cache holds what each layer saw; kept sets are sorted and nested.
    Returns the stats for method-specific checks."""
    n, seq_len = n_visual(model), inp["input_ids"].shape[1]
    with torch.no_grad(), layer_lengths(model) as lengths:
        out = model(**inp, use_cache=True)
    st = learnpruner.stats(model)
    scheduled = st.schedule.per_layer()
    assert lengths == [seq_len - n + k for k in scheduled]
    assert st.tokens_per_layer == scheduled
    assert abs(st.average_tokens - tokens) <= 1.0
    assert [_cache(out).get_seq_length(i) for i in range(len(lengths))] == lengths
    if st.stage1_kept is not None:
        assert st.stage1_kept.shape == (inp["input_ids"].shape[0], scheduled[0])
        assert torch.all(st.stage1_kept.diff(dim=1) > 0)
    chain = ([st.stage1_kept] if st.stage1_kept is not None else []) + list(st.llm_kept)
    for earlier, later in zip(chain, chain[1:]):  # each drop picks among what the previous one kept
        for a, b in zip(earlier, later):
            assert set(b.tolist()) <= set(a.tolist())
    return st


def check_cached_equals_stepwise(model, inp, steps: int = 4, atol: float = 1e-4):
    """Greedy generation with the KV cache equals a step-by-step recomputation without cache over the kept
    sets of its prefill (pinned with ``fixed_selection``): the same tokens, and each step's logits within
    ``atol`` (so that a wrong position or mask shows even where the argmax survives it)."""
    with torch.no_grad():
        out = model.generate(**inp, max_new_tokens=steps, do_sample=False, suppress_tokens=[IMAGE_TOKEN],
                             output_logits=True, return_dict_in_generate=True)
        gen = out.sequences
        st = learnpruner.stats(model)
        new = gen[:, inp["input_ids"].shape[1]:]
        with learnpruner.fixed_selection(model, st.stage1_kept, st.llm_kept):
            for t in range(steps):
                ids = torch.cat([inp["input_ids"], new[:, :t]], dim=1)
                mask = torch.cat([inp["attention_mask"], torch.ones_like(new[:, :t])], dim=1)
                pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
                logits = model(input_ids=ids, attention_mask=mask, position_ids=pos,
                               pixel_values=inp["pixel_values"], use_cache=False).logits[:, -1]
                torch.testing.assert_close(out.logits[t], logits, atol=atol, rtol=1e-4,
                                           msg=lambda m, t=t: f"step {t} logits: {m}")
                logits[:, IMAGE_TOKEN] = float("-inf")
                assert torch.equal(logits.argmax(-1), new[:, t]), f"step {t}"


def check_batched_equals_single(model, inp, position_ids=None, new_tokens: int = 3):
    """A padded batch keeps the same tokens, and gives the same last logits and greedy tokens, as each
    sample alone."""
    with torch.no_grad():
        batched = model(**inp, position_ids=position_ids)
        st = learnpruner.stats(model)
        gen = model.generate(**inp, max_new_tokens=new_tokens, do_sample=False)
        width = inp["input_ids"].shape[1]
        for i in range(inp["input_ids"].shape[0]):
            real = inp["attention_mask"][i].bool()
            single = {"input_ids": inp["input_ids"][i:i + 1, real],
                      "attention_mask": inp["attention_mask"][i:i + 1, real],
                      "pixel_values": inp["pixel_values"][i:i + 1]}
            out = model(**single)
            s1 = learnpruner.stats(model)
            assert (st.stage1_kept is None) == (s1.stage1_kept is None)
            if st.stage1_kept is not None:
                assert torch.equal(st.stage1_kept[i], s1.stage1_kept[0])
            for a, b in zip(st.llm_kept, s1.llm_kept, strict=True):
                assert torch.equal(a[i], b[0])
            torch.testing.assert_close(batched.logits[i, -1], out.logits[0, -1], atol=1e-4, rtol=1e-4)
            g = model.generate(**single, max_new_tokens=new_tokens, do_sample=False)
            assert torch.equal(g[0, single["input_ids"].shape[1]:], gen[i, width:])
