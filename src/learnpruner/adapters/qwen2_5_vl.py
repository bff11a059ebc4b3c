"""Qwen2.5-VL (``transformers.Qwen2_5_VLForConditionalGeneration``) adapter: images and video, 3-D rotary positions.

**Vision tower.** A Conv3d patch embedding (14 px patches, 2 frames deep) and blocks with window attention
(full attention in ``fullatt_block_indexes``); the tower works in *window order* and restores raster order
only after its ``PatchMerger`` (``reverse_indices``). The merger normalises every patch (``ln_q``), joins
each 2x2 group of patches into one row of width ``4 * hidden`` and maps it to the LLM width with an MLP: it
is the projector. There is no [CLS] token (``has_cls = False``): methods that read [CLS] attention
(visionzip, vispruner, cls-text) are refused by ``apply`` naming the method and the methods that run.

**Where stage 1 reads (and the LPM input).** The merger's *input*: per LLM token its four grouped patches
of the last vision block, ``[n, 4 * hidden]`` (5120 wide on the 7B), in raster order (the tower's own
``reverse_indices`` applied; read by running the tower with the merger swapped for the grouping alone, so
no window bookkeeping is copied here). Why this point:

* it is the last point before the projector, as LLaVA's feature layer is: one row per LLM token (merging
  is per group, so selecting rows here equals selecting tokens after the merger), and the merger's MLP
  then runs on the kept rows only (:meth:`project`);
* the rows are vision-space features of the whole tower (all window and full-attention blocks), not
  LLM-space embeddings, so an LPM reads the same kind of input on every family;
* the patches before grouping would give four rows per LLM token (a budget in patches, not tokens), and
  the merger's output would leave the projector to run on every token.

``feature_layer()`` is ``-1`` (the last vision block) and ``feature_dim()`` ``4 * vision hidden``.

**Items.** Every image and every video is one item of the layout, in prompt order (images and videos may
interleave; each fills its own placeholder id, ``image_token_id`` or ``video_token_id``), so budgets
(``tokens=`` / ``ratio=``) and ``learnpruner.stats`` work per image and per video. A video's temporal
groups (2 frames each) are its ``crops``: methods that split stage 1 per crop split it per frame group.
Tokens per item: ``t * h * w / 4`` of its ``image_grid_thw`` / ``video_grid_thw`` row.

**Positions (M-RoPE).** Kept tokens keep their original 3-D positions: :meth:`rope_positions` computes them
on the UNPRUNED prompt with the model's own ``get_rope_index`` (``mm_token_type_ids`` built from
``input_ids``), or takes the ``[3, b, s]`` / ``[4, b, s]`` position ids ``generate()`` passes (row 0 of the
4-row form is the text position, used for masks; the engine's ``Seq.pos`` stays the 1-D text positions).
The engine turns them into cos/sin once and gathers the kept rows. ``rope_deltas`` (per row: the largest
rotary position + 1 minus the number of real tokens, as ``get_rope_index`` defines them) stay on the cache,
and decode steps continue where the unpruned model would: text position (original length + generated
tokens) plus ``rope_deltas``, not the pruned cache length. The fast decode path (``apply(..., fast=True)``) works
the same way: its rotary positions are that sum, computed on the device from the cached ``rope_deltas`` (no host
sync), and fed to the captured step as a static input next to the text positions.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..engine.layout import VisualFeatures, grid_coords
from .base import Adapter, Served, register_adapter

__all__ = ["Qwen2_5_VLAdapter", "ROPE_DELTAS_ATTR", "merge_rows", "grid_offsets", "grid_extent"]

ROPE_DELTAS_ATTR = "_learnpruner_rope_deltas"  # on the cache: [b, 1] rope_deltas of the unpruned prompt

# Qwen2.5-VL keeps images near their native resolution, so no count is "the" image's: apply() checks a method's
# options against this nominal one, the largest image the stock image processor makes by default (max_pixels
# 1003520 = 1280 x 28^2 px; an 896x1120 px image); budgets are met (or refused, naming the item's count) per
# item at the forward
NOMINAL_TOKENS = 1280

IMAGE, VIDEO = 1, 2  # mm_token_type_ids values (text 0)


@contextmanager
def grouped_outputs(*mergers):
    """Within this context each of ``mergers`` (patch mergers) returns its input grouped per LLM token
    (``[N/4, 4*hidden]``, raster order) in place of its output: its forward is swapped for the grouping alone."""
    saved = [m.__dict__.get("forward") for m in mergers]
    for m in mergers:
        m.forward = lambda x, width=m.hidden_size: x.reshape(-1, width)
    try:
        yield
    finally:
        for m, forward in zip(mergers, saved):
            if forward is None:
                del m.forward
            else:
                m.forward = forward


def _merger_input(visual):
    """Within this context the tower returns the merger's input (grouped patches ``[N/4, 4*hidden]``, raster
    order) in place of the merger's output."""
    return grouped_outputs(visual.merger)


