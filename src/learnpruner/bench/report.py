"""The benchmark's outputs: a markdown table, ``results.json`` and plots."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from ..utils import atomic_write
from .flops import FLOPS_CONVENTION


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


def speed_table(records: list[dict], full: bool = False) -> str:
    """The results as a markdown table, with the measurement conventions underneath: by default the figures people
    compare (median with the runs' min-max, speedups, decode, KV, FLOPs ratio); ``full`` adds every column (the
    sections, the ideal, memory, throughput). A row whose budget keeps every token is marked and given no speedup."""
    if full:
        head = ["method", "tokens", "batch", "avg vis tok", "vision ms", "stage1 ms", "llm sel ms", "prefill ms",
                "ideal ms", "overhead", "prefill speedup", "ideal speedup", "decode ms/tok", "e2e ms", "e2e speedup",
                "tok/s", "peak mem MiB", "KV MiB", "GFLOPs", "FLOPs ratio"]
    else:
        head = ["method", "tokens", "batch", "avg vis tok", "prefill ms (min-max)", "prefill speedup",
                "decode ms/tok", "e2e ms (min-max)", "e2e speedup", "KV MiB", "FLOPs ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for r in records:
        if "skipped" in r:
            notes.append(f"- {r['method']} tokens={r['tokens']} batch={r['batch_size']}: skipped ({r['skipped']})")
            continue
        label = r["method"] + (" (fast)" if r.get("fast") else " (plain HF)" if r["method"] == "none" else "")
        if r["method"] != "none" and r.get("prunes") is False:
            label += " (prunes nothing: every token kept)"
        if full:
            cells = [label, r["tokens"], r["batch_size"], _fmt(r["avg_visual_tokens"]), _fmt(r["vision_ms"]),
                     _fmt(r["stage1_ms"], 2), _fmt(r["llm_select_ms"], 2), _fmt(r["prefill_ms"]),
                     _fmt(r["ideal_prefill_ms"]), _fmt(r["overhead"], 2), _fmt(r["prefill_speedup"], 2),
                     _fmt(r["ideal_speedup"], 2), _fmt(r["decode_ms_per_token"]), _fmt(r["e2e_ms"]),
                     _fmt(r["e2e_speedup"], 2), _fmt(r["throughput_tok_s"], 2), _fmt(_mib(r["peak_mem_bytes"])),
                     _fmt(_mib(r["kv_cache_bytes"]), 2), _fmt(r["flops"] / 1e9), _fmt(r["flops_ratio"], 3)]
        else:
            cells = [label, r["tokens"], r["batch_size"], _fmt(r["avg_visual_tokens"]), _with_range(r, "prefill_ms"),
                     _speedup(r, "prefill_speedup"), _fmt(r["decode_ms_per_token"]), _with_range(r, "e2e_ms"),
                     _speedup(r, "e2e_speedup"), _fmt(_mib(r["kv_cache_bytes"]), 2), _fmt(r["flops_ratio"], 3)]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    if records:
        r = records[0]
        threads = f", {r['cpu_threads']} torch thread(s)" if r["cpu_threads"] else ""
        lines += [
            "",
            f"model {r['model']} on {r['device']}{threads}; dtype {r['dtype']}; torch {r['torch']}, transformers "
            f"{r['transformers']}; {r['text_tokens']} text tokens + {_image_note(r)} per sample, "
            f"{r['new_tokens']} new tokens; median (and min-max) of {r['repeats']} runs after {r['warmup']} "
            f"warm-up(s), inputs "
            f"rotating over {r['variants']} random images/prompts; "
            + ("CUDA-event timing." if r["device_type"] == "cuda" else "time.perf_counter timing."),
            "tokens: the budget (visual tokens per image, average per LLM layer); `none` is measured once, at "
            "every token, on the unpatched model (plain transformers). "
            "prefill = one forward with the KV cache and logits_to_keep=1 (time to first token, vision included). "
            "decode ms/tok = (generate(N) - generate(1)) / (N - 1), medians, e2e = generate (greedy, exactly N new "
            "tokens). "
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


def _with_range(r: dict, key: str) -> str:
    lo, hi = r.get(f"{key}_min"), r.get(f"{key}_max")
    return _fmt(r[key]) + (f" ({_fmt(lo)}-{_fmt(hi)})" if lo is not None and hi is not None else "")


def _speedup(r: dict, key: str) -> str:
    if r["method"] == "none":
        return "1 (baseline)" if not r.get("fast") else _fmt(r.get(key), 2)
    return "-" if r.get("prunes") is False else _fmt(r.get(key), 2)


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
