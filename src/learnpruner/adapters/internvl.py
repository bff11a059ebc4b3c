"""InternVL3 (``transformers.InternVLForConditionalGeneration``) adapter.

InternViT encodes 448 px tiles (1024 patches of 14 px plus a class token, which the model drops: strategy
"default"); a pixel shuffle folds each 2x2 block of patches into one token of 4x the width (256 tokens per tile),
and the projector (LayerNorm + 2-layer MLP, per token) maps them into the Qwen2.5 LLM (1-D RoPE). An image is its
dynamic tiles (up to 12, chosen by its aspect ratio) plus a thumbnail tile; the processor writes
``<img>`` + 256 placeholders per tile + ``</img>``, so the tiles of one image are one run of placeholders in the
prompt, and ``pixel_values`` holds every tile of every image of the batch in prompt order.

Where stage 1 runs: on the pixel-shuffled rows, the projector's input (read by stopping the model's own
``get_image_features`` at the projector, so nothing of InternVL's feature path is re-implemented). The projector
works on each token alone, so projecting only the kept rows equals projecting all of them and gathering: the
projector then runs on the kept rows only. Each image is one item: stage 1 ranks all its tiles' tokens at once
(a tile is a crop, ``stats(model).images[i].crops``); ``<img>``/``</img>`` are plain text. InternViT's class token
never reaches the model's features, so methods that read a [CLS] attention are refused by name.
"""

from __future__ import annotations

import torch

from ..engine.layout import VisualFeatures, grid_coords
from .base import Adapter, Served, register_adapter


class _Captured(Exception):
    """Stops a feature path at the projector once its input is captured."""


def projector_input(projector: torch.nn.Module, run) -> torch.Tensor:
    """The input ``projector`` receives when ``run()`` (a model's own feature path) calls it; the path stops there,
    so the projector does not run. The vLLM plugin uses it too."""
    captured = {}

    def stop(module, args):
        captured["rows"] = args[0]
        raise _Captured

    handle = projector.register_forward_pre_hook(stop)
    try:
        run()
    except _Captured:
        pass
    finally:
        handle.remove()
    if "rows" not in captured:
        raise RuntimeError(f"the feature path never reached {type(projector).__name__}")
    return captured["rows"]


@register_adapter
class InternVLAdapter(Adapter):
    family = "internvl"
    model_classes = ("InternVLForConditionalGeneration",)
    served = (Served("internvl", "InternVLForConditionalGeneration", "internvl", "PrunedInternVL", "GuardedInternVL",
                     "contiguous"),)
    has_cls = False  # the class token is dropped before the pixel shuffle
    vision_options = ("vision_feature_layer", "vision_feature_select_strategy")

    @property
    def language_model(self):
        return self.model.model.language_model

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    def feature_layer(self):
        return self.model.config.vision_feature_layer

    def _tile_side(self) -> int:
        """Tokens per tile side after the pixel shuffle (16 at 448 px)."""
        vc = self.model.config.vision_config
        size = vc.image_size[0] if isinstance(vc.image_size, (list, tuple)) else vc.image_size
        patch = vc.patch_size[0] if isinstance(vc.patch_size, (list, tuple)) else vc.patch_size
        return int(size // patch * self.model.config.downsample_ratio)

    def tile_tokens(self) -> int:
        """Visual tokens per tile (256 at 448 px)."""
        return self._tile_side() ** 2

    def feature_dim(self) -> int:
        """The pixel-shuffled width: the tower's width times ``1 / downsample_ratio ** 2`` (4096 for InternViT-300M)."""
        return self.model.config.vision_config.hidden_size * int(1 / self.model.config.downsample_ratio) ** 2

    def num_visual_tokens(self) -> int:
        """Visual tokens of the largest image: 12 tiles plus the thumbnail (the processor's default max_patches)."""
        return 13 * self.tile_tokens()

    def vision_module(self):
        return self.model.model.vision_tower

    def graph_modules(self) -> list:
        """InternViT (a plain ViT: static shapes, no host synchronisation)."""
        return [self.model.model.vision_tower]

    def output_class(self) -> type:
        return self.model_module_attr("InternVLCausalLMOutputWithPast")

    def tile_features(self, pixel_values: torch.Tensor, vision_feature_layer=None,
                      vision_feature_select_strategy=None) -> torch.Tensor:
        """``[tiles, 256, feature_dim]``: the projector's input, from the model's own ``get_image_features``."""
        cfg = self.model.config
        layer = cfg.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = vision_feature_select_strategy or cfg.vision_feature_select_strategy
        return projector_input(self.model.model.multi_modal_projector, lambda: self.model.model.get_image_features(
            pixel_values, vision_feature_layer=layer, vision_feature_select_strategy=strategy))

    def encode(self, pixel_values: torch.Tensor, cls_attention: bool = False, input_ids=None,
               vision_feature_layer=None, vision_feature_select_strategy=None, **kwargs) -> VisualFeatures:
        """Each image (one run of placeholders in the prompt: its tiles, 256 tokens each) is one item, its tiles
        its crops, in prompt order."""
        if cls_attention:
            raise ValueError(f"{self.family} has no [CLS] token in its features (InternViT's is dropped)")
        tiles = self.tile_features(pixel_values, vision_feature_layer, vision_feature_select_strategy)
        per = tiles.shape[1]
        counts = self.tiles_per_image(input_ids, tiles.shape[0], per)
        features, crops, coords, start = [], [], [], 0
        side = self._tile_side()
        for c in counts:
            features.append(tiles[start:start + c].reshape(c * per, -1))
            crops.append(torch.arange(c, device=tiles.device).repeat_interleave(per))
            coords.append(grid_coords(torch.arange(per, device=tiles.device), side, side).repeat(c, 1))
            start += c
        return VisualFeatures(features, [torch.arange(f.shape[0], device=f.device) for f in features], crops=crops,
                              patches=[torch.arange(per, device=tiles.device).repeat(c) for c in counts],
                              coords=coords)

    def tiles_per_image(self, input_ids: torch.Tensor | None, tiles: int, per: int) -> list[int]:
        """Tiles of each image: the runs of placeholders in the prompt (row by row), each ``per`` tokens a tile;
        without ``input_ids``, every tile is an image of its own."""
        if input_ids is None:
            return [1] * tiles
        counts = []
        for row in (input_ids == self.image_token_id):
            flat = row.to(torch.int8)
            edges = torch.diff(torch.cat([flat.new_zeros(1), flat, flat.new_zeros(1)]))
            starts, ends = (edges == 1).nonzero()[:, 0], (edges == -1).nonzero()[:, 0]
            for s, e in zip(starts.tolist(), ends.tolist()):
                if (e - s) % per:
                    raise ValueError(f"a run of {e - s} image placeholders is not a whole number of {per}-token "
                                     "tiles: the prompt and pixel_values disagree")
                counts.append((e - s) // per)
        if sum(counts) != tiles:
            raise ValueError(f"the prompt holds placeholders for {sum(counts)} tiles, pixel_values {tiles}")
        return counts

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(features)
