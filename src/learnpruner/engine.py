"""The engine: runs a pruned forward pass through an adapted model.

Data path, once::

    pixels -> vision features (n per image) -> STAGE 1 rule -> r1 kept rows -> projector (kept rows only)
    -> placeholders of dropped tokens are removed from the sequence (kept tokens keep their original
       position ids and order) -> LLM layers [0, K) -> scores from layer K-1's queries and keys
    -> STAGE 2 rule -> r2 kept -> LLM layers [K, L) on the shorter sequence -> logits

Pruned tokens are physically removed from the hidden states (no masking in place of removal). With
a KV cache, layers before K cache the stage-1 set and layers from K on the stage-2 set; the
compacted padding masks travel on the cache object so that every decode step attends to exactly
the kept tokens.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask

from . import selection as sel
from .adapters import Adapter
from .budget import Schedule
from .lpm import LearnablePruningModule
from .methods import Method
from .rules import LLM_RULES, STAGE1_RULES, LLMContext, Selection, VisionContext

__all__ = ["PruneState", "Stats", "pruned_forward", "fixed_selection"]

LAYOUT_ATTR = "_learnpruner_layout"


@dataclass
class Stats:
    """What the last forward with images did.

    ``stage1_kept`` / ``stage2_kept``: ``LongTensor[num_images, k]`` of visual-token indices
    ``0..n-1`` in original order (one row per image; with one image per prompt, one row per sample),
    or ``None`` where a stage did not run. ``tokens_per_layer``: visual tokens per image each decoder
    layer processed, counted on the hidden states actually passed to it. ``kept_positions``:
    ``LongTensor[batch, s]`` original sequence index of each row of the returned logits (-1 for
    padding added by compaction). ``stage2_scores``: ``[num_images, n]`` stage-2 scores (``-inf``
    for tokens stage 1 removed), when stage 2 ran.
    """

    method: str
    schedule: Schedule | None = None
    stage1_kept: torch.Tensor | None = None
    stage2_kept: torch.Tensor | None = None
    llm_kept: list[torch.Tensor] = field(default_factory=list)
    tokens_per_layer: list[int] = field(default_factory=list)
    kept_positions: torch.Tensor | None = None
    stage2_scores: torch.Tensor | None = None
    num_images: int = 0

    @property
    def average_tokens(self) -> float:
        """Average visual tokens per image per LLM layer in the last forward."""
        return sum(self.tokens_per_layer) / max(1, len(self.tokens_per_layer))


@dataclass
class PruneState:
    """All pruning state of one model instance (kept in ``model._learnpruner``)."""

    method: Method
    tokens: int | None
    options: dict
    adapter: Adapter
    base_class: type
    lpm: LearnablePruningModule | None = None
    generator: torch.Generator | None = None
    last: Stats | None = None
    forced: tuple | None = None
    # optional profiler: ``timer(name)`` returns a context manager timing section ``name``
    # ("vision", "stage1", "projector", "llm_select"); set by the benchmark, None otherwise
    timer: object | None = None
    # decode on static KV buffers with a capturable step (CUDA graphs on GPU); see learnpruner.fast
    fast: bool = False
    _schedules: dict = field(default_factory=dict)

    def section(self, name: str):
        return self.timer(name) if self.timer is not None else nullcontext()

    def schedule(self, n: int) -> Schedule:
        if n not in self._schedules:
            num_layers = self.adapter.text_config.num_hidden_layers
            if self.tokens is None:
                self._schedules[n] = Schedule(n=n, num_layers=num_layers)
            else:
                self._schedules[n] = self.method.schedule(self.tokens, n, num_layers, self.options)
        return self._schedules[n]


@contextmanager
def fixed_selection(model, stage1_kept: torch.Tensor | None, llm_kept=None):
    """Within this context, forwards keep exactly these token sets instead of running the rules.

    Used to recompute a generation step by step over the kept sets of its prefill (cache checks),
    and by visualisations. Indices are ``[num_images, k]`` visual-token indices; ``llm_kept`` is one
    tensor (one LLM drop) or a list with one tensor per drop (``Stats.llm_kept``). Merged tokens are
    not replayed: only the kept sets are fixed.
    """
    state: PruneState = model._learnpruner
    previous, state.forced = state.forced, (stage1_kept, llm_kept)
    try:
        yield model
    finally:
        state.forced = previous


# --------------------------------------------------------------------------------------------------
# sequence bookkeeping


def _compact(keep: torch.Tensor) -> torch.Tensor:
    """Index map ``[b, s']`` of the kept positions of each row, right-aligned; ``-1`` marks new padding."""
    b, _ = keep.shape
    counts = keep.sum(dim=1)
    width = int(counts.max()) if b else 0
    slot = keep.long().cumsum(dim=1) - 1 + (width - counts)[:, None]
    idx = torch.full((b, width), -1, dtype=torch.long, device=keep.device)
    rows, cols = keep.nonzero(as_tuple=True)
    idx[rows, slot[rows, cols]] = cols
    return idx


def _take(x: torch.Tensor, idx: torch.Tensor, fill=0) -> torch.Tensor:
    """Gather ``x[b, idx[b, j], ...]`` along dim 1 (``x`` may have batch 1); ``fill`` where ``idx < 0``."""
    if x.shape[0] != idx.shape[0]:
        x = x.expand(idx.shape[0], *x.shape[1:])
    safe = idx.clamp(min=0)
    out = x.gather(1, safe.view(*safe.shape, *([1] * (x.dim() - 2))).expand(*safe.shape, *x.shape[2:]))
    pad = (idx < 0).view(*idx.shape, *([1] * (x.dim() - 2)))
    return out.masked_fill(pad, fill) if bool(pad.any()) else out


@dataclass
class _Seq:
    """The running sequence: hidden states plus per-position bookkeeping, all ``[b, s, ...]``."""

    hidden: torch.Tensor
    mask: torch.Tensor | None  # 2D padding mask (None = no padding, as given by the user)
    pos: torch.Tensor  # position ids [b or 1, s]
    cos_sin: tuple[torch.Tensor, torch.Tensor]
    vis: torch.Tensor  # visual-token index or -1
    img: torch.Tensor  # image number or -1
    orig: torch.Tensor  # original sequence index or -1 (padding added by compaction)

    def take(self, idx: torch.Tensor) -> _Seq:
        b, s = self.hidden.shape[:2]
        mask = self.mask if self.mask is not None else torch.ones(b, s, dtype=torch.long, device=idx.device)
        return _Seq(
            hidden=_take(self.hidden, idx),
            mask=_take(mask, idx, 0),
            pos=_take(self.pos, idx, 1),
            cos_sin=(_take(self.cos_sin[0], idx), _take(self.cos_sin[1], idx)),
            vis=_take(self.vis, idx, -1),
            img=_take(self.img, idx, -1),
            orig=_take(self.orig, idx, -1),
        )


def _keep_from_table(seq: _Seq, kept: torch.Tensor, n: int) -> torch.Tensor:
    """Positions to keep: every non-visual position plus the visual tokens listed in ``kept``."""
    chosen = torch.zeros(kept.shape[0], n, dtype=torch.bool, device=seq.vis.device)
    chosen.scatter_(1, kept.to(seq.vis.device), True)
    is_vis = seq.vis >= 0
    return ~is_vis | chosen[seq.img.clamp(min=0), seq.vis.clamp(min=0)]


# --------------------------------------------------------------------------------------------------
# scoring inside the LLM


def _query_rows(vis: torch.Tensor, mask: torch.Tensor | None, rule) -> tuple[torch.Tensor, torch.Tensor]:
    """Which rows score the visual tokens: ``(index [b, q], valid [b, q])``.

    ``"text"``: every valid non-visual token after the sample's last visual token (the instruction);
    a sample whose prompt ends with the image falls back to its last token. ``"last"``: the last
    valid token of each sample. A callable computes its own rows.
    """
    if callable(rule):
        return rule(vis, mask)
    b, s = vis.shape
    ar = torch.arange(s, device=vis.device).expand(b, s)
    valid = mask.bool() if mask is not None else torch.ones(b, s, dtype=torch.bool, device=vis.device)
    last_valid = torch.where(valid, ar, -1).amax(dim=1)
    if rule == "last":
        return last_valid[:, None], torch.ones(b, 1, dtype=torch.bool, device=vis.device)
    if rule != "text":
        raise ValueError(f"unknown query rule {rule!r}; accepted: 'text', 'last' or a callable")
    last_vis = torch.where(vis >= 0, ar, -1).amax(dim=1)
    rows = valid & (ar > last_vis[:, None]) & (vis < 0)
    empty = rows.sum(dim=1) == 0
    rows[empty, last_valid[empty].clamp(min=0)] = True
    q = int(rows.sum(dim=1).max())
    order = torch.sort(rows.long(), dim=1, descending=True, stable=True).indices[:, :q]
    return order, rows.gather(1, order)


class _Capture:
    """Forward hooks that keep the outputs of one layer's q/k projections for a single call."""

    def __init__(self, attn):
        self.out = {}
        self.handles = [
            attn.q_proj.register_forward_hook(lambda m, i, o: self.out.__setitem__("q", o)),
            attn.k_proj.register_forward_hook(lambda m, i, o: self.out.__setitem__("k", o)),
        ]

    def close(self):
        for h in self.handles:
            h.remove()


def _layer_readout(ad: Adapter, layer_idx: int, cap: dict, seq: _Seq, query, want_keys: bool) -> dict:
    """What an LLM rule reads of layer ``layer_idx``: attention from the ``query`` rows and/or the keys.

    Computed from the layer's own q/k projections with the model's RoPE; only the needed query
    rows are formed, so no attention implementation has to return weights (SDPA and FlashAttention
    work) and the probabilities equal eager attention's. Returns ``scores`` ([b, s], mean over heads
    and valid query rows), ``attention`` ([b, q, s], mean over heads), ``query_index``,
    ``query_valid`` and ``keys`` ([b, kv_heads, s, head_dim] after RoPE) as requested.
    """
    attn = ad.attention(layer_idx)
    rope = ad.rotary_fn(layer_idx)
    hd = attn.head_dim
    b, s = seq.vis.shape
    k = cap["k"].view(b, s, -1, hd).transpose(1, 2)
    cos, sin = (t.expand(b, *t.shape[1:]) for t in seq.cos_sin)
    _, k = rope(k, k, cos, sin)
    out = {"keys": k} if want_keys else {}
    if query is not None:
        qidx, qvalid = _query_rows(seq.vis, seq.mask, query)
        q = _take(cap["q"], qidx).view(b, qidx.shape[1], -1, hd).transpose(1, 2)
        q, _ = rope(q, q, _take(cos, qidx), _take(sin, qidx))
        valid = seq.mask.bool() if seq.mask is not None else torch.ones(b, s, dtype=torch.bool, device=k.device)
        probs = sel.attention_probs(q, k, attn.scaling, qidx, valid)
        out.update(scores=sel.aggregate_scores(probs, qvalid), attention=probs.mean(dim=1), query_index=qidx,
                   query_valid=qvalid)
    return out


# --------------------------------------------------------------------------------------------------
# the forward


def _mask(ad: Adapter, hidden, mask2d, cache, pos, layer_idx=None):
    kwargs = {"position_ids": pos}
    if layer_idx is not None:
        kwargs["layer_idx"] = layer_idx
    return create_causal_mask(ad.text_config, hidden, mask2d, cache, **kwargs)


def _call_layer(ad: Adapter, layer, hidden, mask, seq_cos_sin, pos, cache, use_cache, kwargs):
    return layer(
        hidden,
        attention_mask=mask,
        position_embeddings=seq_cos_sin,
        position_ids=pos,
        use_cache=use_cache,
        **{ad.cache_kwarg: cache},
        **kwargs,
    )


def _replace_rows(rows: torch.Tensor, selection: Selection) -> torch.Tensor:
    """Apply a selection's merged rows to the gathered kept rows ``[num_images, k, d]``."""
    if selection.replace is None:
        return rows
    m = selection.replace_mask if selection.replace_mask is not None else torch.ones_like(selection.kept, dtype=bool)
    return torch.where(m[..., None], selection.replace.to(rows.dtype), rows)


def _stage1(state: PruneState, ctx: VisionContext, r1: int | None, forced) -> tuple[Selection | None, torch.Tensor]:
    """Run stage 1; returns the selection (None when nothing is dropped) and the rows to project."""
    feats = ctx.features
    if forced is not None:
        selection = Selection(forced.to(feats.device))
    elif r1 is not None:
        selection = STAGE1_RULES[state.method.stage1](ctx, r1)
    else:
        return None, feats
    rows = feats.gather(1, selection.kept[:, :, None].expand(-1, -1, feats.shape[-1]))
    return selection, _replace_rows(rows, selection)


def pruned_forward(
    self,
    input_ids: torch.LongTensor | None = None,
    pixel_values: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    cache=None,
    past_key_values=None,
    inputs_embeds: torch.Tensor | None = None,
    labels: torch.LongTensor | None = None,
    use_cache: bool | None = None,
    logits_to_keep: int | torch.Tensor = 0,
    vision_feature_layer=None,
    vision_feature_select_strategy: str | None = None,
    image_sizes=None,
    return_dict: bool | None = None,
    output_attentions: bool | None = None,
    output_hidden_states: bool | None = None,
    **kwargs,
):
    """Forward of a model patched by :func:`learnpruner.apply`; same arguments as the original."""
    state: PruneState = self._learnpruner
    ad = state.adapter
    if output_attentions or output_hidden_states:
        raise NotImplementedError(
            "output_attentions/output_hidden_states are not available on a pruned model (layers see "
            "different sequences); call learnpruner.remove(model) first"
        )
    kwargs.pop("mm_encoder_outputs", None)
    cache = cache if cache is not None else past_key_values
    cfg = ad.text_config
    use_cache = use_cache if use_cache is not None else getattr(cfg, "use_cache", True)
    if use_cache and cache is None:
        cache = DynamicCache(config=cfg)
    if inputs_embeds is None:
        if input_ids is None:
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        inputs_embeds = ad.language_model.embed_tokens(input_ids)
    static = getattr(cache, "_learnpruner_static", None)
    past = static.get_seq_length() if static is not None else cache.get_seq_length() if cache is not None else 0
    if pixel_values is not None and past > 0:
        raise ValueError("learnpruner prunes at prefill: pixel_values with a non-empty cache is not supported")
    layout = getattr(cache, LAYOUT_ATTR, None) if past > 0 else None
    if layout is not None and state.fast:
        from .fast import fast_decode

        hidden, final_orig = fast_decode(ad, cache, layout, inputs_embeds, position_ids, kwargs), None
    elif layout is not None:
        hidden, final_orig = _decode(ad, layout, inputs_embeds, attention_mask, position_ids, cache, use_cache, kwargs)
    else:
        hidden, final_orig = _prefill(
            state, inputs_embeds, input_ids, pixel_values, attention_mask, position_ids, cache, use_cache, past,
            {"vision_feature_layer": vision_feature_layer,
             "vision_feature_select_strategy": vision_feature_select_strategy},
            kwargs,
        )

    hidden = ad.language_model.norm(hidden)
    keep_slice = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    logits = self.lm_head(hidden[:, keep_slice, :])
    loss = None
    if labels is not None:
        if final_orig is not None:
            labels = _take(labels.to(final_orig.device), final_orig, -100)
        loss = self.loss_function(logits=logits, labels=labels, vocab_size=cfg.vocab_size, **kwargs)
    out_cls = ad.output_class()
    cache_field = "cache" if "cache" in out_cls.__dataclass_fields__ else "past_key_values"
    out = out_cls(loss=loss, logits=logits, **{cache_field: cache if use_cache else None})
    return out.to_tuple() if return_dict is False else out


def _decode(ad, layout, inputs_embeds, attention_mask, position_ids, cache, use_cache, kwargs):
    """A step after a pruned prefill: each layer group attends to exactly its cached kept tokens."""
    b, s = inputs_embeds.shape[:2]
    orig_len, segments = layout["orig_len"], layout["segments"]
    virtual_past = orig_len + (cache.get_seq_length(0) - segments[0][1].shape[1])
    if attention_mask is not None and attention_mask.shape[1] != virtual_past + s:
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[1]} positions, expected {virtual_past + s} "
            "(prompt + generated tokens)"
        )
    if attention_mask is not None:
        new = attention_mask[:, orig_len:]
    else:
        new = torch.ones(b, virtual_past + s - orig_len, dtype=torch.long, device=inputs_embeds.device)
    if position_ids is None:
        position_ids = (torch.arange(s, device=inputs_embeds.device) + virtual_past)[None]
    cos_sin = ad.language_model.rotary_emb(inputs_embeds, position_ids=position_ids)
    starts = [start for start, _ in segments]
    masks = [
        _mask(ad, inputs_embeds, torch.cat([m, new.to(m.dtype)], dim=1), cache, position_ids, start)
        for start, m in segments
    ]
    hidden = inputs_embeds
    seg = 0
    for i, layer in enumerate(ad.layers[: ad.text_config.num_hidden_layers]):
        while seg + 1 < len(starts) and i >= starts[seg + 1]:
            seg += 1
        hidden = _call_layer(ad, layer, hidden, masks[seg], cos_sin, position_ids, cache, use_cache, kwargs)
    return hidden, None


