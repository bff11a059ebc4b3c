"""Training ``learnpruner-set``'s module from the answer loss: REINFORCE on the stochastic form of its greedy rule.

The selection (:func:`~learnpruner.selection.coverage_greedy`) is discrete and sequential, so no straight-through
mask gives its gradient. Its softmax form (:func:`~learnpruner.selection.coverage_sample`: each step draws the
next token from ``softmax((beta * q_i - max_s sim(i, s)) / tau)``) is a policy whose log-probability is
differentiable in the quality MLP and in ``gamma``. Per record ``samples`` sets are drawn; the frozen LLM answers
from the text and each set's rows only (what inference computes after stage 1; no backward through the LLM); each
draw's advantage is the mean answer cross-entropy of the other draws minus its own (the leave-one-out baseline,
Kool et al. 2019), and the loss is ``-mean(advantage * log_prob) / k``. Cost per record: ``samples`` LLM forwards
over ``text + k`` rows and the ``k``-step draw on the ``n x n`` similarity.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from .. import selection as sel
from ..engine.layout import VisualFeatures, fill_streams
from ..engine.sequence import layer_additions
from ..lpm import LearnablePruningModule
from ..methods.learnpruner_set import set_quality
from .loss import _feature_table, _take_rows, prompt_embeddings, rotary_positions, row_subset

__all__ = ["SetPolicy", "policy_loss", "answer_ce", "fit_gamma"]


class SetPolicy(nn.Module):
    """learnpruner-set's trainable parts: the quality MLP (an LPM, its last layer zero-initialised so training
    starts from coverage alone) and ``gamma`` (as ``log_gamma``). Saved as an LPM folder whose ``lpm.json`` ships
    the learned ``gamma`` and ``beta`` as the method's options."""

    def __init__(self, lpm: LearnablePruningModule, gamma: float = 0.5, beta: float = 0.1, tau: float = 0.02,
                 zero_init: bool = True):
        super().__init__()
        if not gamma > 0:
            raise ValueError(f"gamma must be positive to be learned (as log gamma), got {gamma}")
        self.lpm = lpm
        if zero_init:
            last = lpm.mlp[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        self.log_gamma = nn.Parameter(torch.tensor(math.log(gamma)))
        self.beta, self.tau = float(beta), float(tau)

    @property
    def config(self):
        return self.lpm.config

    @property
    def gamma(self) -> torch.Tensor:
        return self.log_gamma.exp()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.lpm(features)

    def similarity(self, ad, features: torch.Tensor, coords: torch.Tensor | None) -> torch.Tensor:
        return sel.coverage_similarity(ad.project(features), coords, self.gamma if coords is not None else 0.0)

    def quality(self, features: torch.Tensor) -> torch.Tensor | None:
        return self.beta * set_quality(self.lpm, features) if self.beta else None

    GAMMA_LR = 30.0  # log gamma's learning rate, as a multiple of the quality MLP's (one scalar, a weak gradient)

    def param_groups(self, lr: float) -> list[dict]:
        """The optimizer's groups: the quality MLP at ``lr``, ``log_gamma`` at ``GAMMA_LR * lr``."""
        return [{"params": list(self.lpm.parameters()), "lr": lr},
                {"params": [self.log_gamma], "lr": self.GAMMA_LR * lr}]

    def options(self) -> dict:
        return {"gamma": round(float(self.gamma.detach()), 6), "beta": self.beta}

    def save(self, path: str | os.PathLike) -> Path:
        self.lpm.config.extra.setdefault("options", {}).update(self.options())
        return self.lpm.save(path)

    @torch.no_grad()
    def keep_mask(self, ad, visual: VisualFeatures, feats: torch.Tensor, valid: torch.Tensor, k: list[int]
                  ) -> torch.Tensor:
        """The inference selection (greedy) as a 0/1 mask ``[num_images, width]``: the validation curve's."""
        return _group_masks(self, ad, visual, feats, valid, k, sample=None)[0]


def _coords_table(visual: VisualFeatures, width: int, device) -> torch.Tensor | None:
    if visual.coords is None:
        return None
    out = torch.zeros(visual.num_images, width, visual.coords[0].shape[-1], device=device)
    for i, c in enumerate(visual.coords):
        out[i, : c.shape[0]] = c.to(device)
    return out


def _group_masks(policy: SetPolicy, ad, visual: VisualFeatures, feats, valid, k: list[int], sample: int | None,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per group of images with one count ``n`` (and one ``k``): the greedy set (``sample=None``) or ``sample``
    draws of the policy. Returns ``(masks [draws * num_images, width], log_prob [draws * num_images] or None)``,
    draw-major."""
    draws = 1 if sample is None else sample
    num, width = feats.shape[:2]
    masks = torch.zeros(draws, num, width, device=feats.device)
    logp = torch.zeros(draws, num, device=feats.device) if sample is not None else None
    coords = _coords_table(visual, width, feats.device)
    counts = valid.sum(dim=1).tolist()
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (n, kk) in enumerate(zip(counts, k)):
        groups.setdefault((int(n), min(int(kk), int(n))), []).append(i)
    for (n, kk), images in groups.items():
        idx = torch.tensor(images, device=feats.device)
        f = feats[idx, :n]
        c = None if coords is None else coords[idx, :n]
        if kk >= n:
            masks[:, idx, :n] = 1
            continue
        sim = policy.similarity(ad, f, c)
        q = policy.quality(f)
        if sample is None:
            kept = sel.coverage_greedy(sim, kk, q)[None]
        else:
            g = len(images)
            rep = sim.repeat(draws, 1, 1)
            qrep = None if q is None else q.repeat(draws, 1)
            kept, lp = sel.coverage_sample(rep, kk, qrep, policy.tau, generator)
            kept, lp = kept.view(draws, g, kk), lp.view(draws, g)
            logp[:, idx] = lp
        for d in range(draws):
            masks[d, idx[:, None].expand_as(kept[d]), kept[d]] = 1
    return masks.flatten(0, 1), None if logp is None else logp.flatten()


def answer_ce(model, ad, batch: dict, embeds, layout, positions: dict, adds, hard: torch.Tensor, valid: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per record: the mean answer cross-entropy and whether every answer token is the argmax, the LLM on the text
    and the rows ``hard`` keeps (``[num_images, width]``) only, teacher-forced."""
    rows, _ = row_subset(hard, valid, layout, 0)
    token = layout.vis >= 0
    gate = torch.ones(token.shape, dtype=embeds.dtype, device=embeds.device)
    e, gate, mask, labels, pos, adds = _take_rows(rows, embeds, gate, batch["attention_mask"], batch["labels"],
                                                  positions, adds)
    with layer_additions(ad, adds):
        logits = model(inputs_embeds=e, attention_mask=mask, learnpruner_gate=gate, use_cache=False,
                       **pos).logits[:, :-1].float()
    target = labels[:, 1:]
    answer = target != -100
    nll = -torch.log_softmax(logits, dim=-1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
    ce = (nll * answer).sum(dim=1) / answer.sum(dim=1).clamp(min=1)
    right = ((logits.argmax(dim=-1) == target) | ~answer).all(dim=1)
    return ce, right


def policy_loss(model, ad, policy: SetPolicy, batch: dict, rho, cfg, visual: VisualFeatures | None = None,
                generator: torch.Generator | None = None):
    """One REINFORCE step's loss for ``policy`` on a batch: ``(loss, parts)`` with ``parts`` as the STE loss's
    (``ce``: the draws' mean answer CE; ``kept`` / ``target``: kept fractions; ``rows``: the LLM's mean sequence)
    plus ``gamma``. ``rho``: the per-count target fraction (the method's plan, :class:`~.loss._Targets`)."""
    samples = cfg.policy_samples
    if samples < 2:
        raise ValueError(f"policy_samples must be at least 2 (the leave-one-out baseline), got {samples}")
    with torch.no_grad():
        embeds, visual, layout = prompt_embeddings(model, ad, batch, visual)
        positions = rotary_positions(ad, batch)
        adds = fill_streams(ad, visual, [None] * visual.num_images, embeds, layout.vis >= 0)
    feats, valid = _feature_table(visual)
    counts = visual.counts()
    fractions = [rho(n) if callable(rho) else rho for n in counts]
    k = [n if f is None else max(1, round(f * n)) for n, f in zip(counts, fractions)]
    masks, logp = _group_masks(policy, ad, visual, feats, valid, k, samples, generator)
    num = visual.num_images
    ces = []
    with torch.no_grad():
        for d in range(samples):
            ce, _ = answer_ce(model, ad, batch, embeds, layout, positions, adds, masks[d * num:(d + 1) * num], valid)
            ces.append(ce)
    ce = torch.stack(ces)  # [draws, b]
    baseline = (ce.sum(dim=0, keepdim=True) - ce) / (samples - 1)
    advantage = baseline - ce  # > 0: this draw answered better than the others
    # each record's advantage goes to the log-probability of its images' draws
    img_of = _record_of_images(layout, num, feats.device)
    adv_img = advantage[:, img_of].flatten()  # draw-major, as logp
    mean_k = sum(k) / len(k)
    loss = -(adv_img.detach() * logp).mean() / mean_k
    kept = torch.tensor([kk / n for kk, n in zip(k, counts)]).mean()
    parts = {"ce": ce.mean().detach(), "ratio": torch.zeros(()), "kl": torch.zeros(()), "kept": kept,
             "target": kept, "rows": torch.tensor(float(batch["attention_mask"].sum(dim=1).float().mean())),
             "gamma": policy.gamma.detach(), "advantage": advantage.abs().mean().detach()}
    return loss, parts


def _record_of_images(layout, num_images: int, device) -> torch.Tensor:
    """``[num_images]``: the batch row (record) each image sits in."""
    out = torch.zeros(num_images, dtype=torch.long, device=device)
    rows, _ = (layout.img >= 0).nonzero(as_tuple=True)
    out[layout.img[layout.img >= 0]] = rows.to(device)
    return out


@torch.no_grad()
def fit_gamma(model, ad, policy: SetPolicy, cache, targets, grid, records: int, pad_id: int) -> list[dict]:
    """Fit ``gamma`` on the answer loss of training records: for each value of ``grid`` the greedy selection
    (with the policy's current quality) is scored on the first ``records`` records of the training ``cache``
    (teacher-forced answer cross-entropy, the LLM on the kept rows, as :func:`~.loop.validate` scores), and the
    policy takes the value of the lowest loss. A zeroth-order fit: gamma's REINFORCE gradient is weak (one scalar
    that moves every similarity a little). Returns ``[{"gamma", "ce", "accuracy"}]`` per value."""
    import copy

    from .loop import validate

    if records <= 0:
        raise ValueError(f"records must be positive, got {records}")
    view = copy.copy(cache)
    view.records = cache.records[:records]
    start = policy.log_gamma.detach().clone()
    rows = []
    for g in grid:
        if not g > 0:
            raise ValueError(f"the gamma grid takes positive values, got {g}")
        policy.log_gamma.fill_(math.log(g))
        point = validate(model, ad, policy, view, targets, None, pad_id)
        rows.append({"gamma": float(g), "ce": point["ce"], "accuracy": point["accuracy"]})
    best = min(rows, key=lambda r: r["ce"]) if rows else None
    policy.log_gamma.copy_(start if best is None else torch.tensor(math.log(best["gamma"])))
    return rows
