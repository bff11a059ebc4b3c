"""The runtime: one process, or many through ``accelerate``/``torchrun`` (DDP over the LPM)."""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger("learnpruner.training")


class _Runtime:
    def __init__(self, bf16: bool, device: str | None):
        self.acc = None
        try:
            from accelerate import Accelerator

            if int(os.environ.get("WORLD_SIZE", "1")) > 1 or device is None:
                # accelerate sets up CPU-only multi-process (gloo) training only when told cpu=True
                no_accelerator = not (hasattr(torch, "accelerator") and torch.accelerator.is_available())
                cpu = device == "cpu" or (device is None and no_accelerator)
                self.acc = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=cpu)
        except ImportError:
            pass
        self.device = self.acc.device if self.acc else torch.device(device or "cpu")
        self.rank = self.acc.process_index if self.acc else 0
        self.world = self.acc.num_processes if self.acc else 1
        self.is_main = self.rank == 0

    def prepare(self, *objs):
        return self.acc.prepare(*objs) if self.acc else objs

    def backward(self, loss):
        if self.acc:
            self.acc.backward(loss)
        else:
            loss.backward()

    def unwrap(self, module):
        return self.acc.unwrap_model(module) if self.acc else module

    def reduce_mean(self, value: torch.Tensor) -> float:
        if self.acc and self.world > 1:
            value = self.acc.reduce(value.detach(), reduction="mean")
        return float(value.detach())

    def wait(self):
        if self.acc:
            self.acc.wait_for_everyone()
