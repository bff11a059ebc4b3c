"""LLaVA-1.5 (``transformers.LlavaForConditionalGeneration``) adapter.

Features come from the CLIP vision tower's hidden states at ``config.vision_feature_layer``
(-2 for LLaVA-1.5), with the [CLS] row dropped under ``vision_feature_select_strategy="default"``
and kept under ``"full"``; the projector is ``model.model.multi_modal_projector``.
"""

from __future__ import annotations

import sys

import torch

from .base import Adapter


class LlavaAdapter(Adapter):
    family = "llava"
    model_classes = ("LlavaForConditionalGeneration",)

    @property
    def language_model(self):
        return self.model.model.language_model

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    def feature_layer(self):
        return self.model.config.vision_feature_layer

    def feature_dim(self) -> int:
        layer = self.feature_layer()
        width = self.model.config.vision_config.hidden_size
        return width if isinstance(layer, int) else width * len(layer)

    def num_visual_tokens(self) -> int:
        vc = self.model.config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        return n + (1 if self.model.config.vision_feature_select_strategy == "full" else 0)

    def vision_features(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        cfg = self.model.config
        layer = kwargs.get("vision_feature_layer") or cfg.vision_feature_layer
        strategy = kwargs.get("vision_feature_select_strategy") or cfg.vision_feature_select_strategy
        tower = self.model.model.vision_tower
        out = tower(pixel_values, output_hidden_states=True, return_dict=True)
        layers = [layer] if isinstance(layer, int) else list(layer)
        feats = [out.hidden_states[i] for i in layers]
        if strategy == "default":
            feats = [f[:, 1:] for f in feats]
        return feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(features)

    def output_class(self) -> type:
        return sys.modules[type(self.model).__module__].LlavaCausalLMOutputWithPast
