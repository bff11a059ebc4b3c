"""The training settings (:class:`TrainConfig`) and the names a run uses."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger("learnpruner.training")


GATED_ATTENTION = "learnpruner_gated"
MASKS = ("threshold", "topk")
RUN_FILES = ("lpm.safetensors", "lpm.json", "checkpoint.pt", "curve.png")  # what a run writes into its out_dir


@dataclass
class TrainConfig:
    """Defaults for LPM training; every weight is configurable."""

    tokens: int = 64
    # the method whose stage 1 the module is trained for: its plan gives each item's stage-1 count at the budget
    method: str = "learnpruner"
    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 20
    ratio_weight: float = 4.0
    mask: str = "threshold"
    distill_weight: float = 0.0
    stage2: bool = False  # run stage 2 (the text-attention drop in the LLM) in the training forward
    # the stage-2 layer K of the schedules the targets follow (None: the method's default); the LPM ships it as
    # its ``layer`` option (lpm.json ``extra["options"]``), so ``apply`` uses the K it was trained for
    layer: int | None = None
    hidden_dim: int = 512
    seed: int = 0
    ckpt_every: int = 100
    grad_ckpt: bool = False
    bf16: bool = False
    max_length: int = 2048
    # sample the training budget per step, log-uniformly in [lo, hi] (seeded by step: resumable), so one LPM
    # ranks tokens for every budget it will be used at; None: always ``tokens``
    budget_range: tuple[int, int] | None = None
    # the LLM runs on the text, the kept rows and this many of each image's dropped rows (their gradient scaled to
    # stay unbiased: see loss.row_subset); None: on every row, as the gated forward over the whole prompt
    dropped_rows: int | None = None
    clip_grad: float | None = None  # clip the LPM's gradient to this global norm (None: no clipping)
    val_every: int = 0  # steps between points of the validation curve (0: no curve)
    # learnpruner-set (method="learnpruner-set": REINFORCE, training.set_policy): the policy's temperature, draws per
    # record (leave-one-out baseline) and the start of the learned gamma
    tau: float = 0.02
    policy_samples: int = 4
    gamma: float = 0.5
    # fit gamma first on the answer loss of the first ``gamma_records`` training records over these values (None: no
    # fit; gamma starts at ``gamma``)
    gamma_grid: tuple[float, ...] | None = None
    gamma_records: int = 2000
    extra: dict = field(default_factory=dict)

    def step_tokens(self, step: int) -> int:
        """The training budget of optimisation step ``step``."""
        if self.budget_range is None:
            return self.tokens
        lo, hi = self.budget_range
        u = np.random.default_rng([self.seed, step]).uniform()
        return int(round(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))))
