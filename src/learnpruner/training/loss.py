"""The training forward and its loss: the hard keep mask with the straight-through estimator, the prompt's
embeddings with the kept rows projected, the answer loss, the keep-ratio term and the optional distillation."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from ..adapters import Adapter
from ..budget import tokens_for
from ..engine.layout import Layout, VisualFeatures, fill_streams, fill_visual, project_rows
from ..engine.sequence import layer_additions
from ..methods import get_method
from .config import GATED_ATTENTION, MASKS, TrainConfig
from .gating import Stage2Gate

logger = logging.getLogger("learnpruner.training")


def hard_keep_mask(keep_prob: torch.Tensor, rho: float | list[float], mask: str = "threshold",
                   valid: torch.Tensor | None = None) -> torch.Tensor:
    """The forward pass's 0/1 keep mask ``[b, n]``: ``p > 0.5``, or exactly the top ``round(rho * n_i)``
    (at least 1) of each row's ``n_i`` valid entries. ``rho``: one fraction or one per row; ``valid``
    (``[b, n]`` bool, None: all) marks the real tokens of a padded table, and padding is never kept."""
    _check_mask(mask)
    valid = torch.ones_like(keep_prob, dtype=torch.bool) if valid is None else valid.bool()
    if mask == "threshold":
        return ((keep_prob > 0.5) & valid).to(keep_prob.dtype)
    count = valid.sum(dim=-1)
    k = (torch.as_tensor(rho, dtype=torch.float64, device=keep_prob.device) * count).round().clamp_min(1)
    order = keep_prob.detach().masked_fill(~valid, float("-inf")).argsort(dim=-1, descending=True, stable=True)
    ranks = torch.arange(keep_prob.shape[-1], device=keep_prob.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, ranks)
    return ((rank < k[..., None]) & valid).to(keep_prob.dtype)


def _check_mask(mask: str) -> None:
    if mask not in MASKS:
        raise ValueError(f"unknown mask {mask!r}; accepted: {', '.join(MASKS)}")


def _feature_table(visual: VisualFeatures) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image's feature rows as one ``[num_images, width, d]`` table (zero-padded) and its validity mask."""
    feats = visual.features
    if isinstance(feats, torch.Tensor):
        return feats, torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
    table = nn.utils.rnn.pad_sequence(list(feats), batch_first=True)
    counts = torch.tensor(visual.counts(), device=table.device)
    return table, torch.arange(table.shape[1], device=table.device)[None] < counts[:, None]


@torch.no_grad()
def rotary_positions(ad: Adapter, batch: dict) -> dict:
    """``{"position_ids": ...}`` for families whose rotary positions depend on the images (Qwen2.5-VL's 3-D
    M-RoPE, computed on the prompt with the model's own rules), else ``{}`` (the model's default positions):
    the forwards below take embeddings, from which such a model cannot recover them."""
    input_ids = batch["input_ids"]
    text = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand_as(input_ids)
    visual = {k: batch[k] for k in ad.visual_inputs if k in batch}
    rope = ad.rope_positions(input_ids, batch.get("attention_mask"), text, visual, None)
    return {"position_ids": rope} if rope.dim() == 3 else {}


def prompt_embeddings(model, ad: Adapter, batch: dict) -> tuple[torch.Tensor, VisualFeatures, Layout]:
    """The unpruned LLM input of a batch through the adapter: text embeddings, every image's projected rows at
    its placeholders, structure (LLaVA-NeXT's row newlines) filled with the adapter's embedding. Returns
    ``(embeds, visual, layout)``."""
    input_ids = batch["input_ids"]
    inputs = {k: batch[k].to(model.dtype) if batch[k].is_floating_point() else batch[k]
              for k in ad.visual_inputs if k in batch}
    visual = ad.encode(inputs.pop("pixel_values", None), input_ids=input_ids, **inputs)
    layout = Layout.build(ad.placeholders(input_ids), visual)
    embeds = model.get_input_embeddings()(input_ids)
    proj = project_rows(ad, visual.features)
    return fill_visual(embeds, layout.vis >= 0, proj, layout, visual.structure), visual, layout


