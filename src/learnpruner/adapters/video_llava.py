"""Video-LLaVA (``transformers.VideoLlavaForConditionalGeneration``) adapter: images and videos.

Images (``pixel_values_images``) go through the image tower: CLIP feature layer -2, [CLS] dropped under
strategy "default" (256 tokens at 224 px). Videos (``pixel_values_videos``, 8 frames) go through the
video tower, and transformers keeps every frame's [CLS] row (8 x 257 = 2056 tokens). Both share the
projector. Each image and each video is ONE item of the visual layout, in prompt order; a video's
frames are its crops (``ItemStats.crops``), so budgets (``tokens=`` per item, ``ratio=`` of the item's
own count) and ``stats`` are per video.

Stage 1 across frames: by default a stage-1 rule ranks all of a video's tokens at once, so the budget
goes to the frames that carry content and a static background repeated in eight frames is not kept
eight times over (the LPM's 10% diversity fill also spreads the kept set). ``stage1_unit="crop"`` (an
``apply`` option) keeps a fixed share per frame instead. [CLS]-based rules read, for every token, the
[CLS] attention of its own frame (a frame's [CLS] row itself is a token of the video, as transformers
feeds it to the LLM).
"""

from __future__ import annotations

import torch

from ..engine.layout import VisualFeatures
from .base import ItemGeometry
from .clip import clip_features
from .llava import LlavaAdapter


class VideoLlavaAdapter(LlavaAdapter):
    """Shares LLaVA's text model, projector, feature layer and CLIP FLOPs; adds the video tower and items."""

    family = "video_llava"
    model_classes = ("VideoLlavaForConditionalGeneration",)
    uniform_token_count = False  # images have 256 tokens, videos frames x 257
    media = ("image", "video")
    pixel_inputs = ("pixel_values_images", "pixel_values_videos")
    visual_inputs = ("pixel_values_images", "pixel_values_videos")
    vision_options = ("vision_feature_layer", "vision_feature_select_strategy")

    def placeholders(self, input_ids: torch.Tensor) -> torch.Tensor:
        cfg = self.model.config
        return (input_ids == cfg.image_token_id) | (input_ids == cfg.video_token_id)

    def _features(self, tower, pixel_values, strategy: str, cls_attention: bool, layer):
        out = clip_features(tower, pixel_values, layer, strategy, cls_attention)
        return out if cls_attention else (out, {})

    def encode(self, pixel_values=None, cls_attention: bool = False, input_ids=None, pixel_values_images=None,
               pixel_values_videos=None, **kwargs) -> VisualFeatures:
        """Images and videos as items in prompt order (each by the position of its first placeholder)."""
        cfg = self.model.config
        layer = kwargs.get("vision_feature_layer")
        layer = cfg.vision_feature_layer if layer is None else layer
        strategy = kwargs.get("vision_feature_select_strategy") or cfg.vision_feature_select_strategy
        items = []  # (first placeholder, features [n, d], extras, crops, patches)
        if pixel_values_images is not None:
            feats, extras = self._features(self.model.model.image_tower, pixel_values_images, strategy,
                                           cls_attention, layer)
            n = feats.shape[1]
            first = self._first_placeholders(input_ids, cfg.image_token_id, n, feats.shape[0])
            for j in range(feats.shape[0]):
                crops = torch.zeros(n, dtype=torch.long, device=feats.device)
                items.append((first[j], feats[j], {k: v[j] for k, v in extras.items()}, crops,
                              torch.arange(n, device=feats.device)))
        if pixel_values_videos is not None:
            v, f = pixel_values_videos.shape[:2]
            feats, extras = self._features(self.model.model.video_tower, pixel_values_videos.flatten(0, 1), "full",
                                           cls_attention, layer)
            per = feats.shape[1]
            first = self._first_placeholders(input_ids, cfg.video_token_id, f * per, v)
            for j in range(v):
                rows = slice(j * f, (j + 1) * f)
                crops = torch.arange(f, device=feats.device).repeat_interleave(per)
                items.append((first[j], feats[rows].flatten(0, 1),
                              {k: x[rows].flatten(0, 1) for k, x in extras.items()}, crops,
                              torch.arange(per, device=feats.device).repeat(f)))
        items.sort(key=lambda it: it[0])
        features = [it[1] for it in items]
        return VisualFeatures(
            features, [torch.arange(x.shape[0], device=x.device) for x in features],
            extras={k: [it[2][k] for it in items] for k in (items[0][2] if items else {})},
            crops=[it[3] for it in items], patches=[it[4] for it in items],
            coords=[self.crop_coords(int(it[4].max()) + 1, it[4].device)[it[4]] for it in items],
        )

    @staticmethod
    def _first_placeholders(input_ids, token: int, per_item: int, count: int) -> list[int]:
        """Flat prompt position of the first placeholder of each of ``count`` items of ``per_item`` tokens."""
        if input_ids is None:
            return list(range(count))
        positions = (input_ids.flatten() == token).nonzero()[:, 0]
        return [int(positions[j * per_item]) if j * per_item < positions.numel() else input_ids.numel() + j
                for j in range(count)]

    def output_class(self) -> type:
        return self.model_module_attr("VideoLlavaCausalLMOutputWithPast")

    # --- benchmark helpers (learnpruner.bench): the bench's item is one video -------------------------
    bench_kind = "video"  # what each bench sample holds (learnpruner.bench reads it)
    bench_kinds = ("video",)
    bench_frames = 8  # frames per video, as Video-LLaVA's processor samples them

    @property
    def bench_token_id(self) -> int:
        """The placeholder id of a bench item: the video token."""
        return self.model.config.video_token_id

    def video_tokens(self, frames: int | None = None) -> int:
        """Visual tokens of a video of ``frames`` frames (default :attr:`bench_frames`): every frame's patches and
        its [CLS] row, whatever the strategy (8 x 257 = 2056 at 224 px)."""
        vc = self.model.config.vision_config
        frames = self.bench_frames if frames is None else frames
        return frames * ((vc.image_size // vc.patch_size) ** 2 + 1)

    def graph_modules(self) -> list:
        """The image and the video towers (plain CLIP ViTs)."""
        return [self.model.model.image_tower, self.model.model.video_tower]

    def vision_module(self):
        """The video tower (the bench feeds videos only)."""
        return self.model.model.video_tower

    def item_geometry(self, image_size=None) -> ItemGeometry:
        """One video of :attr:`bench_frames` frames, each resized to the tower's square input and encoded as one
        crop: 8 crops, 2056 tokens at 224 px (``image_size`` is ignored: every frame enters at that size)."""
        size = self.model.config.vision_config.image_size
        return ItemGeometry(size=(size, size), crops=self.bench_frames, tokens=self.video_tokens())

    def random_images(self, batch: int, generator: torch.Generator | None = None, image_size=None) -> dict:
        """``pixel_values_videos`` ``[batch, frames, C, S, S]``: one random video per sample, as the processor
        lays them out."""
        vc = self.model.config.vision_config
        shape = (batch, self.bench_frames, getattr(vc, "num_channels", 3), vc.image_size, vc.image_size)
        return {"pixel_values_videos": torch.randn(shape, generator=generator)}

    def bench_note(self, image) -> str:
        h, w = image.size
        return (f"one {image.crops}-frame video ({h}x{w} frames): {image.tokens} visual tokens "
                f"(each frame's [CLS] row included)")
