"""Qwen2.5-VL in vLLM with learnpruner's stage 1 (vLLM's ``Qwen2_5_VLForConditionalGeneration``, subclassed).

Images and videos, each one item with its own budget (``tokens=`` per image and per video, or ``ratio=`` of its
own count). What changes:

* **Placeholders.** The processor emits each item's kept count of ``<|image_pad|>`` / ``<|video_pad|>``, so vLLM
  schedules, caches and bills that many tokens.
* **Stage 1.** The tower runs with its merger swapped for the grouping alone (the transformers adapter's own
  helper), the package's stage-1 rule picks each item's kept rows on the merger's input, and the merger runs on
  the kept rows only (:func:`learnpruner.adapters.qwen2_5_vl.merge_rows`).
* **Positions.** The kept tokens keep their original 3-D M-RoPE positions, and the text after an item starts
  where it would after the unpruned item, as in the transformers engine: the text is numbered exactly when
  the prompt is, each visual row gets its item's first position, and the encoder appends each kept token's
  offset to its embedding, added to its position in ``forward`` (:class:`~.mrope.KeptPositions`, shared with
  Qwen3-VL; its module says how).

Not served: precomputed image or video embeddings (nothing to prune from), EVS (``video_pruning_rate``) on top
of a learnpruner budget, the encoder's data-parallel mode and encoder CUDA graphs (both bypass this embedding
step).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from ...adapters.qwen2_5_vl import _merger_input, grid_offsets, merge_rows
from ...engine.layout import grid_coords
from .mrope import KeptCounts, KeptPositions, encode_offsets
from .stage1 import guarded, select_kept, spec_of

FAMILY = "qwen2_5_vl"


def _spec(config):
    return spec_of(config, FAMILY)

class PrunedQwenProcessingInfo(KeptCounts, Qwen2_5_VLProcessingInfo):
    """Each image's and each video's placeholders: the tokens it keeps."""

    family = FAMILY


class PrunedQwenProcessor(Qwen2_5_VLMultiModalProcessor):
    """Qwen's prompt updates with each item's placeholder run cut to its kept count."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs) -> Sequence[PromptReplacement]:
        if (self.info.ctx.get_mm_config().video_pruning_rate or 0) > 0:
            raise ValueError("video_pruning_rate (vLLM's EVS) and a learnpruner budget both prune videos: use one")
        spec = _spec(self.info.get_hf_config())
        updates = []
        for update in super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
            def kept(item_idx: int, _full=update.replacement) -> list[int]:
                full = _full(item_idx)
                return full[:spec.kept(len(full))]

            updates.append(PromptReplacement(modality=update.modality, target=update.target, replacement=kept))
        return updates


@MULTIMODAL_REGISTRY.register_processor(PrunedQwenProcessor, info=PrunedQwenProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class PrunedQwen2_5_VL(KeptPositions, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL with learnpruner's stage 1 between the vision blocks and the merger."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        if self.is_multimodal_pruning_enabled:
            raise ValueError("video_pruning_rate (vLLM's EVS) and a learnpruner budget both prune videos: use one")
        self.start_stage1(vllm_config, FAMILY, lambda rows: merge_rows(self.visual.merger, rows))

    # --- the encoder: stage 1 on the merger's input, offsets appended -------------------------------------------
    def _pruned(self, pixels: torch.Tensor, grid_thw: torch.Tensor, t_factors: list[float]) -> tuple[torch.Tensor, ...]:
        grids = grid_thw.tolist()
        with _merger_input(self.visual):
            rows = self.visual(pixels, grid_thw=grids)  # [N / 4, 4 * hidden], raster order
        merge = self.visual.spatial_merge_size
        sizes = (grid_thw.prod(-1) // merge ** 2).tolist()
        out = []
        for features, (t, h, w), factor in zip(rows.split(sizes), grids, t_factors):
            place = grid_coords(torch.arange(features.shape[0], device=features.device) % ((h // merge) * (w // merge)),
                                h // merge, w // merge)
            kept = select_kept(self, features[None], coords=place)
            index = (torch.arange(features.shape[0], device=features.device) if kept is None
                     else kept[0].to(features.device))
            embeds = merge_rows(self.visual.merger, features[index])
            offsets = grid_offsets(index, (t, h // merge, w // merge), factor)
            out.append(torch.cat([embeds, encode_offsets(offsets, embeds.dtype)], dim=1))
        return tuple(out)

    def _process_image_input(self, image_input) -> tuple[torch.Tensor, ...]:
        if image_input["type"] == "image_embeds":
            raise ValueError("learnpruner prunes pixels, not precomputed image embeddings")
        grid = image_input["image_grid_thw"]
        return self._pruned(image_input["pixel_values"], grid, [1.0] * grid.shape[0])

    def _process_video_input(self, video_input) -> tuple[torch.Tensor, ...]:
        if video_input["type"] == "video_embeds":
            raise ValueError("learnpruner prunes pixels, not precomputed video embeddings")
        grid = video_input["video_grid_thw"]
        return self._pruned(video_input["pixel_values_videos"], grid, self._t_factors(
            video_input.get("second_per_grid_ts"), grid.shape[0]))

    def visual_runs(self, input_tokens, mm_features):
        for offset, t, h, w, factor in self.iter_mm_grid_thw(mm_features):
            yield offset, self.learnpruner.kept(t * h * w), (t, h, w), factor

    def _t_factors(self, seconds, count: int) -> list[float]:
        per_second = getattr(self.config.vision_config, "tokens_per_second", 1.0)
        if seconds is None:
            return [float(per_second)] * count
        return [float(s) * per_second for s in torch.as_tensor(seconds).flatten().tolist()]


GuardedQwen2_5_VL = guarded(Qwen2_5_VLForConditionalGeneration)  # vLLM's own class, refusing a stray learnpruner entry
