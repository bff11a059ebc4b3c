"""The README's learnpruner-set table from the eval folders of benchmarks/evidence_set.sh: each method at 64 and
32 tokens with its 95% interval and % of unpruned, and learnpruner-set minus it on the same items with the
paired interval, McNemar's p and the verdict. ``python benchmarks/set_table.py runs/set-evidence``."""

from __future__ import annotations

import sys
from pathlib import Path

from learnpruner.evaluation import compare_cells
from learnpruner.evaluation.report import all_cells, summarize

OURS = "learnpruner-set"


def table(folder: Path, budgets=(64, 32), unpruned: float | None = None) -> str:
    cells = summarize([r for r in all_cells(folder) if r.get("status") == "ok"])
    none = next((r for r in cells if r["method"] == "none"), None)
    base = none["accuracy"] if none else unpruned
    methods = [OURS] + sorted({r["method"] for r in cells} - {OURS, "none"})
    head = "| method | " + " | ".join(f"{t} tokens | {OURS} minus it | verdict" for t in budgets) + " |"
    lines = [head, "|---|" + "---|---|---|" * len(budgets)]
    if none:
        lines.append(f"| none (all tokens) | {100 * none['accuracy']:.1f} [{100 * none['ci'][0]:.1f}, "
                     f"{100 * none['ci'][1]:.1f}] |" + " | | |" * len(budgets))
    for m in methods:
        row = [m]
        for t in budgets:
            r = next((c for c in cells if c["method"] == m and c["tokens"] == t), None)
            if r is None:
                row += ["", "", ""]
                continue
            rel = f" ({100 * r['accuracy'] / base:.1f}%)" if base else ""
            row.append(f"{100 * r['accuracy']:.1f} [{100 * r['ci'][0]:.1f}, {100 * r['ci'][1]:.1f}]{rel}")
            if m == OURS:
                row += ["", ""]
                continue
            p = compare_cells(folder, OURS, m, t)
            verdict = {"A better": f"{OURS} better", "B better": f"{m} better"}.get(p["verdict"], "level")
            row += [f"{100 * p['difference']:+.1f} [{100 * p['ci'][0]:+.1f}, {100 * p['ci'][1]:+.1f}] "
                    f"(p {p['mcnemar_p']:.2g})", verdict]
        lines.append("| " + " | ".join(row) + " |")
    n = sorted({r["n"] for r in cells})
    lines.append(f"\n{folder}: {', '.join(map(str, n))} items per cell")
    return "\n".join(lines)


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/set-evidence")
    for sub in sorted(p for p in root.iterdir() if (p / "preds").is_dir()):
        budgets = sorted({r["tokens"] for r in all_cells(sub) if r.get("method") != "none"}, reverse=True)
        print(table(sub, tuple(budgets)))
        print()
