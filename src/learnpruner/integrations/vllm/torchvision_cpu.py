"""torchvision on a CPU-only torch: what vLLM's CPU build needs to import.

PyPI's torchvision wheels are CUDA builds. On torch's CPU build their C++ ops library does not load, which
torchvision tolerates everywhere except two fake-tensor registrations (``torchvision::nms`` and ``::qnms``)
that its ``__init__`` runs unconditionally, so ``import torchvision`` fails. transformers imports torchvision
as soon as it is installed (image utilities, the Pixtral image processor that vLLM's LLaVA imports, the video
processors Qwen2.5-VL's processor needs), and vLLM's CPU build pulls the CUDA wheel in.

:func:`declare_missing_ops` declares the schemas of those two ops (no kernels) before torchvision is imported,
when, and only when, torch is a CPU build and torchvision's ops library cannot load. torchvision's pure-Python
parts (the transforms transformers uses) then import and run; calling ``torchvision.ops.nms`` raises, as it
would have anyway. It must run before the first ``import torchvision`` of every process, so
``python -m learnpruner.integrations.vllm.torchvision_cpu --install`` writes a one-line ``.pth`` file into the
environment's site-packages that calls it at interpreter start (``--uninstall`` removes it). The vLLM
environment of ``.ci/run`` is set up this way.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sysconfig
from pathlib import Path

PTH_NAME = "learnpruner-torchvision-cpu.pth"
OPS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
       "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_LIBRARY = None  # the torch.library.Library holding the declared schemas (its deletion would remove them)


def _cuda_torchvision() -> bool:
    """Whether the installed torchvision is a CUDA build (its ``version.py`` says ``+cu...``), found without
    importing it or loading its ops library (a failed load leaves the process's op registry inconsistent)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    version = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    try:
        first = version.read_text().splitlines()[0]
    except (OSError, IndexError):
        return False
    return "+cu" in first


def declare_missing_ops() -> bool:
    """Declare ``torchvision::nms``/``qnms`` when torch is a CPU build and torchvision's ops cannot load;
    returns whether it declared them. Safe to call more than once, and a no-op once torchvision is imported."""
    global _LIBRARY
    import sys

    if _LIBRARY is not None or "torchvision" in sys.modules:
        return False
    import torch

    if torch.version.cuda is not None or not _cuda_torchvision():
        return False
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in OPS:
        try:
            lib.define(schema)
        except RuntimeError:  # declared already (this hook ran in this process under another module name)
            return False
    _LIBRARY = lib
    return True


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def install(site: Path | None = None) -> Path:
    """Write the ``.pth`` hook into ``site`` (default: this interpreter's site-packages); returns its path."""
    path = (site or _site_packages()) / PTH_NAME
    # this file is loaded by its path, as a module of its own: the hook imports neither learnpruner nor torch's
    # dependants before torchvision (only torch itself)
    me = str(Path(__file__).resolve())
    # once per process: site may read the same site-packages twice (a venv's lib64 -> lib link), and a second
    # module object replacing the first would drop the first's Library, and with it the declared schemas
    line = ("import sys, importlib.util as u; n = 'learnpruner_torchvision_cpu'; "
            f"s = None if n in sys.modules else u.spec_from_file_location(n, {me!r}); "
            "m = s and u.module_from_spec(s); s and s.loader.exec_module(m); "
            "s and sys.modules.setdefault(n, m).declare_missing_ops()\n")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(line)
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--install", action="store_true", help="write the .pth hook into site-packages")
    group.add_argument("--uninstall", action="store_true", help="remove the .pth hook")
    args = ap.parse_args(argv)
    if args.install:
        print(f"wrote {install()}")
    else:
        path = _site_packages() / PTH_NAME
        path.unlink(missing_ok=True)
        print(f"removed {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
