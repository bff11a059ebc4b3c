"""Every speed figure the README claims, in one run: ``bash benchmarks/gpu.sh [--smoke] [--out DIR]``.

Full run (one H100-class GPU, bf16, random weights, no network; about 8 minutes): LLaVA-1.5-7B at batch 1
and 16 with 576/192/64/32 visual tokens, methods none/fastv/learnpruner, on the plain and the fast path;
LLaVA-NeXT-7B (a 672x672 image) at 2880 and 160; Qwen2.5-VL-7B with an 896x1120 image (1280 -> 142) and an
8-frame 448x448 video (1024 -> 114) at batch 1; Qwen3-VL-8B with a 1024x1280 image (1280 -> 142, DeepStack
included) and an 8-frame 512x512 video (1024 -> 114, timestamped frame groups) at batch 1; LLaVA-OneVision-7B with
a 2304x2304 image (7290 -> 405, anyres_max_9) and an 8-frame video (1568 -> 196), and InternVL3-8B with 6 tiles
plus the thumbnail (1792 -> 199), learnpruner-set at batch 1. ``--smoke`` runs the
same code on tiny architectures on the CPU in seconds (CI runs it). Writes ``results.json``, ``table.md`` and the
plots into ``--out`` and prints the table, with the card (device, dtype, versions, command) and the issue's
targets checked.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import transformers

from learnpruner import bench
from learnpruner.utils import atomic_write

FULL = [  # (arch, methods, tokens, batch sizes, item: None for the family's own)
    ("llava-1.5-7b", "none,fastv,learnpruner", "576,192,64,32", "1,16", None),
    ("llava-next-7b", "none,learnpruner", "2880,160", "1", None),
    ("qwen2.5-vl-7b", "none,learnpruner", "1280,142", "1", "image"),
    ("qwen2.5-vl-7b", "none,learnpruner", "1024,114", "1", "video"),
    ("qwen3-vl-8b", "none,learnpruner", "1280,142", "1", "image"),
    ("qwen3-vl-8b", "none,learnpruner", "1024,114", "1", "video"),
    ("llava-onevision-7b", "none,learnpruner-set", "7290,405", "1", "image"),
    ("llava-onevision-7b", "none,learnpruner-set", "1568,196", "1", "video"),
    ("internvl3-8b", "none,learnpruner-set", "1792,199", "1", None),
]
SMOKE = [
    ("llava-tiny", "none,fastv,learnpruner", "64,32,16", "1,2", None),
    ("llava-next-tiny", "none,learnpruner", "80,20", "1", None),
    ("qwen2.5-vl-tiny", "none,learnpruner", "1024,114", "1", "video"),
    ("qwen3-vl-tiny", "none,learnpruner", "1280,142", "1", "image"),
    ("qwen3-vl-tiny", "none,learnpruner", "1024,114", "1", "video"),
    ("llava-onevision-tiny", "none,learnpruner-set", "160,18", "1", "image"),
    ("llava-onevision-tiny", "none,learnpruner-set", "32,8", "1", "video"),
    ("internvl3-tiny", "none,learnpruner-set", "112,12", "1", None),
]


def _card(device: torch.device, dtype, argv: list[str]) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "CPU")
    return {"device": name, "device_type": device.type, "dtype": str(dtype).replace("torch.", ""),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "command": "bash benchmarks/gpu.sh " + shlex.join(argv),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def run(smoke: bool, out: Path, argv: list[str], repeats: int | None = None) -> list[dict]:
    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    records = []
    model, built = None, None
    for arch, methods, tokens, batches, item in (SMOKE if smoke else FULL):
        if built != arch:
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
            model, built = bench.build_arch(arch, dtype, device), arch
        for fast in (False, True):
            recs = bench.run_bench(model, methods=methods, tokens=tokens, batch_sizes=batches, new_tokens=8,
                                   text_tokens=64, repeats=repeats or (1 if smoke else 5), warmup=0 if smoke else 2,
                                   device=str(device), dtype=dtype, progress=not smoke, fast=fast, item=item)
            for r in recs:
                r["arch"] = arch if item is None else f"{arch}-{item}"
                r["path"] = "fast" if r.get("fast") else "plain"
                if r.get("prefill_ms") and r.get("stage1_ms") is not None:
                    r["selection_share"] = ((r.get("stage1_ms") or 0) + (r.get("llm_select_ms") or 0)) / r["prefill_ms"]
            records += [r for r in recs if not (fast and r["method"] == "none" and not r.get("fast"))]
    card = _card(device, dtype, argv)
    for r in records:
        r["card"] = card
    return records


def _find(records, arch, method, tokens, batch, path):
    for r in records:
        if (r["arch"], r["method"], r["batch_size"], r["path"]) == (arch, method, batch, path) and \
                (method == "none" or r["tokens"] == tokens) and not r.get("skipped"):
            return r
    return None


def targets(records: list[dict], smoke: bool) -> list[tuple[str, float | None, float, bool | None]]:
    """The issue's speed targets: ``(what, measured, target, met)`` (None where a cell is missing)."""
    arch = "llava-tiny" if smoke else "llava-1.5-7b"
    low, mid = (16, 32) if smoke else (32, 64)
    plain_none = _find(records, arch, "none", None, 1, "plain")
    fast_none = _find(records, arch, "none", None, 1, "fast")
    lp_fast = _find(records, arch, "learnpruner", low, 1, "fast")
    none16 = _find(records, arch, "none", None, 16 if not smoke else 2, "plain")
    lp16 = _find(records, arch, "learnpruner", mid, 16 if not smoke else 2, "fast")
    lp_plain = _find(records, arch, "learnpruner", low, 1, "plain")

    def ratio(a, b, key):
        return a[key] / b[key] if a and b and a.get(key) and b.get(key) else None

    rows = [
        (f"batch-1 prefill at {low} tokens, learnpruner fast vs plain transformers (all tokens)",
         ratio(plain_none, lp_fast, "prefill_ms"), 2.5),
        ("same path both sides: measured / ideal speedup",
         (ratio(fast_none, lp_fast, "prefill_ms") / ratio(fast_none, lp_fast, "ideal_prefill_ms"))
         if ratio(fast_none, lp_fast, "ideal_prefill_ms") and ratio(fast_none, lp_fast, "prefill_ms") else None, 0.9),
        (f"batch-{16 if not smoke else 2} prefill throughput at {mid} tokens vs plain transformers",
         ratio(none16, lp16, "prefill_ms"), 4.5),
        (f"KV cache at {low} tokens: times smaller", ratio(plain_none, lp_plain, "kv_cache_bytes"), 6.8),
    ]
    out = [(what, value, goal, None if value is None else value >= goal) for what, value, goal in rows]
    share = lp_fast.get("selection_share") if lp_fast else None
    out.append(("selection overhead share of the pruned prefill (at most)", share, 0.03,
                None if share is None else share <= 0.03))
    return out


