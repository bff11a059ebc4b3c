"""Analytic prefill FLOPs and KV-cache bytes, and the cache bytes a forward really left."""

from __future__ import annotations

import torch

from ..cost import kv_bytes, llm_flops, lm_head_flops
from .archs import _adapter

FLOPS_CONVENTION = (
    "FLOPs: analytic, prefill only, 2 FLOPs per multiply-add; vision tower (patch conv + every encoder "
    "layer, as HF runs them, on every crop of the image or frame of the video) + projector (kept rows) + LLM "
    "(q/k/v/o, SwiGLU MLP with 3 matrices, attention scores and weighted values counted full non-causal q x kv like "
    "FlopCounterMode counts SDPA; per layer the text tokens, the structure tokens (LLaVA-NeXT row newlines), "
    "the item's own text (Qwen3-VL video timestamps) and the visual tokens of Schedule.per_layer()) + lm_head on "
    "the last position; selection work not counted"
)


def _image_for(ad, schedule, image):
    image = image if image is not None else ad.item_geometry()
    if schedule.n != image.tokens:
        raise ValueError(f"the schedule is for {schedule.n}-token images, the image has {image.tokens} visual "
                         f"tokens; pass image=bench_for(model).item_geometry(image_size) for that image's size")
    return image


def flops_breakdown(model, schedule, batch: int, text_tokens: int, lm_head: str = "last", image=None) -> dict:
    """Analytic prefill FLOPs by part: ``vision``, ``projector``, ``llm``, ``lm_head`` (see FLOPS_CONVENTION).

    ``model``: a model, its adapter, its config or an :data:`ARCHS` name (LLaVA, LLaVA-NeXT, Video-LLaVA; configs
    and names through a weightless meta-device model); ``schedule``: the method's
    :class:`~learnpruner.budget.Schedule` (one image, or video, per sample); ``text_tokens``: non-image tokens per
    sample; ``lm_head``: ``"last"`` (one position per sample, as in generate) or ``"all"`` (every
    position of the final layer, as a plain ``model(**inputs)``); ``image``: the
    :class:`~learnpruner.bench.geometry.ItemGeometry` of the image (default: the family's largest; Video-LLaVA:
    an 8-frame video, its frames the crops). The vision tower and projector FLOPs come from the adapter
    (``vision_flops``, ``projector_flops``).
    """
    if lm_head not in ("last", "all"):
        raise ValueError(f"lm_head must be 'last' or 'all', got {lm_head!r}")
    ad = _adapter(model)
    image = _image_for(ad, schedule, image)
    rows = schedule.r1 if schedule.r1 is not None else schedule.n
    fixed = text_tokens + image.structure + image.text  # in every layer, outside the budget
    tokens = [fixed + v for v in schedule.per_layer()]
    positions = 1 if lm_head == "last" else tokens[-1]
    parts = {"vision": ad.vision_flops(image), "projector": ad.projector_flops(rows),
             "llm": llm_flops(ad.text_config, tokens), "lm_head": lm_head_flops(ad.text_config, positions)}
    return {k: batch * v for k, v in parts.items()}


def analytic_flops(model, schedule, batch: int, text_tokens: int, lm_head: str = "last", image=None) -> int:
    """Total analytic prefill FLOPs (sum of :func:`flops_breakdown`)."""
    return int(sum(flops_breakdown(model, schedule, batch, text_tokens, lm_head, image).values()))


def analytic_kv_bytes(model, schedule, batch: int, text_tokens: int, dtype=torch.bfloat16, image=None) -> int:
    """Bytes of the KV cache after a prefill under ``schedule``: per layer keys and values of the text, structure
    and that layer's visual tokens (what :func:`kv_cache_bytes` measures on the real cache)."""
    ad = _adapter(model)
    image = _image_for(ad, schedule, image)
    fixed = text_tokens + image.structure + image.text
    return kv_bytes(ad.text_config, [fixed + v for v in schedule.per_layer()], batch, dtype)


def _cache_tensors(cache):
    if cache is None:
        return
    if isinstance(cache, torch.Tensor):
        yield cache
        return
    if isinstance(cache, (tuple, list)):
        for item in cache:
            yield from _cache_tensors(item)
        return
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    yield t
        return
    for name in ("key_cache", "value_cache"):
        yield from _cache_tensors(getattr(cache, name, None))


def _output_cache(out):
    """The cache of a model output: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    cache = out.get("cache", None)
    return cache if cache is not None else out.get("past_key_values", None)


def kv_cache_bytes(cache) -> int:
    """Bytes held by the key/value tensors of ``cache`` (a transformers Cache or nested tuples).

    The sum of the tensors' ``nbytes`` (each tensor counted once), i.e. the size of the real tensors:
    after a pruned prefill, layers before a drop hold more tokens than layers after it.
    """
    seen, total = set(), 0
    for t in _cache_tensors(cache):
        key = (t.data_ptr(), t.nbytes)
        if t.numel() and key not in seen:
            seen.add(key)
            total += t.nbytes
    return total
