"""LLaVA-NeXT (``transformers.LlavaNextForConditionalGeneration``, AnyRes) adapter.

Each image is a base crop plus a grid of high-resolution crops chosen from
``config.image_grid_pinpoints`` by its aspect ratio; the CLIP tower encodes every crop (feature layer
-2, [CLS] dropped under strategy "default"). ``pack_image_features`` lays out an image's placeholders:
the base crop's patches, then the grid crops joined into one large grid with the padding rows or
columns removed (``unpad_image``), in raster order with one ``image_newline`` embedding after each grid
row. The exact (crop, patch) of every placeholder is read by running the model's own
``pack_image_features`` on an index tensor in place of the features.

Token universe and budgets: an image's visual tokens are its CLIP-backed placeholders (base crop plus
the unpadded grid: 2880 for a 672x672 image at 336 px, the papers' "2880"). The row newlines are
*structure*: kept in place (they mark the grid's rows), never selected and outside the budget;
``learnpruner.stats(model).images[i].structure`` counts them. Stage 1 selects among all crops' rows
of an image at once (one ranking per image, not a fixed share per crop); the projector then runs on
the kept rows only. [CLS]-based rules read, for each token, the [CLS] attention of its own crop.
"""

from __future__ import annotations

import torch

from ..engine.layout import STRUCTURE, VisualFeatures
from .base import Served, register_adapter
from .llava import LlavaAdapter


@register_adapter
class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"
    model_classes = ("LlavaNextForConditionalGeneration",)
    served = (Served("llava_next", "LlavaNextForConditionalGeneration", "llava_next", "PrunedLlavaNext",
                     "GuardedLlavaNext", "contiguous"),)
    uniform_token_count = False  # base crop plus a grid chosen by the aspect ratio
    visual_inputs = ("pixel_values", "image_sizes")

    def _crop_tokens(self) -> int:
        vc = self.model.config.vision_config
        return (vc.image_size // vc.patch_size) ** 2 + (self.model.config.vision_feature_select_strategy == "full")

    def num_visual_tokens(self) -> int:
        """Visual tokens of the largest image the grid pinpoints allow (base crop plus a full grid)."""
        size = self.model.config.vision_config.image_size
        crops = max((h // size) * (w // size) for h, w in self.model.config.image_grid_pinpoints)
        return (1 + crops) * self._crop_tokens()

    def _num_crops(self, image_sizes) -> list[int]:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = self.model.config
        return [image_size_to_num_patches(image_size=s, grid_pinpoints=cfg.image_grid_pinpoints,
                                          patch_size=cfg.vision_config.image_size) for s in image_sizes]

    def packed_order(self, num_crops: int, crop_tokens: int, image_size) -> torch.Tensor:
        """``[L]``: for each placeholder of one image, ``crop * crop_tokens + patch``, or -1 for a newline."""
        cfg = self.model.config
        idx = torch.arange(num_crops * crop_tokens, dtype=torch.float32).view(num_crops, crop_tokens, 1)
        sizes = torch.as_tensor(image_size).view(1, 2)
        packed, _ = self.model.model.pack_image_features(
            [idx], sizes, cfg.vision_feature_select_strategy, image_newline=torch.tensor([-1.0])
        )
        return packed[0][:, 0].round().long()

    def encode(self, pixel_values: torch.Tensor, cls_attention: bool = False, image_sizes=None,
               **kwargs) -> VisualFeatures:
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes with pixel_values (the processor returns both)")
        crops = self._num_crops(image_sizes)
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([pv[:c] for pv, c in zip(pixel_values, crops)])
        elif pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must have 4 or 5 dimensions, got shape {tuple(pixel_values.shape)}")
        out = self.vision_features(pixel_values, cls_attention, **kwargs)
        feats, extras = out if cls_attention else (out, {})
        p, device = feats.shape[1], feats.device
        features, slots, crop_of, patch_of = [], [], [], []
        per_image_extras: dict[str, list[torch.Tensor]] = {k: [] for k in extras}
        start = 0
        for c, size in zip(crops, image_sizes):
            order = self.packed_order(c, p, size.tolist() if isinstance(size, torch.Tensor) else size).to(device)
            token = order >= 0
            flat = order[token]
            features.append(feats[start:start + c].reshape(c * p, -1)[flat])
            slot = torch.full_like(order, STRUCTURE)
            slot[token] = torch.arange(flat.shape[0], device=device)
            slots.append(slot)
            crop_of.append(flat // p)
            patch_of.append(flat % p)
            for k, v in extras.items():
                per_image_extras[k].append(v[start:start + c].reshape(c * p, *v.shape[2:])[flat])
            start += c
        grid = self.crop_coords(p, device)
        return VisualFeatures(features, slots, structure=self.model.model.image_newline,
                              extras=per_image_extras, crops=crop_of, patches=patch_of,
                              coords=[grid[q] for q in patch_of])

    def output_class(self) -> type:
        return self.model_module_attr("LlavaNextCausalLMOutputWithPast")
