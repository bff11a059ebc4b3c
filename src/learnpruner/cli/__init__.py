"""learnpruner: LearnPruner and peer visual-token pruning for Hugging Face VLMs.

Subcommands, each a function registered in :data:`~learnpruner.commands.COMMANDS` with its arguments, one module
per group here (:mod:`.generate`, :mod:`.train`, :mod:`.evaluate`, :mod:`.info`):
``generate`` (one question about one image or video, pruned), ``eval`` (methods x budgets with intervals,
resumable), ``compare`` (paired differences of an eval folder's cells), ``train`` (an LPM for a frozen VLM),
``calibrate`` (adaptive-budget thresholds), ``report`` (an HTML page of an eval folder), ``demo``, ``methods`` (the
registry), ``env`` (versions for a bug report), and from their own modules ``bench`` (:mod:`learnpruner.bench`),
``vllm-bench``, ``serve`` and ``lmms-task`` (:mod:`learnpruner.integrations`). Building the parser imports no torch.
"""

from __future__ import annotations

import argparse
import sys

from ..commands import COMMANDS

__all__ = ["main", "COMMANDS"]



# the order --help lists the subcommands in (a command not named here comes after them)
ORDER = ("generate", "demo", "eval", "compare", "report", "train", "calibrate", "bench", "serve", "vllm-bench",
         "lmms-task", "methods", "env")


def build_parser() -> argparse.ArgumentParser:
    from .. import (
        __version__,
        bench,  # noqa: F401  (registers the `bench` subcommand)
    )
    from ..integrations.lmms_eval import task  # noqa: F401  (registers the `lmms-task` subcommand)
    from ..integrations.vllm import bench as vllm_bench  # noqa: F401  (registers `vllm-bench`; imports vLLM lazily)
    from ..integrations.vllm import serve  # noqa: F401  (registers `serve`)
    from . import evaluate, generate, info, train  # noqa: F401  (register their subcommands, in this order)

    parser = argparse.ArgumentParser(prog="learnpruner", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"learnpruner {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    order = [n for n in ORDER if n in COMMANDS] + [n for n in COMMANDS if n not in ORDER]
    for name in order:
        add_args, _, help = COMMANDS[name]
        add_args(sub.add_parser(name, help=help, description=help))
    return parser


# what each command writes (compare's --out is the eval folder it reads)
OUTPUTS = {"report": ("html",), "train": ("out",), "eval": ("out",), "calibrate": ("out",), "generate": ("overlay",),
           "bench": ("out",), "demo": ("out",), "lmms-task": ("out",), "vllm-bench": ("out",), "compare": ("json",),
           "serve": ()}


def _refuse_outputs_in_package(args: argparse.Namespace) -> None:
    from ..utils import refuse_package_path

    for attr in OUTPUTS.get(args.command, ()):
        value = getattr(args, attr, None)
        if value:
            refuse_package_path(value, f"--{attr}")


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Bad input: one ``error: ...`` line on stderr and exit code 2 (argparse's
    usage errors too); Ctrl-C: one line (for ``eval``, how to resume) and exit code 130."""
    argv = list(sys.argv[1:] if argv is None else argv)
    passed = []
    if argv[:1] == ["serve"] and "--" in argv:  # what follows -- goes to vLLM unchanged
        cut = argv.index("--")
        argv, passed = argv[:cut], argv[cut + 1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed by argparse
        return e.code if isinstance(e.code, int) else 2
    if getattr(args, "passthrough", False):
        args.vllm_args = passed
    try:
        _refuse_outputs_in_package(args)
        return COMMANDS[args.command][1](args) or 0
    except KeyboardInterrupt:
        resume = f"; rerun the same command to resume from --out {args.out}" if args.command == "eval" else ""
        print(f"\ninterrupted{resume}" if sys.stderr.isatty() else f"interrupted{resume}", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError) as e:  # FileNotFoundError is an OSError
        message = "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
