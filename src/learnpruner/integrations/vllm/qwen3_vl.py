"""Qwen3-VL in vLLM with learnpruner's stage 1 (vLLM's ``Qwen3VLForConditionalGeneration``, subclassed): images
and videos.

Each image and each video is one item with its own budget (``tokens=`` per item, or ``ratio=`` of its own count).
As for Qwen2.5-VL (:mod:`.qwen2_5_vl`): the processor emits each item's kept count of placeholders; the tower runs
with its mergers swapped for the grouping alone (the transformers adapter's helper), the package's stage-1 rule
picks the kept rows on the main merger's input, and the kept tokens keep their original 3-D positions
(:class:`~.mrope.KeptPositions`). **DeepStack:** the tower's taps are grouped the same way, and every DeepStack
merger runs on the same kept rows as the main merger; the encoder's output row of a kept token is its main
embedding followed by its own DeepStack features (vLLM's layout, which its ``embed_input_ids`` splits and adds
after the first decoder layers), then the position offsets. A dropped token leaves all of them.

**Videos, frame group by frame group.** Qwen3-VL writes a video as one placeholder run per temporal group, each
after its timestamp (``<t seconds>``), and vLLM fixes every run's length when it processes the prompt, before the
tower has run. So a video's kept count is split evenly over its groups (:func:`learnpruner.budget.split_evenly`,
earlier groups first) and each group's rule runs on that group alone: the transformers engine's
``stage1_unit="crop"`` (``learnpruner.apply(model, ..., stage1_unit="crop")``), which the tests hold it equal to.
Stage 1 in the transformers engine's default unit ranks all of a video's tokens at once; that is not available
here, and is the one difference between the engines on Qwen3-VL videos.

Qwen3-VL-MoE (``"qwen3_vl_moe"``) is the same pruned model over vLLM's MoE class: its tower, mergers and positions
are the dense model's.

Not served: precomputed embeddings, EVS (``video_pruning_rate``) on top of a learnpruner budget, the encoder's
data-parallel mode and encoder CUDA graphs (both bypass this embedding step).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration, Qwen3VLMoeProcessingInfo
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement, PromptUpdateDetails

from ...adapters.qwen2_5_vl import grid_offsets
from ...adapters.qwen3_vl import _grouped_taps, merge_rows3
from ...budget import split_evenly
from ...engine.layout import grid_coords
from .mrope import KeptCounts, KeptPositions, encode_offsets
from .stage1 import guarded, select_kept, spec_of

FAMILY = "qwen3_vl"
NO_EVS = "video_pruning_rate (vLLM's EVS) and a learnpruner budget both prune videos: use one"


def _spec(config):
    return spec_of(config, FAMILY)


def group_shares(spec, groups: int, per_group: int) -> list[int]:
    """Placeholders each temporal group of an item keeps: the item's kept count (``spec.kept`` of all its tokens)
    split evenly over its ``groups`` runs of ``per_group`` tokens, earlier groups first (an image: one group), and
    at least one per group: vLLM fixes every run's length before the tower runs, and an empty run would leave a group
    with no row to merge (a budget below the group count keeps one token per group, as the transformers engine's
    ``stage1_unit="crop"`` does)."""
    return split_evenly(spec.kept(groups * per_group), [per_group] * groups, at_least=1)


def _cut_runs(tokens: list[int], token_id: int, spec) -> list[int]:
    """``tokens`` (a video's replacement: timestamp, start, run of ``token_id``, end, per group) with each run of
    ``token_id`` cut to its group's share."""
    pieces = [(t, len(list(run))) for t, run in itertools.groupby(tokens)]
    runs = [n for t, n in pieces if t == token_id]
    if len(set(runs)) > 1:
        raise ValueError(f"a video's frame groups hold different token counts {runs}")
    shares = iter(group_shares(spec, len(runs), runs[0]) if runs else [])
    return [t for t, n in pieces for _ in range(next(shares) if t == token_id else n)]


class PrunedQwen3ProcessingInfo(KeptCounts, Qwen3VLProcessingInfo):
    """Each image's and each video's placeholders: the tokens it keeps (a video: the sum of its groups' shares)."""

    family = FAMILY
    start_frames = 2  # as vLLM's Qwen3-VL searches

    def get_num_video_tokens(self, *, num_frames: int, **kwargs) -> int:
        full = super(KeptCounts, self).get_num_video_tokens(num_frames=num_frames, **kwargs)
        tps = self.get_hf_config().vision_config.temporal_patch_size
        groups = max(1, -(-num_frames // tps))
        return sum(group_shares(_spec(self.get_hf_config()), groups, full // groups))


class PrunedQwen3Processor(Qwen3VLMultiModalProcessor):
    """Qwen3-VL's prompt updates with each image's placeholder run cut to its kept count, and each video's runs
    to their groups' shares."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs) -> Sequence[PromptReplacement]:
        if (self.info.ctx.get_mm_config().video_pruning_rate or 0) > 0:
            raise ValueError(NO_EVS)
        config = self.info.get_hf_config()
        spec = _spec(config)
        updates = []
        for update in super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
            if update.modality == "image":
                def kept(item_idx: int, _full=update.replacement) -> list[int]:
                    full = _full(item_idx)
                    return full[:spec.kept(len(full))]
            else:
                def kept(item_idx: int, _full=update.replacement) -> PromptUpdateDetails:
                    full = _full(item_idx)
                    tokens = full.full if isinstance(full, PromptUpdateDetails) else full
                    return PromptUpdateDetails.select_token_id(_cut_runs(list(tokens), config.video_token_id, spec),
                                                               config.video_token_id)

            updates.append(PromptReplacement(modality=update.modality, target=update.target, replacement=kept))
        return updates


@MULTIMODAL_REGISTRY.register_processor(PrunedQwen3Processor, info=PrunedQwen3ProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class PrunedQwen3VL(KeptPositions, Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL with learnpruner's stage 1 between the vision blocks and the mergers."""

    def __init__(self, *, vllm_config, prefix: str = "model") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        if self.is_multimodal_pruning_enabled:
            raise ValueError(NO_EVS)
        self.start_stage1(vllm_config, FAMILY, lambda rows: merge_rows3(self.visual.merger, rows))

    def visual_runs(self, input_tokens, mm_features):
        """An image: one run. A video: one run per temporal group, each numbered as a one-frame grid after its
        timestamp (as the model's ``get_rope_index`` numbers it), holding the group's share."""
        config = self.config
        merge = config.vision_config.spatial_merge_size
        for feature in mm_features:
            offset = feature.mm_position.offset
            if feature.modality == "image":
                t, h, w = feature.data["image_grid_thw"].data.tolist()
                yield offset, self.learnpruner.kept(t * (h // merge) * (w // merge)), (t, h // merge, w // merge), 1.0
                continue
            t, h, w = feature.data["video_grid_thw"].data.tolist()
            grid = (1, h // merge, w // merge)
            for share in group_shares(self.learnpruner, t, grid[1] * grid[2]):
                start = input_tokens.index(config.vision_start_token_id, offset) + 1
                yield start, share, grid, 1.0
                offset = start + share

    def _pruned(self, pixels: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per item: its kept tokens' rows (main embedding, DeepStack features, offsets), group by group."""
        grids = grid_thw.tolist()
        visual = self.visual
        with _grouped_taps(visual):
            rows = visual(pixels, grid_thw=grids)  # [N/4, 4 * hidden * (1 + taps)]
        width = visual.merger.hidden_size
        mergers = [visual.merger, *visual.deepstack_merger_list]
        merge = visual.spatial_merge_size
        sizes = (grid_thw.prod(-1) // merge ** 2).tolist()
        out = []
        for item, (t, h, w) in zip(rows.split(sizes), grids):
            grid = (1, h // merge, w // merge)
            per = grid[1] * grid[2]
            pieces = []
            for group, share in zip(item.split(per), group_shares(self.learnpruner, t, per)):  # share >= 1
                place = grid_coords(torch.arange(per, device=group.device), grid[1], grid[2])
                kept = select_kept(self, group[None, :, :width], share, coords=place)
                index = torch.arange(per, device=group.device) if kept is None else kept[0].to(group.device)
                parts = [merge_rows3(m, group[index, j * width:(j + 1) * width]) for j, m in enumerate(mergers)]
                pieces.append(torch.cat([*parts, encode_offsets(grid_offsets(index, grid), parts[0].dtype)], dim=1))
            out.append(torch.cat(pieces))
        return tuple(out)

    def _process_image_input(self, image_input) -> tuple[torch.Tensor, ...]:
        if image_input["type"] == "image_embeds":
            raise ValueError("learnpruner prunes pixels, not precomputed image embeddings")
        return self._pruned(image_input["pixel_values"], image_input["image_grid_thw"])

    def _process_video_input(self, video_input) -> tuple[torch.Tensor, ...]:
        if video_input["type"] == "video_embeds":
            raise ValueError("learnpruner prunes pixels, not precomputed video embeddings")
        return self._pruned(video_input["pixel_values_videos"], video_input["video_grid_thw"])


class PrunedQwen3MoeProcessingInfo(Qwen3VLMoeProcessingInfo, PrunedQwen3ProcessingInfo):
    """The MoE model's config, the pruned placeholder counts."""


@MULTIMODAL_REGISTRY.register_processor(PrunedQwen3Processor, info=PrunedQwen3MoeProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class PrunedQwen3VLMoe(PrunedQwen3VL, Qwen3VLMoeForConditionalGeneration):
    """vLLM's Qwen3-VL-MoE with the same stage 1 (the tower, the mergers and the positions are the dense model's;
    only the text model's MLPs differ)."""


GuardedQwen3VL = guarded(Qwen3VLForConditionalGeneration)  # vLLM's own classes, refusing a stray learnpruner entry
GuardedQwen3VLMoe = guarded(Qwen3VLMoeForConditionalGeneration)
