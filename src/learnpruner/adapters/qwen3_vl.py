"""Qwen3-VL (``transformers.Qwen3VLForConditionalGeneration`` and the MoE ``Qwen3VLMoeForConditionalGeneration``)
adapter: images and video, 3-D rotary positions, DeepStack features pruned with the main embedding.

Qwen3-VL is Qwen2.5-VL's successor, and what learnpruner needs of it is mostly the same (this adapter derives
from :class:`~.qwen2_5_vl.Qwen2_5_VLAdapter`): items are images and videos in prompt order, stage 1 reads the
merger's input (per LLM token its 2x2 grouped patches of the last vision block, ``[n, 4 * hidden]``, raster
order), the merger runs on the kept rows only, kept tokens keep their original 3-D positions (the model's own
``get_rope_index`` on the unpruned prompt), and decode steps continue at the unpruned length plus
``rope_deltas``. There is no [CLS] token: methods that read it are refused by name. What differs:

**DeepStack.** The tower also taps the hidden states of a few blocks (``deepstack_visual_indexes``; 8/16/24 of
27 on the 8B), each through its own merger, and the text model adds the ``j``-th of them to the visual rows of
its input after decoder layer ``j``. Here each tap is a *stream* of the item (:attr:`VisualFeatures.streams`:
the tap's grouped rows, read like the main rows by swapping every merger for the grouping alone): the
engine keeps in every stream exactly the tokens stage 1 keeps, runs the tap's merger on those rows only
(:meth:`project_stream`), and adds them after layer ``j`` at the rows of the tokens still in the sequence. A
token that stage 1 or an LLM-side drop removes leaves the main embedding and every DeepStack addition still
to come; a kept token receives its own features at its own row. Methods that merge tokens (a ``replace`` of
rows) change the main row only; the kept token's DeepStack features are its own.

**Tower.** No windows: every block attends within each frame (group), with learned position embeddings
interpolated to the grid and 2-D rotary positions; 16 px patches, so a token covers 32 x 32 px. Stage 1
reads the tower's output as on Qwen2.5-VL, so nothing of this is copied here.

**Video.** The processor writes a timestamp (``<t seconds>``) and vision start/end tokens around every temporal
group, so one video's placeholders come in several runs; the video is still one item (its budget, its stats)
and ``get_rope_index`` numbers each group's run after its timestamp.
"""

from __future__ import annotations

import torch

from ..engine.layout import VisualFeatures
from .base import Served, register_adapter
from .qwen2_5_vl import IMAGE, VIDEO, Qwen2_5_VLAdapter, grouped_outputs

__all__ = ["Qwen3VLAdapter", "merge_rows3"]


def _grouped_taps(visual):
    """Within this context the tower's merger and DeepStack mergers return their inputs grouped per LLM token
    (``[N/4, 4 * hidden]``, raster order) in place of their outputs."""
    return grouped_outputs(visual.merger, *visual.deepstack_merger_list)


def merge_rows3(merger, rows: torch.Tensor) -> torch.Tensor:
    """A Qwen3-VL ``PatchMerger`` (main or DeepStack) on grouped rows ``[..., 4 * hidden] -> [..., out_hidden]``:
    its own forward on the rows' patches (it normalises per patch or per group, as the merger was built). Works on
    transformers' merger and on vLLM's (same parts: ``norm``, ``hidden_size``)."""
    lead = rows.shape[:-1]
    patch = merger.norm.weight.shape[0]  # per patch, or the whole group for a post-shuffle norm
    return merger(rows.reshape(-1, patch)).reshape(*lead, -1)


@register_adapter
class Qwen3VLAdapter(Qwen2_5_VLAdapter):
    family = "qwen3_vl"
    model_classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")
    served = (Served("qwen3_vl", "Qwen3VLForConditionalGeneration", "qwen3_vl", "PrunedQwen3VL", "GuardedQwen3VL",
                     "original"),
              Served("qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration", "qwen3_vl", "PrunedQwen3VLMoe",
                     "GuardedQwen3VLMoe", "original"))
    visual_inputs = ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw", "mm_token_type_ids")

    def output_class(self) -> type:
        return self.model_module_attr("Qwen3VLMoeCausalLMOutputWithPast", "Qwen3VLCausalLMOutputWithPast",
                                      "MultimodalCausalLMOutputWithPast")

    # --- vision -------------------------------------------------------------------------------------
    def _tower(self, pixel_values: torch.Tensor, grid_thw) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        """Per item its merger-input rows, and per DeepStack tap per item that tap's grouped rows."""
        if grid_thw is None:
            raise ValueError("Qwen3-VL needs the grid (image_grid_thw / video_grid_thw) with the pixel values")
        visual = self._visual
        with _grouped_taps(visual):
            out = visual(pixel_values.type(visual.dtype), grid_thw=grid_thw)
        sizes = self.tokens_per_item(grid_thw)
        taps = [list(torch.split(t, sizes)) for t in out.deepstack_features]
        return list(torch.split(out.pooler_output, sizes)), taps

    def vision_features(self, pixel_values: torch.Tensor, cls_attention: bool = False, grid_thw=None, **kwargs):
        """Per image (or video) ``[n_i, 4 * hidden]``: the merger's input in raster (token) order."""
        if cls_attention:
            raise ValueError(f"{self.family} has no [CLS] token")
        return self._tower(pixel_values, grid_thw)[0]

    def encode(self, pixel_values: torch.Tensor | None = None, cls_attention: bool = False, *, input_ids=None,
               image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None, **kwargs) -> VisualFeatures:
        """As :meth:`Qwen2_5_VLAdapter.encode`, plus ``streams``: per DeepStack tap, per item (prompt order) its
        grouped rows ``[n, 4 * hidden]``."""
        if cls_attention:
            raise ValueError(f"{self.family} has no [CLS] token")
        taps = len(self._visual.deepstack_merger_list)
        feats = {IMAGE: [], VIDEO: []}
        streams = {IMAGE: [[] for _ in range(taps)], VIDEO: [[] for _ in range(taps)]}
        grids = {IMAGE: image_grid_thw, VIDEO: video_grid_thw}
        for kind, pixels in ((IMAGE, pixel_values), (VIDEO, pixel_values_videos)):
            if pixels is not None:
                feats[kind], streams[kind] = self._tower(pixels, grids[kind])
        order = self.item_order(input_ids, [f.shape[0] for f in feats[IMAGE]], [f.shape[0] for f in feats[VIDEO]])
        tapped = [[streams[kind][t][j] for kind, j in order] for t in range(taps)]
        return self.item_features(order, feats, grids, streams=tapped or None)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The main merger on (kept) rows: ``[..., 4 * hidden] -> [..., out_hidden]``."""
        return merge_rows3(self._visual.merger, features)

    def project_stream(self, j: int, rows: torch.Tensor) -> torch.Tensor:
        """DeepStack tap ``j``'s merger on (kept) grouped rows; the engine adds the result after decoder layer
        ``j``."""
        return merge_rows3(self._visual.deepstack_merger_list[j], rows)
