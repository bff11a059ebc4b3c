"""The benchmark's view of the LLaVA-like families (LLaVA-1.5, LLaVA-NeXT, Video-LLaVA): their architectures with
the published dimensions (random weights; nothing downloaded), CPU-friendly and test-sized variants; one bench
item's geometry, its random inputs and the analytic FLOPs of the CLIP tower and the projector
(:class:`~learnpruner.bench.geometry.BenchFamily`)."""

from __future__ import annotations

import torch

from ..bench.geometry import BenchFamily, ItemGeometry

__all__ = ["LLAVA_ARCHS", "NEXT_PINPOINTS", "bench_processor", "LlavaBench", "LlavaNextBench", "VideoLlavaBench"]


def _clip(hidden, layers, heads, inter, image_size=336, patch=14):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        image_size=image_size, patch_size=patch, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )


def _llama(hidden, layers, heads, inter, vocab=32064, kv_heads=None):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads, intermediate_size=inter, vocab_size=vocab,
        max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def _llava(vision, text, image_token):
    from transformers import LlavaConfig

    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=image_token, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )


# llava-hf/llava-v1.6-*: AnyRes grids of 336 px crops, up to 2x2 (672x672) or 1x3
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def _video_llava(vision, text, image_token, video_token):
    from transformers import VideoLlavaConfig

    return VideoLlavaConfig(
        vision_config=vision, text_config=text, image_token_id=image_token, video_token_id=video_token,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )


def _llava_next(vision, text, image_token, pinpoints=NEXT_PINPOINTS):
    from transformers import LlavaNextConfig

    return LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_id=image_token, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", image_grid_pinpoints=pinpoints,
    )


LLAVA_ARCHS = {
    "llava-1.5-7b": lambda: _llava(_clip(1024, 24, 16, 4096), _llama(4096, 32, 32, 11008), 32000),
    "llava-1.5-13b": lambda: _llava(_clip(1024, 24, 16, 4096), _llama(5120, 40, 40, 13824), 32000),
    # CPU-friendly, same 576 visual tokens per image (CLIP 336/14)
    "llava-mid": lambda: _llava(_clip(512, 12, 8, 2048), _llama(1024, 16, 16, 2816), 32000),
    # for tests: 64 visual tokens (112/14), 8 small layers
    "llava-tiny": lambda: _llava(_clip(64, 2, 4, 128, image_size=112),
                                 _llama(128, 8, 4, 256, vocab=512, kv_heads=2), 511),
    # llava-hf/llava-v1.6-vicuna-7b-hf: CLIP ViT-L/14-336 + vicuna-7B; a 672x672 image is 5 crops,
    # 576 + 48 * 48 = 2880 visual tokens + 48 row newlines = 2928 placeholders
    "llava-next-7b": lambda: _llava_next(_clip(1024, 24, 16, 4096), _llama(4096, 32, 32, 11008), 32000),
    # CPU-friendly, the same 5 crops, 2880 visual tokens and 48 newlines per 672x672 image; small tower and LLM
    "llava-next-mid": lambda: _llava_next(_clip(256, 6, 4, 1024), _llama(384, 16, 6, 1024), 32000),
    # for tests: 56 px crops (16 tokens), grids up to 2x2: a 112x112 image is 80 visual tokens + 8 newlines
    "llava-next-tiny": lambda: _llava_next(_clip(64, 2, 4, 128, image_size=56),
                                           _llama(128, 8, 4, 256, vocab=512, kv_heads=2), 511,
                                           pinpoints=[[56, 112], [112, 56], [112, 112]]),
    # LanguageBind/Video-LLaVA-7B-hf (config.json): CLIP ViT-L/14 at 224 px for the image and the video tower,
    # vicuna-7B, image/video tokens 32000/32001, vocab 32064; 8 frames x (256 patches + [CLS]) = 2056 per video
    "video-llava-7b": lambda: _video_llava(_clip(1024, 24, 16, 4096, image_size=224),
                                           _llama(4096, 32, 32, 11008), 32000, 32001),
    # CPU-friendly, the same 2056 tokens per 8-frame video; small towers and LLM (llava-next-mid's)
    "video-llava-mid": lambda: _video_llava(_clip(256, 6, 4, 1024, image_size=224), _llama(384, 16, 6, 1024),
                                            32000, 32001),
    # for tests: 56 px frames (16 patches + [CLS]): an 8-frame video is 136 tokens
    "video-llava-tiny": lambda: _video_llava(_clip(64, 2, 4, 128, image_size=56),
                                             _llama(128, 8, 4, 256, vocab=512, kv_heads=2), 510, 511),
}


def bench_processor(config):
    """The processor of an architecture benchmark: the testbed's word-level LLaVA processor at ``config``'s image
    and patch size, with ``config``'s image token id (and vocabulary size) set to match it."""
    from ..testbed.model import build_processor

    processor = build_processor()
    size, patch = config.vision_config.image_size, config.vision_config.patch_size
    processor.image_processor.size = {"shortest_edge": size}
    processor.image_processor.crop_size = {"height": size, "width": size}
    processor.patch_size = patch
    config.image_token_index = processor.tokenizer.convert_tokens_to_ids("<image>")
    config.text_config.vocab_size = max(config.text_config.vocab_size, len(processor.tokenizer))
    return processor


