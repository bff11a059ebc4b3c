"""``learnpruner-set``: a learned stage 1 that sees the set (this library's extension of LearnPruner, arXiv
2604.23950; not in the paper).

LearnPruner's LPM scores every token alone, so it cannot know that two patches show the same object: at 32
tokens it keeps many patches of a few objects and over-counts (docs/lpm-analysis.md). ``learnpruner-set`` keeps
the LPM as a learned *quality* term inside a set objective, greedy max-min coverage
(:func:`~learnpruner.selection.coverage_greedy`): each step keeps the token maximising
``beta * q_i - max_{s in kept} sim(i, s)``, ``q_i = tanh(logit_keep - logit_drop)`` of the LPM and ``sim``
the cosine similarity in a joint appearance-and-place space (:func:`~learnpruner.selection.coverage_similarity`:
the projected visual tokens beside each token's grid position weighted by ``gamma``). Both ``gamma`` and the
quality MLP are learned from the answer loss with the VLM frozen (``learnpruner train --method learnpruner-set``:
REINFORCE on the stochastic form of the same greedy rule, :func:`~learnpruner.training.set_policy.policy_loss`);
the learned ``gamma`` ships in the module's ``lpm.json``.
"""

from __future__ import annotations

import torch

from .. import selection as sel
from ..rules import Selection, VisionContext, lpm_of, stage1_rule
from .base import Method, Option, _lpm_check, fraction, register, stage1_schedule

__all__ = ["set_quality", "set_similarity", "SET_FOLDER"]

SET_FOLDER = "learnpruner-set"  # the model folder's learnpruner-set module (an LPM file with its learned gamma)


def set_quality(lpm, features: torch.Tensor) -> torch.Tensor:
    """``[g, n]``: learnpruner-set's quality of each token, ``tanh`` of the LPM's keep logit (``logit_keep -
    logit_drop``): bounded in ``(-1, 1)``, so ``beta`` caps how far quality can outweigh coverage (an unbounded logit
    let early REINFORCE steps swamp the coverage term and the policy collapsed onto a few tokens)."""
    logits = lpm.logits(features).float()
    return torch.tanh(logits[..., 1] - logits[..., 0])


def set_similarity(ctx: VisionContext, gamma: float | torch.Tensor) -> torch.Tensor:
    """``[g, n, n]``: learnpruner-set's metric on a context: the projected tokens beside their grid coordinates."""
    if ctx.coords is None and float(gamma) != 0.0:
        raise ValueError("learnpruner-set weighs where each token lies (gamma > 0), but this model's adapter gives no "
                         "token coordinates; pass gamma=0 for appearance alone")
    projected = ctx.adapter.project(ctx.features)
    coords = None if ctx.coords is None else ctx.coords.to(projected.device)
    return sel.coverage_similarity(projected, coords, gamma)


@stage1_rule("coverage", needs_lpm=True)
def _coverage(ctx: VisionContext, k: int) -> Selection:
    with torch.no_grad():
        sim = set_similarity(ctx, ctx.options["gamma"])
        beta = ctx.options["beta"]
        quality = beta * set_quality(lpm_of(ctx), ctx.features).to(sim.device) if beta else None
        return Selection(sel.coverage_greedy(sim, k, quality).to(ctx.features.device))


register(Method(
    name="learnpruner-set",
    summary='after the encoder: coverage in a learned place-aware metric + learned quality',
    paper='this library (extends arXiv 2604.23950)',
    stage1="coverage",
    stage2=None,
    schedule_fn=stage1_schedule,
    positions="original",
    lpm_folder=SET_FOLDER,
    options=(
        Option("lpm", None, _lpm_check, "the learned module: a folder, a module or 'random' (default: the model "
               f"folder's {SET_FOLDER}/)"),
        Option("gamma", 0.5, fraction("gamma", 0.0, 10.0), "weight of a token's grid position beside its "
               "appearance in the similarity (learned; the module's lpm.json ships it; 0.5 without one)"),
        Option("beta", 0.1, fraction("beta", 0.0, 10.0), "weight of the learned quality (tanh of the LPM's keep "
               "logit, in (-1, 1)) against coverage (a similarity); 0: coverage alone"),
    ),
    doc=(
        "learnpruner-set: this library's set-aware extension of LearnPruner (arXiv 2604.23950), not in the paper. "
        "Stage 1 after the vision encoder keeps T tokens by greedy max-min coverage with a learned quality: each "
        "step keeps the token maximising beta * q_i - max over kept s of sim(i, s) (the first: beta * q_i minus "
        "its similarity to its nearest other token, DivPrune's first pick), q_i = tanh of the module's keep logit "
        "on the vision feature layer's rows (bounded, so beta caps its weight) and sim the cosine similarity of "
        "normalize([normalize(projected token); "
        "gamma * (row, column)]), the token's grid place in [-1, 1] in its crop or frame. gamma and the quality "
        "MLP are learned from the answer loss with the VLM frozen (`learnpruner train --method learnpruner-set`: "
        "REINFORCE on the softmax form of the same greedy rule, leave-one-out baseline; the saved module is the "
        "best point of its validation curve, the untrained start included). Departures from the paper, named: "
        "(1) the LPM is a quality term inside a set objective, not a top-k scorer; (2) no stage 2 (the text-guided "
        "LLM drop cost accuracy at 32 tokens on val; every LLM layer sees T tokens); (3) no diversity fill (the set "
        "rule is the diversity); (4) positions original (kept tokens keep their ids; chosen on val); (5) trained "
        "by REINFORCE on the answer loss instead of the straight-through estimator, the LLM running on the kept "
        "rows only. Defaults: gamma 0.5 and beta 0.1 unless the module ships them; lpm: the model folder's "
        f"{SET_FOLDER}/. budget='paper' is the same (T kept). LLaVA-NeXT: on each image's tokens at once, as "
        "DivPrune; video: over all frames at once, (row, column) within each frame."
    ),
))
