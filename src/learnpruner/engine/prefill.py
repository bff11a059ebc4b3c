"""The pruned prefill: stage 1 after the vision encoder, then the decoder layers with the LLM drops.

Steps, each a function below:

1. :func:`vision_stage`: encode the images (adapter), lay out the placeholders (:class:`Layout`), run
   the stage-1 rule on each group of equal-count images, project the kept rows only and write them
   (and any structure embeddings) into the prompt; the dropped placeholders leave the sequence.
2. :func:`llm_stage`: the decoder layers; before each drop layer the LLM rule runs per group on the
   readout of the previous layer, and the dropped positions leave the sequence.
3. :func:`record_stats`: what each image kept, per stage and per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache

from .. import selection as sel
from ..budget import Schedule, split_evenly
from ..rules import LLM_RULES, STAGE1_RULES, LLMContext, Selection, VisionContext, lpm_of
from .graphs import graphed_modules
from .layout import STRUCTURE, TEXT, Layout, VisualFeatures, fill_streams, fill_visual, pad_rows, project_rows
from .prefill_static import pad_to_bucket, run_segment, unpad
from .readout import Capture, layer_readout
from .sequence import Seq, add_stream, call_layer, causal_mask, keep_positions, take, text_positions
from .state import SEGMENTS_ATTR, CacheSegments, ItemStats, PruneState, Stats

__all__ = ["prefill"]



# --------------------------------------------------------------------------------------------------
# kept sets as tables


def kept_table(kept: torch.Tensor, num_images: int, width: int) -> torch.Tensor:
    """``[num_images, width]`` bool from kept indices ``[num_images, k]`` (``-1`` entries ignored)."""
    table = torch.zeros(num_images, width + 1, dtype=torch.bool, device=kept.device)
    table.scatter_(1, torch.where(kept < 0, width, kept), True)
    return table[:, :width]


def table_kept(table: torch.Tensor) -> torch.Tensor:
    """Kept indices ``[num_images, k]`` (ascending, ``-1``-padded) of a bool table."""
    width = table.shape[1]
    k = int(table.sum(dim=1).max()) if table.numel() else 0
    ar = torch.arange(width, device=table.device).expand_as(table)
    idx = torch.sort(torch.where(table, ar, width), dim=1).values[:, :k]
    return torch.where(idx == width, -1, idx)


def present_table(vis: torch.Tensor, img: torch.Tensor, num_images: int, width: int) -> torch.Tensor:
    """``[num_images, width]`` bool: which visual tokens are in the sequence."""
    table = torch.zeros(num_images, width, dtype=torch.bool, device=vis.device)
    p = vis >= 0
    table[img[p], vis[p]] = True
    return table


def _replace_rows(rows: torch.Tensor, selection: Selection) -> torch.Tensor:
    """Apply a selection's merged rows to the gathered kept rows ``[num_images, k, d]``."""
    if selection.replace is None:
        return rows
    m = selection.replace_mask if selection.replace_mask is not None else torch.ones_like(selection.kept, dtype=bool)
    return torch.where(m[..., None], selection.replace.to(rows.dtype), rows)


def _replace_hidden(hidden: torch.Tensor, vis: torch.Tensor, img: torch.Tensor, selection: Selection):
    """Write a selection's merged rows into the hidden states at the kept slots they replace."""
    m = selection.replace_mask if selection.replace_mask is not None else torch.ones_like(selection.kept, dtype=bool)
    hidden = hidden.clone()
    imgs, slots = m.nonzero(as_tuple=True)
    targets = selection.kept[imgs, slots]
    where = (vis[None] == targets[:, None, None]) & (img[None] == imgs[:, None, None])  # [r, b, s]
    r, bb, ss = where.nonzero(as_tuple=True)
    hidden[bb, ss] = selection.replace[imgs[r], slots[r]].to(hidden.dtype)
    return hidden


# --------------------------------------------------------------------------------------------------
# step 1: vision


