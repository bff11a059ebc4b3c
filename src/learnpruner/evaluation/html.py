"""``learnpruner report DIR``: one self-contained HTML page from an eval folder.

The page holds the accuracy plot with its 95% intervals, the accuracy table (with % of unpruned), the paired
verdicts, the accuracy per question type, and a few items shown as the methods saw them: the image with the
patches each kept, the question, the reference answer and each method's answer from the folder's predictions.
Images are embedded (base64 PNG), so the file can be mailed or attached to an issue as it is.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

__all__ = ["write_report", "markdown_to_html"]

STYLE = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#1d1d1f;line-height:1.45;padding:0 1rem}h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;
border-bottom:1px solid #ddd;padding-bottom:.2rem}table{border-collapse:collapse;margin:.6rem 0;font-size:.88rem}
th,td{border:1px solid #d0d0d0;padding:.25rem .55rem;text-align:left}th{background:#f3f3f5}
tr:nth-child(even) td{background:#fafafa}img{max-width:100%}.items{display:flex;flex-wrap:wrap;gap:1rem}
.item{border:1px solid #ddd;border-radius:6px;padding:.6rem;width:330px;font-size:.85rem}.ok{color:#0a7f2e}
.bad{color:#b3261e}.meta{color:#666;font-size:.85rem}"""


def markdown_to_html(text: str) -> str:
    """The pipe tables and paragraphs of :func:`~learnpruner.evaluation.markdown_table`'s output as HTML."""
    out, table = [], []

    def flush():
        if table:
            head, *rows = [r for r in table if not set(r.replace("|", "").strip()) <= {"-"}]
            cells = [c.strip() for c in head.strip("|").split("|")]
            out.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cells) + "</tr>")
            for r in rows:
                out.append("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r.strip().strip("|")
                                            .split("|")) + "</tr>")
            out.append("</table>")
            table.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    flush()
    return "\n".join(out)


def _png(path_or_bytes) -> str:
    data = Path(path_or_bytes).read_bytes() if isinstance(path_or_bytes, (str, os.PathLike)) else path_or_bytes
    return "data:image/png;base64," + base64.b64encode(data).decode()


def write_report(out_dir: str | os.PathLike, path: str | os.PathLike | None = None, items: int = 3,
                 overlays: bool = True, device: str = "cpu") -> Path:
    """Write ``out_dir/report.html`` (or ``path``) from an eval folder; returns its path. ``items``: how many items
    to show with the patches each method kept (the first ones where the methods disagree), re-running the cells'
    model on them (``overlays=False``: none, no model is loaded)."""
    from ..utils import atomic_write
    from . import markdown_table
    from .report import all_cells, summarize

    out = Path(out_dir)
    if not (out / "preds").is_dir():
        raise FileNotFoundError(f"{str(out)!r} holds no eval results (no preds/ folder): run `learnpruner eval "
                                f"--out {out}` first")
    records = summarize(all_cells(out))
    if not records:
        raise ValueError(f"{out} has no cells yet")
    from ..viz import _accuracy_title, plot_accuracy

    ok = [r for r in records if r.get("status") == "ok" and r.get("accuracy") is not None]
    title = _accuracy_title(ok)
    buf = io.BytesIO()
    plot_path = out / "accuracy.png"
    plot_accuracy(records, plot_path)
    buf.write(plot_path.read_bytes())
    parts = [f"<h1>learnpruner evaluation</h1><p class='meta'>{html.escape(title)} · folder "
             f"<code>{html.escape(str(out))}</code></p>",
             "<h2>Accuracy against visual tokens</h2>",
             f"<img alt='accuracy with 95% intervals' src='{_png(buf.getvalue())}'>",
             "<h2>Accuracy, intervals, paired verdicts, question types</h2>", markdown_to_html(markdown_table(records)),
             "<p class='meta'>Intervals: 95% Wilson for each cell, Newcombe's paired interval for differences; a "
             "method is called better only where the interval excludes 0 and McNemar's p &lt; 0.05.</p>"]
    if overlays and items > 0:
        parts.append("<h2>Items as the methods saw them</h2>")
        parts.append(_item_section(out, ok, items, device))
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>learnpruner report: "
            f"{html.escape(title)}</title><style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n")
    target = Path(path) if path is not None else out / "report.html"
    atomic_write(target, lambda tmp: Path(tmp).write_text(page))
    return target


