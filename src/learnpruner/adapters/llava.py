"""LLaVA-1.5 (``transformers.LlavaForConditionalGeneration``) adapter.

Features come from the CLIP vision tower's hidden states at ``config.vision_feature_layer``
(-2 for LLaVA-1.5), with the [CLS] row dropped under ``vision_feature_select_strategy="default"``
and kept under ``"full"``; the projector is ``model.model.multi_modal_projector``.
"""

from __future__ import annotations

import torch

from ..engine.layout import VisualFeatures
from .base import Adapter, ItemGeometry
from .clip import clip_features, crop_coords


class LlavaAdapter(Adapter):
    family = "llava"
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

    # --- benchmark helpers ------------------------------------------------------------------------
    def vision_module(self):
        return self.model.model.vision_tower

    def item_geometry(self, image_size=None) -> ItemGeometry:
        """Every image is resized to the tower's square input: one crop, :meth:`num_visual_tokens` tokens."""
        size = self.model.config.vision_config.image_size
        return ItemGeometry(size=(size, size), crops=1, tokens=self.num_visual_tokens())

    def random_images(self, batch: int, generator: torch.Generator | None = None, image_size=None) -> dict:
        vc = self.model.config.vision_config
        shape = (batch, getattr(vc, "num_channels", 3), vc.image_size, vc.image_size)
        return {"pixel_values": torch.randn(shape, generator=generator)}

    def vision_flops(self, image: ItemGeometry | None = None) -> int:
        """CLIP: patch conv + every encoder layer (HF runs them all, whatever the feature layer) on each crop;
        q/k/v/o and the 2-matrix MLP on ``patches + 1`` positions, attention scores and values full."""
        vc = self.model.config.vision_config
        crops = (image or self.item_geometry()).crops
        d, inter = vc.hidden_size, vc.intermediate_size
        patches = (vc.image_size // vc.patch_size) ** 2
        s = patches + 1  # + [CLS]
        conv = 2 * patches * getattr(vc, "num_channels", 3) * vc.patch_size**2 * d
        layer = 2 * s * (4 * d * d + 2 * d * inter) + 4 * s * s * d
        return crops * (conv + vc.num_hidden_layers * layer)

    def projector_flops(self, rows: int) -> int:
        """Two linear layers: feature width (times the feature layers) -> text hidden -> text hidden."""
        h = self.text_config.hidden_size
        return 2 * rows * (self.feature_dim() * h + h * h)
