"""Accuracy of pruning methods: every method x budget on one dataset, resumable.

``learnpruner eval`` answers each question greedily with the pruned model and scores exact match
(after lowercasing and stripping punctuation; any of ``answers`` counts). Predictions are appended
to ``DIR/preds/<method>@<tokens>.jsonl`` one batch at a time, so an interrupted run resumes where
it stopped without recomputing or losing results (a torn last line is cut before appending). Each
prediction carries a fingerprint of its item (id, question, answers, qtype, image): a cell made with
another model, other method options or for other data is refused, not mixed. ``DIR/.lock`` keeps a
second eval off a folder in use. ``DIR/results.json`` (every cell in ``DIR``, each with the run that
made it) and ``DIR/accuracy.png`` are rewritten atomically after every cell.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

import learnpruner

from .intervals import LEVEL
from .utils import atomic_write

__all__ = ["EvalItem", "load_items", "normalize", "is_correct", "evaluate", "summarize", "markdown_table",
           "paired_table"]


@dataclass
class EvalItem:
    id: str
    image: object  # PIL image, or a path opened lazily (an image file, or a video file when ``kind="video"``)
    question: str
    answers: list[str]
    qtype: str = "all"
    extra: dict = field(default_factory=dict)
    kind: str = "image"  # "image" or "video"

    def frames(self, num_frames: int = 8):
        """A video item's frames, sampled uniformly (``[T, H, W, 3]``)."""
        from .video import read_frames

        try:
            return read_frames(self.image, num_frames)
        except (OSError, ValueError) as e:
            raise ValueError(f"{self.where()}: {e}") from None

    def pil(self):
        """The item's image, RGB and upright (read by :func:`learnpruner.media.read_image`)."""
        from .media import read_image

        if isinstance(self.image, (str, os.PathLike)):
            try:
                return read_image(self.image)
            except (OSError, ValueError) as e:
                raise ValueError(f"{self.where()}: {e}") from None
        return self.image

    def where(self) -> str:
        """``FILE:LINE: item 'ID'`` (the line when the item came from a JSONL), for error messages."""
        line = self.extra.get("line")
        return f"{line}: item {self.id!r}" if line else f"item {self.id!r}"

    def fingerprint(self) -> str:
        """A hash of the item: id, question, answers, qtype, kind and the image or video (its pixels, or the
        bytes of its file: another file of the same name and size is other data)."""
        h = hashlib.sha256(json.dumps([self.id, self.question, list(self.answers), self.qtype]).encode())
        if self.kind != "image":
            h.update(self.kind.encode())
        if isinstance(self.image, (str, os.PathLike)):
            try:
                h.update(_file_digest(self.image).encode())
            except OSError:
                raise FileNotFoundError(f"{self.where()}: no {self.kind} at {os.fspath(self.image)}") from None
        else:
            h.update(f"{self.image.mode} {self.image.size}".encode())
            h.update(self.image.tobytes())
        return h.hexdigest()[:16]


