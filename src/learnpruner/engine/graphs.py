"""A bounded cache of CUDA graphs for the fast prefill (``apply(..., fast=True)``).

:meth:`GraphCache.run` calls a function of tensors. On CUDA it captures the call once per key and input
shapes (after a warm-up on a side stream, as CUDA graphs require) and replays it afterwards: the inputs are
copied into the graph's static tensors, the graph is replayed, and the outputs are cloned out, so a later
replay never overwrites what the caller holds. On other devices, and whenever ``enabled`` is False, the same
function simply runs, so the code around it is the same on a CPU (where the tests run it) and on a GPU.

Each graph keeps its own memory pool (its inputs, outputs and intermediates at the captured shapes). The
cache holds at most ``max_graphs`` of them and drops the least recently used one beyond that: memory stays
bounded whatever mix of prompt buckets, batch sizes and schedules a process sees, at the cost of a new
capture when an evicted shape comes back.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.utils import _pytree as pytree

__all__ = ["GraphCache", "MAX_GRAPHS", "graphed_modules"]

MAX_GRAPHS = 32  # graphs kept per model (prefill segments and vision passes together); least recently used first


def _signature(value):
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, str(value.device))
    return ("value", value)


class GraphCache:
    """CUDA graphs of tensor functions, keyed by a caller's key and the inputs' shapes, dtypes and devices.

    ``max_graphs``: how many are kept (least recently used dropped first); ``captures``: how many were
    captured so far (a replay of a kept graph does not count)."""

    def __init__(self, max_graphs: int = MAX_GRAPHS, enabled: bool = True):
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs must be a positive integer, got {max_graphs!r}")
        self.max_graphs = max_graphs
        self.enabled = enabled
        self.captures = 0
        self._graphs: OrderedDict = OrderedDict()

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        self._graphs.clear()

    def run(self, key, fn: Callable, *args, reset: Callable[[], None] | None = None):
        """``fn(*args)``, replayed from a CUDA graph when every tensor argument is on a CUDA device.

        ``args``: tensors or ``None`` (part of the key); ``fn`` must have static shapes for given input shapes
        and no host synchronisation. ``reset`` undoes what a warm-up call of ``fn`` changed outside its outputs
        (the decode step advances its cache position); it runs after each warm-up. Returns ``fn``'s output (a
        pytree of tensors), cloned out of the graph."""
        if not self._capturable([a for a in args if isinstance(a, torch.Tensor)]):
            return fn(*args)
        # inference-mode tensors cannot be written outside inference mode: one graph per mode
        full_key = (key, torch.is_inference_mode_enabled(), tuple(_signature(a) for a in args))
        entry = self._graphs.get(full_key)
        if entry is None:
            entry = self._capture(fn, args, reset)
            self._graphs[full_key] = entry
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(full_key)
        for static, value in zip(entry["inputs"], args):
            if isinstance(static, torch.Tensor):
                static.copy_(value)
        entry["graph"].replay()
        return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, entry["outputs"])

    def _capturable(self, tensors: list[torch.Tensor]) -> bool:
        """Capture only when enabled, with every tensor on a CUDA device, and outside another capture."""
        if not (self.enabled and tensors and all(t.is_cuda for t in tensors)):
            return False
        return not torch.cuda.is_current_stream_capturing()

    def _capture(self, fn: Callable, args, reset: Callable[[], None] | None = None) -> dict:
        inputs = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up on a side stream (lazy initialisation, autotuning)
            for _ in range(2):
                fn(*inputs)
                if reset is not None:
                    reset()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = fn(*inputs)
        self.captures += 1
        return {"graph": graph, "inputs": inputs, "outputs": outputs}


@contextmanager
def graphed_modules(graphs: GraphCache | None, modules) -> Iterator[None]:
    """Within this context each module of ``modules`` runs its forward through ``graphs`` (a CUDA graph per input
    shape on a GPU, the forward itself elsewhere). Tensor arguments are the graph's inputs; the other arguments
    (flags such as ``output_hidden_states=True``) are part of its key. Only the instances are patched, and only
    for the duration of the context."""
    if graphs is None or not modules:
        yield
        return
    saved = []
    for j, module in enumerate(modules):
        had_own = "forward" in module.__dict__
        original, name = module.forward, type(module).__name__

        def forward(*args, _original=original, _j=j, _name=name, **kwargs):
            names = sorted(k for k, v in kwargs.items() if isinstance(v, torch.Tensor))
            fixed = tuple(sorted((k, v) for k, v in kwargs.items() if k not in names))
            try:
                hash(fixed)
            except TypeError:  # an argument that cannot key a graph: run as is
                return _original(*args, **kwargs)

            def call(*tensors):
                return _original(*tensors[: len(args)], **dict(zip(names, tensors[len(args):])), **dict(fixed))

            return graphs.run(("module", _j, _name, tuple(names), fixed), call, *args, *(kwargs[k] for k in names))

        saved.append((module, had_own, original))
        module.forward = forward
    try:
        yield
    finally:
        for module, had_own, original in saved:
            if had_own:
                module.forward = original
            else:
                del module.forward