def merge_rows(merger, features: torch.Tensor) -> torch.Tensor:
    """The tower's ``PatchMerger`` on grouped rows (:func:`_merger_input`'s output, all or some of them):
    ``[..., 4 * hidden] -> [..., out_hidden]``, ``ln_q`` per patch and then the MLP. Works on transformers' merger
    and on vLLM's (same parts: ``ln_q``, ``mlp``, ``hidden_size``)."""
    lead = features.shape[:-1]
    x = merger.ln_q(features.reshape(-1, merger.ln_q.weight.shape[-1]))
    return merger.mlp(x.reshape(-1, merger.hidden_size)).reshape(*lead, -1)


def grid_offsets(index: torch.Tensor, grid: tuple[int, int, int], t_factor: float = 1.0) -> torch.Tensor:
    """``[3, k]``: the M-RoPE position of each token ``index`` (raster order, frame group by frame group) of an
    item with LLM grid ``grid`` = ``(t, h, w)`` (after the 2x2 merge), relative to the item's first position:
    ``(floor(t_i * t_factor), h_i, w_i)``, as ``get_rope_index`` numbers them (``t_factor``: a video's
    ``second_per_grid_t * tokens_per_second``; 1 for images)."""
    _, h, w = grid
    t_i = torch.div(index, h * w, rounding_mode="floor")
    h_i = torch.div(index, w, rounding_mode="floor") % h
    return torch.stack([(t_i.double() * t_factor).long(), h_i, index % w])


def grid_extent(grid: tuple[int, int, int], t_factor: float = 1.0) -> int:
    """How many positions an item of LLM grid ``(t, h, w)`` takes: its largest offset + 1 (the text after it
    starts there)."""
    t, h, w = grid
    return max(int((t - 1) * t_factor), h - 1, w - 1) + 1


