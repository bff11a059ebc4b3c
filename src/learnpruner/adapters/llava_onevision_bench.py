"""The benchmark's view of LLaVA-OneVision: its architectures (random weights; nothing downloaded), one bench item's
geometry (an image at the largest AnyRes grid, capped by ``anyres_max_9``; or an 8-frame video), its random inputs
and the analytic FLOPs of the SigLIP tower and the projector (:class:`~learnpruner.bench.geometry.BenchFamily`).

The projector runs on every row of every crop or frame *before* stage 1 (stage 1 reads projected rows: see
:mod:`.llava_onevision`), so its FLOPs do not shrink with the budget: they are counted with the tower in
``vision`` and ``projector`` is 0. The bilinear interpolation and pooling are not counted (no multiply-adds of
weights; ``FlopCounterMode`` counts none either).
"""

from __future__ import annotations

import torch

from ..bench.geometry import BenchFamily, ItemGeometry
from .llava_bench import largest_pinpoint

__all__ = ["ONEVISION_ARCHS", "ONEVISION_PINPOINTS", "LlavaOnevisionBench"]

# llava-hf/llava-onevision-qwen2-*-ov-hf: every grid of 384 px crops from 1x1 to 6x6
ONEVISION_PINPOINTS = [[384 * h, 384 * w] for h in range(1, 7) for w in range(1, 7)]
BENCH_FRAMES = 8


def _siglip(hidden, layers, heads, inter, image_size=384, patch=14):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                              num_attention_heads=heads, image_size=image_size, patch_size=patch,
                              vision_use_head=False, layer_norm_eps=1e-6)


def _qwen2(hidden, layers, heads, kv_heads, inter, vocab=152128):
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, intermediate_size=inter, vocab_size=vocab,
                       max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False)


def _onevision(vision, text, image_token=151646, video_token=151647, pinpoints=ONEVISION_PINPOINTS):
    from transformers import LlavaOnevisionConfig

    return LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_id=image_token,
                                video_token_id=video_token, vision_feature_layer=-1,
                                vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
                                image_grid_pinpoints=pinpoints, projector_hidden_act="gelu")


ONEVISION_ARCHS = {
    # llava-hf/llava-onevision-qwen2-7b-ov-hf's dimensions: SigLIP-so400m at 384 px (26 encoder layers, as the HF
    # checkpoint keeps them; no pooling head), Qwen2-7B. A 2304x2304 image is 1 + 36 crops; its 162x162 grid is
    # interpolated to 81x81 (anyres_max_9): 729 + 6561 = 7290 visual tokens + 81 row newlines
    "llava-onevision-7b": lambda: _onevision(_siglip(1152, 26, 16, 4304), _qwen2(3584, 28, 28, 4, 18944)),
    # CPU-friendly: the same crops and token geometry, a small tower and LLM
    "llava-onevision-mid": lambda: _onevision(_siglip(256, 6, 4, 1024), _qwen2(384, 16, 6, 2, 1024)),
    # for tests: 56 px crops (16 tokens), grids up to 4x4: a 224x224 image is 16 + 144 tokens + 12 newlines
    "llava-onevision-tiny": lambda: _onevision(_siglip(64, 2, 4, 128, image_size=56), _qwen2(128, 8, 4, 2, 256, 512),
                                               image_token=510, video_token=511,
                                               pinpoints=[[56 * h, 56 * w] for h in range(1, 5) for w in range(1, 5)]),
}


class LlavaOnevisionBench(BenchFamily):
    """A bench item is one image at the largest pinpoint (the most crops; its grid capped by ``anyres_max_9``) or,
    with ``bench_item("video")``, a video of 8 frames pooled 2x2."""

    family = "llava_onevision"
    archs = ONEVISION_ARCHS
    bench_kinds = ("image", "video")

    @property
    def bench_token_id(self) -> int:
        return self.video_token_id if self.bench_kind == "video" else self.image_token_id

    def largest_image_size(self) -> tuple[int, int]:
        return largest_pinpoint(self.model.config)

    def item_geometry(self, image_size=None) -> ItemGeometry:
        """An image of ``image_size`` (default :meth:`largest_image_size`): base crop plus grid crops, tokens and
        row newlines as the model packs them. A video: ``BENCH_FRAMES`` frames as crops, 2x2-pooled tokens, one
        newline."""
        side = self.model.config.vision_config.image_size
        if self.bench_kind == "video":
            return ItemGeometry(size=(side, side), crops=BENCH_FRAMES, tokens=self.video_tokens(BENCH_FRAMES),
                                structure=1)
        size = self.largest_image_size() if image_size is None else (int(image_size[0]), int(image_size[1]))
        crops = self._num_crops([list(size)], None)[0]
        newline, _ = self._image_layout(crops, list(size), None)
        return ItemGeometry(size=size, crops=crops, tokens=int((~newline).sum()), structure=int(newline.sum()))

    def random_images(self, batch: int, generator: torch.Generator | None = None, image_size=None) -> dict:
        vc = self.model.config.vision_config
        geo = self.item_geometry(image_size)
        if self.bench_kind == "video":
            shape = (batch, geo.crops, getattr(vc, "num_channels", 3), vc.image_size, vc.image_size)
            return {"pixel_values_videos": torch.randn(shape, generator=generator)}
        shape = (batch, geo.crops, getattr(vc, "num_channels", 3), vc.image_size, vc.image_size)
        return {"pixel_values": torch.randn(shape, generator=generator),
                "image_sizes": torch.tensor([list(geo.size)] * batch)}

    def bench_note(self, image) -> str:
        h, w = image.size
        if self.bench_kind == "video":
            return (f"one {image.crops}-frame video ({h}x{w} frames, pooled 2x2): {image.tokens} visual tokens + 1 "
                    "newline (kept, outside the budget)")
        return super().bench_note(image)

    def bench_budgets(self) -> list[int]:
        """Every token, then 1/9, 1/18 and 1/36 of them (a 7290-token image: 810, 405, 202)."""
        n = self.item_geometry().tokens
        return [n] + [max(1, round(n * f)) for f in (1 / 9, 1 / 18, 1 / 36)]

    def vision_flops(self, image: ItemGeometry | None = None) -> int:
        """SigLIP on every crop (or frame): patch conv + every encoder layer (q/k/v/o, the 2-matrix MLP, attention
        scores and values full) on ``patches`` positions, the pooling head where the config keeps it; then the
        projector on every row (it runs before stage 1 here)."""
        vc = self.model.config.vision_config
        crops = (image or self.item_geometry()).crops
        d, inter = vc.hidden_size, vc.intermediate_size
        s = (vc.image_size // vc.patch_size) ** 2
        conv = 2 * s * getattr(vc, "num_channels", 3) * vc.patch_size**2 * d
        layer = 2 * s * (4 * d * d + 2 * d * inter) + 4 * s * s * d
        head = (4 * d * d + 4 * s * d * d + 4 * s * d + 4 * d * inter) if getattr(vc, "vision_use_head", False) else 0
        h = self.text_config.hidden_size
        projector = 2 * s * (d * h + h * h)
        return crops * (conv + vc.num_hidden_layers * layer + head + projector)

    def projector_flops(self, rows: int) -> int:
        """0: the projector runs on every row before stage 1, counted in :meth:`vision_flops`."""
        return 0
