"""Reports of a run folder: ``results.json``, the accuracy table with intervals, paired tables and comparisons."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..intervals import LEVEL
from ..utils import atomic_write
from .store import _cell_name, _read_preds


def _cell_record(method, tokens, preds, status, reason) -> dict:
    rec = {"method": method, "tokens": tokens, "status": status, "n": len(preds)}
    if reason:
        rec["reason"] = reason
    if preds:
        rec["accuracy"] = sum(p["correct"] for p in preds) / len(preds)
        from ..intervals import accuracy_interval

        rec["ci"] = list(accuracy_interval([p["correct"] for p in preds]))
        rec["ci_level"] = LEVEL
        rec["interval"] = "wilson"
        by_type: dict[str, list[bool]] = {}
        for p in preds:
            by_type.setdefault(p["qtype"], []).append(p["correct"])
        rec["per_qtype"] = {k: sum(v) / len(v) for k, v in sorted(by_type.items())}
        avgs = [p["avg_tokens"] for p in preds if p.get("avg_tokens") is not None]
        rec["avg_tokens"] = sum(avgs) / len(avgs) if avgs else None
        rec["seconds_per_item"] = sum(p["seconds"] for p in preds) / len(preds)
    return rec


def summarize(records: list[dict]) -> list[dict]:
    """Add ``relative`` (% of the unpruned accuracy) to each record when a ``none`` cell of the same model on the
    same data exists.

    Records from runs on different data (``run["data"]``, the items' fingerprint) or of different models
    (``model``, the model's fingerprint) are never compared.
    """
    bases: dict = {}
    for r in records:
        if r["method"] == "none" and r.get("accuracy"):
            bases.setdefault(cell_key(r), r["accuracy"])
    for r in records:
        base = bases.get(cell_key(r))
        if base and r.get("accuracy") is not None:
            r["relative"] = 100.0 * r["accuracy"] / base
        else:
            r.pop("relative", None)
    return records


def cell_key(r: dict) -> tuple:
    """What two cells must share to be compared: the data's fingerprint and the model's."""
    return (r.get("run") or {}).get("data"), (r.get("model") or {}).get("fingerprint")


def all_cells(out: Path) -> list[dict]:
    """Every cell in ``out/preds``: its saved record (with the run that made it), ``none`` first.

    A predictions file without a saved record (an older learnpruner) is summarized from all its lines,
    with ``run: None``. A record that cannot be read is refused, naming its file (nothing is left out silently).
    """
    records = []
    for path in sorted((out / "preds").glob("*.jsonl")):
        result = path.with_suffix(".result.json")
        if not result.is_file():
            method, _, tokens = path.stem.rpartition("@")
            if method and tokens.isdigit():
                rec = _cell_record(method, int(tokens), list(_read_preds(path).values()), "ok", None)
                records.append({**rec, "run": None})
    for result in sorted((out / "preds").glob("*.result.json")):
        try:
            rec = json.loads(result.read_text())
        except (ValueError, OSError) as e:
            raise ValueError(f"{result} cannot be read ({e}); rerun the eval into the same --out to rewrite it, or "
                             "delete the cell's files") from None
        missing = [k for k in ("method", "tokens", "status") if not isinstance(rec, dict) or k not in rec]
        if missing or not isinstance(rec.get("tokens"), int):
            raise ValueError(f"{result} is not a cell record (it lacks {', '.join(missing) or 'an integer tokens'}); "
                             "rerun the eval into the same --out to rewrite it, or delete the cell's files")
        records.append(rec)
    return sorted(records, key=lambda r: (r["method"] != "none", r["method"], -r["tokens"]))


def _write_results(out: Path) -> None:
    records = summarize(all_cells(out))
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(records, indent=2) + "\n"))
    from ..viz import plot_accuracy

    plot_accuracy(records, out / "accuracy.png")


def markdown_table(records: list[dict]) -> str:
    """Accuracy (and % of unpruned) per method x budget, then accuracy per question type.

    An unreachable cell names the lowest budget the method reaches; a cell whose measured average
    differs from its budget by more than 1% says what it reached.
    """
    budgets = sorted({r["tokens"] for r in records if r["method"] != "none"}, reverse=True)
    none = next((r for r in records if r["method"] == "none"), None)
    lines = ["| method | " + " | ".join(f"{t} tokens" for t in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    if none is not None and none.get("accuracy") is not None:
        lines.append(f"| none (all tokens) | {100 * none['accuracy']:.1f}{_ci_text(none)} (100%) |"
                     + " |" * (len(budgets) - 1))
    def row(r: dict) -> str:  # cells of the paper convention get rows of their own
        return r["method"] + (" [paper budgets]" if r.get("budget") == "paper" else "")

    for method in dict.fromkeys(row(r) for r in records if r["method"] != "none"):
        cells = []
        for t in budgets:
            r = next((r for r in records if row(r) == method and r["tokens"] == t), None)
            if r is None:
                cells.append("")
            elif r["status"] != "ok":
                least = re.search(r"at least (\d+)", r.get("reason") or "")
                cells.append(f"unreachable (needs >= {least.group(1)})" if least else "unreachable")
            elif r.get("accuracy") is None:
                cells.append("no items")
            else:
                rel = f" ({r['relative']:.1f}%)" if "relative" in r else ""
                avg = r.get("avg_tokens")
                off = avg is not None and abs(avg - t) > max(1.0, 0.01 * t)
                cells.append(f"{100 * r['accuracy']:.1f}{_ci_text(r)}{rel}" + (f" [reached {avg:.1f}]" if off else ""))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    qtypes = sorted({q for r in records for q in r.get("per_qtype", {})})
    if len(qtypes) > 1:
        lines += ["", "| method | tokens | " + " | ".join(qtypes) + " |", "|---|---|" + "---|" * len(qtypes)]
        for r in records:
            if r.get("per_qtype"):
                vals = " | ".join(f"{100 * r['per_qtype'].get(q, float('nan')):.1f}" for q in qtypes)
                tokens = "all" if r["method"] == "none" else r["tokens"]
                lines.append(f"| {r['method']} | {tokens} | {vals} |")
    pairs = paired_table(records)
    if pairs:
        lines += ["", pairs]
    return "\n".join(lines)


def _ci_text(r: dict) -> str:
    ci = r.get("ci")
    return f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else ""


def paired_table(records: list[dict], against: str | None = None) -> str:
    """Paired comparisons at each budget: every method against ``against`` (default: the most accurate method
    at that budget), on the items both answered: A - B in points with its 95% interval, the exact McNemar
    p-value, and the verdict ("better" only where the interval excludes zero, else "level")."""
    lines = []
    budgets = sorted({r["tokens"] for r in records if r["method"] != "none"}, reverse=True)
    for t in budgets:
        cells = [r for r in records if r["tokens"] == t and r["method"] != "none" and r.get("paired")]
        if len(cells) < 2:
            continue
        label = {id(r): _cell_name(r["method"], r["tokens"], r.get("budget", "average")) for r in cells}
        ref = (next((r for r in cells if r["method"] == against), None) if against else
               max(cells, key=lambda r: r.get("accuracy", -1)))
        if ref is None:
            continue
        for r in cells:
            if r is ref or label[id(ref)] not in r["paired"]:
                continue
            pr = r["paired"][label[id(ref)]]
            if not lines:
                lines = [f"Paired on the same items (A - B, points, {int(100 * LEVEL)}% interval; better only "
                         "where it excludes 0):", "", "| tokens | A | B | A - B | interval | McNemar p | verdict |",
                         "|---|---|---|---|---|---|---|"]
            verdict = {"A better": f"{r['method']} better", "B better": f"{ref['method']} better"}.get(
                pr["verdict"], "level")
            lines.append(f"| {t} | {r['method']} | {ref['method']} | {100 * pr['difference']:+.1f} | "
                         f"[{100 * pr['ci'][0]:+.1f}, {100 * pr['ci'][1]:+.1f}] | {pr['mcnemar_p']:.3g} | {verdict} |")
    return "\n".join(lines)


def _unpruned_cell(answered: list[dict], other: str, tokens: int, budget: str, records: dict) -> dict | None:
    """The ``none`` cell to pair with ``other@tokens``: one unpruned cell serves every budget and both conventions
    (its label is the eval's largest budget), so every ``none`` cell of the other's data and model is a candidate;
    the one with the most items is taken."""
    mate = records.get((other, tokens, budget))
    if mate is None and budget == "paper" and same_in_both_conventions(other):
        mate = records.get((other, tokens, "average"))
    nones = [r for r in answered if r["method"] == "none"]
    if mate is not None:
        nones = [r for r in nones if cell_key(r) == cell_key(mate)] or nones
    return max(nones, key=lambda r: r.get("n", 0), default=None)


def same_in_both_conventions(method: str) -> bool:
    """Whether ``method`` runs the same schedule under both budget conventions (its paper reports average tokens
    per layer: no paper schedule of its own). Unknown names: False."""
    from ..methods import METHODS

    return method in METHODS and METHODS[method].paper_fn is None


def compare_cells(out_dir: str | os.PathLike, a: str, b: str, tokens: int, budget: str = "average") -> dict:
    """The paired comparison of method ``a`` with method ``b`` at ``tokens`` in the eval folder ``out_dir``
    (``none`` for the unpruned cell), computed from their saved predictions: A - B with its interval, the
    McNemar p-value and the verdict (see :func:`learnpruner.intervals.paired`). Under ``budget="paper"`` a
    method whose paper uses the average convention (LearnPruner, every method that prunes after the encoder: no
    paper schedule of its own) is read from its average cell, which is the same setting. Cells evaluated on
    different data, or over items the other does not hold, are refused, naming what differs."""
    from ..intervals import paired

    out = Path(out_dir)
    answered = [r for r in all_cells(out) if r.get("status") == "ok"]
    records = {(r["method"], r["tokens"], r.get("budget", "average")): r for r in answered if r["method"] != "none"}
    cells = []
    for m, other in ((a, b), (b, a)):
        if m == "none":
            rec = _unpruned_cell(answered, other, tokens, budget, records)
        else:
            rec = records.get((m, tokens, budget))
            if rec is None and budget == "paper" and same_in_both_conventions(m):
                rec = records.get((m, tokens, "average"))
        if rec is None:
            have = sorted({f"{k[0]}@{k[1]}" for k in records} | {"none" for r in answered if r["method"] == "none"})
            raise ValueError(f"{out} has no answered cell {m}@{tokens} ({budget} budgets); it has: "
                             f"{', '.join(have) or 'none'}")
        cells.append(rec)
    models = [(r.get("model") or {}).get("fingerprint") for r in cells]
    if models[0] != models[1]:
        names = [(r.get("model") or {}).get("model") for r in cells]
        raise ValueError(f"{a} and {b} were evaluated with different models ({names[0]} {models[0]} against "
                         f"{names[1]} {models[1]}); a paired comparison needs the same model")
    data = [(r.get("run") or {}).get("data") for r in cells]
    if data[0] != data[1] or None in data:
        n = [(r.get("run") or {}).get("items", r.get("n")) for r in cells]
        raise ValueError(f"{a} and {b} were evaluated on different data ({n[0]} items, data {data[0]} against "
                         f"{n[1]} items, data {data[1]}); a paired comparison needs the same items: rerun one of "
                         "them on the other's data")
    preds = [_read_preds(out / "preds" / f"{_cell_name(r['method'], r['tokens'], r.get('budget', 'average'))}.jsonl")
             for r in cells]
    ids = [i for i in preds[0] if i in preds[1]]
    differ = [i for i in ids if preds[0][i].get("item") != preds[1][i].get("item")]
    if differ:
        raise ValueError(f"{a} and {b} answered item {differ[0]!r} for different data (its fingerprints differ); "
                         "no interval is computed over items the two do not share")
    n_expected = max(cells[0]["n"], cells[1]["n"])
    if len(ids) < n_expected:
        raise ValueError(f"{a} and {b} share {len(ids)} answered items of {n_expected}; evaluate both on every "
                         "item first (rerun the eval into the same --out to finish them)")
    result = paired([bool(preds[0][i]["correct"]) for i in ids], [bool(preds[1][i]["correct"]) for i in ids])
    return {"a": a, "b": b, "tokens": tokens, "budget": budget, **result.as_dict()}