def report(records: list[dict], smoke: bool) -> str:
    card = records[0]["card"]
    lines = [f"**Card:** {card['device']} ({card['device_type']}), {card['dtype']}, torch {card['torch']}, "
             f"transformers {card['transformers']}, 64 text tokens, 8 new tokens, random weights; "
             f"`{card['command']}` ({card['date']})" + (" -- SMOKE run: tiny architectures, not speed figures"
                                                         if smoke else ""), ""]
    for arch in dict.fromkeys(r["arch"] for r in records):
        for path in ("plain", "fast"):
            rs = [r for r in records if r["arch"] == arch and r["path"] == path]
            if rs:
                lines += [f"### {arch}, {path} path", "", bench.speed_table(rs, full=True), ""]
    lines += ["### Targets", "", "| target | measured | goal | met |", "|---|---|---|---|"]
    for what, value, goal, met in targets(records, smoke):
        lines.append(f"| {what} | {'-' if value is None else f'{value:.3f}'} | {goal} | "
                     f"{'-' if met is None else 'yes' if met else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="benchmarks/gpu.sh", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny architectures on the CPU, seconds (CI)")
    p.add_argument("--out", default="runs/gpu-bench", help="folder for results.json, table.md and plots")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per cell (default: 5; smoke: 1)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = run(args.smoke, out, argv, args.repeats)
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(records, indent=1, default=str)))
    text = report(records, args.smoke)
    atomic_write(out / "table.md", lambda tmp: Path(tmp).write_text(text))
    for arch in dict.fromkeys(r["arch"] for r in records):
        sub = out / arch
        sub.mkdir(exist_ok=True)
        bench.plot_results([r for r in records if r["arch"] == arch], sub)
    print(text)
    print(f"written: {out}/results.json, {out}/table.md, {out}/<arch>/bench.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
