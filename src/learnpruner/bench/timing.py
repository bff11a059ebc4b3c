"""The clock: CUDA events on a GPU, ``time.perf_counter`` on a CPU; medians over repeats."""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class _Clock:
    """Wall-clock on CPU (perf_counter), CUDA events on GPU; also the engine's section timer."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending = []

    def __call__(self, name: str):
        return self.section(name)

    @contextmanager
    def section(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.pending.append((name, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.pending.append((name, t0, time.perf_counter()))

    def collect(self) -> dict:
        """Milliseconds per section name (summed) since the last collect."""
        if self.cuda:
            torch.cuda.synchronize()
        out = defaultdict(float)
        for name, a, b in self.pending:
            out[name] += a.elapsed_time(b) if self.cuda else (b - a) * 1000.0
        self.pending = []
        return dict(out)

    def run(self, fn):
        """``(result, ms, sections)`` of ``fn()``: total ms and the ms of the sections timed inside it."""
        self.collect()
        with self.section("__total__"):
            result = fn()
        sections = self.collect()
        return result, sections.pop("__total__"), sections


def _median(values):
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else None
