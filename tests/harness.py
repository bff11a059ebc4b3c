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


def check_cached_equals_stepwise(model, inp, steps: int = 4, atol: float = 1e-4, visual: dict | None = None,
                                 banned: list[int] | None = None):
    """Greedy generation with the KV cache equals a step-by-step recomputation without cache over the kept
    sets of its prefill (pinned with ``fixed_selection``): the same tokens, and each step's logits within
    ``atol`` (so that a wrong position or mask shows even where the argmax survives it). ``visual``: the
    forward's visual inputs (default ``pixel_values``); ``banned``: tokens never generated (default the image
    token)."""
    visual = {"pixel_values": inp["pixel_values"]} if visual is None else visual
    banned = [IMAGE_TOKEN] if banned is None else banned
    with torch.no_grad():
        out = model.generate(**inp, max_new_tokens=steps, do_sample=False, suppress_tokens=banned,
                             output_logits=True, return_dict_in_generate=True)
        gen = out.sequences
        st = learnpruner.stats(model)
        new = gen[:, inp["input_ids"].shape[1]:]
        with learnpruner.fixed_selection(model, st.stage1_kept, st.llm_kept):
            for t in range(steps):
                ids = torch.cat([inp["input_ids"], new[:, :t]], dim=1)
                mask = torch.cat([inp["attention_mask"], torch.ones_like(new[:, :t])], dim=1)
                pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
                logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                               **visual).logits[:, -1]
                torch.testing.assert_close(out.logits[t], logits, atol=atol, rtol=1e-4,
                                           msg=lambda m, t=t: f"step {t} logits: {m}")
                logits[:, banned] = float("-inf")
                assert torch.equal(logits.argmax(-1), new[:, t]), f"step {t}"


def check_batched_equals_single(model, inp, position_ids=None, new_tokens: int = 3, alone=None):
    """A padded batch keeps the same tokens, and gives the same last logits and greedy tokens, as each
    sample alone (``alone(inp, i)``: sample ``i`` unpadded with its visual inputs; default: one image per prompt,
    ``pixel_values[i]``)."""
    with torch.no_grad():
        batched = model(**inp, position_ids=position_ids)
        st = learnpruner.stats(model)
        gen = model.generate(**inp, max_new_tokens=new_tokens, do_sample=False)
        width = inp["input_ids"].shape[1]
        for i in range(inp["input_ids"].shape[0]):
            real = inp["attention_mask"][i].bool()
            single = alone(inp, i) if alone is not None else {
                "input_ids": inp["input_ids"][i:i + 1, real], "attention_mask": inp["attention_mask"][i:i + 1, real],
                "pixel_values": inp["pixel_values"][i:i + 1]}
            out = model(**single)
            s1 = learnpruner.stats(model)
            a, b = st.images[i], s1.images[0]  # each prompt's one image, in the batch and alone
            assert (a.stage1_kept is None) == (b.stage1_kept is None)
            if a.stage1_kept is not None:
                assert torch.equal(a.stage1_kept, b.stage1_kept)
            for x, y in zip(a.llm_kept, b.llm_kept, strict=True):
                assert torch.equal(x, y)
            torch.testing.assert_close(batched.logits[i, -1], out.logits[0, -1], atol=1e-4, rtol=1e-4)
            g = model.generate(**single, max_new_tokens=new_tokens, do_sample=False)
            assert torch.equal(g[0, single["input_ids"].shape[1]:], gen[i, width:])


def check_fast_equals_plain(model, inp, method: str, options: dict) -> None:
    """Greedy generation on the fast path equals the plain path (tokens, and scores within 1e-5)."""
    def run(fast: bool):
        learnpruner.apply(model, method, fast=fast, **options)
        try:
            with torch.no_grad():
                return model.generate(**inp, max_new_tokens=4, do_sample=False, output_scores=True,
                                      return_dict_in_generate=True)
        finally:
            learnpruner.remove(model)

    plain, quick = run(False), run(True)
    assert torch.equal(plain.sequences, quick.sequences)
    for a, b in zip(plain.scores, quick.scores):
        finite = torch.isfinite(a)
        torch.testing.assert_close(a[finite], b[finite], atol=1e-5, rtol=1e-5)


def check_stage2_scores_equal_eager(model, ref, inp, alone, layer: int, slots, embeds_of, n: int = 2) -> None:
    """The stage-2 scores ``stats`` reports (a prefill of ``model`` already run on ``inp``) equal an eager
    reference: the unmodified eager model ``ref`` on each sample's stage-1 sequence (dropped placeholders removed),
    the mean attention of the instruction's queries at ``layer - 1`` over the visual columns. ``alone(inp, i)``:
    sample ``i`` unpadded; ``slots[i]``: per placeholder its token index or -1 (structure); ``embeds_of(single)``:
    the rows the model writes into the placeholders."""
    st = learnpruner.stats(model)
    image_id = model.config.image_token_id
    with torch.no_grad():
        for i in range(n):
            single = alone(inp, i)
            ids = single["input_ids"][0]
            placeholder = (ids == image_id).nonzero()[:, 0]
            kept1 = st.images[i].stage1_kept
            keep = torch.ones_like(ids, dtype=torch.bool)
            dropped = (slots[i] >= 0) & ~torch.isin(slots[i], kept1 if kept1 is not None else slots[i])
            keep[placeholder[dropped]] = False
            embeds = ref.model.language_model.embed_tokens(ids[None])
            embeds[0, placeholder] = embeds_of(single).to(embeds.dtype)
            pos = torch.arange(ids.shape[0])[None]
            out = ref.model.language_model(inputs_embeds=embeds[:, keep], position_ids=pos[:, keep],
                                           attention_mask=torch.ones(1, int(keep.sum()), dtype=torch.long),
                                           output_attentions=True)
            probs = out.attentions[layer - 1][0].float()
            kept_ids = ids[keep]
            kept_slots = torch.full_like(ids, -1)
            kept_slots[placeholder] = slots[i]
            kept_slots = kept_slots[keep]
            last_image = int((kept_ids == image_id).nonzero().max())
            q = torch.arange(kept_ids.shape[0]) > last_image
            visual_cols = kept_slots >= 0
            expected = probs[:, q][:, :, visual_cols].mean(dim=(0, 1))
            torch.testing.assert_close(st.stage2_scores[i, kept_slots[visual_cols]], expected, atol=1e-6, rtol=1e-5)