def _file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, read in chunks (bounded memory for a large video)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def normalize(text: str) -> str:
    """Lowercase, drop punctuation, collapse spaces."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def is_correct(prediction: str, answers: Sequence[str]) -> bool:
    """Exact match of the normalized prediction with any normalized answer."""
    p = normalize(prediction)
    return any(p == normalize(a) for a in answers)


def load_items(data: str, limit: int | None = None) -> list[EvalItem]:
    """``shapesvqa`` (its fixed test split; ``shapesvqa:SPLIT`` for ``val``, ``test`` or ``test-large``) or a JSONL
    of ``{image|video, question, answer|answers[, id, qtype]}``.

    Image and video paths are relative to the JSONL file's folder and must exist; ``answers`` is a list or
    one string; ``id`` defaults to the line number and must be unique; an empty file is refused.
    """
    if limit is not None and limit <= 0:
        raise ValueError(f"--limit must be a positive integer, got {limit}")
    if data == "shapesvqa" or data.startswith("shapesvqa:"):
        from .testbed.shapes import SPLIT_SIZES, load_split

        split = data.partition(":")[2] or "test"
        if split not in SPLIT_SIZES:
            raise ValueError(f"--data {data!r}: ShapesVQA has no split {split!r}; accepted: "
                             f"{', '.join('shapesvqa:' + s for s in SPLIT_SIZES)} ('shapesvqa' is shapesvqa:test)")
        return [EvalItem(f"{split}-{it.index}", it.image, it.question, [it.answer], it.qtype)
                for it in load_split(split, limit)]
    path = Path(data)
    if not path.is_file():
        raise FileNotFoundError(f"no data at {data!r}: pass 'shapesvqa' (its test split; shapesvqa:test-large, "
                                "shapesvqa:val) or a JSONL file of LLaVA-style records")
    items: list[EvalItem] = []
    lines: dict[str, int] = {}
    for lineno, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{data}:{lineno}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
                             "save the file as UTF-8") from None
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            answers = rec["answers"] if "answers" in rec else [rec["answer"]]
            if isinstance(answers, (str, int, float)):
                answers = [answers]  # one answer, not a sequence of characters
            if "video" in rec and "image" in rec:
                raise ValueError(f"{data}:{lineno}: the record has both image ({rec['image']!r}) and video "
                                 f"({rec['video']!r}); a record holds one of them")
            kind = "video" if "video" in rec else "image"
            item = EvalItem(str(rec.get("id", lineno)), path.parent / rec[kind], rec["question"],
                            [str(a) for a in answers], str(rec.get("qtype", "all")),
                            extra={"line": f"{data}:{lineno}", "image": rec[kind]}, kind=kind)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(
                f"{data}:{lineno}: bad record ({e!r}); expected image (or video), question and answer or answers"
            ) from None
        if not item.answers:
            raise ValueError(f"{item.where()}: answers is empty; give at least one accepted answer")
        if item.id in lines:
            raise ValueError(f"{data}: id {item.id!r} appears on lines {lines[item.id]} and {lineno}; ids must be "
                             "unique (a record without an id is named by its line number)")
        lines[item.id] = lineno
        if not item.image.is_file():
            raise FileNotFoundError(f"{item.where()}: no {item.kind} at {item.image}")
        items.append(item)
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise ValueError(f"{data} holds no records; expected one JSON object per line with image, question and "
                         "answer or answers")
    return items


def _cell_name(method: str, tokens: int, budget: str = "average") -> str:
    """A cell's file name; the ``paper`` budget convention gets its own cells (never mixed with the average's)."""
    return f"{method}@{tokens}" + ("" if budget == "average" or method == "none" else f"-{budget}")


def _read_preds(path: Path) -> dict[str, dict]:
    """Predictions already written; unparseable lines (an interrupted write) are ignored."""
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
                done[rec["id"]] = rec
            except (json.JSONDecodeError, KeyError):
                continue
    return done


def _repair_tail(path: Path) -> None:
    """Cut unterminated or unparseable last lines (a write killed midway), so appends start on a line of their own."""
    if not path.is_file():
        return
    data = path.read_bytes()
    keep = len(data)
    while keep:
        start = data.rfind(b"\n", 0, keep - 1) + 1
        if data[keep - 1:keep] == b"\n":
            try:
                json.loads(data[start:keep])
                break
            except ValueError:
                pass
        keep = start
    if keep < len(data):
        with open(path, "r+b") as f:
            f.truncate(keep)


def _check_data(out: Path, path: Path, done: dict[str, dict], hashes: dict[str, str]) -> None:
    """Refuse saved predictions of this data's ids that were made for another item (other data in ``out``)."""
    for i, rec in done.items():
        if i in hashes and rec.get("item") != hashes[i]:
            what = ("has no data fingerprint (an older learnpruner wrote it)" if "item" not in rec else
                    "was made for another question, answers, qtype or image")
            raise ValueError(
                f"--out {out} holds predictions made for different data: {path.name}'s prediction for item {i!r} "
                f"{what} (ids default to line numbers); pass another --out or delete {out} to start fresh"
            )


