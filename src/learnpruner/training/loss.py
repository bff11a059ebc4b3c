"""The training forward and its loss: the hard keep mask with the straight-through estimator, the prompt's
embeddings with the kept rows projected, the answer loss, the keep-ratio term and the optional distillation."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from ..adapters import Adapter
from ..engine.layout import Layout, VisualFeatures, fill_streams, fill_visual, project_rows
from ..engine.sequence import layer_additions, take
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


def prompt_embeddings(model, ad: Adapter, batch: dict, visual: VisualFeatures | None = None
                      ) -> tuple[torch.Tensor, VisualFeatures, Layout]:
    """The unpruned LLM input of a batch through the adapter: text embeddings, every image's projected rows at
    its placeholders, structure (LLaVA-NeXT's row newlines) filled with the adapter's embedding. ``visual``: the
    batch's encoded items when already computed (a feature cache), else the adapter encodes the batch's pixels.
    Returns ``(embeds, visual, layout)``."""
    input_ids = batch["input_ids"]
    if visual is None:
        inputs = {k: batch[k].to(model.dtype) if batch[k].is_floating_point() else batch[k]
                  for k in ad.visual_inputs if k in batch}
        visual = ad.encode(inputs.pop("pixel_values", None), input_ids=input_ids, **inputs)
    layout = Layout.build(ad.placeholders(input_ids), visual)
    embeds = model.get_input_embeddings()(input_ids)
    proj = project_rows(ad, visual.features)
    return fill_visual(embeds, layout.vis >= 0, proj, layout, visual.structure), visual, layout


def step_loss(model, ad, lpm, batch: dict, rho: float | Callable[[int], float | None], cfg: TrainConfig,
              teacher_impl: str = "sdpa", visual: VisualFeatures | None = None, select: Callable | None = None,
              generator: torch.Generator | None = None):
    """The training loss for one batch (the model must use the gated attention): ``(loss, parts)``.

    ``rho``: the target kept fraction of every image, or a function of an image's token count giving its
    target (None: that image keeps every token, as at inference, and is not gated). ``visual``: the batch's items
    from a feature cache (None: the adapter encodes the batch's pixels). ``select(keep_prob, features, k, valid)``
    gives the forward's hard 0/1 keep mask ``[num_images, width]`` for per-image counts ``k`` (default:
    :func:`hard_keep_mask` with ``cfg.mask``). With ``cfg.dropped_rows`` the LLM runs on the text, the kept rows
    and that many of each image's dropped rows only, drawn with ``generator`` (:func:`row_subset`). ``parts`` holds
    ``ce``, ``ratio``, ``kl``, ``kept`` (hard kept fraction, mean over the gated images), ``target`` (their mean
    target), ``rows`` (the LLM's mean sequence length) and the per-image tables ``keep_prob`` ``[num_images,
    width]`` with ``valid`` (real tokens).
    """
    embeds, visual, layout = prompt_embeddings(model, ad, batch, visual)
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
    if select is None:
        hard = hard_keep_mask(keep_prob, fractions, cfg.mask, valid)
    else:
        k = (torch.tensor(fractions, dtype=torch.float64) * counts.cpu()).round().clamp_min(1).long().tolist()
        hard = select(keep_prob.detach(), feats, k, valid).to(keep_prob.dtype)
    hard = torch.where(gated[:, None], hard, valid.to(keep_prob))
    # straight-through: hard forward, soft gradient; images not pruned at inference keep a constant gate of 1
    gate_vis = torch.where(gated[:, None], hard + keep_prob - keep_prob.detach(), hard)
    token = layout.vis >= 0
    rows = None
    if cfg.dropped_rows is not None and cfg.stage2:
        raise ValueError("dropped_rows (the LLM on the kept rows and a sample of the dropped ones) cannot run with "
                         "stage2=True (stage 2 ranks every stage-1 token in the LLM): drop one of them")
    attn_vis = gate_vis
    if cfg.dropped_rows is not None:
        rows, scale = row_subset(hard, valid & gated[:, None], layout, cfg.dropped_rows, generator)
        attn_vis = hard + scale * (keep_prob - keep_prob.detach())
    gate = torch.ones(token.shape, dtype=gate_vis.dtype, device=gate_vis.device)
    gate = gate.masked_scatter(token, attn_vis[layout.img[token], layout.vis[token]])
    stage2 = _stage2_gate(gate, rho, layout, visual, batch) if cfg.stage2 else None
    mask, labels = batch["attention_mask"], batch["labels"]
    if rows is not None:
        embeds, gate, mask, labels, positions, adds = _take_rows(rows, embeds, gate, mask, labels, positions, adds)
    with layer_additions(ad, adds):
        out = model(inputs_embeds=embeds, attention_mask=mask, labels=labels,
                    learnpruner_gate=stage2 if stage2 is not None else gate, use_cache=False, **positions)
    kept_frac = (gate_vis * valid).sum(dim=1) / counts  # per image, through the STE
    zero = torch.zeros((), device=out.loss.device)
    ratio = ((kept_frac - target) ** 2)[gated].mean() if bool(gated.any()) else zero
    loss = out.loss + cfg.ratio_weight * ratio
    kl = zero
    if teacher is not None:
        if rows is not None:
            teacher = take(teacher, rows)
        answer = labels[:, 1:] != -100
        s_logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)[answer]
        t_logp = torch.log_softmax(teacher[:, :-1].float(), dim=-1)[answer]
        kl = torch.nn.functional.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean")
        loss = loss + cfg.distill_weight * kl
    hard_frac = (hard * valid).sum(dim=1) / counts
    kept = hard_frac[gated].mean() if bool(gated.any()) else hard_frac.mean()
    parts = {"ce": out.loss.detach(), "ratio": ratio.detach(), "kl": kl.detach(), "kept": kept.detach(),
             "target": target[gated].mean() if bool(gated.any()) else target.mean(),
             "rows": mask.sum(dim=1).float().mean(), "keep_prob": keep_prob, "valid": valid, "hard": hard.detach()}
    if stage2 is not None:
        parts["stage2_chosen"] = stage2.chosen
    return loss, parts


def row_subset(hard: torch.Tensor, valid: torch.Tensor, layout: Layout, dropped: int,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of the training forward when the LLM runs on the kept tokens and ``dropped`` of each image's dropped
    tokens: ``(rows [b, s'], scale [num_images, width])``.

    A dropped token's gate is 0, so its row changes no other row and the forward over any subset of the dropped
    rows equals the forward over all of them; each included dropped row still gets its exact straight-through
    gradient. Drawing ``dropped`` of an image's ``D`` dropped tokens uniformly (``generator``) and scaling their
    gradient by ``D / dropped`` (``scale``; 1 for kept tokens, 0 for dropped ones left out) makes the LPM's gradient
    an unbiased estimate of the full one at the cost of a sequence of ``text + kept + dropped`` rows. ``rows``
    lists each sample's rows in order (text, structure and the chosen visual tokens), ``-1``-padded on the right.
    """
    if isinstance(dropped, bool) or not isinstance(dropped, int) or dropped < 0:
        raise ValueError(f"dropped_rows must be a non-negative integer, got {dropped!r}")
    out = (valid & (hard <= 0))  # dropped, real tokens
    noise = torch.rand(out.shape, generator=generator).to(out.device)
    noise = noise.masked_fill(~out, 2.0)  # dropped tokens rank first, in random order
    rank = noise.argsort(dim=1).argsort(dim=1)
    chosen = out & (rank < dropped)
    n_out = out.sum(dim=1, keepdim=True).float()
    n_chosen = chosen.sum(dim=1, keepdim=True).float().clamp(min=1.0)
    scale = torch.where(chosen, n_out / n_chosen, (hard > 0).to(n_out.dtype))
    keep_tok = (hard > 0) | chosen  # [num_images, width]
    token = layout.vis >= 0
    keep = torch.ones(token.shape, dtype=torch.bool, device=token.device)
    keep[token] = keep_tok[layout.img[token], layout.vis[token]]
    width = int(keep.sum(dim=1).max())
    order = torch.sort(torch.where(keep, torch.arange(keep.shape[1], device=keep.device), keep.shape[1]),
                       dim=1).values[:, :width]
    return torch.where(order == keep.shape[1], -1, order), scale


def _take_rows(rows, embeds, gate, mask, labels, positions: dict, adds):
    """The training forward's inputs on ``rows`` (:func:`row_subset`); 1-D positions become explicit, as the rows
    keep their original position ids."""
    valid = rows >= 0
    embeds = take(embeds, rows)
    gate = take(gate[..., None], rows, fill=1)[..., 0]
    mask = take(mask[..., None], rows, fill=0)[..., 0] * valid
    labels = torch.where(valid, take(labels[..., None], rows, fill=-100)[..., 0], -100)
    if "position_ids" in positions:  # M-RoPE: [rows of positions, b, s]
        pos = positions["position_ids"]
        gathered = torch.stack([take(p[..., None], rows)[..., 0] for p in pos])
        positions = {"position_ids": gathered}
    else:
        positions = {"position_ids": rows.clamp(min=0)}
    if adds is not None:
        adds = torch.stack([take(a, rows) for a in adds])
    return embeds, gate, mask, labels, positions, adds


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
    budget (the schedule of ``method``'s resolved plan, its LPM deferred: the one being trained), and the target kept
    fraction ``r1 / n`` (None where stage 1 keeps every token)."""

    def __init__(self, tokens: int, num_layers: int, layer: int | None = None, family: str = "llava",
                 method: str = "learnpruner"):
        from ..plan import resolve

        self.tokens, self.num_layers, self.layer = tokens, num_layers, layer
        options = {} if layer is None or "layer" not in get_method(method).options else {"layer": layer}
        self.plan = resolve(family, method, tokens, num_layers=num_layers, defer_lpm=True, **options)

    def schedule(self, n: int):
        """The :class:`~learnpruner.budget.Schedule` inference gives an image of ``n`` tokens."""
        return self.plan.schedule(n)

    def r1(self, n: int) -> int | None:
        return self.schedule(n).r1

    def drop(self, n: int) -> tuple[int, int] | None:
        """Stage 2 of an image of ``n`` tokens: ``(layer, r2)``, or None where it keeps the stage-1 set."""
        drops = self.schedule(n).drops
        return tuple(drops[0]) if drops else None

    def __call__(self, n: int) -> float | None:
        r1 = self.r1(n)
        return None if r1 is None else r1 / n


def rule_mask(rule: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor], keep_prob: torch.Tensor,
              feats: torch.Tensor, k: list[int], valid: torch.Tensor) -> torch.Tensor:
    """The 0/1 keep mask ``[num_images, width]`` of a pure stage-1 selection ``rule(keep_prob [g, n], features [g, n,
    d], k) -> kept [g, k]`` run as inference runs it: on each group of images with the same count ``n`` and the same
    ``k``, over their ``n`` real tokens."""
    out = torch.zeros(keep_prob.shape, dtype=keep_prob.dtype, device=keep_prob.device)
    counts = valid.sum(dim=1).tolist()
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (n, kk) in enumerate(zip(counts, k)):
        groups.setdefault((int(n), min(int(kk), int(n))), []).append(i)
    for (n, kk), images in groups.items():
        idx = torch.tensor(images, device=keep_prob.device)
        kept = rule(keep_prob[idx, :n], feats[idx, :n], kk)
        out[idx[:, None].expand_as(kept), kept] = 1
    return out
