"""The benchmark's view of InternVL3: its architectures (random weights; nothing downloaded), one bench item (an image
of 6 dynamic tiles plus the thumbnail, wrapped in ``<img>`` ... ``</img>``), its random inputs and the analytic FLOPs
of InternViT and the projector (:class:`~learnpruner.bench.geometry.BenchFamily`)."""

from __future__ import annotations

import torch

from ..bench.geometry import BenchFamily, ItemGeometry

__all__ = ["INTERNVL_ARCHS", "BENCH_TILES", "InternVLBench"]

BENCH_TILES = 7  # 6 dynamic tiles (a 2x3 grid of 448 px tiles) + the thumbnail


def _internvit(hidden, layers, heads, inter, image_size=448):
    from transformers import InternVLVisionConfig

    return InternVLVisionConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                intermediate_size=inter, image_size=(image_size, image_size), patch_size=(14, 14))


def _qwen2(hidden, layers, heads, kv_heads, inter, vocab=151674):
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, intermediate_size=inter, vocab_size=vocab,
                       max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False)


def _internvl(vision, text, image_token=151667):
    from transformers import InternVLConfig

    per = (vision.image_size[0] // vision.patch_size[0] // 2) ** 2
    return InternVLConfig(vision_config=vision, text_config=text, image_token_id=image_token, image_seq_length=per,
                          downsample_ratio=0.5, vision_feature_layer=-1, vision_feature_select_strategy="default",
                          tie_word_embeddings=False)


INTERNVL_ARCHS = {
    # OpenGVLab/InternVL3-8B-hf's dimensions: InternViT-300M-448px (24 layers, width 1024) and Qwen2.5-7B; an image
    # of 6 tiles + thumbnail is 7 x 256 = 1792 visual tokens
    "internvl3-8b": lambda: _internvl(_internvit(1024, 24, 16, 4096), _qwen2(3584, 28, 28, 4, 18944)),
    # CPU-friendly: the same tiles and token counts, a small tower and LLM
    "internvl3-mid": lambda: _internvl(_internvit(256, 6, 4, 1024), _qwen2(384, 16, 6, 2, 1024)),
    # for tests: 112 px tiles (64 patches, 16 tokens after the pixel shuffle)
    "internvl3-tiny": lambda: _internvl(_internvit(64, 2, 4, 128, image_size=112), _qwen2(128, 8, 4, 2, 256, 512),
                                        image_token=511),
}


class InternVLBench(BenchFamily):
    """A bench item is one image of :data:`BENCH_TILES` tiles between ``<img>`` and ``</img>`` (two text tokens)."""

    family = "internvl"
    archs = INTERNVL_ARCHS

    def _tile_px(self) -> int:
        size = self.model.config.vision_config.image_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    def item_geometry(self, image_size=None) -> ItemGeometry:
        """:data:`BENCH_TILES` tiles (``image_size`` is ignored: the processor resizes every tile to the tower's
        input), their tokens, and the two text tokens around them."""
        px = self._tile_px()
        return ItemGeometry(size=(2 * px, 3 * px), crops=BENCH_TILES, tokens=BENCH_TILES * self.tile_tokens(),
                            text=2)

    def bench_region(self) -> torch.Tensor:
        """``<img>``, every tile's placeholders, ``</img>`` (the two delimiters as plain text ids)."""
        geo = self.item_geometry()
        return torch.tensor([2] + [self.image_token_id] * geo.tokens + [2], dtype=torch.long)

    def random_images(self, batch: int, generator: torch.Generator | None = None, image_size=None) -> dict:
        """``pixel_values`` ``[batch * tiles, 3, S, S]``: every tile of every sample in prompt order."""
        vc, px = self.model.config.vision_config, self._tile_px()
        shape = (batch * BENCH_TILES, getattr(vc, "num_channels", 3), px, px)
        return {"pixel_values": torch.randn(shape, generator=generator)}

    def bench_note(self, image) -> str:
        h, w = image.size
        return (f"one {h}x{w} image ({image.crops - 1} tiles + thumbnail): {image.tokens} visual tokens + "
                f"{image.text} <img>/</img> text tokens")

    def vision_flops(self, image: ItemGeometry | None = None) -> int:
        """InternViT on every tile: patch conv + every layer (q/k/v/o, the 2-matrix MLP, attention scores and values
        full) on ``patches + 1`` positions (the class token runs, then is dropped)."""
        vc = self.model.config.vision_config
        crops = (image or self.item_geometry()).crops
        d, inter = vc.hidden_size, vc.intermediate_size
        patch = vc.patch_size[0] if isinstance(vc.patch_size, (list, tuple)) else vc.patch_size
        patches = (self._tile_px() // patch) ** 2
        s = patches + 1
        conv = 2 * patches * getattr(vc, "num_channels", 3) * patch**2 * d
        layer = 2 * s * (4 * d * d + 2 * d * inter) + 4 * s * s * d
        return crops * (conv + vc.num_hidden_layers * layer)

    def projector_flops(self, rows: int) -> int:
        """The projector's two linear layers on the kept rows: pixel-shuffled width -> text hidden -> text hidden."""
        h = self.text_config.hidden_size
        return 2 * rows * (self.feature_dim() * h + h * h)