@contextlib.contextmanager
def _out_lock(out: Path) -> Iterator[None]:
    """Hold ``out/.lock`` (O_EXCL, our pid inside) while evaluating; a dead holder's lock is taken over."""
    lock = out / ".lock"
    mine = f"{os.getpid()}\n{socket.gethostname()}\n"
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            holder = _lock_holder(lock)
            if holder is not None:
                raise FileExistsError(
                    f"{out} is in use by another eval ({holder}); wait for it to end or pass another --out "
                    f"(if no eval is running there, delete {lock})"
                ) from None
            with contextlib.suppress(FileNotFoundError):
                os.remove(lock)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(mine)
        break
    else:
        raise FileExistsError(f"could not take the lock {lock}; delete it if no eval is running in {out}")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if lock.read_text() == mine:
                os.remove(lock)


def _lock_holder(lock: Path) -> str | None:
    """``pid N`` of the live process holding ``lock``, or None when the lock is stale."""
    try:
        text = lock.read_text().split()
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return None
    if not text or not text[0].isdigit():
        return None if age > 10 else "a process that is starting"  # empty: its holder may be writing it
    pid, host = int(text[0]), (text[1] if len(text) > 1 else socket.gethostname())
    if host != socket.gethostname():
        return f"pid {pid} on {host}"  # cannot check another machine's processes
    if pid == os.getpid():
        return None  # left by an earlier process that had our pid (e.g. a restarted container)
    if os.name == "nt":
        return f"pid {pid}"  # os.kill(pid, 0) would signal it there
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return f"pid {pid}"


def _cell_setup(model, options: dict, max_new_tokens: int, device: str = "cpu", num_frames: int = 8,
                fingerprint: dict | None = None) -> dict:
    """Every setting that changes a cell's answers: the model (name, configuration and weights), its dtype, the
    device type, the method options, the generation length and the frames sampled from a video.
    ``fingerprint``: the model's :func:`~learnpruner.hub.model_fingerprint`, if already computed."""
    opts = {k: (v if isinstance(v, (str, int, float, bool, type(None))) else repr(v)) for k, v in options.items()}
    if fingerprint is None:
        from .hub import model_fingerprint

        fingerprint = model_fingerprint(model)
    return {**fingerprint, "options": opts, "max_new_tokens": max_new_tokens,
            "dtype": str(model.dtype).removeprefix("torch."), "device": torch.device(device).type,
            "frames": num_frames}


def _check_cell_setup(path: Path, model, options: dict, max_new_tokens: int, device: str = "cpu",
                      num_frames: int = 8, fingerprint: dict | None = None) -> None:
    """Refuse to resume a cell whose saved predictions came from another setup (:func:`_cell_setup`).

    The setup is written beside the predictions (``<cell>.setup.json``) before the first of them; a
    cell with predictions but no setup file (an older run) adopts the current setup, and a setup file of an
    older learnpruner (fewer settings) is checked on the settings it holds, then completed.
    """
    setup = _cell_setup(model, options, max_new_tokens, device, num_frames, fingerprint)
    meta = path.with_suffix(".setup.json")
    if meta.is_file():
        saved = json.loads(meta.read_text())
        differ = {k: (saved[k], setup[k]) for k in setup if k in saved and saved[k] != setup[k]}
        if differ or not set(saved) <= set(setup):
            what = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in differ.items()) or \
                f"settings {sorted(set(saved) - set(setup))} this learnpruner does not know"
            raise ValueError(
                f"{path} holds predictions made with another setup ({what}); "
                "pass another --out (or delete that cell's files) to evaluate a different setup"
            )
        if saved == setup:
            return
    atomic_write(meta, lambda tmp: Path(tmp).write_text(json.dumps(setup, indent=1)))


