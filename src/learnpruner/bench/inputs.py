"""Benchmark inputs (random images or videos and prompts, as the family's processor lays them out) and the ideal
prefill (the scheduled lengths with no selection work) the measured one is compared with."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .archs import _adapter

_TEXT_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids")


def _make_inputs(model, batch: int, text_tokens: int, variants: int, device, dtype, seed: int = 0):
    """``variants`` input dicts of ``batch`` prompts ``<s> t*4 <item> t*rest`` with random images (the adapter's
    ``random_images``; ``<item>`` its :meth:`~learnpruner.bench.geometry.BenchFamily.bench_region`: ``<image>*L``,
    or ``<video>*L``, or a Qwen3-VL video's timestamped frame groups), ``text_tokens`` prompt tokens besides the
    item; and the index of the item's first token. ``model``: a model, its adapter or its benchmark view (whose
    ``bench_item`` chose the item)."""
    ad = _adapter(model)
    region = ad.bench_region()
    pre = min(4, text_tokens - 1)
    post = text_tokens - 1 - pre
    start = 1 + pre  # index of the item's first token
    vocab = ad.text_config.vocab_size
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(variants):
        text = torch.randint(2, vocab, (batch, text_tokens - 1), generator=g)
        text[ad.placeholders(text)] = 2  # no stray placeholder of any kind in the text
        ids = torch.cat([
            torch.ones(batch, 1, dtype=torch.long), text[:, :pre], region[None].expand(batch, -1),
            text[:, pre:pre + post],
        ], dim=1)
        images = ad.random_images(batch, generator=g)
        out.append({
            "input_ids": ids.to(device),
            "attention_mask": torch.ones_like(ids).to(device),
            **{k: v.to(device) for k, v in ad.prompt_inputs(ids).items()},
            **{k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in images.items()},
        })
    return out, start


@dataclass
class _Batch:
    """The inputs of one batch size, and what the ideal forward needs of them (per variant)."""

    size: int
    inputs: list[dict]
    start: int  # index of the first image placeholder
    feats: list[torch.Tensor]  # [batch, n, d] feature rows of the images, before the projector
    text_ids: list[torch.Tensor]  # [batch, text]: the prompts without their placeholders
    structure: torch.Tensor | None  # [k, hidden]: the structure rows each image adds (None: none)


def _prepare_batch(model, ad, size: int, text_tokens: int, variants: int, device, dtype, seed: int) -> _Batch:
    from ..engine import STRUCTURE

    inputs, start = _make_inputs(ad, size, text_tokens, variants, device, dtype, seed)
    feats, structure = [], None
    with torch.inference_mode():
        for inp in inputs:
            visual = ad.encode(input_ids=inp["input_ids"], **{k: v for k, v in inp.items() if k not in _TEXT_INPUTS})
            feats.append(visual.rows(list(range(visual.num_images))))
            k = int((visual.slots[0] == STRUCTURE).sum())
            if k and visual.structure is not None:
                structure = visual.structure.reshape(1, -1).expand(k, -1)
    # the prompts without their placeholders (a Qwen3-VL video's timestamps stay: they are text)
    text_ids = [inp["input_ids"][~ad.placeholders(inp["input_ids"])].view(size, -1) for inp in inputs]
    return _Batch(size, inputs, start, feats, text_ids, structure)


def _ideal_prefill(ad, feats_kept, text_ids, start: int, schedule, structure=None):
    """The kept tokens only, no selection: projector on pre-sliced rows, layers on pre-sized sequences
    (``text_ids``, with the kept rows and the image's structure rows, if any, at ``start``, in every layer). Side
    streams (Qwen3-VL's DeepStack mergers and additions) are left out: there the ideal is a little faster than any
    real forward."""
    from transformers.cache_utils import DynamicCache

    from ..engine import call_layer, causal_mask

    lm = ad.language_model
    proj = ad.project(feats_kept)
    emb = lm.embed_tokens(text_ids)
    parts = [emb[:, :start], proj.to(emb.dtype)]
    if structure is not None:
        parts.append(structure.to(emb)[None].expand(emb.shape[0], -1, -1))
    hidden = torch.cat(parts + [emb[:, start:]], dim=1)
    s = hidden.shape[1]
    pos = torch.arange(s, device=hidden.device)[None]
    cos, sin = lm.rotary_emb(hidden, position_ids=ad.decode_rope_positions(pos, None))
    cache = DynamicCache(config=ad.text_config)
    fixed = text_ids.shape[1] + (structure.shape[0] if structure is not None else 0)
    lengths = [fixed + v for v in schedule.per_layer()]
    current, mask = s, causal_mask(ad, hidden, None, cache, pos)
    for i, layer in enumerate(ad.layers[: ad.text_config.num_hidden_layers]):
        if lengths[i] != current:
            current = lengths[i]
            hidden, pos = hidden[:, :current], pos[:, :current]
            cos, sin = cos[:, :current], sin[:, :current]
            mask = causal_mask(ad, hidden, None, cache, pos, i)
        hidden = call_layer(ad, layer, hidden, mask, (cos, sin), pos, cache, True, {})
    hidden = lm.norm(hidden[:, -1:])
    return ad.lm_head(hidden), cache
