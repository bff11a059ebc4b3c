"""Peer methods in the same harness: importing this package registers their rules and methods."""

from . import coverage, llm, vision  # noqa: F401