@register_adapter
class Qwen2_5_VLAdapter(Adapter):
    family = "qwen2_5_vl"
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)
    served = (Served("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl", "PrunedQwen2_5_VL",
                     "GuardedQwen2_5_VL", "original"),)
    has_cls = False
    media = ("image", "video")
    mrope = True
    pixel_inputs = ("pixel_values", "pixel_values_videos")
    visual_inputs = ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw", "second_per_grid_ts",
                     "mm_token_type_ids")

    # --- parts ------------------------------------------------------------------------------------
    @property
    def language_model(self):
        return self.model.model.language_model

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    @property
    def video_token_id(self) -> int:
        return self.model.config.video_token_id

    @property
    def _visual(self):
        return self.model.model.visual

    def placeholders(self, input_ids: torch.Tensor) -> torch.Tensor:
        return (input_ids == self.image_token_id) | (input_ids == self.video_token_id)

    def feature_layer(self):
        return -1

    def feature_dim(self) -> int:
        vc = self.model.config.vision_config
        return vc.hidden_size * vc.spatial_merge_size ** 2

    def num_visual_tokens(self) -> int:
        """A nominal count (:data:`NOMINAL_TOKENS`: the stock image processor's largest image by default): each
        item's real count follows its size (``t * h * w / 4`` of its grid) and its budget is met at the forward."""
        return NOMINAL_TOKENS

    def output_class(self) -> type:
        # Qwen2_5_VLCausalLMOutputWithPast before transformers 5.18
        return self.model_module_attr("Qwen2_5_VLCausalLMOutputWithPast", "MultimodalCausalLMOutputWithPast")

    # --- vision -------------------------------------------------------------------------------------
    def tokens_per_item(self, grid_thw: torch.Tensor | None) -> list[int]:
        if grid_thw is None:
            return []
        return (grid_thw.prod(-1) // self.model.config.vision_config.spatial_merge_size ** 2).tolist()

    def vision_features(self, pixel_values: torch.Tensor, cls_attention: bool = False, grid_thw=None, **kwargs):
        """Per image (or video) ``[n_i, 4 * hidden]``: the merger's input in raster (token) order."""
        if cls_attention:
            raise ValueError(f"{self.family} has no [CLS] token")
        if grid_thw is None:
            raise ValueError("Qwen2.5-VL needs the grid (image_grid_thw / video_grid_thw) with the pixel values")
        visual = self._visual
        with _merger_input(visual):
            out = visual(pixel_values.type(visual.dtype), grid_thw=grid_thw)
        rows = out.pooler_output if hasattr(out, "pooler_output") else out[1]
        return list(torch.split(rows, self.tokens_per_item(grid_thw)))

    def item_order(self, input_ids: torch.Tensor | None, image_counts: list[int],
                   video_counts: list[int]) -> list[tuple[int, int]]:
        """``[(kind, index)]``: the images (kind 1) and videos (kind 2) in prompt order (batch-major, by their
        first placeholder). Without ``input_ids``: images, then videos."""
        if input_ids is None:
            return [(IMAGE, i) for i in range(len(image_counts))] + [(VIDEO, j) for j in range(len(video_counts))]
        flat = input_ids.flatten()
        kinds = torch.where(flat == self.image_token_id, IMAGE, torch.where(flat == self.video_token_id, VIDEO, 0))
        kinds = kinds[kinds > 0].tolist()
        counts = {IMAGE: image_counts, VIDEO: video_counts}
        taken = {IMAGE: 0, VIDEO: 0}
        order, p = [], 0
        while p < len(kinds):
            kind = kinds[p]
            j = taken[kind]
            n = counts[kind][j] if j < len(counts[kind]) else None
            if n is None or kinds[p:p + n] != [kind] * n:
                break
            order.append((kind, j))
            taken[kind] += 1
            p += n
        if p != len(kinds) or taken[IMAGE] != len(image_counts) or taken[VIDEO] != len(video_counts):
            found = {k: sum(1 for x in kinds if x == k) for k in (IMAGE, VIDEO)}
            raise ValueError(
                f"Image/video features and tokens do not match: {found[IMAGE]} image and {found[VIDEO]} video tokens "
                f"in input_ids, images giving {image_counts} and videos giving {video_counts} tokens"
            )
        return order

    def encode(self, pixel_values: torch.Tensor | None = None, cls_attention: bool = False, *, input_ids=None,
               image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None, **kwargs) -> VisualFeatures:
        """Every image and video of one forward as an item, in prompt order: its merger-input rows ``[n, 4*hidden]``
        (raster order, frame group by frame group for a video), ``slots`` = ``0..n-1`` (every placeholder holds a
        token), ``crops`` = the temporal group of each token (0 for images), ``patches`` = its index in the frame.
        The images and the videos each go through the tower in one call, as the model's own forward does."""
        if cls_attention:
            raise ValueError(f"{self.family} has no [CLS] token")
        feats = {IMAGE: [], VIDEO: []}
        grids = {IMAGE: image_grid_thw, VIDEO: video_grid_thw}
        if pixel_values is not None:
            feats[IMAGE] = self.vision_features(pixel_values, grid_thw=image_grid_thw)
        if pixel_values_videos is not None:
            feats[VIDEO] = self.vision_features(pixel_values_videos, grid_thw=video_grid_thw)
        order = self.item_order(input_ids, [f.shape[0] for f in feats[IMAGE]], [f.shape[0] for f in feats[VIDEO]])
        return self.item_features(order, feats, grids)

    def item_features(self, order: list[tuple[int, int]], feats: dict, grids: dict, **extra) -> VisualFeatures:
        """The :class:`VisualFeatures` of the items in prompt ``order`` (``[(kind, index)]``): each item's rows
        (``feats[kind][index]``), every placeholder holding a token, ``crops`` its temporal group, ``patches`` its
        index in the frame (from ``grids[kind][index]``); ``extra`` passed on (e.g. ``streams``)."""
        merge = self.model.config.vision_config.spatial_merge_size
        features, slots, crops, patches, coords = [], [], [], [], []
        for kind, j in order:
            f = feats[kind][j]
            _, h, w = grids[kind][j].tolist()
            per_frame = (h // merge) * (w // merge)
            idx = torch.arange(f.shape[0], device=f.device)
            features.append(f)
            slots.append(idx)
            crops.append(idx // per_frame)
            patches.append(idx % per_frame)
            coords.append(grid_coords(patches[-1], h // merge, w // merge))
        return VisualFeatures(features, slots, crops=crops, patches=patches, coords=coords, **extra)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The merger on (kept) rows: ``[..., 4 * hidden] -> [..., out_hidden]`` (``ln_q`` per patch, then the MLP)."""
        return merge_rows(self._visual.merger, features)

    # --- positions ------------------------------------------------------------------------------------
    def text_positions(self, position_ids: torch.Tensor) -> torch.Tensor | None:
        """The 1-D text positions of a forward's ``position_ids``: row 0 of ``[4, b, s]``, the ids themselves when
        2-D, None for ``[3, b, s]`` (no text row: the engine counts positions itself)."""
        if position_ids.dim() == 3:
            return position_ids[0] if position_ids.shape[0] == 4 else None
        return position_ids

    def mm_token_type_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[b, s]``: 1 at image placeholders, 2 at video placeholders, 0 for text (what the processor returns)."""
        return torch.where(input_ids == self.image_token_id, IMAGE,
                           torch.where(input_ids == self.video_token_id, VIDEO, 0)).to(torch.int)

    def prompt_inputs(self, input_ids: torch.Tensor) -> dict:
        return {"mm_token_type_ids": self.mm_token_type_ids(input_ids)}

    @staticmethod
    def _deltas(rope: torch.Tensor, attention_mask) -> torch.Tensor:
        """``[b, 1]``: largest rotary position + 1 minus the real tokens of each row (``get_rope_index``'s
        ``rope_deltas``)."""
        b, s = rope.shape[1], rope.shape[2]
        valid = (attention_mask.bool() if attention_mask is not None
                 else torch.ones(b, s, dtype=torch.bool, device=rope.device)).to(rope.device)
        top = rope.masked_fill(~valid[None], torch.iinfo(rope.dtype).min).amax(dim=(0, 2))
        return (top + 1 - valid.sum(dim=1))[:, None]

    def rope_positions(self, input_ids, attention_mask, positions, visual: dict, cache):
        """``[3, b, s]`` rotary positions of a forward over the unpruned prompt (see the module docstring).

        ``positions``: the forward's ``position_ids`` as given (``[3 or 4, b, s]`` are used as they are; 2-D ones
        are text positions) or the engine's default. With images or videos and no 3-D ids, ``get_rope_index``
        computes them. A forward that continues a cache (no pixels) adds the cached ``rope_deltas``."""
        past = cache.get_seq_length() if cache is not None else 0
        grids = visual.get("image_grid_thw") is not None or visual.get("video_grid_thw") is not None
        deltas = None
        if positions.dim() == 3:
            rope = positions[-3:]
            deltas = self._deltas(rope, attention_mask) if past == 0 else None
        elif grids and input_ids is not None:
            rope, deltas = self.model.model.get_rope_index(
                input_ids, self.mm_token_type_ids(input_ids), image_grid_thw=visual.get("image_grid_thw"),
                video_grid_thw=visual.get("video_grid_thw"), second_per_grid_ts=visual.get("second_per_grid_ts"),
                attention_mask=attention_mask,
            )
            self.model.model.rope_deltas = deltas  # as the model's own forward leaves them
        else:  # text only: positions as given, plus the deltas of the prompt a cache continues
            cached = getattr(cache, ROPE_DELTAS_ATTR, None) if past > 0 else None
            rope = positions if cached is None else positions + cached.to(positions.device)
            rope = rope[None].expand(3, *rope.shape)
        if deltas is not None and cache is not None and past == 0:
            setattr(cache, ROPE_DELTAS_ATTR, deltas)
        return rope

    def decode_rope_positions(self, positions: torch.Tensor, cache):
        """``[3, b, s]`` rotary positions of decode steps after a pruned prefill: 3-D ids as given (rows 1-3 of
        ``[4, b, s]``), or the text positions (original length + generated tokens) plus the cached
        ``rope_deltas`` — where the unpruned model continues, not from the pruned cache length."""
        if positions.dim() == 3:
            return positions[-3:]
        deltas = getattr(cache, ROPE_DELTAS_ATTR, None)
        rope = positions if deltas is None else positions + deltas.to(positions.device)
        return rope[None].expand(3, *rope.shape)

    def vision_module(self):
        return self._visual