def adaptive_schedule(base: Schedule, k: int) -> Schedule:
    """An image's schedule under an adaptive budget: stage 1 keeps ``k`` (the LPM's own decision), stage 2 keeps
    ``k`` times the base schedule's ``r2 / r1`` at the same layer (at least 1, at most ``k``)."""
    if base.r1 is None:
        return base
    drops = tuple((layer, max(1, min(k, round(k * r / base.r1)))) for layer, r in base.drops)
    return Schedule(n=base.n, num_layers=base.num_layers, r1=k if k < base.n else None, drops=drops)


@dataclass
class _Step:
    """What every stage-1 context of one forward shares: the state's plan and the step's tensors."""

    state: PruneState
    visual: VisualFeatures
    layout: Layout
    pixel_values: torch.Tensor | None
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    shared: dict

    def context(self, images: list[int], feats: torch.Tensor, index: torch.Tensor | None = None,
                part: str | None = None) -> VisionContext:
        """The typed context of a stage-1 rule on ``images`` (one group of equal count) with rows ``feats``
        (``[g, n', d]``); ``index``: the rows of one crop (or frame) of a single image, ``part`` its name."""
        state, visual = self.state, self.visual
        vis_g, img_g = self.layout.view(self.layout.vis, self.layout.img, images)
        items = None if state.items is None else [state.items[i] if part is None else f"{state.items[i]}/{part}"
                                                  for i in images]
        ctx = VisionContext(feats, state.plan.options, state.adapter, self.pixel_values, self.input_ids, vis_g,
                            img_g, self.attention_mask, lpm=state.lpm, generator=state.generator, items=items,
                            shared=self.shared)
        if visual.coords is not None:
            ctx.coords = visual.rows(images, visual.coords) if index is None else visual.coords[images[0]][index][None]
        for name, v in visual.extras.items():
            ctx.cache[name] = visual.rows(images, v) if index is None else v[images[0]][index][None]
        return ctx

    def select(self, ctx: VisionContext, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rule on ``ctx`` keeping ``k``: ``(kept [g, k], their rows [g, k, d])`` (merged rows in place)."""
        selection = STAGE1_RULES[self.state.method.stage1](ctx, k)
        feats = ctx.features
        picked = feats.gather(1, selection.kept[:, :, None].expand(-1, -1, feats.shape[-1]))
        return selection.kept, _replace_rows(picked, selection)


def _stage1_adaptive(step: _Step, image: int, base: Schedule):
    """Stage 1 of one image under ``budget="adaptive"``: it keeps the tokens its LPM keep-probability puts
    above the calibrated threshold (at least one), then the stage-1 rule runs with that count; returns the kept
    indices, their rows and the image's own schedule."""
    feats = step.visual.rows([image])
    ctx = step.context([image], feats)
    k = int((lpm_of(ctx)(feats) > step.state.adaptive).sum().clamp(min=1))
    schedule = adaptive_schedule(base, k)
    if schedule.r1 is None:
        return None, feats[0], schedule
    kept, rows = step.select(ctx, schedule.r1)
    return kept[0], rows[0], schedule


def _stage1_per_crop(step: _Step, image: int, r1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1 on each crop of one image alone (``stage1_unit="crop"``); the image's ``r1`` is
    split evenly over its crops, each crop keeping at least one token (as vLLM must for Qwen3-VL's frame groups,
    whose placeholder runs are fixed before encoding). Returns the image's kept indices (ascending) and their
    rows."""
    visual = step.visual
    feats = visual.features[image]
    crops = visual.crops[image]
    members = [(crops == c).nonzero()[:, 0] for c in crops.unique().tolist()]
    budget = split_evenly(r1, [m.shape[0] for m in members], at_least=1)
    kept, picked = [], []
    for c, (idx, k) in enumerate(zip(members, budget)):
        if k == 0:
            continue
        if k >= idx.shape[0]:
            kept.append(idx)
            picked.append(feats[idx])
            continue
        chosen, rows = step.select(step.context([image], feats[idx][None], idx, part=f"crop{c}"), k)
        kept.append(idx[chosen[0]])
        picked.append(rows[0])
    kept_all, rows_all = torch.cat(kept), torch.cat(picked)
    order = torch.argsort(kept_all)
    return kept_all[order], rows_all[order]


@dataclass
class VisionResult:
    layout: Layout
    visual: VisualFeatures
    schedules: list  # per image: its Schedule (by its token count; adaptive budgets: by its own kept count)
    embeds: torch.Tensor  # the prompt embeddings with the kept visual rows written in
    keep: torch.Tensor | None  # [b, s] positions that survive stage 1 (None: all)
    kept1: torch.Tensor | None  # [num_images, k] stage-1 kept (-1 padded), None when stage 1 kept all
    kept_per_image: list  # per image: its stage-1 kept indices, None where its stage 1 kept all
    adds: torch.Tensor | None = None  # [streams, b, s, D]: the kept tokens' side streams (fill_streams), or None
    shared: dict = field(default_factory=dict)  # what stage 1 left for the LLM rules of this forward


def vision_stage(state: PruneState, embeds, input_ids, visual_inputs: dict, attention_mask, cache, forced1,
                 vision_kwargs) -> VisionResult:
    """Encode, then for each group of items of one count: context -> rule -> gather (the unit's strategy: the whole
    group at once, each crop alone, or each image at its adaptive count), then project the kept rows and write them
    into the prompt."""
    ad = state.adapter
    pixel_values = visual_inputs.get("pixel_values")
    if input_ids is None:
        raise ValueError("learnpruner needs input_ids (not inputs_embeds) to locate the image tokens")
    needs_cls = state.method.needs_cls and forced1 is None
    graphed = ad.graph_modules() if state.graphs is not None and not needs_cls else []
    with state.section("vision"), graphed_modules(state.graphs, graphed):
        others = {k: v for k, v in visual_inputs.items() if k != "pixel_values"}
        visual = ad.encode(pixel_values, cls_attention=needs_cls, input_ids=input_ids, **others, **vision_kwargs)
    layout = Layout.build(ad.placeholders(input_ids), visual)
    by_count = {n: state.schedule(n) for n in layout.groups}
    schedules = [by_count[n] for n in layout.counts]
    if cache is not None and not isinstance(cache, DynamicCache) and not all(s.is_noop for s in schedules):
        raise ValueError(
            f"learnpruner needs a DynamicCache (its layers hold different lengths after pruning), got "
            f"{type(cache).__name__}; drop cache_implementation='static' or pass no cache"
        )
    num_images, width, device = layout.num_images, layout.width, embeds.device
    rows: list = [None] * num_images  # per image: the feature rows to project
    kept: list = [None] * num_images  # per image: stage-1 kept indices (None: all)
    step = _Step(state, visual, layout, pixel_values, input_ids, attention_mask, shared={})
    with state.section("stage1"):
        per_crop = state.stage1_unit == "crop" and visual.crops is not None and forced1 is None
        for n, images in layout.groups.items():
            feats = visual.rows(images)
            r1 = by_count[n].r1
            if forced1 is not None:
                for j, i in enumerate(images):
                    kept[i] = forced1[i][forced1[i] >= 0].to(feats.device)
                    rows[i] = feats[j, kept[i]]
            elif r1 is None:
                for j, i in enumerate(images):
                    rows[i] = feats[j]
            elif state.adaptive is not None:
                for i in images:
                    kept[i], rows[i], schedules[i] = _stage1_adaptive(step, i, by_count[n])
            elif per_crop:
                for i in images:
                    kept[i], rows[i] = _stage1_per_crop(step, i, r1)
            else:
                chosen, picked = step.select(step.context(images, feats), r1)
                for j, i in enumerate(images):
                    kept[i], rows[i] = chosen[j], picked[j]
    with state.section("projector"):
        proj = project_rows(ad, rows, stack=len(layout.groups) == 1)
    kept1, keep, slot = None, None, layout.vis >= 0
    if any(k is not None for k in kept):
        full = [torch.arange(n, device=device) for n in layout.counts]
        kept1 = pad_rows([full[i] if k is None else k.to(device) for i, k in enumerate(kept)])
        keep = keep_positions(layout.vis, layout.img, kept_table(kept1, num_images, width))
        slot = slot & keep
    with state.section("projector"):
        adds = fill_streams(ad, visual, kept, embeds, slot)
    embeds = fill_visual(embeds, slot, proj, layout, visual.structure)
    return VisionResult(layout, visual, schedules, embeds, keep, kept1, kept, adds, step.shared)


# --------------------------------------------------------------------------------------------------
# step 2: the decoder layers


@dataclass
class LLMResult:
    hidden: torch.Tensor
    seq: Seq
    segments: list  # (first layer, 2D mask) of each layer group
    llm_kept: list  # [num_images, k] per drop
    counts: list  # per layer: visual tokens of each image
    scores: torch.Tensor | None  # stage-2 score table of the first drop
    compacted: bool


def _drop_plan(vision: VisionResult | None, forced_llm) -> dict[int, dict[tuple[int, int], list[int]]]:
    """``{layer: {(token count, kept): [images]}}``: which images drop at which layer, grouped by equal count
    and equal kept number (one rule call per group)."""
    plan: dict[int, dict[tuple[int, int], list[int]]] = {}
    if vision is None:
        return plan
    for i, sched in enumerate(vision.schedules):
        for layer, r in sched.drops:
            plan.setdefault(layer, {}).setdefault((vision.layout.counts[i], r), []).append(i)
    if forced_llm is not None and len(forced_llm) != len(plan):
        raise ValueError(f"fixed_selection got {len(forced_llm)} LLM selection(s) for {len(plan)} drop(s)")
    return dict(sorted(plan.items()))


def _llm_select(state: PruneState, rule, vision: VisionResult, seq: Seq, hidden, layer: int, groups, readout,
                embeds0, scratch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Run the LLM rule of each group dropping at ``layer``; returns (chosen table, hidden, score table)."""
    layout = vision.layout
    num_images, width = layout.num_images, layout.width
    chosen = torch.ones(num_images, width, dtype=torch.bool, device=hidden.device)
    scores = None
    if rule.query:
        scores = torch.full((num_images, width), float("-inf"), device=hidden.device)
    input_embeds = take(embeds0, seq.orig)
    for (n, r), images in groups.items():
        vis_g, img_g = layout.view(seq.vis, seq.img, images)
        table = sel.per_image_scores(readout["scores"], vis_g, img_g, len(images), n) if rule.query else None
        ctx = LLMContext(
            hidden, vis_g, img_g, seq.mask, table, len(images), n, layer, state.plan.options, state.adapter,
            input_embeds=input_embeds, shared=vision.shared,
            attention=readout.get("attention"), query_index=readout.get("query_index"),
            query_valid=readout.get("query_valid"), keys=readout.get("keys"),
            scratch=scratch.setdefault(tuple(images), {}),
        )
        selection = rule.fn(ctx, r)
        if selection.replace is not None:
            hidden = _replace_hidden(hidden, vis_g, img_g, selection)
        idx = torch.tensor(images, device=hidden.device)
        chosen[idx] = kept_table(selection.kept.to(hidden.device), len(images), width)
        if table is not None:
            scores[idx, :n] = table.to(scores.device)
    return chosen, hidden, scores


def _static_prefill(state: PruneState, cache, use_cache, kwargs) -> bool:
    """Whether the decoder layers run on the fast prefill's static shapes (:mod:`learnpruner.engine.prefill_static`)."""
    return bool(state.fast and use_cache and isinstance(cache, DynamicCache) and not kwargs
                and state.graphs is not None)


def llm_stage(state: PruneState, vision: VisionResult | None, seq: Seq, embeds0, cache, use_cache, forced_llm,
              kwargs, compacted: bool) -> LLMResult:
    """The decoder layers, in segments between the drops; ``embeds0`` is the LLM input at full length (for rules
    that read it). On the fast path each segment runs on static shapes
    (see :mod:`learnpruner.engine.prefill_static`)."""
    ad = state.adapter
    if forced_llm is not None:
        forced_llm = [forced_llm] if isinstance(forced_llm, torch.Tensor) else list(forced_llm)
    plan = _drop_plan(vision, forced_llm)
    rule = LLM_RULES[state.method.stage2] if plan and state.method.stage2 and forced_llm is None else None
    wants = rule is not None and (rule.query is not None or rule.keys)
    num_images = vision.layout.num_images if vision is not None else 0
    static = _static_prefill(state, cache, use_cache, kwargs)
    pad = 0
    if static:
        seq, pad = pad_to_bucket(seq)
    segments = [(0, seq.mask)]
    llm_kept, counts_per_layer, readout, scores = [], [], {}, None
    scratch: dict = {}  # per image group, shared by the LLM drops of this forward
    counts = seq.visual_counts(num_images) if num_images else []
    num_layers = ad.text_config.num_hidden_layers
    bounds = [0, *[layer for layer in plan if 0 < layer < num_layers], num_layers]
    for a, b in zip(bounds[:-1], bounds[1:]):
        if a in plan:
            with state.section("llm_select"):
                width = vision.layout.width
                present = present_table(seq.vis, seq.img, num_images, width)
                if forced_llm is not None:
                    chosen = kept_table(forced_llm[len(llm_kept)].to(seq.hidden.device), num_images, width)
                else:
                    chosen, seq.hidden, table = _llm_select(state, rule, vision, seq, seq.hidden, a, plan[a],
                                                            readout, embeds0, scratch)
                    scores = table if scores is None else scores
                chosen = chosen & present
                llm_kept.append(table_kept(chosen))
                keep = keep_positions(seq.vis, seq.img, chosen)
                if not bool(keep.all()):
                    seq = seq.drop(keep)
                    compacted = True
                segments.append((a, seq.mask))
                counts = seq.visual_counts(num_images)
        counts_per_layer += [counts] * (b - a)
        readout_layer = b - 1 if b in plan and wants else None
        if static:
            seq.hidden, qk = run_segment(state, a, b, seq, cache, readout_layer)
        else:
            seq.hidden, qk = _eager_segment(state, a, b, seq, cache, use_cache, kwargs, readout_layer)
        if readout_layer is not None:
            with state.section("llm_select"):
                readout = layer_readout(ad, readout_layer, qk, seq, rule.query, rule.keys)
    seq = unpad(seq, pad)
    return LLMResult(seq.hidden, seq, segments, llm_kept, counts_per_layer, scores, compacted)


def _eager_segment(state: PruneState, start: int, stop: int, seq: Seq, cache, use_cache, kwargs,
                   readout_layer: int | None):
    """Decoder layers ``[start, stop)`` one call at a time (the plain path); returns the hidden states and the
    q/k projection outputs of ``readout_layer`` (captured by hooks), if given."""
    ad = state.adapter
    mask = causal_mask(ad, seq.hidden, seq.mask, cache, seq.pos, start if start else None)
    hidden, qk = seq.hidden, {}
    for i in range(start, stop):
        cap = Capture(ad.attention(i)) if i == readout_layer else None
        try:
            hidden = add_stream(call_layer(ad, ad.layers[i], hidden, mask, seq.cos_sin, seq.pos, cache, use_cache,
                                           kwargs), seq.adds, i)
        finally:
            if cap is not None:
                cap.close()
        if cap is not None:
            qk = cap.out
    return hidden, qk


# --------------------------------------------------------------------------------------------------
# step 3: statistics, and the whole prefill


def _mean(values: list[int]) -> int | float:
    total = sum(values)
    return total // len(values) if total % len(values) == 0 else total / len(values)


def record_stats(state: PruneState, vision: VisionResult, llm: LLMResult) -> Stats:
    layout = vision.layout
    structure = torch.bincount(layout.img[layout.vis == STRUCTURE], minlength=layout.num_images).tolist()
    images = []
    for i, n in enumerate(layout.counts):
        images.append(ItemStats(
            count=n,
            schedule=vision.schedules[i],
            tokens_per_layer=[c[i] for c in llm.counts],
            stage1_kept=vision.kept_per_image[i],
            llm_kept=[k[i][k[i] >= 0] for k in llm.llm_kept],
            structure=structure[i],
            crops=None if vision.visual.crops is None else vision.visual.crops[i],
            patches=None if vision.visual.patches is None else vision.visual.patches[i],
        ))
    schedules = set(vision.schedules)
    return Stats(
        method=state.method.name,
        schedule=schedules.pop() if len(schedules) == 1 else None,
        stage1_kept=vision.kept1,
        stage2_kept=llm.llm_kept[0] if llm.llm_kept else None,
        llm_kept=llm.llm_kept,
        tokens_per_layer=[_mean(c) for c in llm.counts],
        kept_positions=llm.seq.orig,
        stage2_scores=llm.scores,
        num_images=layout.num_images,
        images=images,
        plan=state.plan,
    )


def _renumber(state: PruneState, rope: torch.Tensor):
    """The rotary embedding when kept tokens get contiguous positions (option ``positions``), else None.

    Families with multi-dimensional rotary positions (M-RoPE, ``rope`` of shape ``[3, b, s]``) keep the original
    ones: by default, and refused when ``positions="contiguous"`` is asked for explicitly."""
    plan = state.plan
    positions, explicit = plan.options["positions"], plan.sources["positions"] == "caller"
    if positions != "contiguous":
        return None
    if rope.dim() != 2:
        if explicit:
            raise ValueError(
                f"positions='contiguous' is not available for {state.adapter.family}: its rotary positions are "
                f"multi-dimensional (M-RoPE); use positions='original'"
            )
        return None
    return state.adapter.language_model.rotary_emb


def prefill(state: PruneState, inputs_embeds, input_ids, visual_inputs: dict | None, attention_mask, position_ids,
            cache, use_cache, past, vision_kwargs, kwargs):
    """A full forward (prefill); returns the last hidden states and each row's original position.

    ``visual_inputs``: the forward's visual keyword arguments (the adapter's ``visual_inputs``), or None for
    a forward without images."""
    ad = state.adapter
    b, s = inputs_embeds.shape[:2]
    device = inputs_embeds.device
    given = position_ids  # as passed: M-RoPE families may get [3 or 4, b, s]; Seq.pos keeps the 1-D text positions
    position_ids = text_positions(ad, given, s, past, device)
    forced1, forced_llm = state.forced or (None, None)
    vision = None
    vis = torch.full((b, s), TEXT, dtype=torch.long, device=device)
    img = torch.full((b, s), -1, dtype=torch.long, device=device)
    if visual_inputs is not None:
        vision = vision_stage(state, inputs_embeds, input_ids, visual_inputs, attention_mask, cache, forced1,
                              vision_kwargs)
        inputs_embeds, vis, img = vision.embeds, vision.layout.vis, vision.layout.img
    rope = ad.rope_positions(input_ids, attention_mask, position_ids if given is None else given, visual_inputs or {},
                             cache)
    cos_sin = ad.language_model.rotary_emb(inputs_embeds, position_ids=rope)
    orig = torch.arange(s, device=device).expand(b, s)
    seq = Seq(inputs_embeds, attention_mask, position_ids, cos_sin, vis, img, orig, _renumber(state, rope),
              adds=vision.adds if vision is not None else None)
    compacted = vision is not None and vision.keep is not None and not bool(vision.keep.all())
    if compacted:
        seq = seq.drop(vision.keep)
    llm = llm_stage(state, vision, seq, inputs_embeds, cache, use_cache, forced_llm, kwargs, compacted)
    if vision is not None:
        state.last = record_stats(state, vision, llm)
    if cache is not None and (llm.compacted or state.fast):
        # the cache holds fewer tokens than the prompt (or the fast path takes over): decode steps need the masks
        segs = [(start, m if m is not None else torch.ones(b, s, dtype=torch.long, device=device))
                for start, m in llm.segments]
        setattr(cache, SEGMENTS_ATTR, CacheSegments(orig_len=s, segments=segs))
    return llm.hidden, llm.seq.orig