def step_loss(model, ad, lpm, batch: dict, rho: float | Callable[[int], float | None], cfg: TrainConfig,
              teacher_impl: str = "sdpa"):
    """The training loss for one batch (the model must use the gated attention): ``(loss, parts)``.

    ``rho``: the target kept fraction of every image, or a function of an image's token count giving its
    target (None: that image keeps every token, as at inference, and is not gated). ``parts`` holds ``ce``,
    ``ratio``, ``kl``, ``kept`` (hard kept fraction, mean over the gated images), ``target`` (their mean
    target), and the per-image tables ``keep_prob`` ``[num_images, width]`` with ``valid`` (real tokens).
    """
    embeds, visual, layout = prompt_embeddings(model, ad, batch)
    positions = rotary_positions(ad, batch)
    # side streams (Qwen3-VL's DeepStack features) of every token, added after their decoder layers
    adds = fill_streams(ad, visual, [None] * visual.num_images, embeds, layout.vis >= 0)
    teacher = None
    if cfg.distill_weight > 0:
        with torch.no_grad(), layer_additions(ad, adds):
            model.set_attn_implementation({"text_config": teacher_impl})
            teacher = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], use_cache=False,
                            **positions).logits
            model.set_attn_implementation({"text_config": GATED_ATTENTION})
    feats, valid = _feature_table(visual)
    counts = valid.sum(dim=1)
    targets = [rho(n) if callable(rho) else rho for n in visual.counts()]
    gated = torch.tensor([t is not None for t in targets], device=feats.device)
    fractions = [1.0 if t is None else t for t in targets]
    target = torch.tensor(fractions, device=feats.device)
    keep_prob = lpm(feats)  # [num_images, width]
    hard = torch.where(gated[:, None], hard_keep_mask(keep_prob, fractions, cfg.mask, valid), valid.to(keep_prob))
    # straight-through: hard forward, soft gradient; images not pruned at inference keep a constant gate of 1
    gate_vis = torch.where(gated[:, None], hard + keep_prob - keep_prob.detach(), hard)
    token = layout.vis >= 0
    gate = torch.ones(token.shape, dtype=gate_vis.dtype, device=gate_vis.device)
    gate = gate.masked_scatter(token, gate_vis[layout.img[token], layout.vis[token]])
    stage2 = _stage2_gate(gate, rho, layout, visual, batch) if cfg.stage2 else None
    with layer_additions(ad, adds):
        out = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"],
                    learnpruner_gate=stage2 if stage2 is not None else gate, use_cache=False, **positions)
    kept_frac = (gate_vis * valid).sum(dim=1) / counts  # per image, through the STE
    zero = torch.zeros((), device=out.loss.device)
    ratio = ((kept_frac - target) ** 2)[gated].mean() if bool(gated.any()) else zero
    loss = out.loss + cfg.ratio_weight * ratio
    kl = zero
    if teacher is not None:
        answer = batch["labels"][:, 1:] != -100
        s_logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)[answer]
        t_logp = torch.log_softmax(teacher[:, :-1].float(), dim=-1)[answer]
        kl = torch.nn.functional.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean")
        loss = loss + cfg.distill_weight * kl
    hard_frac = (hard * valid).sum(dim=1) / counts
    kept = hard_frac[gated].mean() if bool(gated.any()) else hard_frac.mean()
    parts = {"ce": out.loss.detach(), "ratio": ratio.detach(), "kl": kl.detach(), "kept": kept.detach(),
             "target": target[gated].mean() if bool(gated.any()) else target.mean(),
             "keep_prob": keep_prob, "valid": valid, "hard": hard.detach()}
    if stage2 is not None:
        parts["stage2_chosen"] = stage2.chosen
    return loss, parts


def _stage2_gate(gate, targets, layout: Layout, visual: VisualFeatures, batch: dict) -> Stage2Gate | None:
    """The :class:`Stage2Gate` of a batch: each image's stage-2 layer and ``r2`` from the per-count
    ``targets``; the instruction rows are the prompt's (before the first answer token), as at inference."""
    from ..engine.readout import query_rows

    if not isinstance(targets, _Targets):
        raise ValueError("stage2=True needs the per-count training targets (a _Targets), not a fixed fraction")
    counts = visual.counts()
    drops = [targets.drop(n) for n in counts]
    layers = {d[0] for d in drops if d is not None}
    if not layers:
        return None
    if len(layers) > 1:
        raise ValueError(f"images of one batch drop at different LLM layers {sorted(layers)}")
    r2 = [n if d is None else d[1] for n, d in zip(counts, drops)]
    labels = batch["labels"]
    ar = torch.arange(labels.shape[1], device=labels.device).expand_as(labels)
    first_answer = torch.where(labels != -100, ar, labels.shape[1]).amin(dim=1, keepdim=True)
    prompt = batch["attention_mask"].bool() & (ar < first_answer)
    qidx, qvalid = query_rows(layout.vis, prompt, "text")
    return Stage2Gate(gate, layers.pop(), layout.vis, layout.img, r2, counts, qidx, qvalid)


class _Targets:
    """Per token count ``n``: the stage-1 budget ``r1`` inference gives an image of ``n`` tokens at the training
    budget, and the target kept fraction ``r1 / n`` (None where stage 1 keeps every token)."""

    def __init__(self, tokens: int, num_layers: int, layer: int | None = None):
        self.tokens, self.num_layers, self.layer = tokens, num_layers, layer
        self._schedules: dict = {}

    def schedule(self, n: int):
        """The :class:`~learnpruner.budget.Schedule` inference gives an image of ``n`` tokens."""
        if n not in self._schedules:
            budget = tokens_for(n, self.tokens, None)
            options = {} if self.layer is None else {"layer": self.layer}
            self._schedules[n] = get_method("learnpruner").schedule(budget, n, self.num_layers, options)
        return self._schedules[n]

    def r1(self, n: int) -> int | None:
        return self.schedule(n).r1

    def drop(self, n: int) -> tuple[int, int] | None:
        """Stage 2 of an image of ``n`` tokens: ``(layer, r2)``, or None where it keeps the stage-1 set."""
        drops = self.schedule(n).drops
        return tuple(drops[0]) if drops else None

    def __call__(self, n: int) -> float | None:
        r1 = self.r1(n)
        return None if r1 is None else r1 / n
