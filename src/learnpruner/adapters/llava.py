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

    def vision_features(self, pixel_values: torch.Tensor, cls_attention: bool = False, **kwargs):
        """Features at the feature layer; with ``cls_attention=True`` also ``{"cls", "keys"}``.

        ``cls`` (``[num_images, n]``) is the [CLS] attention of the encoder layer that produced the (last)
        feature layer, mean over heads, computed from that layer's own q/k projections during the same
        forward (so SDPA works); ``keys`` (``[num_images, n, head_dim]``) are that layer's keys, mean over
        heads. Under strategy "default" the [CLS] row itself is left out, under "full" it is kept.
        """
        cfg = self.model.config
        layer = kwargs.get("vision_feature_layer")
        layer = cfg.vision_feature_layer if layer is None else layer
        strategy = kwargs.get("vision_feature_select_strategy") or cfg.vision_feature_select_strategy
        tower = self.model.model.vision_tower
        layers = [layer] if isinstance(layer, int) else list(layer)
        captured, handles = {}, []
        if cls_attention:
            encoder_layers = getattr(tower, "vision_model", tower).encoder.layers
            last = layers[-1]
            idx = (len(encoder_layers) + 1 + last if last < 0 else last) - 1
            if idx < 0:
                raise ValueError("[CLS] attention needs a vision feature layer after the embeddings")
            attn = encoder_layers[idx].self_attn
            handles = [
                attn.q_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("q", o[:, :1])),
                attn.k_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("k", o)),
            ]
        try:
            out = tower(pixel_values, output_hidden_states=True, return_dict=True)
        finally:
            for h in handles:
                h.remove()
        feats = [out.hidden_states[i] for i in layers]
        if strategy == "default":
            feats = [f[:, 1:] for f in feats]
        feats = feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)
        if not cls_attention:
            return feats
        b, s = captured["k"].shape[:2]
        heads, hd = attn.num_heads, attn.head_dim
        q = captured["q"].view(b, 1, heads, hd).transpose(1, 2).float()
        k = captured["k"].view(b, s, heads, hd).transpose(1, 2).float()
        probs = torch.softmax((q @ k.transpose(-1, -2)) * attn.scale, dim=-1).mean(dim=1)[:, 0]  # [b, s]
        keys = k.mean(dim=1)  # [b, s, hd]: the layer's keys, mean over heads (VisionZip's merge metric)
        drop = 1 if strategy == "default" else 0
        return feats, {"cls": probs[:, drop:], "keys": keys[:, drop:]}

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(features)

    def output_class(self) -> type:
        return sys.modules[type(self.model).__module__].LlavaCausalLMOutputWithPast
