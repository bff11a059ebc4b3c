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

from .stage1 import CONFIG_KEY, Stage1Runner, Stage1Spec

FAMILY = "llava"  # the LPM family (as learnpruner.adapters names it)
ARCHITECTURE = "LearnPrunerLlavaForConditionalGeneration"


def _spec(config) -> Stage1Spec:
    spec = Stage1Spec.from_config(getattr(config, CONFIG_KEY, None))
    if spec is None:
        raise ValueError(f"{ARCHITECTURE} needs hf_overrides[{CONFIG_KEY!r}] (learnpruner.integrations.vllm."
                         "overrides builds it)")
    return spec


class PrunedLlavaProcessingInfo(LlavaProcessingInfo):
    """Each image's placeholders: the tokens it keeps."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return _spec(self.get_hf_config()).kept(n)


@MULTIMODAL_REGISTRY.register_processor(_build_llava_or_pixtral_hf_processor, info=PrunedLlavaProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class PrunedLlava(LlavaForConditionalGeneration):
    """vLLM's LLaVA with learnpruner's stage 1 between the vision tower and the projector."""

    hf_to_vllm_mapper = LlavaForConditionalGeneration.hf_to_vllm_mapper | WeightsMapper(
        orig_to_new_regex={re.compile(r"^((?:model\.)?vision_tower\.)(?!vision_model\.)"): r"\1vision_model."})

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = vllm_config.model_config.hf_config
        self.learnpruner = _spec(config)
        layer = config.vision_feature_layer
        width = config.vision_config.hidden_size * (1 if isinstance(layer, int) else len(layer))
        lpm = self.learnpruner.load_lpm(vllm_config.model_config.model, FAMILY, width, layer)
        self._stage1 = Stage1Runner(self.learnpruner, lpm, self.multi_modal_projector)
        self.__dict__["_lpm"] = lpm  # not a submodule: vLLM's weight loading and checks never see it

    def _process_image_input(self, image_input):
        if isinstance(image_input, LlavaImageEmbeddingInputs):
            raise ValueError("learnpruner prunes pixels, not precomputed image embeddings")
        features = self._process_image_pixels(image_input)
        if not isinstance(features, torch.Tensor):  # ragged images (Pixtral towers): not a LLaVA-1.5 model
            raise ValueError(f"{ARCHITECTURE} runs CLIP/SigLIP LLaVA-1.5 models")
        if self._lpm is not None:
            self._lpm.to(features.device, features.dtype)
        kept = self._stage1.select(features)
        if kept is not None:
            features = features.gather(1, kept.to(features.device)[..., None].expand(-1, -1, features.shape[-1]))
        return self.multi_modal_projector(features)
