"""A run folder's cells: prediction files appended batch by batch, torn tails repaired, the setup each cell was
made with, and the lock that keeps a second eval off a folder in use."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from ..utils import atomic_write


def _cell_name(method: str, tokens: int, budget: str = "average") -> str:
    """A cell's file name; the ``paper`` budget convention gets its own cells (never mixed with the average's)."""
    return f"{method}@{tokens}" + ("" if budget == "average" or method == "none" else f"-{budget}")


def _read_preds(path: Path) -> dict[str, dict]:
    """Predictions already written, by item id. An unterminated last line (a write killed midway) is left out;
    any other line that is not a prediction record refuses the file, naming its line."""
    done = {}
    if not path.is_file():
        return done
    data = path.read_bytes()
    lines = data.split(b"\n")
    torn = not data.endswith(b"\n")
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
            if not isinstance(rec, dict) or not isinstance(rec.get("id"), str) or not isinstance(
                    rec.get("correct"), bool):
                raise ValueError("not a prediction record")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if torn and lineno == len(lines):
                continue
            raise ValueError(f"{path}:{lineno}: {e if not isinstance(e, json.JSONDecodeError) else 'not JSON'} "
                             "(expected one JSON object per line with id, pred and correct, as learnpruner eval "
                             "writes); delete the file to recompute its cell") from None
        done[rec["id"]] = rec
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
                fingerprint: dict | None = None, plan: dict | None = None) -> dict:
    """Every setting that changes a cell's answers: the model (name, configuration and weights), its dtype, the
    device type, the method options as given and as resolved (``plan``: the cell's :meth:`~learnpruner.Plan.as_dict`,
    every option with its default and the LPM's SHA-256), the generation length and the frames sampled from a video.
    ``fingerprint``: the model's :func:`~learnpruner.hub.model_fingerprint`, if already computed."""
    opts = {k: (v if isinstance(v, (str, int, float, bool, type(None))) else repr(v)) for k, v in options.items()}
    if fingerprint is None:
        from ..hub import model_fingerprint

        fingerprint = model_fingerprint(model)
    setup = {**fingerprint, "options": opts, "max_new_tokens": max_new_tokens,
             "dtype": str(model.dtype).removeprefix("torch."), "device": torch.device(device).type,
             "frames": num_frames}
    if plan is not None:
        setup["plan"] = plan
    return setup


def _check_cell_setup(path: Path, model, options: dict, max_new_tokens: int, device: str = "cpu",
                      num_frames: int = 8, fingerprint: dict | None = None, plan: dict | None = None) -> None:
    """Refuse to resume a cell whose saved predictions came from another setup (:func:`_cell_setup`).

    The setup is written beside the predictions (``<cell>.setup.json``) before the first of them; a
    cell with predictions but no setup file (an older run) adopts the current setup, and a setup file of an
    older learnpruner (fewer settings) is checked on the settings it holds, then completed.
    """
    setup = _cell_setup(model, options, max_new_tokens, device, num_frames, fingerprint, plan)
    meta = path.with_suffix(".setup.json")
    if meta.is_file():
        saved = json.loads(meta.read_text())
        differ = {k: (saved[k], setup[k]) for k in setup if k in saved and saved[k] != setup[k]}
        if "plan" in differ:  # name what changed inside the plan (the LPM's hash, an option, the layer)
            a, b = differ.pop("plan")
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    differ[f"plan.{key}"] = (a.get(key), b.get(key))
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
