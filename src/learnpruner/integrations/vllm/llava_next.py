"""LLaVA-NeXT (AnyRes) in vLLM with learnpruner's stage 1 (vLLM's ``LlavaNextForConditionalGeneration``).

An image's visual tokens are its base crop's patches and its unpadded high-resolution grid, in vLLM's packed
order; the ``image_newline`` after each grid row is structure: always kept, outside the budget, as in the
transformers engine. Stage 1 ranks all of an image's tokens at once on the CLIP features at the feature layer,
the projector runs on the kept rows only, and the image's embedding is the kept rows and the newlines in packed
order. Each image's placeholders (its kept count plus its newlines) follow its own size.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextImageEmbeddingInputs,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ...adapters.clip import crop_coords
from .llava import CLIP_WEIGHT_NAMES, stage1_for
from .stage1 import guarded, select_kept, spec_of

FAMILY = "llava_next"
ARCHITECTURE = "LearnPrunerLlavaNextForConditionalGeneration"


class PrunedLlavaNextProcessingInfo(LlavaNextProcessingInfo):
    """Each image's placeholders: the tokens it keeps plus its row newlines."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        total = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        newlines = self.num_newlines(image_width, image_height)
        return spec_of(self.get_hf_config(), FAMILY).kept(total - newlines) + newlines

    def num_newlines(self, image_width: int, image_height: int) -> int:
        return anyres_newlines(self, image_width, image_height)


def anyres_newlines(info, image_width: int, image_height: int) -> int:
    """The row newlines of an AnyRes image, by vLLM's own count (``info``: a LLaVA-NeXT-like processing info; its
    ``_get_num_unpadded_features`` is the family's, OneVision's with its anyres_max_9 interpolation)."""
    from vllm.model_executor.models.llava_next import get_anyres_image_grid_shape

    config, encoder = info.get_hf_config(), info.get_vision_encoder_info()
    rows, cols = get_anyres_image_grid_shape(image_size=(image_height, image_width),
                                             grid_pinpoints=config.image_grid_pinpoints,
                                             patch_size=encoder.get_image_size())
    _, newlines = info._get_num_unpadded_features(original_height=image_height, original_width=image_width,
                                                  npatches=encoder.get_patch_grid_length(),
                                                  num_patch_height=rows, num_patch_width=cols)
    return newlines


@MULTIMODAL_REGISTRY.register_processor(LlavaNextMultiModalProcessor, info=PrunedLlavaNextProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class PrunedLlavaNext(LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT with learnpruner's stage 1 between the vision tower and the projector."""

    hf_to_vllm_mapper = LlavaNextForConditionalGeneration.hf_to_vllm_mapper | CLIP_WEIGHT_NAMES

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        stage1_for(self, vllm_config, FAMILY)
        self._orders: dict[tuple, torch.Tensor] = {}  # packed order per (image size, crops, patches): a request
        # stream holds few distinct sizes, and the order depends on nothing else

    def packed_order(self, image_size: torch.Tensor, crops: int, per_crop: int) -> torch.Tensor:
        """``[L]``: for each placeholder of one image, ``crop * per_crop + patch``, or -1 for a newline."""
        key = (*(int(v) for v in image_size.tolist()), crops, per_crop)
        if key not in self._orders:
            self._orders[key] = self._packed_order(image_size, crops, per_crop)
        return self._orders[key]

    @torch.no_grad()
    def _packed_order(self, image_size: torch.Tensor, crops: int, per_crop: int) -> torch.Tensor:
        """vLLM's own packing run on an index tensor (its newline embedding set to -1 meanwhile)."""
        index = torch.arange(crops * per_crop, dtype=torch.float32).view(crops, per_crop, 1)
        saved = self.image_newline.data
        self.image_newline.data = torch.full((1,), -1.0)
        try:
            order = self._merge_image_patch_embeddings(image_size.cpu(), index, strategy="spatial_unpad")
        finally:
            self.image_newline.data = saved
        return order[:, 0].round().long()

    def _process_image_input(self, image_input):
        if isinstance(image_input, LlavaNextImageEmbeddingInputs):
            raise ValueError("learnpruner prunes pixels, not precomputed image embeddings")
        pixel_values = image_input["pixel_values"]
        per_image = list(pixel_values) if isinstance(pixel_values, torch.Tensor) else pixel_values
        image_sizes = image_input.get("image_sizes")
        crops = [v.shape[0] for v in per_image]
        features = self._image_pixels_to_features(self.vision_tower, torch.cat(per_image))
        out, start = [], 0
        for i, c in enumerate(crops):
            feats = features[start:start + c]  # [crops, per_crop, d] before the projector
            start += c
            order = self.packed_order(image_sizes[i], c, feats.shape[1]).to(feats.device)
            token = order >= 0
            rows = feats.reshape(-1, feats.shape[-1])[order[token]][None]  # [1, n, d] in packed order
            place = crop_coords(self.config.vision_config, feats.shape[1], feats.device)[order[token] % feats.shape[1]]
            kept = select_kept(self, rows, coords=place)
            keep = token.clone()
            if kept is not None:
                mine = torch.zeros(int(token.sum()), dtype=torch.bool, device=feats.device)
                mine[kept[0].to(feats.device)] = True
                keep[token] = mine
            projected = self.multi_modal_projector(rows[0][keep[token]])
            is_token = token[keep | ~token]  # the kept slots in packed order: kept tokens and every newline
            embeds = projected.new_empty(int(is_token.numel()), projected.shape[-1])
            embeds[is_token] = projected
            embeds[~is_token] = self.image_newline.to(embeds.dtype)
            out.append(embeds)
        return out


GuardedLlavaNext = guarded(LlavaNextForConditionalGeneration)  # vLLM's own class, refusing a stray learnpruner entry
