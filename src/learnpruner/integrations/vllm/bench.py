"""``learnpruner vllm-bench``: vLLM serving unpruned against pruned, on one stream of image requests.

For each setting (``none`` is stock vLLM's model class run through the plugin with nothing pruned) an offline
engine (``vllm.LLM``) starts once, then:

- time to first token: the median over ``--repeats`` single requests of one image and a question, generating
  one token (the prefill, vision tower included, and vLLM's scheduling);
- throughput: ``--requests`` requests submitted together (continuous batching), ``--new-tokens`` each, as
  requests per second and generated tokens per second.

``--model`` takes a LLaVA-1.5 or Qwen2.5-VL folder (``shapes-tiny``: ShapesVQA images and questions);
``--arch llava-1.5-7b`` (or ``qwen2.5-vl-7b``, ...) writes a folder holding that architecture's config and the
testbed's processor, and vLLM runs it with random weights (``load_format="dummy"``: nothing to download; the speed
is the architecture's) on ShapesVQA images resized to the architecture's bench image (896x1120 px, 1280 tokens, on
Qwen2.5-VL). Results go to ``OUT/vllm-bench.json`` with the card they were measured on.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from ...commands import command

__all__ = ["run_vllm_bench"]


def _arch_folder(arch: str, out: Path) -> tuple[Path, str]:
    """A model folder for ``arch`` (config, word-level tokenizer and processor; no weights) and its family."""
    from ...bench import arch_config
    from ...bench.geometry import bench_processor, processor_families
    from . import ARCHITECTURES

    config = arch_config(arch)
    family = config.model_type
    with_processor = set(processor_families())
    if family not in ARCHITECTURES or family not in with_processor:
        raise ValueError(f"--arch {arch!r} ({family}): vllm-bench runs the architectures of "
                         f"{', '.join(sorted(set(ARCHITECTURES) & with_processor))}")
    folder = out / f"arch-{arch}"
    processor = bench_processor(family, config)
    config.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, family


def _requests(n: int, family: str, size: tuple[int, int] | None = None, seed: int = 0) -> list[dict]:
    """``n`` ShapesVQA questions with their images (resized to ``size`` (h, w) px if given), in the prompt form
    of ``family``'s vLLM model (its own image placeholder)."""
    from ...testbed.shapes import generate_item
    from . import model_class

    placeholder = model_class(family).get_placeholder_str("image", 1)
    items = [generate_item("test", seed + i) for i in range(n)]
    return [{"prompt": f"USER: {placeholder}\n{it.question} ASSISTANT:",
             "multi_modal_data": {"image": it.image if size is None else it.image.resize(size[::-1])}}
            for it in items]


def _limits(family: str) -> dict:
    """One image a prompt, and no video where the family's vLLM model takes videos (the requests hold none: no
    video budget is profiled)."""
    from . import model_class

    try:
        video = model_class(family).get_placeholder_str("video", 1) is not None
    except (ValueError, NotImplementedError):
        video = False
    return {"image": 1, "video": 0} if video else {"image": 1}


def _card() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    from ...bench import cpu_name

    return f"cpu ({cpu_name()})"


def run_vllm_bench(model: str | None, arch: str | None, settings: list[tuple[str, int | None]], requests: int = 32,
                   new_tokens: int = 8, repeats: int = 5, out_dir: str = "learnpruner-vllm-bench",
                   engine_kwargs: dict | None = None, lpm: str | None = None, print_fn=print) -> list[dict]:
    """Measure every ``(method, tokens)`` setting; returns the records (also written to ``OUT/vllm-bench.json``).
    ``lpm``: the LPM of the LPM methods (default: the model folder's own; with ``arch``: an untrained one, as the
    speed does not depend on its weights)."""
    import vllm

    from ...hub import resolve
    from ...utils import atomic_write
    from . import overrides
    from .stage1 import Stage1Spec

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    cuda = torch.cuda.is_available()  # on a GPU: bfloat16 and vLLM's CUDA graphs; on a CPU: float32, eager
    kwargs = {"dtype": "bfloat16" if cuda else "float32", "enforce_eager": not cuda, "mm_processor_cache_gb": 0,
              **(engine_kwargs or {})}
    size = None
    if arch is not None:
        from ...bench import arch_adapter

        folder, family = _arch_folder(arch, out)
        path, kwargs["load_format"] = str(folder), "dummy"
        size = arch_adapter(arch).item_geometry().size  # the architecture's bench image (1280 tokens on Qwen)
    else:
        path = resolve(model)
        from ...hub import load_config

        family = load_config(path).model_type
    kwargs.setdefault("limit_mm_per_prompt", _limits(family))
    stream, single = _requests(requests, family, size), _requests(repeats, family, size, seed=requests)
    records = []
    for method, tokens in settings:
        options = {}
        if Stage1Spec.check(method, tokens).needs_lpm() and (lpm or arch):
            options["lpm"] = lpm or "random"
        llm = vllm.LLM(path, hf_overrides=overrides(family, method, tokens, **options), **kwargs)
        first = vllm.SamplingParams(max_tokens=1, temperature=0)
        llm.generate(single[:1], first, use_tqdm=False)  # warm-up
        ttft, latency = [], []
        params = vllm.SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0)
        for req in single:
            t0 = time.perf_counter()
            o = llm.generate([req], first, use_tqdm=False)[0]
            ttft.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            llm.generate([req], params, use_tqdm=False)
            latency.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        outs = llm.generate(stream, params, use_tqdm=False)
        wall = time.perf_counter() - t0
        rec = {"method": method, "tokens": tokens, "prompt_tokens": len(o.prompt_token_ids),
               "ttft_ms": 1000 * statistics.median(ttft), **percentiles("ttft_ms", [1000 * x for x in ttft]),
               **percentiles("latency_ms", [1000 * x for x in latency]), "requests_per_s": requests / wall,
               "generated_tokens_per_s": sum(len(x.outputs[0].token_ids) for x in outs) / wall,
               "requests": requests, "new_tokens": new_tokens, "card": _card(), "model": arch or model}
        records.append(rec)
        print_fn(f"{_label(method, tokens)}: {rec['prompt_tokens']} prompt tokens, TTFT {rec['ttft_ms']:.0f} ms, "
                 f"{rec['requests_per_s']:.2f} req/s")
        del llm
        import gc

        gc.collect()
    base = next((r for r in records if r["method"] == "none"), None)
    for r in records:
        if base is not None:
            r["ttft_speedup"] = base["ttft_ms"] / r["ttft_ms"]
            r["throughput_speedup"] = r["requests_per_s"] / base["requests_per_s"]
    atomic_write(out / "vllm-bench.json", lambda tmp: Path(tmp).write_text(json.dumps(records, indent=1) + "\n"))
    return records