def _answer_batch(model, processor, items: list[EvalItem], max_new_tokens: int, device: str,
                  num_frames: int = 8) -> list[str]:
    from .hub import check_context, format_turn

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
) -> list[dict]:
    """Evaluate every ``method x budget`` cell; returns this run's records (``DIR/results.json`` holds every cell).

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
    hashes: dict[str, str] = {}
    for it in items:
        if it.id in hashes:
            raise ValueError(f"{it.where()}: id {it.id!r} appears twice; item ids must be unique")
        hashes[it.id] = it.fingerprint()
    from .adapters import adapter_for

    ad = adapter_for(model)
    for kind in dict.fromkeys(it.kind for it in items):
        try:
            ad.check_media(kind)
        except ValueError as e:
            first = next(it for it in items if it.kind == kind)
            raise ValueError(f"{first.where()}: {e}") from None
    n, num_layers = ad.num_visual_tokens(), ad.text_config.num_hidden_layers
    method_options = method_options or {}
    for m in dict.fromkeys(methods):
        method = learnpruner.get_method(m)
        opts = method_options.get(m, {})
        try:  # at the full budget a schedule fails only on bad options (a low budget may be unreachable)
            method.check_options(opts)
            method.schedule(n, n, num_layers, {k: v for k, v in opts.items() if k != "lpm"}, budget=budget)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{m}: {e}") from None
    out = Path(out_dir)
    (out / "preds").mkdir(parents=True, exist_ok=True)
    run = {"id": f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "methods": list(methods), "budgets": list(budgets),
           "items": len(items), "data": hashlib.sha256("".join(hashes.values()).encode()).hexdigest()[:16]}
    processor.tokenizer.padding_side = "left"
    cells = [(m, t) for m in methods for t in (budgets if m != "none" else [max(budgets)])]
    cells.sort(key=lambda c: c[0] != "none")  # the reference first: no-op cells reuse its predictions
    by_id = {it.id: it for it in items}
    from .hub import model_fingerprint

    fingerprint = model_fingerprint(model)  # once: the model does not change between cells
    records = []
    correct: dict[str, dict[str, bool]] = {}  # cell -> item -> answered right, this run's answered cells
    total = len(cells) * len(items)
    bar = tqdm(total=total, desc="eval", disable=not progress, dynamic_ncols=True)
    with _out_lock(out), contextlib.closing(bar):
        for method, tokens in cells:
            opts = method_options.get(method, {})
            path = out / "preds" / f"{_cell_name(method, tokens, budget)}.jsonl"
            _check_cell_setup(path, model, opts, max_new_tokens, device, fingerprint=fingerprint)
            _repair_tail(path)
            done = _read_preds(path)
            _check_data(out, path, done, hashes)
            bar.update(len([i for i in done if i in by_id]))
            bar.set_postfix(cell=_cell_name(method, tokens, budget))
            status, reason = "ok", None
            todo = [it for it in items if it.id not in done]
            try:
                schedule = learnpruner.get_method(method).schedule(
                    tokens, n, num_layers, {k: v for k, v in opts.items() if k != "lpm"}, budget=budget)
            except ValueError as e:
                schedule, status, reason = None, "unreachable", str(e)
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
                learnpruner.apply(model, method, tokens=tokens, budget=budget, **opts)
                try:
                    with open(path, "a") as f:
                        for start in range(0, len(todo), batch_size):
                            chunk = todo[start:start + batch_size]
                            t0 = time.perf_counter()
                            preds = _answer_batch(model, processor, chunk, max_new_tokens, device)
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
                done = _read_preds(path)
            if status != "ok":
                bar.update(len(todo))
            rec = _cell_record(method, tokens, [done[i] for i in by_id if i in done], status, reason)
            rec["run"], rec["budget"] = run, budget
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
    from .intervals import paired

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


def _cell_record(method, tokens, preds, status, reason) -> dict:
    rec = {"method": method, "tokens": tokens, "status": status, "n": len(preds)}
    if reason:
        rec["reason"] = reason
    if preds:
        rec["accuracy"] = sum(p["correct"] for p in preds) / len(preds)
        from .intervals import bootstrap_interval

        rec["ci"] = list(bootstrap_interval([float(p["correct"]) for p in preds]))
        rec["ci_level"] = LEVEL
        by_type: dict[str, list[bool]] = {}
        for p in preds:
            by_type.setdefault(p["qtype"], []).append(p["correct"])
        rec["per_qtype"] = {k: sum(v) / len(v) for k, v in sorted(by_type.items())}
        avgs = [p["avg_tokens"] for p in preds if p.get("avg_tokens") is not None]
        rec["avg_tokens"] = sum(avgs) / len(avgs) if avgs else None
        rec["seconds_per_item"] = sum(p["seconds"] for p in preds) / len(preds)
    return rec


def summarize(records: list[dict]) -> list[dict]:
    """Add ``relative`` (% of the unpruned accuracy) to each record when a ``none`` cell on the same data exists.

    Records from runs on different data (``run["data"]``, the items' fingerprint) are never compared.
    """
    def data(r: dict):
        return (r.get("run") or {}).get("data")

    bases: dict = {}
    for r in records:
        if r["method"] == "none" and r.get("accuracy"):
            bases.setdefault(data(r), r["accuracy"])
    for r in records:
        base = bases.get(data(r))
        if base and r.get("accuracy") is not None:
            r["relative"] = 100.0 * r["accuracy"] / base
        else:
            r.pop("relative", None)
    return records


def _all_cells(out: Path) -> list[dict]:
    """Every cell in ``out/preds``: its saved record (with the run that made it), ``none`` first.

    A predictions file without a saved record (an older learnpruner) is summarized from all its lines,
    with ``run: None``.
    """
    records = []
    for path in sorted((out / "preds").glob("*.jsonl")):
        result = path.with_suffix(".result.json")
        if not result.is_file():
            method, _, tokens = path.stem.rpartition("@")
            if method and tokens.isdigit():
                rec = _cell_record(method, int(tokens), list(_read_preds(path).values()), "ok", None)
                records.append({**rec, "run": None})
    for result in (out / "preds").glob("*.result.json"):
        with contextlib.suppress(ValueError, OSError):
            records.append(json.loads(result.read_text()))
    return sorted(records, key=lambda r: (r["method"] != "none", r["method"], -r["tokens"]))


def _write_results(out: Path) -> None:
    records = summarize(_all_cells(out))
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(records, indent=2) + "\n"))
    from .viz import plot_accuracy

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


def compare_cells(out_dir: str | os.PathLike, a: str, b: str, tokens: int, budget: str = "average") -> dict:
    """The paired comparison of method ``a`` with method ``b`` at ``tokens`` in the eval folder ``out_dir``
    (``none`` for the unpruned cell), computed from their saved predictions: A - B with its interval, the
    McNemar p-value and the verdict (see :func:`learnpruner.intervals.paired`). Cells evaluated on different
    data, or over items the other does not hold, are refused, naming what differs."""
    from .intervals import paired

    out = Path(out_dir)
    records = {(r["method"], r["tokens"] if r["method"] != "none" else None, r.get("budget", "average")): r
               for r in _all_cells(out) if r.get("status") == "ok"}
    cells = []
    for m in (a, b):
        key = (m, None, "average") if m == "none" else (m, tokens, budget)
        rec = records.get(key) or (records.get((m, None, budget)) if m == "none" else None)
        if rec is None:
            have = sorted({f"{k[0]}@{k[1]}" for k in records if k[1] is not None} | {"none" for k in records
                                                                                    if k[0] == "none"})
            raise ValueError(f"{out} has no answered cell {m}@{tokens} ({budget} budgets); it has: "
                             f"{', '.join(have) or 'none'}")
        cells.append(rec)
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
