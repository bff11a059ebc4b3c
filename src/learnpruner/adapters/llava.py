"""LLaVA-1.5 (``transformers.LlavaForConditionalGeneration``) adapter.

Features come from the CLIP vision tower's hidden states at ``config.vision_feature_layer``
(-2 for LLaVA-1.5), with the [CLS] row dropped under ``vision_feature_select_strategy="default"``
and kept under ``"full"``; the projector is ``model.model.multi_modal_projector``.
"""

from __future__ import annotations

import torch

from ..engine.layout import VisualFeatures
from .base import Adapter, Served, register_adapter
from .clip import clip_features, crop_coords


@register_adapter
class LlavaAdapter(Adapter):
    family = "llava"
    served = (Served("llava", "LlavaForConditionalGeneration", "llava", "PrunedLlava", "GuardedLlava", "contiguous"),)
    vision_options = ("vision_feature_layer", "vision_feature_select_strategy")
    model_classes = ("LlavaForConditionalGeneration",)
    uniform_token_count = True

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

    def cls_row_in_features(self) -> bool:
        return self.model.config.vision_feature_select_strategy == "full"

    def num_visual_tokens(self) -> int:
        vc = self.model.config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        return n + (1 if self.model.config.vision_feature_select_strategy == "full" else 0)

    def vision_features(self, pixel_values: torch.Tensor, cls_attention: bool = False, **kwargs):
        """Features at the feature layer; with ``cls_attention=True`` also ``{"cls", "keys"}`` (see
        :func:`~learnpruner.adapters.clip.clip_features`)."""
        cfg = self.model.config
        layer = kwargs.get("vision_feature_layer")
        layer = cfg.vision_feature_layer if layer is None else layer
        strategy = kwargs.get("vision_feature_select_strategy") or cfg.vision_feature_select_strategy
        return clip_features(self.model.model.vision_tower, pixel_values, layer, strategy, cls_attention)

    def encode(self, pixel_values: torch.Tensor, cls_attention: bool = False, **kwargs) -> VisualFeatures:
        """One image per ``pixel_values`` row, ``n`` tokens each, filling ``n`` placeholders in order."""
        out = self.vision_features(pixel_values, cls_attention, **kwargs)
        feats, extras = out if cls_attention else (out, {})
        slots = torch.arange(feats.shape[1], device=feats.device)
        coords = self.crop_coords(feats.shape[1], feats.device)
        return VisualFeatures(feats, [slots] * feats.shape[0], extras=extras, coords=[coords] * feats.shape[0])

    def crop_coords(self, n: int, device=None) -> torch.Tensor:
        """``[n, 2]``: each of a crop's ``n`` feature rows' place in the patch grid (:func:`.clip.crop_coords`)."""
        return crop_coords(self.model.config.vision_config, n, device)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(features)

    def output_class(self) -> type:
        return self.model_module_attr("LlavaCausalLMOutputWithPast")

    def graph_modules(self) -> list:
        """The CLIP tower (a plain ViT: static shapes, no host synchronisation)."""
        return [self.model.model.vision_tower]

    def vision_module(self):
        return self.model.model.vision_tower
