"""LLaVA-OneVision (``transformers.LlavaOnevisionForConditionalGeneration``) adapter: images and videos.

A SigLIP tower (no [CLS] token: 729 tokens per 384 px crop, feature layer -1, strategy "full"), a Qwen2 LLM with
1-D RoPE. An image is a base crop plus an AnyRes grid of up to 3x3 crops from ``config.image_grid_pinpoints``;
the model projects every crop's rows, joins the grid crops into one large grid, removes its padding
(``unpad_image``), shrinks it by bilinear interpolation when it holds more than ``anyres_max_9`` crops' worth of
tokens, and appends one ``image_newline`` after each grid row. A video's frames are pooled 2x2 (bilinear, after
the projector: 196 tokens per frame at 384 px) and one newline follows the whole video.

Where stage 1 runs: on the **projected** rows, exactly the embeddings the LLM would see, and the projector then
runs on nothing (:meth:`LlavaOnevisionAdapter.project` is the identity). Both of OneVision's reshaping steps (the
AnyRes interpolation and the video pooling) are bilinear maps applied *after* the projector, whose GELU MLP does
not commute with them: the rows the LLM sees do not exist before it. Selecting there keeps parity exact (the
model's own ``get_image_features`` / ``get_video_features`` produce them) and costs one projector pass over all
rows, a 2-layer MLP on at most ~7.5k rows, small beside the LLM. The LPM of this family reads these rows (its
input width is the LLM's hidden size). The row newlines (and a video's final newline) are *structure*, as on
LLaVA-NeXT: kept in place, never selected, outside the budget.

Items are images and videos in prompt order (by their first placeholder); a token's ``crops`` index is 0 for
an image's base crop and 1 for its high-resolution grid (the frame index for a video), and ``coords`` its place
in its crop's, grid's or frame's raster. Methods that read a [CLS] token (SigLIP has none) are refused by name.
"""

from __future__ import annotations

import torch

from ..engine.layout import STRUCTURE, VisualFeatures, grid_coords
from .base import Adapter, Served, register_adapter