def _preds(out: Path, method: str, tokens: int) -> dict:
    from .store import _cell_name, _read_preds

    return _read_preds(out / "preds" / f"{_cell_name(method, tokens, 'average')}.jsonl")


def _item_section(out: Path, cells: list[dict], count: int, device: str) -> str:
    """The chosen items with each shown cell's kept patches and answer: at the smallest budget, the most accurate
    method and learnpruner's (the unpruned answer beside them)."""
    import learnpruner

    from ..hub import load
    from ..viz import crop_pixels, overlay_image_stats
    from .data import is_correct, load_items
    from .runner import answer_batch

    pruned = [r for r in cells if r["method"] != "none" and r.get("budget", "average") == "average"]
    if not pruned:
        return "<p>No pruned cells to show.</p>"
    low = min(r["tokens"] for r in pruned)
    at_low = sorted((r for r in pruned if r["tokens"] == low), key=lambda r: -r["accuracy"])
    ours = [r for r in at_low[1:] if r["method"].startswith("learnpruner")][:2]
    shown = [at_low[0], *ours] if ours else at_low[:2]  # the most accurate, and ours (or the runner-up)
    run = shown[0].get("run") or {}
    data, model_name = run.get("data_name"), (shown[0].get("model") or {}).get("model")
    if not data or not model_name:
        return "<p>The cells do not record their data or model name (an older eval): no items shown.</p>"
    preds = {(r["method"], r["tokens"]): _preds(out, r["method"], r["tokens"]) for r in shown}
    none = next((r for r in cells if r["method"] == "none"), None)
    base = _preds(out, "none", none["tokens"]) if none else {}
    first = next(iter(preds.values()))
    ids = [i for i in first if len({bool(p.get(i, {}).get("correct")) for p in preds.values()}) > 1]  # they disagree
    ids = (ids + [i for i in first if i not in ids])[:count]
    items = {it.id: it for it in load_items(data) if it.id in set(ids)}
    model, processor = load(model_name, device=device)
    cards = []
    for item_id in ids:
        it = items[item_id]
        panels = []
        for r in shown:
            learnpruner.apply(model, r["method"], tokens=r["tokens"])
            try:
                answer = answer_batch(model, processor, [it], 4, device)[0]
                st = learnpruner.stats(model)
                pixels = crop_pixels(processor.image_processor(images=[it.pil()], return_tensors="pt")["pixel_values"],
                                     0, 1)
                tmp = out / f".report-{os.getpid()}.png"
                overlay_image_stats(st.images[0], pixels, tmp, title=f"{r['method']} @ {r['tokens']}")
                png = _png(tmp.read_bytes())
                tmp.unlink()
            finally:
                learnpruner.remove(model)
            mark = "ok" if is_correct(answer, it.answers) else "bad"
            panels.append(f"<div><img alt='{html.escape(r['method'])} kept patches' src='{png}'>"
                          f"<div class='{mark}'>{html.escape(r['method'])} @ {r['tokens']}: "
                          f"<b>{html.escape(answer)}</b></div></div>")
        unpruned = base.get(item_id, {}).get("pred")
        cards.append(f"<div class='item'><div><b>{html.escape(it.question)}</b></div><div class='meta'>reference: "
                     f"{html.escape(', '.join(it.answers))}" + (f" · unpruned: {html.escape(unpruned)}" if unpruned
                                                                else "") + f" · {html.escape(item_id)}</div>"
                     + "".join(panels) + "</div>")
    return f"<div class='items'>{''.join(cards)}</div>"
