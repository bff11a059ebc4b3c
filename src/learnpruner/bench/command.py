"""``learnpruner bench``: the command line."""

from __future__ import annotations

import argparse

from ..commands import command


def _bench_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="hub id, local folder or built-in name (loads real weights)")
    src.add_argument("--arch", help="a named architecture with random weights, no download (e.g. llava-1.5-7b, "
                     "qwen2.5-vl-7b, llava-onevision-7b; `--arch list` prints every one, with its family)")
    p.add_argument("--methods", default="none,fastv,learnpruner", help="comma-separated method names")
    p.add_argument("--tokens", default=None,
                   help="comma-separated budgets: visual tokens per image, average per LLM layer (default: every "
                   "token, then the family's papers' budgets: 576,192,64 for LLaVA-1.5, 2880,640,320,160 for "
                   "LLaVA-NeXT at 672x672, 2056,685,228 per 8-frame video for Video-LLaVA)")
    p.add_argument("--batch-sizes", default="1", help="comma-separated batch sizes")
    p.add_argument("--new-tokens", type=int, default=8, help="tokens generated for end-to-end and decode time")
    p.add_argument("--text-tokens", type=int, default=64, help="non-image prompt tokens per sample")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per cell (median and min-max reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per cell")
    p.add_argument("--variants", type=int, default=3, help="different random inputs cycled through the runs")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="float32, float16, bfloat16 or auto (bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch.set_num_threads")
    p.add_argument("--out", default="learnpruner-bench", help="folder for results.json and bench.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--full-table", action="store_true",
                   help="print every column (sections, ideal, memory, throughput); results.json always has them")
    p.add_argument("--fast", action="store_true",
                   help="run every method on the fast path (static-shape prefill and decode; CUDA graphs on GPU)")
    p.add_argument("--item", choices=("image", "video"), default=None,
                   help="what each sample holds where the family takes both (Qwen2.5-VL: an image of 1280 tokens "
                   "or an 8-frame 448x448 video of 1024; default: the family's own, image except Video-LLaVA)")


@command("bench", "measure speed, memory and FLOPs of pruning methods", _bench_args)
def _bench(args: argparse.Namespace) -> int:
    import torch

    from .report import plot_results, speed_table, write_results
    from .run import run_bench

    if args.arch == "list":  # the names each family's benchmark view registers
        from .geometry import BENCH_FAMILIES, bench_archs

        bench_archs()
        for family, cls in BENCH_FAMILIES.items():
            print(f"{family}: {', '.join(cls.archs)}")
        return 0

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
    print(speed_table(records, full=args.full_table))
    path = write_results(records, args.out)
    png = plot_results(records, args.out)
    print(f"\nwrote {path}" + (f" and {png}" if png else ""))
    return 0
