"""The evaluation loop: every method x budget cell, batch by batch, resumable; paired comparisons of the cells."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import torch

import learnpruner

from ..budget import UnreachableBudget
from ..engine import item_keys
from ..utils import atomic_write
from .data import EvalItem, is_correct
from .report import _cell_record, _write_results, summarize
from .store import _cell_name, _check_cell_setup, _check_data, _out_lock, _read_preds, _repair_tail


def answer_batch(model, processor, items: list[EvalItem], max_new_tokens: int, device: str,
                  num_frames: int = 8) -> list[str]:
    from ..hub import check_context, format_turn

    texts = [format_turn(processor, it.question, it.kind) for it in items]
    media = {}
    if any(it.kind == "image" for it in items):
        media["images"] = [it.pil() for it in items if it.kind == "image"]
    if any(it.kind == "video" for it in items):
        media["videos"] = [it.frames(num_frames) for it in items if it.kind == "video"]
    inputs = processor(text=texts, return_tensors="pt", padding=True, **media).to(device)
    for key in [k for k in inputs if k.startswith("pixel_values")]:
        inputs[key] = inputs[key].to(model.dtype)
    check_context(model, inputs["attention_mask"].sum(1).tolist(), max_new_tokens, [it.where() for it in items])
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return [t.strip() for t in processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)]


@contextlib.contextmanager
def _unreachable_items():
    """Within this context an item whose budget its method cannot reach (:class:`UnreachableBudget`, raised at the
    forward on families whose items have their own counts) ends the cell: the list yielded gets the reason."""
    refused: list[str] = []
    try:
        yield refused
    except UnreachableBudget as e:
        refused.append(str(e))


def evaluate(
    model,
    processor,
    items: list[EvalItem],
    methods: Sequence[str],
    budgets: Sequence[int],
    out_dir: str | os.PathLike,
    batch_size: int = 16,
    max_new_tokens: int = 4,
    device: str = "cpu",
    method_options: dict[str, dict] | None = None,
    progress: bool = True,
    budget: str = "average",
    data_name: str | None = None,
) -> list[dict]:
    """Evaluate every ``method x budget`` cell; returns this run's records (``DIR/results.json`` holds every cell).
    ``data_name``: what the items are called (``--data``), for titles; the items' fingerprint identifies them.

    ``budget``: how each budget label is read (``"average"`` visual tokens per LLM layer, or ``"paper"``: each
    peer's published configuration for the label; see ``learnpruner.apply``); every record holds the average
    the cell really reached (``avg_tokens``).

    A cell whose budget the method cannot reach (its schedule raises ``ValueError``) is recorded with
    ``status="unreachable"`` and its reason; bad method options are refused before any work. ``none``
    is run once (its budget is irrelevant).
    """
    from tqdm.auto import tqdm

    if not items:
        raise ValueError("no items to evaluate")
    for what, values in (("methods", list(methods)), ("budgets", list(budgets))):
        twice = next((v for i, v in enumerate(values) if v in values[:i]), None)
        if twice is not None:
            raise ValueError(f"{what} names {twice!r} twice: each once (a repeated cell would run twice and be paired "
                             "with itself)")
    hashes: dict[str, str] = {}
    for it in items:
        if it.id in hashes:
            raise ValueError(f"{it.where()}: id {it.id!r} appears twice; item ids must be unique")
        hashes[it.id] = it.fingerprint()
    from ..adapters import adapter_for

    ad = adapter_for(model)
    for kind in dict.fromkeys(it.kind for it in items):
        try:
            ad.check_media(kind)
        except ValueError as e:
            first = next(it for it in items if it.kind == kind)
            raise ValueError(f"{first.where()}: {e}") from None
    n = ad.num_visual_tokens()
    method_options = method_options or {}
    for m in dict.fromkeys(methods):
        try:  # at the full budget a plan fails only on bad options or a bad LPM (a low budget may be unreachable)
            learnpruner.resolve(model, m, n, budget=budget, **method_options.get(m, {}))
        except (ValueError, TypeError, OSError) as e:
            raise ValueError(f"{m}: {e}") from None
    out = Path(out_dir)
    (out / "preds").mkdir(parents=True, exist_ok=True)
    run = {"id": f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "methods": list(methods), "budgets": list(budgets),
           "items": len(items), "data": hashlib.sha256("".join(hashes.values()).encode()).hexdigest()[:16],
           **({"data_name": data_name} if data_name else {})}
    processor.tokenizer.padding_side = "left"
    cells = [(m, t) for m in methods for t in (budgets if m != "none" else [max(budgets)])]
    cells.sort(key=lambda c: c[0] != "none")  # the reference first: no-op cells reuse its predictions
    by_id = {it.id: it for it in items}
    from ..hub import model_fingerprint

    fingerprint = model_fingerprint(model)  # once: the model does not change between cells
    records = []
    correct: dict[str, dict[str, bool]] = {}  # cell -> item -> answered right, this run's answered cells
    total = len(cells) * len(items)
    bar = tqdm(total=total, desc="eval", disable=not progress, dynamic_ncols=True)
    with _out_lock(out), contextlib.closing(bar):
        for method, tokens in cells:
            opts = method_options.get(method, {})
            status, reason, plan, schedule = "ok", None, None, None
            try:  # the cell's plan: the one place its budget becomes a schedule (recorded in its setup)
                plan = learnpruner.resolve(model, method, tokens, budget=budget, **opts)
                schedule = plan.schedule(n)
            except UnreachableBudget as e:
                # items with their own counts (Qwen-VL; n is nominal) meet their budgets at the forward
                if ad.uniform_token_count or plan is None:
                    status, reason = "unreachable", str(e)
            path = out / "preds" / f"{_cell_name(method, tokens, budget)}.jsonl"
            _check_cell_setup(path, model, opts, max_new_tokens, device, fingerprint=fingerprint,
                              plan=plan.as_dict() if plan is not None else None)
            _repair_tail(path)
            done = _read_preds(path)
            _check_data(out, path, done, hashes)
            bar.update(len([i for i in done if i in by_id]))
            bar.set_postfix(cell=_cell_name(method, tokens, budget))
            todo = [it for it in items if it.id not in done]
            reference = out / "preds" / f"{_cell_name('none', max(budgets))}.jsonl"
            noop = schedule is not None and schedule.is_noop and ad.uniform_token_count  # ragged: per image
            if todo and noop and method != "none" and "none" in methods:
                # at a budget that keeps every token the method is the unpruned model (tested bit for bit):
                # the reference's predictions are reused, not recomputed
                reused = {i: r for i, r in _read_preds(reference).items()
                          if i in by_id and i not in done and r.get("item") == hashes[i]}
                done.update(reused)
                reason = "budget keeps every visual token: predictions of `none` reused"
                todo = [it for it in items if it.id not in done]
                bar.update(len(reused))
            if todo and status == "ok":
                learnpruner.apply(model, plan)
                try:
                    with open(path, "a") as f, _unreachable_items() as refused:
                        for start in range(0, len(todo), batch_size):
                            chunk = todo[start:start + batch_size]
                            t0 = time.perf_counter()
                            with item_keys(model, [it.id for it in chunk]):  # random draws seeded per item
                                preds = answer_batch(model, processor, chunk, max_new_tokens, device)
                            dt = (time.perf_counter() - t0) / len(chunk)
                            st = learnpruner.stats(model)
                            avg = st.average_tokens if st is not None else None
                            lines = [json.dumps({"id": it.id, "pred": p, "correct": is_correct(p, it.answers),
                                                 "qtype": it.qtype, "avg_tokens": avg, "seconds": dt,
                                                 "item": hashes[it.id]})
                                     for it, p in zip(chunk, preds)]
                            f.write("\n".join(lines) + "\n")
                            f.flush()
                            os.fsync(f.fileno())
                            bar.update(len(chunk))
                finally:
                    learnpruner.remove(model)
                if refused:
                    status, reason = "unreachable", refused[0]
                done = _read_preds(path)
            if status != "ok":
                bar.update(len(todo))
            rec = _cell_record(method, tokens, [done[i] for i in by_id if i in done], status, reason)
            rec["run"], rec["budget"], rec["model"] = run, budget, fingerprint
            records.append(rec)
            if status == "ok":
                correct[_cell_name(method, tokens, budget)] = {i: bool(done[i]["correct"]) for i in by_id
                                                               if i in done}
            atomic_write(path.with_suffix(".result.json"),
                         lambda tmp, rec=rec: Path(tmp).write_text(json.dumps(rec, indent=1) + "\n"))
            _write_results(out)
        _add_pairs(records, correct, budget)
        for rec in records:
            path = out / "preds" / f"{_cell_name(rec['method'], rec['tokens'], budget)}.result.json"
            atomic_write(path, lambda tmp, rec=rec: Path(tmp).write_text(json.dumps(rec, indent=1) + "\n"))
        _write_results(out)
    return summarize(records)


def _add_pairs(records: list[dict], correct: dict[str, dict[str, bool]], budget: str) -> None:
    """Give each answered cell ``paired``: its comparison with every other method at the same budget and with
    ``none``, over the items both answered in this run (:func:`learnpruner.intervals.paired`, A = this cell)."""
    from ..intervals import paired

    for rec in records:
        mine = correct.get(_cell_name(rec["method"], rec["tokens"], budget))
        if mine is None:
            continue
        rec["paired"] = {}
        for other in records:
            label = _cell_name(other["method"], other["tokens"], budget)
            theirs = correct.get(label)
            if other is rec or theirs is None or not (other["tokens"] == rec["tokens"] or "none" in
                                                      (other["method"], rec["method"])):
                continue
            shared = [i for i in mine if i in theirs]
            if shared:
                rec["paired"][label] = paired([mine[i] for i in shared], [theirs[i] for i in shared]).as_dict()