def percentiles(key: str, values: list[float], qs=(50, 90, 99)) -> dict:
    """``{key_p50, key_p90, key_p99}`` of ``values`` (linear interpolation between order statistics, as numpy's
    default and vLLM's serving benchmark report them)."""
    if not values:
        return {}
    xs = sorted(values)
    out = {}
    for q in qs:
        pos = (len(xs) - 1) * q / 100
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        out[f"{key}_p{q}"] = xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
    return out


def _label(method: str, tokens) -> str:
    return "none (all tokens)" if method == "none" else f"{method}@{tokens}"


def table(records: list[dict]) -> str:
    lines = ["| method | visual tokens | prompt tokens | TTFT ms p50 / p90 / p99 | vs none | latency ms p50 / p90 / "
             "p99 | req/s | vs none |", "|---|---|---|---|---|---|---|---|"]

    def pct(r, key):
        return " / ".join(f"{r[f'{key}_p{q}']:.0f}" if f"{key}_p{q}" in r else "-" for q in (50, 90, 99))

    for r in records:
        visual = "all" if r["method"] == "none" else r["tokens"]
        lines.append(f"| {r['method']} | {visual} | {r['prompt_tokens']} | {pct(r, 'ttft_ms')} | "
                     f"{r.get('ttft_speedup', 1):.2f}x | {pct(r, 'latency_ms')} | {r['requests_per_s']:.2f} | "
                     f"{r.get('throughput_speedup', 1):.2f}x |")
    return "\n".join(lines)


def _args(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="a LLaVA-1.5 or Qwen2.5-VL folder, or a built-in name (shapes-tiny)")
    what.add_argument("--arch", help="llava-1.5-7b, llava-1.5-13b, llava-mid, qwen2.5-vl-7b, qwen2.5-vl-mid: that "
                      "architecture, random weights")
    p.add_argument("--methods", default="none,learnpruner,divprune", help="comma-separated stage-1 methods")
    p.add_argument("--tokens", default="64,32", help="comma-separated budgets (visual tokens per image)")
    p.add_argument("--requests", type=int, default=32, help="requests in the throughput stream")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5, help="single requests timed for the time to first token")
    p.add_argument("--lpm", default=None, help="LPM folder (default: the model's own; with --arch: an untrained one)")
    p.add_argument("--out", default="learnpruner-vllm-bench")


@command("vllm-bench", "vLLM serving, unpruned against pruned: time to first token and requests per second", _args)
def _vllm_bench(args: argparse.Namespace) -> int:
    from ...options import parse_list

    methods = parse_list(args.methods, str, "--methods", unique=True)
    budgets = parse_list(args.tokens, int, "--tokens", unique=True)
    for name, value in (("requests", args.requests), ("new_tokens", args.new_tokens), ("repeats", args.repeats)):
        if value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    from . import overrides

    settings = [("none", None)] if "none" in methods else []
    settings += [(m, t) for m in methods if m != "none" for t in budgets]
    for m, t in settings:
        overrides("llava", m, t)  # every setting checked (alike for every family) before the first engine starts
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    records = run_vllm_bench(args.model, args.arch, settings, args.requests, args.new_tokens, args.repeats, args.out,
                             lpm=args.lpm)
    print(f"\n{records[0]['model']} on {records[0]['card']}; {args.requests} requests x {args.new_tokens} new tokens; "
          f"TTFT and latency ({args.new_tokens} new tokens): percentiles over {args.repeats} single requests")
    print(table(records))
    return 0
