"""Qwen3-VL in vLLM with learnpruner's stage 1 (vLLM's ``Qwen3VLForConditionalGeneration``, subclassed): images.

Each image is one item with its own budget (``tokens=`` per image, or ``ratio=`` of its own count). As for
Qwen2.5-VL (:mod:`.qwen2_5_vl`): the processor emits each image's kept count of ``<|image_pad|>``; the tower runs
with its mergers swapped for the grouping alone (the transformers adapter's helper), the package's stage-1 rule
picks each image's kept rows on the main merger's input, and the kept tokens keep their original 3-D positions
(:class:`~.mrope.KeptPositions`). **DeepStack:** the tower's taps are grouped the same way, and every DeepStack
merger runs on the same kept rows as the main merger; the encoder's output row of a kept token is its main
embedding followed by its own DeepStack features (vLLM's layout, which its ``embed_input_ids`` splits and adds
after the first decoder layers), then the position offsets. A dropped token leaves all of them.

Not served: videos (Qwen3-VL writes a video frame group by frame group between timestamps, and each group's
placeholder run would need its kept count before the tower has run: start the engine with
``limit_mm_per_prompt={"video": 0}``), precomputed embeddings, EVS, the encoder's data-parallel mode and encoder
CUDA graphs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from ...adapters.qwen2_5_vl import grid_offsets
from ...adapters.qwen3_vl import _grouped_taps, merge_rows3
from . import POSITIONS
from .mrope import KeptPositions, encode_offsets
from .stage1 import select_kept, spec_of

FAMILY = "qwen3_vl"
ARCHITECTURE = "LearnPrunerQwen3VLForConditionalGeneration"
NO_VIDEO = ("learnpruner serves Qwen3-VL images only (a video's frame groups sit between timestamps, each "
            "with its own placeholder run): start the engine with limit_mm_per_prompt={'video': 0}")


def _spec(config):
    return spec_of(config, positions=POSITIONS[FAMILY])


class PrunedQwen3ProcessingInfo(Qwen3VLProcessingInfo):
    """Each image's placeholders: the tokens it keeps."""

    def get_num_image_tokens(self, **kwargs) -> int:
        return _spec(self.get_hf_config()).kept(super().get_num_image_tokens(**kwargs))


class PrunedQwen3Processor(Qwen3VLMultiModalProcessor):
    """Qwen3-VL's prompt updates with each image's placeholder run cut to its kept count."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs) -> Sequence[PromptReplacement]:
        spec = _spec(self.info.get_hf_config())
        updates = []
        for update in super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
            if update.modality != "image":
                updates.append(update)
                continue

            def kept(item_idx: int, _full=update.replacement) -> list[int]:
                full = _full(item_idx)
                return full[:spec.kept(len(full))]

            updates.append(PromptReplacement(modality="image", target=update.target, replacement=kept))
        return updates


@MULTIMODAL_REGISTRY.register_processor(PrunedQwen3Processor, info=PrunedQwen3ProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class PrunedQwen3VL(KeptPositions, Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL with learnpruner's stage 1 between the vision blocks and the mergers."""

    def __init__(self, *, vllm_config, prefix: str = "model") -> None:
        mm = vllm_config.model_config.multimodal_config
        if mm is not None and mm.get_limit_per_prompt("video") > 0:
            raise ValueError(NO_VIDEO)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.start_stage1(vllm_config, FAMILY, lambda rows: merge_rows3(self.visual.merger, rows))

    def item_grids(self, mm_features):
        merge = self.config.vision_config.spatial_merge_size
        for feature in mm_features:
            if feature.modality != "image":
                raise ValueError(NO_VIDEO)
            t, h, w = feature.data["image_grid_thw"].data.tolist()
            yield feature.mm_position.offset, t, h // merge, w // merge, 1.0

    def _process_image_input(self, image_input) -> tuple[torch.Tensor, ...]:
        if image_input["type"] == "image_embeds":
            raise ValueError("learnpruner prunes pixels, not precomputed image embeddings")
        grid_thw = image_input["image_grid_thw"]
        grids = grid_thw.tolist()
        visual = self.visual
        with _grouped_taps(visual):
            rows = visual(image_input["pixel_values"], grid_thw=grids)  # [N/4, 4 * hidden * (1 + taps)]
        width = visual.merger.hidden_size
        mergers = [visual.merger, *visual.deepstack_merger_list]
        merge = visual.spatial_merge_size
        sizes = (grid_thw.prod(-1) // merge ** 2).tolist()
        out = []
        for item, (t, h, w) in zip(rows.split(sizes), grids):
            main = item[:, :width]
            kept = select_kept(self, main[None])
            index = torch.arange(item.shape[0], device=item.device) if kept is None else kept[0].to(item.device)
            parts = [merge_rows3(m, item[index, j * width:(j + 1) * width]) for j, m in enumerate(mergers)]
            offsets = grid_offsets(index, (t, h // merge, w // merge))
            out.append(torch.cat([*parts, encode_offsets(offsets, parts[0].dtype)], dim=1))
        return tuple(out)

    def _process_video_input(self, video_input) -> tuple[torch.Tensor, ...]:
        raise ValueError(NO_VIDEO)
