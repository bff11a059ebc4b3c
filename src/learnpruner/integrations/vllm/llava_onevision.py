"""LLaVA-OneVision in vLLM with learnpruner's stage 1 (vLLM's ``LlavaOnevisionForConditionalGeneration``).

As in the transformers engine (:mod:`learnpruner.adapters.llava_onevision`), stage 1 runs on the projected rows:
vLLM's own image path (tower, projector, AnyRes packing with its ``anyres_max_9`` interpolation and row newlines)
and video path (tower, projector, 2x2 pooling, one newline) produce each item's embeddings, and the rule keeps
``k`` of its token rows; the newlines are structure, always kept, outside the budget. Each item's placeholders
(its kept count plus its newlines) follow its own size. Weights saved by transformers 5.x (a SigLIP tower without
its ``vision_model`` level) load as well as the older layout.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageEmbeddingInputs,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ...adapters.llava_onevision import image_coords, video_coords
from .llava import CLIP_WEIGHT_NAMES
from .llava_next import anyres_newlines
from .stage1 import attach, guarded, select_kept, spec_of

FAMILY = "llava_onevision"
ARCHITECTURE = "LearnPrunerLlavaOnevisionForConditionalGeneration"


class PrunedLlavaOnevisionProcessingInfo(LlavaOnevisionProcessingInfo):
    """Each item's placeholders: the tokens it keeps plus its newlines (an image's row newlines, a video's one)."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        total = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        newlines = anyres_newlines(self, image_width, image_height)
        return spec_of(self.get_hf_config(), FAMILY).kept(total - newlines) + newlines

    def get_num_video_tokens(self, *, image_width: int, image_height: int, num_frames: int) -> int:
        total = super().get_num_video_tokens(image_width=image_width, image_height=image_height,
                                             num_frames=num_frames)
        return spec_of(self.get_hf_config(), FAMILY).kept(total - 1) + 1

    def _get_max_video_frames(self, max_tokens: int) -> int:
        """The most frames whose UNPRUNED tokens fit ``max_tokens`` (a kept count stays constant as frames grow, so
        vLLM's own search on it would never end; the profiled encoder work is the unpruned one)."""
        width, height = self.get_image_size_with_most_features()
        frames = 0
        while super().get_num_video_tokens(image_width=width, image_height=height,
                                           num_frames=frames + 1) <= max_tokens:
            frames += 1
        return frames


@MULTIMODAL_REGISTRY.register_processor(LlavaOnevisionMultiModalProcessor, info=PrunedLlavaOnevisionProcessingInfo,
                                        dummy_inputs=LlavaOnevisionDummyInputsBuilder)
class PrunedLlavaOnevision(LlavaOnevisionForConditionalGeneration):
    """vLLM's LLaVA-OneVision with learnpruner's stage 1 on each item's projected rows."""

    hf_to_vllm_mapper = LlavaOnevisionForConditionalGeneration.hf_to_vllm_mapper | CLIP_WEIGHT_NAMES

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = vllm_config.model_config.hf_config
        # stage 1 reads the LLM-width rows the projector made; nothing is projected after it
        attach(self, vllm_config, FAMILY, config.text_config.hidden_size, config.vision_feature_layer,
               lambda rows: rows)
        self._layouts: dict[tuple, torch.Tensor] = {}  # newline mask per (image size, crops)

    def newline_mask(self, image_size: torch.Tensor, crops: int) -> torch.Tensor:
        """``[L]`` bool: which of an image's packed rows are newlines (vLLM's own packing run on a marker: zeros
        for tokens, 1 for the newline)."""
        key = (*(int(v) for v in image_size.tolist()), crops)
        if key not in self._layouts:
            side = self.config.vision_config.image_size // self.config.vision_config.patch_size
            marker = torch.zeros(crops, side * side, 1)
            saved = self.image_newline.data
            self.image_newline.data = torch.ones(1)
            try:
                packed = self._merge_image_patch_embeddings(image_size.cpu(), marker, image_newline=torch.ones(1),
                                                            strategy="spatial_unpad")
            finally:
                self.image_newline.data = saved
            self._layouts[key] = packed[:, 0] > 0.5
        return self._layouts[key]

    def _keep(self, embeds: torch.Tensor, newline: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """The item's embedding with only the kept token rows and every newline, in packed order."""
        newline = newline.to(embeds.device)
        kept = select_kept(self, embeds[~newline][None], coords=coords.to(embeds.device))
        if kept is None:
            return embeds
        mine = torch.zeros(int((~newline).sum()), dtype=torch.bool, device=embeds.device)
        mine[kept[0].to(embeds.device)] = True
        keep = newline.clone()
        keep[~newline] = mine
        return embeds[keep]

    def _process_image_input(self, image_input):
        if isinstance(image_input, LlavaOnevisionImageEmbeddingInputs):
            raise ValueError("learnpruner prunes pixels, not precomputed image embeddings")
        full = super()._process_image_input(image_input)
        pixel_values = image_input["pixel_values"]
        crops = [int(v.shape[0]) for v in pixel_values]
        sizes = image_input.get("image_sizes")
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        if sizes is None:
            sizes = torch.tensor([[self.config.vision_config.image_size] * 2] * len(crops))
        out = []
        for embeds, c, size in zip(full, crops, sizes):
            newline = self.newline_mask(size, c)
            out.append(self._keep(embeds, newline, image_coords(newline, side, c > 1)))
        return out

    def _process_video_pixels(self, inputs):
        full = super()._process_video_pixels(inputs)
        videos = list(full) if isinstance(full, torch.Tensor) else [v[0] for v in full]
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        pooled = -(-side // 2)
        out = []
        for embeds in videos:
            newline = torch.zeros(embeds.shape[0], dtype=torch.bool)
            newline[-1] = True
            frames = (embeds.shape[0] - 1) // (pooled * pooled)
            out.append(self._keep(embeds, newline, video_coords(frames, pooled)))
        return out


GuardedLlavaOnevision = guarded(LlavaOnevisionForConditionalGeneration)  # vLLM's own, refusing a stray entry