def _prefill(state, inputs_embeds, input_ids, pixel_values, attention_mask, position_ids, cache, use_cache, past,
             vision_kwargs, kwargs):
    """A full forward (prefill): stage 1, then the decoder layers with the LLM drops."""
    ad = state.adapter
    b, s = inputs_embeds.shape[:2]
    device = inputs_embeds.device
    if position_ids is None:
        position_ids = (torch.arange(s, device=device) + past)[None]
    vis = torch.full((b, s), -1, dtype=torch.long, device=device)
    img = vis.clone()
    n_img, sched, sel1, keep = 0, None, None, None
    forced1, forced_llm = state.forced or (None, None)
    if pixel_values is not None:
        if input_ids is None:
            raise ValueError("learnpruner needs input_ids (not inputs_embeds) to locate the image tokens")
        rule1 = STAGE1_RULES.get(state.method.stage1) if state.method.stage1 else None
        needs_cls = bool(getattr(rule1, "needs_cls", False)) and forced1 is None
        with state.section("vision"):
            feats = ad.vision_features(pixel_values, cls_attention=needs_cls, **vision_kwargs)
        feats, extras = feats if needs_cls else (feats, {})
        n_img, n = feats.shape[:2]
        placeholders = input_ids == ad.image_token_id
        if int(placeholders.sum()) != n_img * n:
            raise ValueError(
                f"Image features and image tokens do not match: {int(placeholders.sum())} image tokens in "
                f"input_ids, {n_img} image(s) x {n} features"
            )
        g = placeholders.flatten().long().cumsum(0).view(b, s) - 1
        vis = torch.where(placeholders, g % n, vis)
        img = torch.where(placeholders, g // n, img)
        sched = state.schedule(n)
        if cache is not None and not isinstance(cache, DynamicCache) and not sched.is_noop:
            raise ValueError(
                f"learnpruner needs a DynamicCache (its layers hold different lengths after pruning), got "
                f"{type(cache).__name__}; drop cache_implementation='static' or pass no cache"
            )
        ctx = VisionContext(feats, state, pixel_values, input_ids, vis, img, attention_mask=attention_mask)
        ctx.cache.update(extras)
        with state.section("stage1"):
            sel1, rows = _stage1(state, ctx, sched.r1, forced1)
        with state.section("projector"):
            proj = ad.project(rows).to(device, inputs_embeds.dtype)
        slot = placeholders
        if sel1 is not None:
            chosen = torch.zeros(n_img, n, dtype=torch.bool, device=device)
            chosen.scatter_(1, sel1.kept.to(device), True)
            keep = ~placeholders | chosen[img.clamp(min=0), vis.clamp(min=0)]
            slot = placeholders & keep
        # the projected rows fill the kept placeholders in (image, token) order
        inputs_embeds = inputs_embeds.masked_scatter(slot[..., None], proj.reshape(-1, proj.shape[-1]))

    lm = ad.language_model
    cos_sin = lm.rotary_emb(inputs_embeds, position_ids=position_ids)
    orig = torch.arange(s, device=device).expand(b, s)
    seq = _Seq(inputs_embeds, attention_mask, position_ids, cos_sin, vis, img, orig)
    compacted = keep is not None and not bool(keep.all())
    if compacted:
        seq = seq.take(_compact(keep))
    drops = dict(sched.drops) if sched is not None and n_img else {}
    if forced_llm is not None:
        forced_llm = [forced_llm] if isinstance(forced_llm, torch.Tensor) else list(forced_llm)
        drops = {layer: None for layer, _ in (sched.drops if sched is not None else ())}
        if len(forced_llm) != len(drops):
            raise ValueError(f"fixed_selection got {len(forced_llm)} LLM selection(s) for {len(drops)} drop(s)")
    rule = LLM_RULES[state.method.stage2] if drops and state.method.stage2 else None
    segments = [(0, seq.mask)]
    masks = [_mask(ad, seq.hidden, seq.mask, cache, seq.pos)]
    tokens_per_layer, llm_kept, readout, table = [], [], {}, None
    embeds0 = inputs_embeds  # the LLM input (after stage 1), for rules that read it
    scratch: dict = {}  # shared by the LLM drops of this forward
    hidden = seq.hidden
    for i, layer in enumerate(ad.layers[: ad.text_config.num_hidden_layers]):
        if i in drops:
            with state.section("llm_select"):
                seq.hidden = hidden
                if forced_llm is not None:
                    selection = Selection(forced_llm[len(llm_kept)].to(device))
                else:
                    table = (sel.per_image_scores(readout["scores"], seq.vis, seq.img, n_img, sched.n)
                             if rule.query else None)
                    ctx = LLMContext(
                        hidden, seq.vis, seq.img, seq.mask, table, n_img, sched.n, i, state,
                        input_embeds=_take(embeds0, seq.orig),
                        attention=readout.get("attention"), query_index=readout.get("query_index"),
                        query_valid=readout.get("query_valid"), keys=readout.get("keys"), scratch=scratch,
                    )
                    selection = rule.fn(ctx, drops[i])
                llm_kept.append(selection.kept)
                if selection.replace is not None:
                    seq.hidden = _replace_hidden(seq, selection)
                keep2 = _keep_from_table(seq, selection.kept, sched.n)
                if not bool(keep2.all()):
                    seq = seq.take(_compact(keep2))
                    compacted = True
                hidden = seq.hidden
                segments.append((i, seq.mask))
                masks.append(_mask(ad, hidden, seq.mask, cache, seq.pos, i))
        if n_img:
            tokens_per_layer.append(int((seq.vis >= 0).sum()) // n_img)
        wants = rule is not None and (rule.query is not None or rule.keys) and forced_llm is None
        cap = _Capture(ad.attention(i)) if (i + 1) in drops and wants else None
        try:
            hidden = _call_layer(ad, layer, hidden, masks[-1], seq.cos_sin, seq.pos, cache, use_cache, kwargs)
        finally:
            if cap is not None:
                cap.close()
        if cap is not None:
            seq.hidden = hidden
            with state.section("llm_select"):
                readout = _layer_readout(ad, i, cap.out, seq, rule.query, rule.keys)

    if pixel_values is not None:
        state.last = Stats(
            method=state.method.name,
            schedule=sched,
            stage1_kept=sel1.kept if sel1 is not None else None,
            stage2_kept=llm_kept[0] if llm_kept else None,
            llm_kept=llm_kept,
            tokens_per_layer=tokens_per_layer,
            kept_positions=seq.orig,
            stage2_scores=table,
            num_images=n_img,
        )
    if cache is not None and (compacted or state.fast):
        # the cache holds fewer tokens than the prompt (or the fast path takes over): decode steps need the masks
        segs = [(start, m if m is not None else torch.ones(b, s, dtype=torch.long, device=device))
                for start, m in segments]
        setattr(cache, LAYOUT_ATTR, {"orig_len": s, "segments": segs})
    return hidden, seq.orig


def _replace_hidden(seq: _Seq, selection: Selection) -> torch.Tensor:
    """Write a selection's merged rows into the hidden states at the kept slots they replace."""
    m = selection.replace_mask if selection.replace_mask is not None else torch.ones_like(selection.kept, dtype=bool)
    hidden = seq.hidden.clone()
    imgs, slots = m.nonzero(as_tuple=True)
    targets = selection.kept[imgs, slots]
    where = (seq.vis[None] == targets[:, None, None]) & (seq.img[None] == imgs[:, None, None])  # [r, b, s]
    r, bb, ss = where.nonzero(as_tuple=True)
    hidden[bb, ss] = selection.replace[imgs[r], slots[r]].to(hidden.dtype)
    return hidden