@register_adapter
class LlavaOnevisionAdapter(Adapter):
    family = "llava_onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    served = (Served("llava_onevision", "LlavaOnevisionForConditionalGeneration", "llava_onevision",
                     "PrunedLlavaOnevision", "GuardedLlavaOnevision", "contiguous"),)
    has_cls = False  # SigLIP
    media = ("image", "video")
    pixel_inputs = ("pixel_values", "pixel_values_videos")
    visual_inputs = ("pixel_values", "image_sizes", "pixel_values_videos", "image_sizes_videos", "batch_num_images")
    vision_options = ("vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio")
    default_frames = 8  # frames per video in training and the benchmark (the processor samples what it is given)

    def __init__(self, model) -> None:
        super().__init__(model)
        self._layouts: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # per (crops, size, aspect): a request
        # stream holds few image sizes, and the layout depends on nothing else

    # --- parts ----------------------------------------------------------------------------------------------
    @property
    def language_model(self):
        return self.model.model.language_model

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    @property
    def video_token_id(self) -> int:
        return self.model.config.video_token_id

    def placeholders(self, input_ids: torch.Tensor) -> torch.Tensor:
        return (input_ids == self.image_token_id) | (input_ids == self.video_token_id)

    def feature_layer(self):
        return self.model.config.vision_feature_layer

    def feature_dim(self) -> int:
        """The LLM's hidden size: stage 1 reads projected rows (see the module docstring)."""
        return self.text_config.hidden_size

    def _side(self) -> int:
        vc = self.model.config.vision_config
        return vc.image_size // vc.patch_size

    def _crop_tokens(self) -> int:
        return self._side() ** 2

    def _pooled_side(self) -> int:
        return -(-self._side() // 2)  # ceil, as apply_pooling

    def num_visual_tokens(self) -> int:
        """Visual tokens of the largest image: the base crop plus the grid, capped at ``anyres_max_9``'s worth
        (``9 * 729`` grid tokens at 384 px, before interpolation rounding)."""
        cfg, side = self.model.config, self._side()
        size = cfg.vision_config.image_size
        crops = max((h // size) * (w // size) for h, w in cfg.image_grid_pinpoints)
        grid = min(crops, self._max_crops()) * side * side
        return side * side + grid

    def _max_crops(self, aspect: str | None = None) -> int:
        aspect = aspect or getattr(self.model.config, "vision_aspect_ratio", None) or "anyres_max_9"
        return int(aspect.removeprefix("anyres_max_"))

    def video_tokens(self, frames: int | None = None) -> int:
        """Visual tokens of a video of ``frames`` frames (default :attr:`default_frames`): each frame pooled 2x2
        (the final newline is structure)."""
        frames = self.default_frames if frames is None else frames
        return frames * self._pooled_side() ** 2

    def vision_module(self):
        return self.model.model.vision_tower

    def graph_modules(self) -> list:
        """The SigLIP tower (a plain ViT: static shapes, no host synchronisation)."""
        return [self.model.model.vision_tower]

    def output_class(self) -> type:
        return self.model_module_attr("LlavaOnevisionCausalLMOutputWithPast")

    # --- vision -------------------------------------------------------------------------------------------
    def _num_crops(self, image_sizes, batch_num_images) -> list[int]:
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        cfg = self.model.config
        patching = [True] * len(image_sizes) if batch_num_images is None else [
            int(n) == 1 for n in batch_num_images for _ in range(int(n))]
        return [image_size_to_num_patches(image_size=s, grid_pinpoints=cfg.image_grid_pinpoints,
                                          patch_size=cfg.vision_config.image_size) if p else 1
                for s, p in zip(image_sizes, patching)]

    def _image_layout(self, crops: int, image_size, aspect) -> tuple[torch.Tensor, torch.Tensor]:
        """One image's placeholders as the model's own ``pack_image_features`` lays them out, read off a marker
        run (zeros for tokens, 1 for the newline): ``(is_newline [L], part [n])``, ``part`` 0 for the base crop's
        tokens and 1 for the grid's."""
        key = (crops, *(int(v) for v in image_size), aspect)
        if key not in self._layouts:
            self._layouts[key] = self._marker_layout(crops, image_size, aspect)
        return self._layouts[key]

    def _marker_layout(self, crops: int, image_size, aspect) -> tuple[torch.Tensor, torch.Tensor]:
        marker = [torch.zeros(crops, self._crop_tokens(), 1)]
        packed, _ = self.model.model.pack_image_features(
            marker, torch.as_tensor(image_size).view(1, 2), image_newline=torch.ones(1),
            vision_aspect_ratio=aspect or "anyres_max_9")
        newline = packed[0][:, 0] > 0.5
        base = self._crop_tokens() if crops > 1 else int((~newline).sum())
        n = int((~newline).sum())
        part = torch.zeros(n, dtype=torch.long)
        part[base:] = 1
        return newline, part

    def encode(self, pixel_values: torch.Tensor | None = None, cls_attention: bool = False, input_ids=None,
               image_sizes=None, pixel_values_videos=None, image_sizes_videos=None, batch_num_images=None,
               vision_feature_layer=None, vision_feature_select_strategy=None, vision_aspect_ratio=None,
               **kwargs) -> VisualFeatures:
        """Images and videos as items in prompt order; rows are the model's own projected (and packed or pooled)
        embeddings with the newlines taken out as structure."""
        if cls_attention:
            raise ValueError(f"{self.family} has no [CLS] token (SigLIP)")
        cfg, inner = self.model.config, self.model.model
        layer = cfg.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = vision_feature_select_strategy or cfg.vision_feature_select_strategy
        aspect = vision_aspect_ratio or getattr(cfg, "vision_aspect_ratio", None) or "anyres_max_9"
        side = self._side()
        items = []  # (first placeholder, features, slots, crops, coords)
        if pixel_values is not None:
            if image_sizes is None:
                raise ValueError("LLaVA-OneVision needs image_sizes with pixel_values (the processor returns both)")
            packed = inner.get_image_features(pixel_values, image_sizes, vision_feature_layer=layer,
                                              vision_feature_select_strategy=strategy, vision_aspect_ratio=aspect,
                                              batch_num_images=batch_num_images, return_dict=True).pooler_output
            crops = self._num_crops(image_sizes, batch_num_images)
            lengths = [int(p.shape[0]) for p in packed]
            first = _first_placeholders(input_ids, self.image_token_id, lengths)
            for j, (rows, c, size) in enumerate(zip(packed, crops, image_sizes)):
                newline, part = self._image_layout(c, size.tolist() if torch.is_tensor(size) else size, aspect)
                newline, part = newline.to(rows.device), part.to(rows.device)
                items.append((first[j], rows[~newline], _slots(newline), part, image_coords(newline, side, c > 1)))
        if pixel_values_videos is not None:
            v, frames = pixel_values_videos.shape[:2]
            pooled = inner.get_video_features(pixel_values_videos, vision_feature_layer=layer,
                                              vision_feature_select_strategy=strategy, return_dict=True).pooler_output
            per = self._pooled_side() ** 2
            # transformers >= 5.2x appends the video's newline in get_video_features, earlier 5.x in forward: the
            # prompt holds it either way
            pooled = pooled[:, :frames * per]
            first = _first_placeholders(input_ids, self.video_token_id, [frames * per + 1] * v)
            for j in range(v):
                device = pooled.device
                newline = torch.zeros(frames * per + 1, dtype=torch.bool, device=device)
                newline[-1] = True  # one newline after the whole video
                items.append((first[j], pooled[j], _slots(newline),
                              torch.arange(frames, device=device).repeat_interleave(per),
                              video_coords(frames, self._pooled_side()).to(device)))
        items.sort(key=lambda it: it[0])
        return VisualFeatures([it[1] for it in items], [it[2] for it in items], structure=inner.image_newline,
                              crops=[it[3] for it in items], coords=[it[4] for it in items])

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The identity: stage 1 already reads projected rows (see the module docstring)."""
        return features


def image_coords(newline: torch.Tensor, side: int, gridded: bool) -> torch.Tensor:
    """``[n, 2]``: each token row of one packed image (``newline``: ``[L]``, which rows are newlines) at its place in
    its part's raster (:func:`~learnpruner.engine.layout.grid_coords`): the base crop's ``side x side`` grid, then,
    where the image has a high-resolution grid (``gridded``), that grid's rows (one per newline) and columns. The
    vLLM plugin uses it too."""
    n = int((~newline).sum())
    base = side * side if gridded else n
    coords = grid_coords(torch.arange(base, device=newline.device), side, side)
    if gridded:
        rows = int(newline[base:].sum())
        cols = (n - base) // max(rows, 1)
        coords = torch.cat([coords, grid_coords(torch.arange(n - base, device=newline.device), rows, cols)])
    return coords


def video_coords(frames: int, pooled: int) -> torch.Tensor:
    """``[frames * pooled**2, 2]``: each pooled token of a video at its place in its frame's ``pooled x pooled``
    grid (the vLLM plugin uses it too)."""
    return grid_coords(torch.arange(pooled * pooled).repeat(frames), pooled, pooled)


def _slots(newline: torch.Tensor) -> torch.Tensor:
    """``[L]``: per placeholder its token index, or :data:`STRUCTURE` at a newline."""
    slots = torch.full(newline.shape, STRUCTURE, dtype=torch.long, device=newline.device)
    slots[~newline] = torch.arange(int((~newline).sum()), device=newline.device)
    return slots


def _first_placeholders(input_ids, token: int, lengths: list[int]) -> list[int]:
    """Flat prompt position of each item's first placeholder (items of ``lengths`` placeholders, in order)."""
    if input_ids is None:
        return list(range(len(lengths)))
    positions = (input_ids.flatten() == token).nonzero()[:, 0]
    out, start = [], 0
    for j, n in enumerate(lengths):
        out.append(int(positions[start]) if start < positions.numel() else input_ids.numel() + j)
        start += n
    return out
