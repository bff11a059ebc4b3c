"""Small shared helpers: atomic file writes, checkpoints read as data only, RNG state for exact resumes."""

from __future__ import annotations

import os
import pickle
import random
import re
import tempfile
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import torch

__all__ = ["atomic_write", "atomic_torch_save", "check_out_dir", "refuse_package_path", "read_checkpoint", "rng_state",
           "set_rng_state"]


def _umask() -> int:
    """The process umask. Read from ``/proc`` where Linux shows it; elsewhere set and restored at once (to the
    restrictive ``0o077`` meanwhile, so a file another thread creates in between is never too open)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` then move the file onto ``path``, so readers never see half a file.

    The file gets the permissions ``open`` would give it (``0o666`` less the umask), not ``mkstemp``'s ``0o600``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_write` (checkpoints survive an interrupted write)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


PACKAGE = Path(__file__).resolve().parent


def refuse_package_path(path: str | os.PathLike, flag: str) -> None:
    """``ValueError`` when ``path`` lies inside the installed learnpruner package (its shipped models and LPMs):
    nothing a command writes ever lands there."""
    resolved = Path(path).resolve()
    if resolved == PACKAGE or PACKAGE in resolved.parents:
        raise ValueError(f"{flag} {str(path)!r} lies inside the installed learnpruner package ({PACKAGE}); its shipped "
                         "models and LPMs are never written over: give a folder outside it")


def check_out_dir(out_dir: str | os.PathLike, resume: bool, overwrite: bool, run_files: tuple[str, ...]) -> list[Path]:
    """Refuse to start a new run in a non-empty ``out_dir``; returns the old run's files ``overwrite`` deletes.

    ``resume`` with a ``checkpoint.pt`` there continues that run (nothing to delete). ``run_files`` are the
    glob patterns of what a run writes (their ``atomic_write`` temporaries included); other files in the
    folder are never deleted.
    """
    out = Path(out_dir)
    refuse_package_path(out, "--out")
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: --resume continues the run in --out, "
                         "--overwrite replaces it")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a folder")
    if not out.is_dir() or (resume and (out / "checkpoint.pt").is_file()):
        return []
    present = sorted(p.name for p in out.iterdir())
    if present and not overwrite:
        shown = ", ".join(present[:5]) + (f" and {len(present) - 5} more" if len(present) > 5 else "")
        if resume:
            raise ValueError(f"--out {str(out)!r} has no checkpoint.pt to resume from but is not empty ({shown}): "
                             "use --overwrite instead of --resume to replace its run, or another --out")
        raise ValueError(f"--out {str(out)!r} is not empty ({shown}): pass --resume to continue its run, "
                         "--overwrite to replace it, or another --out")
    return [out / n for n in present if any(fnmatch(n, f) or fnmatch(n, f".{f}.*") for f in run_files)]


def read_checkpoint(path: str | os.PathLike, required: tuple[str, ...] = ()) -> dict:
    """A checkpoint written by :func:`atomic_torch_save`, read as data only (``weights_only=True``).

    Anything else (an old checkpoint holding pickled objects, a crafted one, a damaged file, a dict without
    the ``required`` keys) raises ``ValueError`` naming the file; nothing in it is executed.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError) as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        reason = (f"it refers to {found[1]}, which a checkpoint of this learnpruner version never holds" if found
                  else "it is damaged or not a torch checkpoint")
        raise ValueError(f"{str(path)!r} is not a loadable learnpruner checkpoint: {reason}; it was read as data "
                         "only and nothing from it was executed") from None
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} is not a loadable learnpruner checkpoint: it holds a "
                         f"{type(state).__name__}, not a dict; nothing from it was executed")
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"{str(path)!r} is not a loadable learnpruner checkpoint: it lacks "
                         f"{', '.join(map(repr, missing))}; nothing from it was executed")
    return state


def rng_state() -> dict:
    """The Python, NumPy and torch (CPU) generator states, as tensors, lists and numbers only.

    Plain data, so a checkpoint holding them loads with ``torch.load(..., weights_only=True)``.
    """
    version, internal, gauss = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {"python": [version, list(internal), gauss],
            "numpy": {"kind": str(kind), "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    key = np.asarray(n["key"].numpy() if isinstance(n["key"], torch.Tensor) else n["key"], dtype=np.uint32)
    np.random.set_state((n["kind"], key, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
