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
from .base import register_adapter
from .clip import clip_features
from .llava import LlavaAdapter


@register_adapter
class VideoLlavaAdapter(LlavaAdapter):
    """Shares LLaVA's text model, projector, feature layer and CLIP FLOPs; adds the video tower and items."""

    family = "video_llava"
    model_classes = ("VideoLlavaForConditionalGeneration",)
    served = ()  # vLLM has no Video-LLaVA
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

    default_frames = 8  # frames per video, as Video-LLaVA's processor samples them (training and the benchmark)

    def video_tokens(self, frames: int | None = None) -> int:
        """Visual tokens of a video of ``frames`` frames (default :attr:`default_frames`): every frame's patches and
        its [CLS] row, whatever the strategy (8 x 257 = 2056 at 224 px)."""
        vc = self.model.config.vision_config
        frames = self.default_frames if frames is None else frames
        return frames * ((vc.image_size // vc.patch_size) ** 2 + 1)

    def graph_modules(self) -> list:
        """The image and the video towers (plain CLIP ViTs)."""
        return [self.model.model.image_tower, self.model.model.video_tower]

    def vision_module(self):
        """The video tower (what the benchmark feeds; CLIP peers read its post-layernorm, the image tower's twin)."""
        return self.model.model.video_tower
