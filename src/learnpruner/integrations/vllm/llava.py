"""LLaVA-1.5 in vLLM with learnpruner's stage 1 (vLLM's ``LlavaForConditionalGeneration``, subclassed).

Two places change, nothing else: the processing info reports each image's kept count, so vLLM schedules that
many placeholders (and sizes its encoder cache for it), and ``_process_image_input`` runs the stage-1 rule on
the CLIP features at the feature layer and projects the kept rows only. The kept tokens fill the placeholders
in their original order; vLLM numbers their positions contiguously (``positions="contiguous"`` in the
transformers engine). Weights saved by transformers 5.x (``vision_tower.embeddings.*``, no ``vision_model``
level) load as well as the older layout.
"""

from __future__ import annotations

import re

import torch
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImageEmbeddingInputs,
    LlavaProcessingInfo,
    _build_llava_or_pixtral_hf_processor,
)
from vllm.model_executor.models.utils import WeightsMapper
from vllm.multimodal import MULTIMODAL_REGISTRY

from ...adapters.clip import crop_coords
from .stage1 import attach, guarded, select_kept, spec_of

FAMILY = "llava"  # the LPM family (as learnpruner.adapters names it)
ARCHITECTURE = "LearnPrunerLlavaForConditionalGeneration"


class PrunedLlavaProcessingInfo(LlavaProcessingInfo):
    """Each image's placeholders: the tokens it keeps."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return spec_of(self.get_hf_config(), FAMILY).kept(n)


# transformers 5 saves the CLIP tower without its ``vision_model`` level; vLLM 0.32's loaders expect it
CLIP_WEIGHT_NAMES = WeightsMapper(
    orig_to_new_regex={re.compile(r"^((?:model\.)?vision_tower\.)(?!vision_model\.)"): r"\1vision_model."})


def stage1_for(model, vllm_config, family: str) -> None:
    """Give a vLLM LLaVA-like ``model`` its checked spec (``model.learnpruner``) and stage-1 runner."""
    config = vllm_config.model_config.hf_config
    layer = config.vision_feature_layer
    width = config.vision_config.hidden_size * (1 if isinstance(layer, int) else len(layer))
    attach(model, vllm_config, family, width, layer, model.multi_modal_projector)


def select_rows(model, features: torch.Tensor) -> torch.Tensor:
    """``[g, k, d]``: the rows of ``features`` (``[g, n, d]``, one image each) that stage 1 keeps."""
    kept = select_kept(model, features, coords=crop_coords(model.config.vision_config, features.shape[1]))
    if kept is None:
        return features
    return features.gather(1, kept.to(features.device)[..., None].expand(-1, -1, features.shape[-1]))


@MULTIMODAL_REGISTRY.register_processor(_build_llava_or_pixtral_hf_processor, info=PrunedLlavaProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class PrunedLlava(LlavaForConditionalGeneration):
    """vLLM's LLaVA with learnpruner's stage 1 between the vision tower and the projector."""

    hf_to_vllm_mapper = LlavaForConditionalGeneration.hf_to_vllm_mapper | CLIP_WEIGHT_NAMES

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        stage1_for(self, vllm_config, FAMILY)

    def _process_image_input(self, image_input):
        if isinstance(image_input, LlavaImageEmbeddingInputs):
            raise ValueError("learnpruner prunes pixels, not precomputed image embeddings")
        features = self._process_image_pixels(image_input)
        if not isinstance(features, torch.Tensor):  # ragged images (Pixtral towers): not a LLaVA-1.5 model
            raise ValueError(f"{ARCHITECTURE} runs CLIP/SigLIP LLaVA-1.5 models")
        return self.multi_modal_projector(select_rows(self, features))


GuardedLlava = guarded(LlavaForConditionalGeneration)  # vLLM's own class, refusing a stray learnpruner entry
