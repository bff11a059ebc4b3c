"""``learnpruner bench``: speed, memory and FLOPs of every pruning method, measured honestly.

For each method x budget x batch size the benchmark measures, on one model:

- ``vision_ms``, ``stage1_ms``, ``projector_ms``, ``llm_select_ms``: the engine's own timer sections
  (:attr:`learnpruner.engine.PruneState.timer`), summed per forward, median over repeats;
- ``prefill_ms``: time to first token, one whole forward (vision tower included) with the KV cache and
  ``logits_to_keep=1``, as ``generate`` runs it;
- ``e2e_ms``: ``generate`` of exactly ``new_tokens`` tokens (greedy, ``min_new_tokens`` forces the count);
- ``decode_ms_per_token``: ``(e2e_ms - prefill_ms) / (new_tokens - 1)`` (generate minus prefill);
- ``ideal_prefill_ms``: the measured ``vision_ms`` plus the same decoder layers fed hidden states of the
  scheduled lengths per layer group with no selection work (pre-sliced vision features through the
  projector, then slicing only); ``overhead = prefill_ms / ideal_prefill_ms``;
- ``kv_cache_bytes``: bytes of the cache tensors after prefill (:func:`kv_cache_bytes`);
- ``peak_mem_bytes``: ``torch.cuda.max_memory_allocated`` over prefill and generate (None on CPU);
- ``flops``: analytic prefill FLOPs (:func:`analytic_flops`);
- ``images``: per image its visual ``count``, its ``structure`` positions and its visual tokens per layer.

Every sample holds one image, the largest the family takes (LLaVA-1.5: 336x336, 576 tokens; LLaVA-NeXT:
672x672, 5 crops, 2880 tokens plus 48 row newlines), or for Video-LLaVA one 8-frame video (8 x 257 = 2056
tokens, each frame a crop); budgets are visual tokens per image (per video). Everything family-specific
(inputs, placeholder token, vision tower, FLOPs of tower and projector) comes from the model's adapter.

Timing protocol: ``warmup`` untimed runs, then ``repeats`` timed runs whose median is reported; inputs
rotate over ``variants`` different random images and prompts. CUDA times come from CUDA events, CPU
times from ``time.perf_counter``. Methods that need a Learnable Pruning Module get ``lpm="random"``:
an untrained LPM costs exactly what a trained one does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapters.qwen2_5_vl_bench import QWEN_ARCHS
from .commands import command
from .engine.graphs import GraphCache
from .utils import atomic_write

__all__ = [
    "ARCHS",
    "arch_config",
    "arch_adapter",
    "build_arch",
    "flops_breakdown",
    "analytic_flops",
    "analytic_kv_bytes",
    "kv_cache_bytes",
    "run_bench",
    "markdown_table",
    "write_results",
    "plot_results",
]

FLOPS_CONVENTION = (
    "FLOPs: analytic, prefill only, 2 FLOPs per multiply-add; vision tower (patch conv + every encoder "
    "layer, as HF runs them, on every crop of the image or frame of the video) + projector (kept rows) + LLM "
    "(q/k/v/o, SwiGLU MLP with 3 matrices, attention scores and weighted values counted full non-causal q x kv like "
    "FlopCounterMode counts SDPA; per layer the text tokens, the structure tokens (LLaVA-NeXT row newlines) "
    "and the visual tokens of Schedule.per_layer()) + lm_head on the last position; selection work not "
    "counted"
)


# --------------------------------------------------------------------------------------------------
# architectures with random weights


def _clip(hidden, layers, heads, inter, image_size=336, patch=14):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        image_size=image_size, patch_size=patch, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )


def _llama(hidden, layers, heads, inter, vocab=32064, kv_heads=None):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads, intermediate_size=inter, vocab_size=vocab,
        max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def _llava(vision, text, image_token):
    from transformers import LlavaConfig

    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=image_token, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )


# llava-hf/llava-v1.6-*: AnyRes grids of 336 px crops, up to 2x2 (672x672) or 1x3
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def _video_llava(vision, text, image_token, video_token):
    from transformers import VideoLlavaConfig

    return VideoLlavaConfig(
        vision_config=vision, text_config=text, image_token_id=image_token, video_token_id=video_token,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )


def _llava_next(vision, text, image_token, pinpoints=NEXT_PINPOINTS):
    from transformers import LlavaNextConfig

    return LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_id=image_token, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", image_grid_pinpoints=pinpoints,
    )


ARCHS = {
    "llava-1.5-7b": lambda: _llava(_clip(1024, 24, 16, 4096), _llama(4096, 32, 32, 11008), 32000),
    "llava-1.5-13b": lambda: _llava(_clip(1024, 24, 16, 4096), _llama(5120, 40, 40, 13824), 32000),
    # CPU-friendly, same 576 visual tokens per image (CLIP 336/14)
    "llava-mid": lambda: _llava(_clip(512, 12, 8, 2048), _llama(1024, 16, 16, 2816), 32000),
    # for tests: 64 visual tokens (112/14), 8 small layers
    "llava-tiny": lambda: _llava(_clip(64, 2, 4, 128, image_size=112),
                                 _llama(128, 8, 4, 256, vocab=512, kv_heads=2), 511),
    # llava-hf/llava-v1.6-vicuna-7b-hf: CLIP ViT-L/14-336 + vicuna-7B; a 672x672 image is 5 crops,
    # 576 + 48 * 48 = 2880 visual tokens + 48 row newlines = 2928 placeholders
    "llava-next-7b": lambda: _llava_next(_clip(1024, 24, 16, 4096), _llama(4096, 32, 32, 11008), 32000),
    # CPU-friendly, the same 5 crops, 2880 visual tokens and 48 newlines per 672x672 image; small tower and LLM
    "llava-next-mid": lambda: _llava_next(_clip(256, 6, 4, 1024), _llama(384, 16, 6, 1024), 32000),
    # for tests: 56 px crops (16 tokens), grids up to 2x2: a 112x112 image is 80 visual tokens + 8 newlines
    "llava-next-tiny": lambda: _llava_next(_clip(64, 2, 4, 128, image_size=56),
                                           _llama(128, 8, 4, 256, vocab=512, kv_heads=2), 511,
                                           pinpoints=[[56, 112], [112, 56], [112, 112]]),
    # LanguageBind/Video-LLaVA-7B-hf (config.json): CLIP ViT-L/14 at 224 px for the image and the video tower,
    # vicuna-7B, image/video tokens 32000/32001, vocab 32064; 8 frames x (256 patches + [CLS]) = 2056 per video
    "video-llava-7b": lambda: _video_llava(_clip(1024, 24, 16, 4096, image_size=224),
                                           _llama(4096, 32, 32, 11008), 32000, 32001),
    # CPU-friendly, the same 2056 tokens per 8-frame video; small towers and LLM (llava-next-mid's)
    "video-llava-mid": lambda: _video_llava(_clip(256, 6, 4, 1024, image_size=224), _llama(384, 16, 6, 1024),
                                            32000, 32001),
    # for tests: 56 px frames (16 patches + [CLS]): an 8-frame video is 136 tokens
    "video-llava-tiny": lambda: _video_llava(_clip(64, 2, 4, 128, image_size=56),
                                             _llama(128, 8, 4, 256, vocab=512, kv_heads=2), 510, 511),
}
ARCHS.update(QWEN_ARCHS)  # qwen2.5-vl-7b / -mid / -tiny (learnpruner.adapters.qwen2_5_vl_bench)


def arch_config(name: str):
    """The config (``LlavaConfig``, ``LlavaNextConfig``, ``VideoLlavaConfig``) of a named architecture (see
    :data:`ARCHS`); ``ValueError`` for an unknown one."""
    if name not in ARCHS:
        raise ValueError(f"unknown arch {name!r}; accepted: {', '.join(ARCHS)}")
    return ARCHS[name]()


def _model_class(cfg):
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    try:
        return MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(cfg)]
    except KeyError:
        raise ValueError(f"no image-text-to-text model class for {type(cfg).__name__}") from None


def _meta_model(cfg):
    """The model of ``cfg`` on the meta device: its structure and config, no weights allocated."""
    with torch.device("meta"):
        return _model_class(cfg)._from_config(cfg)


def arch_adapter(arch):
    """The adapter of an architecture (a name from :data:`ARCHS` or a config) over a weightless meta-device
    model: its image geometry, budgets and FLOPs without allocating a single weight."""
    from .adapters import adapter_for

    return adapter_for(_meta_model(arch_config(arch) if isinstance(arch, str) else arch))


def _adapter(model):
    """The adapter of a model, an adapter, a config or an :data:`ARCHS` name (the last two over a meta model)."""
    from .adapters import Adapter, adapter_for

    if isinstance(model, Adapter):
        return model
    if isinstance(model, torch.nn.Module):
        return adapter_for(model)
    return arch_adapter(model)


def build_arch(name: str, dtype=torch.float32, device="cpu", seed: int = 0):
    """The model of architecture ``name`` (see :data:`ARCHS`) with random weights, built fast.

    Weights are allocated directly on ``device`` in ``dtype`` with transformers' and torch's
    initialisers switched off, then filled once: matrices uniform with std 0.02, 1-D weights
    (norms, class embedding, LLaVA-NeXT's image newline) 1, biases 0. No download, no meta device.
    """
    from transformers.initialization import no_init_weights

    from .adapters import adapter_for
    from .hub import parse_dtype

    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
        dtype = torch.float32 if dtype == "auto" else dtype
    cfg = arch_config(name)
    device = torch.device(device)
    _check_fits(name, cfg, dtype, device)
    with no_init_weights(), device:
        model = _model_class(cfg)._from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    gen = torch.Generator(device=device).manual_seed(seed)
    bound = 0.02 * math.sqrt(3.0)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() >= 2:
                p.uniform_(-bound, bound, generator=gen)
            elif pname.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
    model.generation_config.pad_token_id = adapter_for(model).text_config.pad_token_id
    model._learnpruner_arch = name
    return model.eval()


def _available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_fits(name: str, cfg, dtype: torch.dtype, device: torch.device) -> None:
    """``ValueError`` before allocating when the weights alone would not fit in the device's free memory."""
    meta = _meta_model(cfg)
    need = sum(p.numel() for p in meta.parameters()) * torch.empty((), dtype=dtype).element_size()
    free = _available_bytes(device)
    if free is not None and need > 0.9 * free:
        raise ValueError(
            f"--arch {name} needs {need / 2**30:.1f} GiB for its weights in {str(dtype).replace('torch.', '')}, "
            f"but {device} has {free / 2**30:.1f} GiB free; use a GPU, --dtype bfloat16, or a smaller arch "
            f"(llava-mid, llava-next-mid, video-llava-mid)"
        )


# --------------------------------------------------------------------------------------------------
# FLOPs and cache size


def _text_dims(tc):
    heads = tc.num_attention_heads
    hd = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    kv = getattr(tc, "num_key_value_heads", None) or heads
    return tc.hidden_size, heads, kv, hd, tc.intermediate_size


def _image_for(ad, schedule, image):
    image = image if image is not None else ad.image_geometry()
    if schedule.n != image.tokens:
        raise ValueError(f"the schedule is for {schedule.n}-token images, the image has {image.tokens} visual "
                         f"tokens; pass image=adapter.image_geometry(image_size) for that image's size")
    return image


def flops_breakdown(model, schedule, batch: int, text_tokens: int, lm_head: str = "last", image=None) -> dict:
    """Analytic prefill FLOPs by part: ``vision``, ``projector``, ``llm``, ``lm_head`` (see FLOPS_CONVENTION).

    ``model``: a model, its adapter, its config or an :data:`ARCHS` name (LLaVA, LLaVA-NeXT, Video-LLaVA; configs
    and names through a weightless meta-device model); ``schedule``: the method's
    :class:`~learnpruner.budget.Schedule` (one image, or video, per sample); ``text_tokens``: non-image tokens per
    sample; ``lm_head``: ``"last"`` (one position per sample, as in generate) or ``"all"`` (every
    position of the final layer, as a plain ``model(**inputs)``); ``image``: the
    :class:`~learnpruner.adapters.base.ImageGeometry` of the image (default: the family's largest; Video-LLaVA:
    an 8-frame video, its frames the crops). The vision tower and projector FLOPs come from the adapter
    (``vision_flops``, ``projector_flops``).
    """
    if lm_head not in ("last", "all"):
        raise ValueError(f"lm_head must be 'last' or 'all', got {lm_head!r}")
    ad = _adapter(model)
    image = _image_for(ad, schedule, image)
    h, heads, kv, hd, ffn = _text_dims(ad.text_config)
    rows = schedule.r1 if schedule.r1 is not None else schedule.n
    fixed = text_tokens + image.structure  # text and structure: in every layer, outside the budget
    llm = 0
    for v in schedule.per_layer():
        n_tok = fixed + v
        llm += 2 * n_tok * (h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * ffn)
        llm += 4 * n_tok * n_tok * heads * hd
    positions = 1 if lm_head == "last" else fixed + schedule.per_layer()[-1]
    head = 2 * positions * h * ad.text_config.vocab_size
    parts = {"vision": ad.vision_flops(image), "projector": ad.projector_flops(rows), "llm": llm, "lm_head": head}
    return {k: batch * v for k, v in parts.items()}


def analytic_flops(model, schedule, batch: int, text_tokens: int, lm_head: str = "last", image=None) -> int:
    """Total analytic prefill FLOPs (sum of :func:`flops_breakdown`)."""
    return int(sum(flops_breakdown(model, schedule, batch, text_tokens, lm_head, image).values()))


def analytic_kv_bytes(model, schedule, batch: int, text_tokens: int, dtype=torch.bfloat16, image=None) -> int:
    """Bytes of the KV cache after a prefill under ``schedule``: per layer keys and values of the text, structure
    and that layer's visual tokens (what :func:`kv_cache_bytes` measures on the real cache)."""
    ad = _adapter(model)
    image = _image_for(ad, schedule, image)
    _, _, kv, hd, _ = _text_dims(ad.text_config)
    size = torch.empty((), dtype=dtype).element_size()
    return sum(2 * batch * kv * (text_tokens + image.structure + v) * hd * size for v in schedule.per_layer())


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


# --------------------------------------------------------------------------------------------------
# timing


class _Clock:
    """Wall-clock on CPU (perf_counter), CUDA events on GPU; also the engine's section timer."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending = []

    def __call__(self, name: str):
        return self.section(name)

    @contextmanager
    def section(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.pending.append((name, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.pending.append((name, t0, time.perf_counter()))

    def collect(self) -> dict:
        """Milliseconds per section name (summed) since the last collect."""
        if self.cuda:
            torch.cuda.synchronize()
        out = defaultdict(float)
        for name, a, b in self.pending:
            out[name] += a.elapsed_time(b) if self.cuda else (b - a) * 1000.0
        self.pending = []
        return dict(out)

    def run(self, fn):
        """``(result, ms, sections)`` of ``fn()``: total ms and the ms of the sections timed inside it."""
        self.collect()
        with self.section("__total__"):
            result = fn()
        sections = self.collect()
        return result, sections.pop("__total__"), sections


def _median(values):
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else None


# --------------------------------------------------------------------------------------------------
# inputs and the ideal forward

_TEXT_INPUTS = ("input_ids", "attention_mask")


def _make_inputs(model, batch: int, text_tokens: int, variants: int, device, dtype, seed: int = 0):
    """``variants`` input dicts of ``batch`` prompts ``<s> t*4 <image>*L t*rest`` with random images (the
    adapter's ``random_images``, ``L`` its placeholders per image; for a video item ``<video>*L`` and one
    random video); and the index of the first placeholder. ``model``: a model or its adapter (whose
    ``bench_item`` chose the item)."""
    ad = _adapter(model)
    slots = ad.image_geometry().placeholders
    pre = min(4, text_tokens - 1)
    post = text_tokens - 1 - pre
    start = 1 + pre  # index of the first image placeholder
    image_token, vocab = ad.bench_token_id, ad.text_config.vocab_size
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(variants):
        text = torch.randint(2, vocab, (batch, text_tokens - 1), generator=g)
        text[ad.placeholders(text)] = 2  # no stray placeholder of any kind in the text
        ids = torch.cat([
            torch.ones(batch, 1, dtype=torch.long), text[:, :pre],
            torch.full((batch, slots), image_token, dtype=torch.long), text[:, pre:pre + post],
        ], dim=1)
        images = ad.random_images(batch, generator=g)
        out.append({
            "input_ids": ids.to(device),
            "attention_mask": torch.ones_like(ids).to(device),
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
    text_ids: list[torch.Tensor]  # [batch, text_tokens]: the prompts without their placeholders
    structure: torch.Tensor | None  # [k, hidden]: the structure rows each image adds (None: none)


def _prepare_batch(model, ad, size: int, text_tokens: int, variants: int, device, dtype, seed: int) -> _Batch:
    from .engine import STRUCTURE

    inputs, start = _make_inputs(ad, size, text_tokens, variants, device, dtype, seed)
    slots = ad.image_geometry().placeholders
    feats, structure = [], None
    with torch.inference_mode():
        for inp in inputs:
            visual = ad.encode(**{k: v for k, v in inp.items() if k not in _TEXT_INPUTS})
            feats.append(visual.rows(list(range(visual.num_images))))
            k = int((visual.slots[0] == STRUCTURE).sum())
            if k and visual.structure is not None:
                structure = visual.structure.reshape(1, -1).expand(k, -1)
    text_ids = [torch.cat([inp["input_ids"][:, :start], inp["input_ids"][:, start + slots:]], dim=1)
                for inp in inputs]
    return _Batch(size, inputs, start, feats, text_ids, structure)


def _ideal_prefill(ad, feats_kept, text_ids, start: int, schedule, text_tokens: int, structure=None):
    """The kept tokens only, no selection: projector on pre-sliced rows, layers on pre-sized sequences
    (text, then the image's structure rows, if any, in every layer)."""
    from transformers.cache_utils import DynamicCache

    from .engine import call_layer, causal_mask

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
    fixed = text_tokens + (structure.shape[0] if structure is not None else 0)
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


# --------------------------------------------------------------------------------------------------
# the benchmark


def _check_positive(values, what: str, accepted: str) -> list[int]:
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{what} must be {accepted}, got {v!r}")
    return values


def _resolve_dtype(dtype, device: torch.device):
    from .hub import parse_dtype

    if isinstance(dtype, torch.dtype):
        return dtype
    dt = parse_dtype(dtype)
    if dt == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return dt


def _plan(methods, tokens, n: int, num_layers: int):
    """``[(method, tokens, schedule or None, reason)]``: ``none`` once (tokens = n); unreachable budgets noted."""
    from .methods import get_method

    plan = []
    for name in methods:
        m = get_method(name)
        if name == "none":
            plan.append((name, n, m.schedule(n, n, num_layers, {}), None))
            continue
        for t in tokens:
            try:
                plan.append((name, t, m.schedule(t, n, num_layers, {}), None))
            except ValueError as e:
                plan.append((name, t, None, str(e)))
    return plan


def _options(method_name: str) -> dict:
    from .methods import get_method

    return {"lpm": "random"} if "lpm" in get_method(method_name).options else {}


@dataclass
class _Settings:
    """The measurement protocol shared by every cell."""

    new_tokens: int
    text_tokens: int
    repeats: int
    warmup: int
    variants: int
    seed: int


def run_bench(
    model=None,
    arch: str | None = None,
    methods="none,fastv,learnpruner",
    tokens=None,
    batch_sizes="1",
    new_tokens: int = 8,
    text_tokens: int = 64,
    repeats: int = 3,
    warmup: int = 1,
    device: str | None = None,
    dtype="auto",
    variants: int = 3,
    progress: bool = True,
    seed: int = 0,
    fast: bool = False,
    item: str | None = None,
) -> list[dict]:
    """Measure every method x budget x batch size; returns one record per cell (see module doc).

    ``model``: a loaded LLaVA, LLaVA-NeXT or Video-LLaVA model, or a hub id / local folder / built-in name; or
    ``arch``: a name from :data:`ARCHS` (random weights). ``methods``/``tokens``/``batch_sizes``: lists or
    comma-separated strings; ``tokens`` are visual tokens per image (average per LLM layer), by default the
    family's (``adapter.bench_budgets()``: 576,192,64 for LLaVA-1.5, 2880,640,320,160 for LLaVA-NeXT,
    2056,685,228 per 8-frame video for Video-LLaVA).
    ``none`` is measured once per batch size (its budget is every token).
    Budgets a method cannot reach give a record with ``skipped`` (the reason) and no measurements.
    With ``fast=True`` every method runs on the fast path (``apply(..., fast=True)``) and ``none``
    is measured twice: as users run it today (plain transformers, the baseline of ``prefill_speedup`` and
    ``e2e_speedup``) and on the fast path (the baseline of ``like_for_like_e2e_speedup``).
    ``item``: what each sample holds, ``"image"`` or ``"video"``, where the family takes both (Qwen2.5-VL:
    an 896x1120 px image of 1280 tokens, or 8 frames of 448x448 px, 1024 tokens); default the family's own.
    """
    from .adapters import adapter_for

    methods, tokens, batch_sizes = _check_args(model, arch, methods, tokens, batch_sizes, item, new_tokens=new_tokens,
                                               text_tokens=text_tokens, repeats=repeats, warmup=warmup,
                                               variants=variants)
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = _resolve_dtype(dtype, dev)
    model, label = _load_model(model, arch, dev, dt, seed)
    ad = adapter_for(model).bench_item(item)
    model.generation_config.pad_token_id = ad.text_config.pad_token_id or 0
    if tokens is None:
        tokens = ad.bench_budgets()
    settings = _Settings(new_tokens, text_tokens, repeats, warmup, variants, seed)
    env = _environment(label, ad, dev, dt, settings)
    plan = _plan(methods, tokens, env["visual_tokens"], env["num_layers"])
    runs = [(name, t, sched, reason, on_fast) for name, t, sched, reason in plan
            for on_fast in ([False, True] if fast and name == "none" else [fast])]
    records = _measure_grid(model, ad, runs, batch_sizes, env, settings, dev, dt, progress)
    _add_speedups(records)
    return records


def _check_args(model, arch, methods, tokens, batch_sizes, item=None, **counts):
    """Step 1: validate every argument before any work; ``(methods, tokens or None, batch sizes)``."""
    from .budget import check_tokens
    from .methods import get_method
    from .options import parse_list

    methods = parse_list(methods, str, "methods")
    for name in methods:
        get_method(name)
    if tokens is not None:
        tokens = [check_tokens(t) for t in parse_list(tokens, _int_like, "tokens")]
    batch_sizes = _check_positive(parse_list(batch_sizes, _int_like, "batch sizes"), "batch sizes",
                                  "positive integers")
    lows = {"new_tokens": 1, "text_tokens": 2, "repeats": 1, "warmup": 0, "variants": 1}
    for what, v in counts.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < lows[what]:
            raise ValueError(f"{what} must be an integer >= {lows[what]}, got {v!r}")
    if (model is None) == (arch is None):
        raise ValueError("give exactly one of model (id, path or instance) and arch "
                         f"(accepted: {', '.join(ARCHS)})")
    if item not in (None, "image", "video"):
        raise ValueError(f"item must be 'image' or 'video' (or None: the family's own), got {item!r}")
    if arch is not None:
        arch_adapter(arch).bench_item(item)  # fail early on a bad name, or an item the family cannot hold
    return methods, tokens, batch_sizes


def _load_model(model, arch, dev: torch.device, dt: torch.dtype, seed: int):
    """Step 2: ``(model, label)``, in eval mode on ``dev`` in ``dt``; refuses an already pruned model."""
    import learnpruner

    if arch is not None:
        model, label = build_arch(arch, dt, dev, seed=seed), arch
    elif isinstance(model, str):
        from .hub import load

        label = model
        model, _ = load(model, device=str(dev), dtype={torch.float32: "float32", torch.float16: "float16",
                                                        torch.bfloat16: "bfloat16"}[dt])
    else:
        label = getattr(model.config, "_name_or_path", "") or type(model).__name__
        model = model.to(dev, dt)
    if learnpruner.is_pruned(model):
        raise ValueError("the model is already pruned; call learnpruner.remove(model) first")
    return model.eval(), label


def _environment(label: str, ad, dev: torch.device, dt: torch.dtype, settings: _Settings) -> dict:
    """Step 3: what every record repeats: model, device, versions, protocol, the image's geometry."""
    import transformers

    cuda = dev.type == "cuda"
    image = ad.image_geometry()
    return {
        "model": label, "family": ad.family, "item": ad.bench_kind,
        "device": torch.cuda.get_device_name(dev) if cuda else f"cpu ({_cpu_name()})",
        "device_type": dev.type, "dtype": str(dt).replace("torch.", ""), "torch": torch.__version__,
        "transformers": transformers.__version__, "cpu_threads": None if cuda else torch.get_num_threads(),
        "new_tokens": settings.new_tokens, "text_tokens": settings.text_tokens, "repeats": settings.repeats,
        "warmup": settings.warmup, "variants": settings.variants,
        "image_size": list(image.size), "crops": image.crops, "visual_tokens": image.tokens,
        "structure_tokens": image.structure, "num_layers": ad.text_config.num_hidden_layers,
        "item_note": ad.bench_note(image),
    }


def _measure_grid(model, ad, runs, batch_sizes, env: dict, settings: _Settings, dev, dt, progress: bool):
    """Step 4: one record per batch size x run (method, budget, path); the model is left unpatched."""
    import learnpruner

    clock = _Clock(dev)
    records = []
    bar = _progress(len(batch_sizes) * len(runs), progress)
    try:
        for b in batch_sizes:
            batch = _prepare_batch(model, ad, b, settings.text_tokens, settings.variants, dev, dt, settings.seed)
            for name, t, sched, reason, on_fast in runs:
                if bar is not None:
                    bar.set_postfix_str(f"{name}{' fast' if on_fast else ''} T={t} b={b}")
                rec = {"method": name, "tokens": t, "batch_size": b, "fast": on_fast, **env}
                if sched is None:
                    rec["skipped"] = reason
                else:
                    rec.update(_measure(model, ad, clock, batch, name, t, sched, settings, on_fast))
                    rec["lpm"] = "random (untrained; speed does not depend on its weights)" if _options(name) else None
                records.append(rec)
                _bar_step(bar)
    finally:
        _bar_close(bar)
        if learnpruner.is_pruned(model):
            learnpruner.remove(model)
    return records


def _add_speedups(records: list[dict]) -> None:
    """Step 5: speedups and FLOPs ratios against ``none`` at the same batch size (plain, and like for like)."""
    measured = [r for r in records if r["method"] == "none" and "skipped" not in r]
    dense = {r["batch_size"]: r for r in measured if not r["fast"]}
    dense_fast = {r["batch_size"]: r for r in measured if r["fast"]}
    for rec in records:
        base = dense.get(rec["batch_size"])
        ok = base is not None and "skipped" not in rec
        rec["prefill_speedup"] = base["prefill_ms"] / rec["prefill_ms"] if ok else None
        rec["e2e_speedup"] = base["e2e_ms"] / rec["e2e_ms"] if ok else None
        rec["ideal_speedup"] = base["ideal_prefill_ms"] / rec["ideal_prefill_ms"] if ok else None
        rec["flops_ratio"] = rec["flops"] / base["flops"] if ok else None
        same = (dense_fast if rec.get("fast") else dense).get(rec["batch_size"])
        ok_same = same is not None and "skipped" not in rec
        rec["like_for_like_e2e_speedup"] = same["e2e_ms"] / rec["e2e_ms"] if ok_same else None
        rec["like_for_like_prefill_speedup"] = same["prefill_ms"] / rec["prefill_ms"] if ok_same else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def _int_like(v):
    if isinstance(v, str):
        v = v.strip()
        return int(v) if v.lstrip("-").isdigit() else float(v)
    return v


def _image_records(st, sched, image, batch: int) -> list[dict]:
    """Per image of the prefill: its visual count, structure positions and visual tokens per layer."""
    if st is not None:
        return [{"count": s.count, "structure": s.structure, "avg_visual_tokens": s.average_tokens,
                 "tokens_per_layer": s.tokens_per_layer} for s in st.images]
    return [{"count": image.tokens, "structure": image.structure, "avg_visual_tokens": sched.average,
             "tokens_per_layer": sched.per_layer()}] * batch


def _measure(model, ad, clock, batch: _Batch, name, t, sched, settings: _Settings, fast: bool = False) -> dict:
    import learnpruner

    cuda = clock.cuda
    new_tokens, repeats, warmup = settings.new_tokens, settings.repeats, settings.warmup
    inputs, b = batch.inputs, batch.size
    # the baseline is the model as users run it today: plain transformers, not patched at all
    plain = name == "none" and not fast
    if plain:
        state = _PlainState(ad.vision_module())
    else:
        learnpruner.apply(model, name, tokens=t, fast=fast, **_options(name))
        state = model._learnpruner
    v = len(inputs)

    def prefill(i):
        return model(**inputs[i % v], use_cache=True, logits_to_keep=1)

    def generate(i):
        return model.generate(**inputs[i % v], max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False)

    try:
        with torch.inference_mode():
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            for i in range(warmup):
                prefill(i)
                generate(i)
            state.timer = clock
            prefill_ms, sections, out = [], defaultdict(list), None
            for i in range(repeats):
                out, ms, secs = clock.run(lambda i=i: prefill(i))
                prefill_ms.append(ms)
                for key in ("vision", "stage1", "projector", "llm_select"):
                    sections[key].append(secs.get(key, 0.0))
            state.timer = None
            st = None if plain else learnpruner.stats(model)
            cache = _output_cache(out)
            kv = kv_cache_bytes(cache)
            del out, cache
            e2e_ms = []
            for i in range(repeats):
                seq, ms, _ = clock.run(lambda i=i: generate(i))
                if seq.shape[1] - inputs[i % v]["input_ids"].shape[1] != new_tokens:
                    raise RuntimeError(f"generate produced {seq.shape[1]} tokens, expected {new_tokens} new ones")
                e2e_ms.append(ms)
            peak = torch.cuda.max_memory_allocated() if cuda else None
    finally:
        state.timer = None
        if plain:
            state.close()
        else:
            learnpruner.remove(model)

    rows = sched.r1 if sched.r1 is not None else sched.n
    kept_feats = [f[:, :rows].contiguous() for f in batch.feats]

    def ideal_logits(feats, text_ids):
        return _ideal_prefill(ad, feats, text_ids, batch.start, sched, settings.text_tokens, batch.structure)[0]

    # on the fast path the ideal is the graph floor: the same kept-only forward captured once and replayed (GPU)
    floors = GraphCache() if fast else GraphCache(enabled=False)

    def ideal(i):
        return floors.run("ideal", ideal_logits, kept_feats[i % v], batch.text_ids[i % v])

    with torch.inference_mode():
        for i in range(warmup):
            ideal(i)
        ideal_ms = [clock.run(lambda i=i: ideal(i))[1] for i in range(repeats)]
    med = {k: _median(x) for k, x in sections.items()}
    prefill_med, e2e_med = _median(prefill_ms), _median(e2e_ms)
    ideal_llm = _median(ideal_ms)
    ideal_total = med["vision"] + ideal_llm
    image = ad.image_geometry()
    breakdown = flops_breakdown(ad, sched, b, settings.text_tokens, image=image)
    return {
        "path": "plain transformers (unpatched)" if plain else
                "learnpruner engine, fast path (static prefill and decode)" if fast else "learnpruner engine",
        "avg_visual_tokens": st.average_tokens if st is not None else sched.average,
        "tokens_per_layer": st.tokens_per_layer if st is not None else sched.per_layer(),
        "images": _image_records(st, sched, image, b),
        "schedule": {"r1": sched.r1, "drops": [list(d) for d in sched.drops]},
        "vision_ms": med["vision"], "stage1_ms": med["stage1"], "projector_ms": med["projector"],
        "llm_select_ms": med["llm_select"],
        "prefill_ms": prefill_med, "prefill_ms_all": prefill_ms,
        "decode_ms_per_token": (e2e_med - prefill_med) / (new_tokens - 1) if new_tokens > 1 else None,
        "e2e_ms": e2e_med, "e2e_ms_all": e2e_ms,
        "throughput_tok_s": b * new_tokens / (e2e_med / 1000.0),
        "ideal_llm_ms": ideal_llm, "ideal_prefill_ms": ideal_total, "overhead": prefill_med / ideal_total,
        "peak_mem_bytes": peak, "kv_cache_bytes": kv,
        "flops": int(sum(breakdown.values())), "flops_breakdown": breakdown,
    }


class _PlainState:
    """Times the vision tower of an unpatched model with forward hooks (the engine's sections otherwise)."""

    def __init__(self, vision_tower):
        self.timer = None
        self._open = []
        self._handles = [
            vision_tower.register_forward_pre_hook(self._enter),
            vision_tower.register_forward_hook(self._exit),
        ]

    def _enter(self, module, args):
        if self.timer is not None:
            cm = self.timer("vision")
            cm.__enter__()
            self._open.append(cm)

    def _exit(self, module, args, out):
        if self._open:
            self._open.pop().__exit__(None, None, None)

    def close(self):
        for h in self._handles:
            h.remove()


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc="bench", file=sys.stderr, dynamic_ncols=True)


def _bar_step(bar):
    if bar is not None:
        bar.update(1)


def _bar_close(bar):
    if bar is not None:
        bar.close()


# --------------------------------------------------------------------------------------------------
# output


def _mib(x):
    return None if x is None else x / 2**20


def _fmt(v, digits=1):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _image_note(r: dict) -> str:
    """How one sample's item is described under the table: the adapter's ``bench_note`` the record carries
    (records of older runs without it: the token count)."""
    return r.get("item_note") or f"{r['visual_tokens']} visual tokens"


def markdown_table(records: list[dict]) -> str:
    """The results as a markdown table, with the measurement conventions underneath."""
    head = ["method", "tokens", "batch", "avg vis tok", "vision ms", "stage1 ms", "llm sel ms", "prefill ms",
            "ideal ms", "overhead", "prefill speedup", "ideal speedup", "decode ms/tok", "e2e ms", "e2e speedup",
            "tok/s", "peak mem MiB", "KV MiB", "GFLOPs", "FLOPs ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for r in records:
        if "skipped" in r:
            notes.append(f"- {r['method']} tokens={r['tokens']} batch={r['batch_size']}: skipped ({r['skipped']})")
            continue
        label = r["method"] + (" (fast)" if r.get("fast") else " (plain HF)" if r["method"] == "none" else "")
        cells = [label, r["tokens"], r["batch_size"], _fmt(r["avg_visual_tokens"]), _fmt(r["vision_ms"]),
                 _fmt(r["stage1_ms"], 2), _fmt(r["llm_select_ms"], 2), _fmt(r["prefill_ms"]),
                 _fmt(r["ideal_prefill_ms"]), _fmt(r["overhead"], 2), _fmt(r["prefill_speedup"], 2),
                 _fmt(r["ideal_speedup"], 2), _fmt(r["decode_ms_per_token"]), _fmt(r["e2e_ms"]),
                 _fmt(r["e2e_speedup"], 2), _fmt(r["throughput_tok_s"], 2), _fmt(_mib(r["peak_mem_bytes"])),
                 _fmt(_mib(r["kv_cache_bytes"]), 2), _fmt(r["flops"] / 1e9), _fmt(r["flops_ratio"], 3)]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    if records:
        r = records[0]
        threads = f", {r['cpu_threads']} torch thread(s)" if r["cpu_threads"] else ""
        lines += [
            "",
            f"model {r['model']} on {r['device']}{threads}; dtype {r['dtype']}; torch {r['torch']}, transformers "
            f"{r['transformers']}; {r['text_tokens']} text tokens + {_image_note(r)} per sample, "
            f"{r['new_tokens']} new tokens; median of {r['repeats']} runs after {r['warmup']} warm-up(s), inputs "
            f"rotating over {r['variants']} random images/prompts; "
            + ("CUDA-event timing." if r["device_type"] == "cuda" else "time.perf_counter timing."),
            "tokens: the budget (visual tokens per image, average per LLM layer); `none` is measured once, at "
            "every token, on the unpatched model (plain transformers). "
            "prefill = one forward with the KV cache and logits_to_keep=1 (time to first token, vision included). "
            "decode ms/tok = (e2e - prefill) / (new tokens - 1), e2e = generate (greedy, exactly N new tokens). "
            "ideal = measured vision ms + the plain decoder layers fed only the scheduled token counts (no "
            "selection work; on the fast path, on a GPU, that forward replayed as a CUDA graph: the floor); "
            "overhead = prefill / ideal. Speedups are against `none` on plain transformers at the "
            "same batch size; (fast) rows ran on the fast path, prefill and decode (results.json also has "
            "like-for-like speedups against `none` on the fast path).",
            "peak mem: torch.cuda.max_memory_allocated (weights included) over prefill and generate"
            + ("; not available on CPU (reported as null)." if r["device_type"] != "cuda" else "."),
            "KV: bytes of the cache tensors after prefill. " + FLOPS_CONVENTION + ".",
        ]
        if any(x.get("lpm") for x in records):
            lines.append("Methods with a Learnable Pruning Module use lpm='random': speed does not depend on "
                         "trained weights.")
    if notes:
        lines += ["", "Skipped:"] + notes
    return "\n".join(lines)


def write_results(records: list[dict], out_dir) -> Path:
    """``out_dir/results.json`` (atomically); returns its path."""
    path = Path(out_dir) / "results.json"

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(records, f, indent=1)
            f.write("\n")

    atomic_write(path, write)
    return path


def plot_results(records: list[dict], out_dir) -> Path | None:
    """``out_dir/bench.png``: prefill ms and prefill speedup vs tokens, one line per method and batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in records if "skipped" not in r]
    if not done:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    groups = defaultdict(list)
    for r in done:
        groups[(r["method"], r["batch_size"])].append(r)
    for (method, b), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["avg_visual_tokens"] or r["tokens"])
        x = [r["avg_visual_tokens"] or r["tokens"] for r in rs]
        marker = "s" if len(rs) == 1 else "o"
        line = ax1.plot(x, [r["prefill_ms"] for r in rs], marker=marker, label=f"{method} b={b}")[0]
        ax1.plot(x, [r["ideal_prefill_ms"] for r in rs], ls=":", color=line.get_color())
        if rs[0]["prefill_speedup"] is not None:
            ax2.plot(x, [r["prefill_speedup"] for r in rs], marker=marker, color=line.get_color(),
                     label=f"{method} b={b}")
            ax2.plot(x, [r["ideal_speedup"] for r in rs], ls=":", color=line.get_color())
    r0 = done[0]
    ax1.set(xlabel="visual tokens per image (average per LLM layer)", ylabel="prefill ms (dotted: ideal)",
            title=f"{r0['model']} · {r0['device_type']} · {r0['dtype']}")
    ax2.set(xlabel="visual tokens per image (average per LLM layer)", ylabel="prefill speedup vs none (dotted: ideal)")
    ax2.axhline(1.0, color="grey", lw=0.5)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no `none` baseline measured", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    path = Path(out_dir) / "bench.png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# the command


def _bench_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="hub id, local folder or built-in name (loads real weights)")
    src.add_argument("--arch", help=f"architecture with random weights, no download: {', '.join(ARCHS)}")
    p.add_argument("--methods", default="none,fastv,learnpruner", help="comma-separated method names")
    p.add_argument("--tokens", default=None,
                   help="comma-separated budgets: visual tokens per image, average per LLM layer (default: every "
                   "token, then the family's papers' budgets: 576,192,64 for LLaVA-1.5, 2880,640,320,160 for "
                   "LLaVA-NeXT at 672x672, 2056,685,228 per 8-frame video for Video-LLaVA)")
    p.add_argument("--batch-sizes", default="1", help="comma-separated batch sizes")
    p.add_argument("--new-tokens", type=int, default=8, help="tokens generated for end-to-end and decode time")
    p.add_argument("--text-tokens", type=int, default=64, help="non-image prompt tokens per sample")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per cell (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per cell")
    p.add_argument("--variants", type=int, default=3, help="different random inputs cycled through the runs")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="float32, float16, bfloat16 or auto (bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch.set_num_threads")
    p.add_argument("--out", default="learnpruner-bench", help="folder for results.json and bench.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--fast", action="store_true",
                   help="run every method on the fast path (static-shape prefill and decode; CUDA graphs on GPU)")
    p.add_argument("--item", choices=("image", "video"), default=None,
                   help="what each sample holds where the family takes both (Qwen2.5-VL: an image of 1280 tokens "
                   "or an 8-frame 448x448 video of 1024; default: the family's own, image except Video-LLaVA)")


@command("bench", "measure speed, memory and FLOPs of pruning methods", _bench_args)
def _bench(args: argparse.Namespace) -> int:
    if args.threads is not None:
        if args.threads <= 0:
            raise ValueError(f"--threads must be a positive integer, got {args.threads}")
        torch.set_num_threads(args.threads)
    records = run_bench(
        model=args.model, arch=args.arch, methods=args.methods, tokens=args.tokens, batch_sizes=args.batch_sizes,
        new_tokens=args.new_tokens, text_tokens=args.text_tokens, repeats=args.repeats, warmup=args.warmup,
        device=args.device, dtype=args.dtype, variants=args.variants, progress=not args.no_progress,
        fast=args.fast, item=args.item,
    )
    print(markdown_table(records))
    path = write_results(records, args.out)
    png = plot_results(records, args.out)
    print(f"\nwrote {path}" + (f" and {png}" if png else ""))
    return 0
