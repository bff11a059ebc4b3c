"""The benchmark loop: settings, the grid of method x budget x batch size, and one measurement."""

from __future__ import annotations

import os
import platform
import sys
from collections import defaultdict
from dataclasses import dataclass

import torch

from ..engine.graphs import GraphCache
from .archs import ARCHS, arch_adapter, build_arch
from .flops import _output_cache, flops_breakdown, kv_cache_bytes
from .inputs import _Batch, _ideal_prefill, _prepare_batch
from .timing import _Clock, _median


def _check_positive(values, what: str, accepted: str) -> list[int]:
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{what} must be {accepted}, got {v!r}")
    return values


def _resolve_dtype(dtype, device: torch.device):
    from ..hub import parse_dtype

    if isinstance(dtype, torch.dtype):
        return dtype
    dt = parse_dtype(dtype)
    if dt == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return dt


def _plan(model, methods, tokens, n: int):
    """``[(method, tokens, schedule or None, reason)]`` for items of ``n`` tokens, each from the method's resolved plan
    (:func:`learnpruner.resolve`): ``none`` once (tokens = n); unreachable budgets noted."""
    from ..plan import resolve

    plan = []
    for name in methods:
        for t in [n] if name == "none" else tokens:
            try:
                plan.append((name, t, resolve(model, name, t, **_options(name)).schedule(n), None))
            except ValueError as e:
                plan.append((name, t, None, str(e)))
    return plan


def _options(method_name: str) -> dict:
    from ..methods import get_method

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
    from .geometry import bench_for

    methods, tokens, batch_sizes = _check_args(model, arch, methods, tokens, batch_sizes, item, new_tokens=new_tokens,
                                               text_tokens=text_tokens, repeats=repeats, warmup=warmup,
                                               variants=variants)
    from ..hub import check_device

    if device is not None:
        check_device(device)
        if torch.device(device).type == "meta":
            raise ValueError("bench times real runs; device 'meta' holds no data: use cpu or cuda")
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = _resolve_dtype(dtype, dev)
    model, label = _load_model(model, arch, dev, dt, seed)
    ad = bench_for(model, item)
    model.generation_config.pad_token_id = ad.text_config.pad_token_id or 0
    if tokens is None:
        tokens = ad.bench_budgets()
    settings = _Settings(new_tokens, text_tokens, repeats, warmup, variants, seed)
    env = _environment(label, ad, dev, dt, settings)
    plan = _plan(model, methods, tokens, env["visual_tokens"])
    runs = [(name, t, sched, reason, on_fast) for name, t, sched, reason in plan
            for on_fast in ([False, True] if fast and name == "none" else [fast])]
    records = _measure_grid(model, ad, runs, batch_sizes, env, settings, dev, dt, progress)
    _add_speedups(records)
    return records


def _check_args(model, arch, methods, tokens, batch_sizes, item=None, **counts):
    """Step 1: validate every argument before any work; ``(methods, tokens or None, batch sizes)``."""
    from ..budget import check_tokens
    from ..methods import get_method
    from ..options import parse_list

    methods = parse_list(methods, str, "methods", unique=True)
    for name in methods:
        get_method(name)
    if tokens is not None:
        tokens = [check_tokens(t) for t in parse_list(tokens, _int_like, "tokens", unique=True)]
    batch_sizes = _check_positive(parse_list(batch_sizes, _int_like, "batch sizes", unique=True), "batch sizes",
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
        from ..hub import load

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
    image = ad.item_geometry()
    return {
        "model": label, "family": ad.family, "item": ad.bench_kind,
        "device": torch.cuda.get_device_name(dev) if cuda else f"cpu ({cpu_name()})",
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
        # a row that prunes nothing (the budget keeps every token) gets no speedup: any difference is noise
        ok = base is not None and "skipped" not in rec and (rec.get("prunes", True) or rec["method"] == "none")
        rec["prefill_speedup"] = base["prefill_ms"] / rec["prefill_ms"] if ok else None
        rec["e2e_speedup"] = base["e2e_ms"] / rec["e2e_ms"] if ok else None
        rec["ideal_speedup"] = base["ideal_prefill_ms"] / rec["ideal_prefill_ms"] if ok else None
        rec["flops_ratio"] = rec["flops"] / base["flops"] if ok else None
        same = (dense_fast if rec.get("fast") else dense).get(rec["batch_size"])
        ok_same = same is not None and "skipped" not in rec
        rec["like_for_like_e2e_speedup"] = same["e2e_ms"] / rec["e2e_ms"] if ok_same else None
        rec["like_for_like_prefill_speedup"] = same["prefill_ms"] / rec["prefill_ms"] if ok_same else None


def cpu_name() -> str:
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

    def generate(i, n=new_tokens):
        return model.generate(**inputs[i % v], max_new_tokens=n, min_new_tokens=n, do_sample=False)

    try:
        with torch.inference_mode():
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            for i in range(warmup):
                prefill(i)
                generate(i)
            # the prefill's time uninstrumented (the section timer adds work of its own), then its sections
            prefill_ms, sections, out = [], defaultdict(list), None
            for i in range(repeats):
                out, ms, _ = clock.run(lambda i=i: prefill(i))
                prefill_ms.append(ms)
            state.timer = clock
            for i in range(repeats):
                _, _, secs = clock.run(lambda i=i: prefill(i))
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
            # decode = generate(N) - generate(1), both through generate: the same preparation, so the difference is
            # the N - 1 decode steps (a standalone forward against generate once gave negative decode times)
            first_ms = [clock.run(lambda i=i: generate(i, 1))[1] for i in range(repeats)] if new_tokens > 1 else []
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
        return _ideal_prefill(ad, feats, text_ids, batch.start, sched, batch.structure)[0]

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
    image = ad.item_geometry()
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
        "prefill_ms": prefill_med, "prefill_ms_all": prefill_ms, **_spread("prefill_ms", prefill_ms),
        "decode_ms_per_token": _decode_per_token(e2e_ms, first_ms, new_tokens), "first_token_ms_all": first_ms,
        "e2e_ms": e2e_med, "e2e_ms_all": e2e_ms, **_spread("e2e_ms", e2e_ms),
        "prunes": not sched.is_noop,
        "throughput_tok_s": b * new_tokens / (e2e_med / 1000.0),
        "ideal_llm_ms": ideal_llm, "ideal_prefill_ms": ideal_total, "overhead": prefill_med / ideal_total,
        "peak_mem_bytes": peak, "kv_cache_bytes": kv,
        "flops": int(sum(breakdown.values())), "flops_breakdown": breakdown,
    }


def _spread(key: str, values: list[float]) -> dict:
    """``{key_min, key_max}`` of a figure's runs (its spread beside the median)."""
    return {f"{key}_min": min(values), f"{key}_max": max(values)} if values else {}


def _decode_per_token(e2e_ms: list[float], first_ms: list[float], new_tokens: int) -> float | None:
    """Median ms per decode step: ``(median generate(N) - median generate(1)) / (N - 1)``, never below 0 (a
    difference of two medians within their noise is reported as 0, not as a negative time)."""
    if new_tokens <= 1 or not first_ms:
        return None
    return max(0.0, (_median(e2e_ms) - _median(first_ms)) / (new_tokens - 1))


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
