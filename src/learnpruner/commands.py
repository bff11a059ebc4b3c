"""The registry of ``learnpruner`` subcommands.

:mod:`learnpruner.cli` builds the parser from :data:`COMMANDS`. A module adds a subcommand by decorating its function
with :func:`command`; the CLI imports those modules (``bench``, the integrations) when it builds the parser, so none
of them imports the CLI (no import cycle).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["COMMANDS", "command"]

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {}


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None]):
    """Register the decorated function as subcommand ``name``; ``arguments`` adds its options."""

    def deco(run):
        COMMANDS[name] = (arguments, run, help)
        return run

    return deco
