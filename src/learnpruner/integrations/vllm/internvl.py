"""InternVL3 in vLLM with learnpruner's stage 1 (vLLM serves ``InternVLForConditionalGeneration`` checkpoints with its
``InternS1ForConditionalGeneration`` class, subclassed here).

As in the transformers engine (:mod:`learnpruner.adapters.internvl`), an image is one item of all its tiles; stage 1
runs on the pixel-shuffled rows (the projector's input, read off vLLM's own ``extract_feature`` by stopping it at the
projector), and the projector runs on the kept rows only. Each image's placeholders between ``<img>`` and
``</img>`` are its kept count (the prompt update is vLLM's, with the context tokens cut to the kept count).
Videos are not served pruned: the pruned class takes images only, so vLLM refuses a video request when it
processes it, before the engine sees it.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.interns1 import (
    InternS1DummyInputsBuilder,
    InternS1ForConditionalGeneration,
    InternS1MultiModalProcessor,
    InternS1ProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptUpdateDetails

from ...adapters.internvl import projector_input
from ...engine.layout import grid_coords
from .stage1 import attach, guarded, select_kept, spec_of

FAMILY = "internvl"
ARCHITECTURE = "LearnPrunerInternVLForConditionalGeneration"


class PrunedInternVLProcessingInfo(InternS1ProcessingInfo):
    """Each image's placeholders: the tokens it keeps; no videos (see the module docstring)."""

    def get_supported_mm_limits(self):
        return {"image": None}

    def get_num_image_tokens(self, **kwargs) -> int:
        return spec_of(self.get_hf_config(), FAMILY).kept(super().get_num_image_tokens(**kwargs))


class PrunedInternVLMultiModalProcessor(InternS1MultiModalProcessor):
    """vLLM's prompt updates, each image's context tokens cut to the count it keeps."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs))
        context = self.info.get_hf_processor(**hf_processor_mm_kwargs).image_token_id
        spec = spec_of(self.info.get_hf_config(), FAMILY)

        def kept_only(original):
            def replacement(item_idx: int):
                ids = list(original(item_idx).full)
                n = ids.count(context)
                first = ids.index(context)
                ids = ids[:first] + [context] * spec.kept(n) + ids[first + n:]
                return PromptUpdateDetails.select_token_id(ids, context)

            return replacement

        for update in updates:
            if update.modality == "image":
                update.replacement = kept_only(update.replacement)
        return updates


@MULTIMODAL_REGISTRY.register_processor(PrunedInternVLMultiModalProcessor, info=PrunedInternVLProcessingInfo,
                                        dummy_inputs=InternS1DummyInputsBuilder)
class PrunedInternVL(InternS1ForConditionalGeneration):
    """vLLM's InternVL (HF layout) with learnpruner's stage 1 between the pixel shuffle and the projector."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = vllm_config.model_config.hf_config
        width = config.vision_config.hidden_size * int(1 / config.downsample_ratio) ** 2
        attach(self, vllm_config, FAMILY, width, config.vision_feature_layer, self.multi_modal_projector)

    def shuffled_rows(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[tiles, 256, 4 * width]``: the projector's input of vLLM's own feature path."""
        return projector_input(self.multi_modal_projector, lambda: self.extract_feature(pixel_values))

    def _process_vision_input(self, image_input):
        if image_input["type"] != "pixel_values":
            raise ValueError(f"learnpruner prunes image pixels, not {image_input['type']!r}")
        rows = self.shuffled_rows(image_input["pixel_values"])
        per = rows.shape[1]
        side = int(per**0.5)
        out, start = [], 0
        for tiles in image_input["num_patches"].tolist():
            feats = rows[start:start + tiles].reshape(1, tiles * per, -1)
            start += tiles
            coords = grid_coords(torch.arange(per, device=feats.device), side, side).repeat(tiles, 1)
            kept = select_kept(self, feats, coords=coords)
            if kept is not None:
                feats = feats[:, kept[0].sort().values.to(feats.device)]
            out.append(self.multi_modal_projector(feats[0]))
        return tuple(out)


GuardedInternVL = guarded(InternS1ForConditionalGeneration)  # vLLM's own, refusing a stray learnpruner entry