def largest_pinpoint(config) -> tuple[int, int]:
    """``(height, width)`` of the AnyRes grid pinpoint with the most crops (first of equals)."""
    size = config.vision_config.image_size
    h, w = max(config.image_grid_pinpoints, key=lambda hw: (hw[0] // size) * (hw[1] // size))
    return int(h), int(w)


def _family_archs(prefix: str | tuple[str, ...], exclude: tuple[str, ...] = ()) -> dict:
    return {k: v for k, v in LLAVA_ARCHS.items() if k.startswith(prefix) and not k.startswith(exclude)}


class LlavaBench(BenchFamily):
    """LLaVA-1.5: every image is resized to the tower's square input (one crop, 576 tokens at 336 px)."""

    family = "llava"
    archs = _family_archs("llava-", exclude=("llava-next",))

    @classmethod
    def processor(cls, config):
        return bench_processor(config)

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


class LlavaNextBench(LlavaBench):
    """LLaVA-NeXT: the base crop plus the AnyRes grid of the largest pinpoint (672x672 at 336 px: 5 crops)."""

    family = "llava_next"
    archs = _family_archs("llava-next")

    processor = BenchFamily.processor  # none: LLaVA-NeXT's AnyRes word-level processor is not built (vllm-bench)

    def largest_image_size(self) -> tuple[int, int]:
        """The grid pinpoint with the most crops (first of equals): the image :meth:`num_visual_tokens` counts."""
        return largest_pinpoint(self.model.config)

    def item_geometry(self, image_size=None) -> ItemGeometry:
        """Base crop plus the AnyRes grid for ``image_size`` (default: :meth:`largest_image_size`); tokens are
        the unpadded grid's, structure its row newlines (672x672 at 336 px: 5 crops, 2880 tokens, 48 rows)."""
        size = self.largest_image_size() if image_size is None else (int(image_size[0]), int(image_size[1]))
        crops = self._num_crops([list(size)])[0]
        order = self.packed_order(crops, self._crop_tokens(), list(size))
        structure = int((order < 0).sum())
        return ItemGeometry(size=size, crops=crops, tokens=int(order.numel()) - structure, structure=structure)

    def random_images(self, batch: int, generator: torch.Generator | None = None, image_size=None) -> dict:
        """``pixel_values`` ``[batch, crops, C, S, S]`` and ``image_sizes`` ``[batch, 2]``, as the processor
        returns them for ``batch`` images of one size."""
        geo = self.item_geometry(image_size)
        vc = self.model.config.vision_config
        shape = (batch, geo.crops, getattr(vc, "num_channels", 3), vc.image_size, vc.image_size)
        return {"pixel_values": torch.randn(shape, generator=generator),
                "image_sizes": torch.tensor([list(geo.size)] * batch)}

    def bench_budgets(self) -> list[int]:
        """Every token, then the LLaVA-NeXT papers' 640/320/160 of 2880 (2/9, 1/9, 1/18 of the count)."""
        n = self.num_visual_tokens()
        return [n] + [max(1, round(n * f)) for f in (2 / 9, 1 / 9, 1 / 18)]


class VideoLlavaBench(LlavaBench):
    """Video-LLaVA: the bench's item is one video of the adapter's ``default_frames`` (8) frames."""

    family = "video_llava"
    archs = _family_archs("video-llava")
    bench_kind = "video"
    bench_kinds = ("video",)

    processor = BenchFamily.processor  # none (vLLM serves no Video-LLaVA)

    @property
    def bench_token_id(self) -> int:
        """The placeholder id of a bench item: the video token."""
        return self.model.config.video_token_id

    def item_geometry(self, image_size=None) -> ItemGeometry:
        """One video of the adapter's ``default_frames`` frames, each resized to the tower's square input and
        encoded as one crop: 8 crops, 2056 tokens at 224 px (``image_size`` is ignored: every frame enters at that
        size)."""
        size = self.model.config.vision_config.image_size
        return ItemGeometry(size=(size, size), crops=self.adapter.default_frames, tokens=self.video_tokens())

    def random_images(self, batch: int, generator: torch.Generator | None = None, image_size=None) -> dict:
        """``pixel_values_videos`` ``[batch, frames, C, S, S]``: one random video per sample, as the processor
        lays them out."""
        vc = self.model.config.vision_config
        shape = (batch, self.adapter.default_frames, getattr(vc, "num_channels", 3), vc.image_size, vc.image_size)
        return {"pixel_values_videos": torch.randn(shape, generator=generator)}

    def bench_note(self, image) -> str:
        h, w = image.size
        return (f"one {image.crops}-frame video ({h}x{w} frames): {image.tokens} visual tokens "
                f"(each frame's [CLS] row included)")
