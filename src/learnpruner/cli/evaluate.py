"""``learnpruner eval`` (methods x budgets with intervals, resumable), ``compare`` and ``report``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..commands import command
from ..options import parse_list, per_method_options


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="hub id, local folder or built-in name (shapes-tiny, shapes-tiny-full, tiny-random-llava)")
    p.add_argument("--data", default="shapesvqa", help="'shapesvqa' (its test split), shapesvqa:test-large (6000 "
                   "items), shapesvqa:val, or a JSONL of records")
    p.add_argument("--methods", default="none,random,fastv,learnpruner",
                   help="comma-separated method names, or 'all' (every registered method)")
    p.add_argument("--tokens", default="576,192,128,64,32", help="comma-separated budgets")
    p.add_argument("--limit", type=int, default=None, help="first N items only")
    p.add_argument("--out", default="learnpruner-eval", help="folder for results.json, accuracy.png, preds/")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--lpm", default=None,
                   help="LPM folder for learnpruner, lpm-only and lpm-lpm (default: the model's own)")
    p.add_argument("--option", action="append", metavar="METHOD:KEY=VALUE",
                   help="a method option, repeatable (e.g. sparsevlm:recycle=false, pyramiddrop:layers=1,2,4)")
    p.add_argument("--budget", choices=("average", "paper"), default="average",
                   help="average: --tokens are visual tokens per LLM layer (default); paper: each peer runs its "
                   "published configuration for the label (the table says what average it reached)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")


@command("eval", "accuracy of methods x budgets on ShapesVQA or your JSONL (resumable)", _eval_args)
def _eval(args: argparse.Namespace) -> int:
    import learnpruner

    from ..evaluation import evaluate, load_items, markdown_table
    from ..hub import load

    methods = (list(learnpruner.METHODS) if args.methods == "all" else
               parse_list(args.methods, str, "--methods", unique=True))
    for m in methods:
        try:
            learnpruner.get_method(m)
        except ValueError as e:
            raise ValueError(f"--methods: {e}") from None
    budgets = parse_list(args.tokens, int, "--tokens", unique=True)
    for t in budgets:
        if t <= 0:
            raise ValueError(f"--tokens values must be positive integers, got {t}")
    if args.batch_size <= 0:
        raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}")
    extra_opts = per_method_options(args.option, methods)
    items = load_items(args.data, args.limit)
    model, processor = load(args.model, device=args.device, dtype=args.dtype)
    lpm_methods = [m for m in methods if learnpruner.get_method(m).needs_lpm]
    opts = {m: {"lpm": args.lpm} for m in lpm_methods if args.lpm}
    if args.model == "tiny-random-llava" and not args.lpm:
        opts = {m: {"lpm": "random"} for m in lpm_methods}
    for m, extra in extra_opts.items():
        opts.setdefault(m, {}).update(extra)
    records = evaluate(model, processor, items, methods, budgets, args.out, batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens, device=args.device, method_options=opts,
                       budget=args.budget, data_name=args.data)
    convention = ("average visual tokens per LLM layer" if args.budget == "average" else
                  "each peer's published setting for the label ([reached N]: the average it processed)")
    print(f"\n{args.data}: {len(items)} items, model {args.model}; tokens = {convention}")
    print(markdown_table(records))
    print(f"\nresults: {args.out}/results.json, plot: {args.out}/accuracy.png")
    return 0


def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", help="method A (e.g. learnpruner)")
    p.add_argument("b", nargs="?", default=None, help="method B; default: every other method of the folder")
    p.add_argument("--out", default="learnpruner-eval", help="the eval folder (learnpruner eval --out)")
    p.add_argument("--tokens", default=None, help="comma-separated budgets (default: every budget of the folder)")
    p.add_argument("--budget", choices=("average", "paper"), default="average")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the comparisons to FILE")


@command("compare", "paired comparison of methods in an eval folder (interval of the difference, McNemar)",
         _compare_args)
def _compare(args: argparse.Namespace) -> int:
    import json

    from ..evaluation import compare_cells
    from ..evaluation.report import all_cells, same_in_both_conventions
    from ..intervals import LEVEL

    out = Path(args.out)
    if not (out / "preds").is_dir():
        raise FileNotFoundError(f"--out {args.out!r} holds no eval results (no preds/ folder)")
    if args.json:
        _refuse_eval_files(out, Path(args.json))
    cells = [r for r in all_cells(out) if r.get("status") == "ok"]
    named = {r["method"] for r in cells}
    for flag, name in (("A", args.a), ("B", args.b)):
        if name is not None and name not in named:
            import learnpruner

            if name != "none":
                try:
                    learnpruner.get_method(name)
                except ValueError as e:
                    raise ValueError(f"method {flag}: {e}") from None
            raise ValueError(f"method {flag} {name!r} has no answered cell in {args.out}; its cells: "
                             f"{', '.join(sorted(named)) or 'none'}")
    budgets = (parse_list(args.tokens, int, "--tokens", unique=True) if args.tokens else
               sorted({r["tokens"] for r in cells if r["method"] != "none"}, reverse=True))
    others = [args.b] if args.b else sorted({r["method"] for r in cells} - {args.a})
    # the folder's cells under this convention (paper: a method the conventions treat alike has its average cell)
    have = {(r["method"], r["tokens"]) for r in cells if r.get("budget", "average") == args.budget}
    if args.budget == "paper":
        have |= {(args.a, r["tokens"]) for r in cells if r["method"] == args.a and same_in_both_conventions(args.a)}
    have |= {("none", t) for r in cells if r["method"] == "none" for t in budgets}
    rows, skipped = [], []
    for t in budgets:
        for b in others:
            if args.b or ((b, t) in have and (args.a, t) in have):  # without B: the cells the folder holds
                rows.append(compare_cells(out, args.a, b, t, args.budget))
            else:
                missing = [f"{m}@{t}" for m in (args.a, b) if (m, t) not in have]
                skipped.append(f"{args.a} vs {b} at {t} ({', '.join(missing)}: no answered {args.budget} cell)")
    print(f"| tokens | A | B | n | A | B | A - B | {int(100 * LEVEL)}% interval | McNemar p | verdict |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        verdict = {"A better": f"{r['a']} better", "B better": f"{r['b']} better"}.get(r["verdict"], "level")
        print(f"| {r['tokens']} | {r['a']} | {r['b']} | {r['n']} | {100 * r['accuracy_a']:.1f} | "
              f"{100 * r['accuracy_b']:.1f} | {100 * r['difference']:+.1f} | [{100 * r['ci'][0]:+.1f}, "
              f"{100 * r['ci'][1]:+.1f}] | {r['mcnemar_p']:.3g} | {verdict} |")
    if skipped:
        print(f"\nskipped {len(skipped)}: " + "; ".join(skipped), file=sys.stderr)
    if not rows:
        raise ValueError(f"no pair to compare: {args.a} has no answered cell at {', '.join(map(str, budgets))} tokens "
                         f"beside another method's in {args.out}")
    if args.json:
        from ..utils import atomic_write

        atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=1) + "\n"))
    return 0


def _refuse_eval_files(out: Path, path: Path) -> None:
    """``--json`` of compare: a new file, never one of the eval folder's own (its predictions, records, plot)."""
    target, own = path.resolve(), out.resolve()
    if target in (own, own / "preds") or (own / "preds") in target.parents or \
            target in (own / "results.json", own / "accuracy.png", own / ".lock"):
        raise ValueError(f"--json {str(path)!r} is one of the eval folder's own files (its predictions, results.json, "
                         "accuracy.png), which it would overwrite: write it elsewhere (e.g. "
                         f"{str(out / 'compare.json')!r})")



def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", metavar="DIR", help="the eval folder (learnpruner eval --out DIR)")
    p.add_argument("--html", default=None, metavar="FILE", help="where to write the page (default: DIR/report.html)")
    p.add_argument("--items", type=int, default=3,
                   help="items shown with the patches each method kept (re-runs the cells' model on them; 0: none)")
    p.add_argument("--device", default="cpu")


@command("report", "one self-contained HTML page from an eval folder: plot, intervals, verdicts, items",
         _report_args)
def _report(args: argparse.Namespace) -> int:
    from ..evaluation.html import write_report

    if args.items < 0:
        raise ValueError(f"--items must be a non-negative integer, got {args.items}")
    path = write_report(args.out, args.html, items=args.items, overlays=args.items > 0, device=args.device)
    print(f"report: {path}")
    return 0
