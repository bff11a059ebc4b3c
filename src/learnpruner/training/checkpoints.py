"""Checkpoints and run folders: atomic saves, exact resume, provenance checks, the loss history."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from torch import nn

from ..utils import atomic_torch_save, read_checkpoint, rng_state
from ..utils import check_out_dir as _check_out_dir
from .config import RUN_FILES

logger = logging.getLogger("learnpruner.training")


def check_out_dir(out_dir: str | os.PathLike, resume: bool = False, overwrite: bool = False) -> list[Path]:
    """Refuse to start a new run in a non-empty ``out_dir``; returns the old run's files (``RUN_FILES``) that
    ``overwrite`` deletes. ``resume`` with a ``checkpoint.pt`` there continues that run."""
    return _check_out_dir(out_dir, resume, overwrite, RUN_FILES)


RESUME_MAY_CHANGE = ("steps", "ckpt_every", "val_every")


def _check_trained_on(saved: dict | None, now: dict, path: Path) -> None:
    """Refuse to resume a run made for another model or other data, naming both (a checkpoint of an older
    learnpruner, which recorded neither, resumes as before)."""
    if saved is None:
        return
    for what, keys in (("model", ("model", "fingerprint")), ("data", ("data", "sha256", "seed"))):
        if any(saved.get(k) != now.get(k) for k in keys):
            there, here = (", ".join(f"{k}={d.get(k)}" for k in keys if d.get(k) is not None) for d in (saved, now))
            raise ValueError(f"cannot resume {path}: it was trained on another {what} ({there}), this run "
                             f"has {here}; resume with the checkpoint's {what} or use another --out")


def _check_resume_config(saved: dict, now: dict, path: Path) -> None:
    """Resuming continues exactly, so only ``RESUME_MAY_CHANGE`` may differ from the checkpoint's run."""
    diff = {k: (saved[k], now.get(k)) for k in saved if k not in RESUME_MAY_CHANGE and saved[k] != now.get(k)}
    if diff:
        shown = ", ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in diff.items())
        raise ValueError(f"cannot resume {path} with different settings ({shown}); "
                         "use the checkpoint's settings or another --out")


def _save_checkpoint(path: Path, lpm: nn.Module, opt, scheduler, step, pos, history, data, cfg,
                     extra: dict | None = None) -> None:
    state = {"lpm": lpm.state_dict(), "opt": opt.state_dict(), "sched": scheduler.state_dict(), "step": step,
             "pos": pos, "history": history, "skipped": dict(data.skipped), "bad": sorted(data._bad),
             "rng": rng_state(), "config": asdict(cfg), "trained_on": lpm.config.extra.get("trained_on"),
             **(extra or {})}
    atomic_torch_save(state, path)


def iter_history(out_dir: str | os.PathLike) -> Iterator[dict]:
    """The per-step records of a run's checkpoint (loss, ce, kept, kl, lr)."""
    yield from read_checkpoint(Path(out_dir) / "checkpoint.pt", ("history",))["history"]
