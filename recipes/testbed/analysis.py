"""Where does a pruning method lose accuracy? ShapesVQA's per-patch ground truth answers it.

For every item, method and budget this records whether the answer was right, the question type, the
number of objects in the scene and, for the objects the answer depends on
(:func:`~learnpruner.testbed.shapes.relevant_objects`), which share of their patches survived stage 1
(after the vision encoder) and which survived to the last LLM layer, and whether every referred object
kept at least one patch at each point. Accuracy conditioned on survival separates "the evidence was
pruned" from "the evidence survived but the model still failed", and stage 1 from stage 2.

    python -m recipes.testbed.analysis --split val --methods learnpruner,divprune,vispruner,cls-text \\
        --tokens 64,32 --out runs/analysis

Writes ``records.jsonl`` (one line per item, method and budget), ``summary.json``, ``summary.md`` and
``survival.png`` into ``--out``. Resumes: cells already in ``records.jsonl`` are skipped.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

import learnpruner
from learnpruner.evaluation import EvalItem, is_correct
from learnpruner.evaluation.runner import answer_batch
from learnpruner.testbed.shapes import load_split, relevant_objects
from learnpruner.utils import atomic_write

__all__ = ["survival", "analyse", "summarize", "main"]


def survival(labels_id: np.ndarray, relevant: list[int], kept: torch.Tensor | None) -> tuple[float, bool] | None:
    """``(share of the relevant objects' patches in kept, every relevant object keeps a patch)``.

    ``labels_id``: the scene's ``[grid, grid]`` patch owner ids (``k + 1`` for object ``k``, 0 for
    background); ``kept``: visual-token indices (row-major patches) or None for all. None when the answer
    depends on no object (a "no" existence question)."""
    if not relevant:
        return None
    ids = labels_id.reshape(-1)
    keep = np.ones(ids.shape[0], dtype=bool) if kept is None else np.isin(np.arange(ids.shape[0]), kept.cpu().numpy())
    patches = [np.flatnonzero(ids == k + 1) for k in relevant]
    total = sum(p.size for p in patches)
    if total == 0:
        return None
    share = sum(int(keep[p].sum()) for p in patches) / total
    every = all(p.size == 0 or bool(keep[p].any()) for p in patches)
    return share, every


def analyse(model, processor, split: str, n: int | None, methods: dict[str, dict], tokens: list[int],
            out: Path, batch_size: int = 16, device: str = "cpu", budget: str = "average") -> list[dict]:
    """Run every (method, budget) cell over the split; append one record per item to ``records.jsonl``.
    With ``budget="adaptive"`` (or ``"paper"``) the cells are named ``METHOD[adaptive]``."""
    items = load_split(split, n)
    path = out / "records.jsonl"
    done = set()
    if path.is_file():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            done.add((r["method"], r["tokens"], r["index"]))
    out.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for method, opts in methods.items():
            name = method if budget == "average" else f"{method}[{budget}]"
            for t in tokens:
                todo = [it for it in items if (name, t, it.index) not in done]
                if not todo:
                    continue
                learnpruner.apply(model, method, tokens=t, budget=budget, **opts)
                try:
                    for start in tqdm(range(0, len(todo), batch_size), desc=f"{name}@{t}", leave=False):
                        batch = todo[start:start + batch_size]
                        evals = [EvalItem(str(it.index), it.image, it.question, [it.answer], it.qtype) for it in batch]
                        preds = answer_batch(model, processor, evals, 8, device)
                        st = learnpruner.stats(model)
                        for it, pred, im in zip(batch, preds, st.images):
                            objects = [SimpleNamespace(**o) for o in it.objects]
                            rel = relevant_objects(it.question, objects, it.boxes)
                            s1 = survival(it.labels["id"], rel, im.stage1_kept)
                            fin = survival(it.labels["id"], rel, im.final_kept)
                            rec = {"method": name, "tokens": t, "index": it.index, "qtype": it.qtype,
                                   "objects": len(it.objects), "correct": is_correct(pred, [it.answer]),
                                   "stage1_share": None if s1 is None else s1[0],
                                   "stage1_all": None if s1 is None else s1[1],
                                   "final_share": None if fin is None else fin[0],
                                   "final_all": None if fin is None else fin[1],
                                   "average_tokens": im.average_tokens}
                            f.write(json.dumps(rec) + "\n")
                        f.flush()
                finally:
                    learnpruner.remove(model)
    return [json.loads(line) for line in path.read_text().splitlines()]


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize(records: list[dict]) -> dict:
    """Accuracy per question type and per object count; survival rates; accuracy given survival."""
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        cells[(r["method"], r["tokens"])].append(r)
    out = {}
    for (method, t), rs in sorted(cells.items()):
        key = f"{method}@{t}"
        by_q, by_n = defaultdict(list), defaultdict(list)
        for r in rs:
            by_q[r["qtype"]].append(r["correct"])
            by_n[r["objects"]].append(r)
        ref = [r for r in rs if r["final_all"] is not None]
        out[key] = {
            "method": method, "tokens": t, "n": len(rs), "accuracy": _mean([r["correct"] for r in rs]),
            "by_qtype": {q: _mean(v) for q, v in sorted(by_q.items())},
            "by_objects": {str(k): {"accuracy": _mean([r["correct"] for r in v]),
                                    "stage1_all": _mean([r["stage1_all"] for r in v]),
                                    "final_all": _mean([r["final_all"] for r in v])}
                           for k, v in sorted(by_n.items())},
            "stage1_share": _mean([r["stage1_share"] for r in rs]),
            "stage1_all": _mean([r["stage1_all"] for r in rs]),
            "final_share": _mean([r["final_share"] for r in rs]),
            "final_all": _mean([r["final_all"] for r in rs]),
            "lost_in_stage1": _mean([not r["stage1_all"] for r in ref]),
            "lost_after_stage1": _mean([r["stage1_all"] and not r["final_all"] for r in ref]),
            "accuracy_if_survived": _mean([r["correct"] for r in ref if r["final_all"]]),
            "accuracy_if_lost": _mean([r["correct"] for r in ref if not r["final_all"]]),
            "average_tokens": _mean([r["average_tokens"] for r in rs]),
        }
    return out


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}"


def markdown(summary: dict) -> str:
    rows = ["| method @ tokens | acc | referred objects keep a patch: stage 1 / final | lost in stage 1 | "
            "lost after stage 1 | acc if kept | acc if lost | patches kept: stage 1 / final |",
            "|---|---|---|---|---|---|---|---|"]
    for key, s in summary.items():
        rows.append(f"| {key} | {_pct(s['accuracy'])} | {_pct(s['stage1_all'])} / {_pct(s['final_all'])} | "
                    f"{_pct(s['lost_in_stage1'])} | {_pct(s['lost_after_stage1'])} | "
                    f"{_pct(s['accuracy_if_survived'])} | {_pct(s['accuracy_if_lost'])} | "
                    f"{_pct(s['stage1_share'])} / {_pct(s['final_share'])} |")
    qtypes = sorted({q for s in summary.values() for q in s["by_qtype"]})
    rows += ["", "| method @ tokens | " + " | ".join(qtypes) + " |", "|---|" + "---|" * len(qtypes)]
    for key, s in summary.items():
        rows.append(f"| {key} | " + " | ".join(_pct(s["by_qtype"].get(q)) for q in qtypes) + " |")
    counts = sorted({int(k) for s in summary.values() for k in s["by_objects"]})
    rows += ["", "accuracy (referred objects keep a patch at the last layer) by number of objects in the scene", "",
             "| method @ tokens | " + " | ".join(f"{c} obj" for c in counts) + " |", "|---|" + "---|" * len(counts)]
    for key, s in summary.items():
        cells = []
        for c in counts:
            b = s["by_objects"].get(str(c))
            cells.append("-" if b is None else f"{_pct(b['accuracy'])} ({_pct(b['final_all'])})")
        rows.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    for key, s in summary.items():
        counts = sorted(int(k) for k in s["by_objects"])
        acc = [100 * s["by_objects"][str(c)]["accuracy"] for c in counts]
        kept = [100 * (s["by_objects"][str(c)]["final_all"] or 0) for c in counts]
        style = dict(lw=2.4 if s["method"] == "learnpruner" else 1.3, marker="o", ms=3.5)
        line, = axes[0].plot(counts, acc, label=key, **style)
        axes[1].plot(counts, kept, color=line.get_color(), **style)
    axes[0].set(xlabel="objects in the scene", ylabel="accuracy (%)", title="accuracy")
    axes[1].set(xlabel="objects in the scene", ylabel="% of items",
                title="every referred object keeps a patch (last layer)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, frameon=False)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from learnpruner.hub import load
    from learnpruner.options import parse_list, per_method_options

    p = argparse.ArgumentParser(prog="python -m recipes.testbed.analysis", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="shapes-tiny")
    p.add_argument("--split", default="val", choices=("val", "test"))
    p.add_argument("--n", type=int, default=None, help="first N items of the split (default: all)")
    p.add_argument("--methods", default="learnpruner,divprune,vispruner,cls-text,lpm-only")
    p.add_argument("--tokens", default="64,32")
    p.add_argument("--lpm", default=None, help="LPM folder for learnpruner/lpm-only (default: the model's)")
    p.add_argument("--option", action="append", default=[], help="METHOD:KEY=VALUE")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--budget", choices=("average", "paper", "adaptive"), default="average")
    p.add_argument("--out", default="runs/analysis")
    args = p.parse_args(argv)
    methods = parse_list(args.methods, str, "--methods")
    tokens = parse_list(args.tokens, int, "--tokens")
    opts = per_method_options(args.option, methods)
    for m in ("learnpruner", "lpm-only"):
        if m in methods and args.lpm:
            opts.setdefault(m, {})["lpm"] = args.lpm
    torch.manual_seed(0)
    model, processor = load(args.model)
    out = Path(args.out)
    records = analyse(model, processor, args.split, args.n, {m: opts.get(m, {}) for m in methods}, tokens, out,
                      args.batch_size, budget=args.budget)
    summary = summarize(records)
    atomic_write(out / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1)))
    text = markdown(summary)
    atomic_write(out / "summary.md", lambda tmp: Path(tmp).write_text(text))
    plot(summary, out / "survival.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
