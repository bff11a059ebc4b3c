"""Benchmark pieces for Qwen3-VL: the architectures (random weights), their inputs, analytic FLOPs and KV bytes.

* :data:`QWEN3_ARCHS`: ``qwen3-vl-8b`` (``Qwen/Qwen3-VL-8B-Instruct``'s dimensions: a 27-block ViT of width 1152
  with 16 px patches, DeepStack taps after blocks 8/16/24, 4608 -> 4096 mergers, and a 36-layer 4096-wide LLM
  with 8 KV heads, head size 128 and interleaved M-RoPE sections [24, 20, 20]), ``qwen3-vl-mid`` (CPU-friendly,
  the same token geometry) and ``qwen3-vl-tiny`` (tests).
* :data:`BENCH_IMAGE`: a 1024x1280 px image, 32 x 40 = 1280 tokens (the count of Qwen2.5-VL's bench image; the
  stock Qwen3-VL processor keeps this size, its pixel bounds being 65536 to 16777216).
* FLOPs follow ``bench.FLOPS_CONVENTION`` (analytic, prefill, 2 per multiply-add, attention full non-causal): the
  tower is the patch Conv3d plus every block on every patch (q/k/v/o, the 2-matrix GELU MLP) with attention
  over each frame (group)'s patches; the projector is the main merger and every DeepStack merger (each two
  linear layers) on the kept rows, as learnpruner runs them; the LLM counts, per layer, the text tokens plus that
  layer's visual tokens. Norms, biases, position-embedding interpolation and the DeepStack additions are not
  counted.
"""

from __future__ import annotations

import math

import torch

from ..bench.geometry import ItemGeometry
from ..cost import items_breakdown, items_kv_bytes
from .qwen2_5_vl_bench import Qwen2_5_VLBench, check_items, grid_tokens, video_grid

__all__ = ["QWEN3_ARCHS", "BENCH_IMAGE", "BENCH_VIDEO", "GROUP_TEXT", "qwen3_config", "image_grid", "grid_tokens",
           "vision_flops", "merger_flops", "flops_breakdown", "analytic_kv_bytes", "random_pixels", "word_processor",
           "bench_processor"]

BENCH_IMAGE = (1024, 1280)  # height, width in px: 32 x 40 merged tokens = 1280
BENCH_VIDEO = (8, 512, 512)  # frames, height, width: 4 temporal groups x 16 x 16 merged tokens = 1024
# text tokens the processor writes per temporal group of a video: a timestamp ("<0.5 seconds>": 6 tokens of Qwen's
# tokenizer), <|vision_start|> and <|vision_end|>
GROUP_TEXT = 8
MIN_PIXELS, MAX_PIXELS = 65536, 16777216  # the stock processor's size bounds (shortest_edge, longest_edge)

# Qwen/Qwen3-VL-8B-Instruct (config.json)
TOKEN_IDS_8B = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                    vision_end_token_id=151653)
VISION_8B = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16, spatial_merge_size=2,
                 temporal_patch_size=2, out_hidden_size=4096, deepstack_visual_indexes=[8, 16, 24],
                 num_position_embeddings=2304, hidden_act="gelu_pytorch_tanh", in_channels=3)
TEXT_8B = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
               rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
               rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                "mrope_interleaved": True})


def qwen3_config(vision: dict | None = None, text: dict | None = None, token_ids: dict | None = None):
    """A ``Qwen3VLConfig`` with the 8B's dimensions, ``vision``/``text``/``token_ids`` overriding fields."""
    from transformers import Qwen3VLConfig

    ids = {**TOKEN_IDS_8B, **(token_ids or {})}
    return Qwen3VLConfig(vision_config={**VISION_8B, **(vision or {})}, text_config={**TEXT_8B, **(text or {})},
                         tie_word_embeddings=False, **ids)


def _tiny():
    rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 6, 6], "mrope_interleaved": True}
    return qwen3_config(
        vision=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                    deepstack_visual_indexes=[0, 1], num_position_embeddings=64),
        text=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=32, max_position_embeddings=4096, rope_parameters=rope,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0),
        token_ids=dict(image_token_id=511, video_token_id=510, vision_start_token_id=509, vision_end_token_id=508),
    )


QWEN3_ARCHS = {
    "qwen3-vl-8b": qwen3_config,
    # CPU-friendly: the same patch and merge geometry (1280 tokens per BENCH_IMAGE), a small tower and LLM
    "qwen3-vl-mid": lambda: qwen3_config(
        vision=dict(depth=8, hidden_size=256, intermediate_size=640, num_heads=4, out_hidden_size=512,
                    deepstack_visual_indexes=[2, 4, 6]),
        text=dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=12, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=64,
                  rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [8, 12, 12],
                                   "mrope_interleaved": True}),
    ),
    "qwen3-vl-tiny": _tiny,
}


def image_grid(config, height: int, width: int, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> tuple:
    """``(t, h, w)`` in patches of an image of ``height x width`` px after the processor's ``smart_resize`` (sides
    rounded to multiples of 32 px, area kept in ``[min_pixels, max_pixels]``)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    vc = config.vision_config
    factor = vc.patch_size * vc.spatial_merge_size
    h, w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return (1, h // vc.patch_size, w // vc.patch_size)


def vision_flops(config, grid) -> int:
    """Analytic FLOPs of the tower for one image or video of ``grid`` (the mergers excluded: :func:`merger_flops`)."""
    vc = config.vision_config
    t, h, w = grid
    patches = t * h * w
    d, inter = vc.hidden_size, vc.intermediate_size
    conv = 2 * patches * d * vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    dense = 2 * patches * (4 * d * d + 2 * d * inter)  # qkv + proj, fc1/fc2
    attention = t * 4 * (h * w) ** 2 * d  # each frame (group)'s patches attend to each other
    return conv + vc.depth * (dense + attention)


def merger_flops(config, rows: int) -> int:
    """The main merger and every DeepStack merger on ``rows`` kept tokens: ``4d -> 4d -> out_hidden`` each."""
    vc = config.vision_config
    wide = vc.hidden_size * vc.spatial_merge_size ** 2
    return (1 + len(vc.deepstack_visual_indexes)) * 2 * rows * (wide * wide + wide * vc.out_hidden_size)


def flops_breakdown(config, schedules, grids, text_tokens: int, batch: int = 1, lm_head: str = "last") -> dict:
    """Analytic prefill FLOPs of one prompt with the items ``grids`` pruned by ``schedules`` (one per item), times
    ``batch``: ``vision``, ``projector`` (every merger on each item's stage-1 rows), ``llm`` and ``lm_head``
    (:func:`learnpruner.cost.items_breakdown`)."""
    check_items(config, schedules, grids)
    return items_breakdown(config.text_config, schedules, text_tokens, sum(vision_flops(config, g) for g in grids),
                           lambda rows: merger_flops(config, rows), batch, lm_head)


def analytic_kv_bytes(config, schedules, text_tokens: int, batch: int = 1, dtype=torch.bfloat16) -> int:
    """Bytes of the KV cache after the prefill (text plus each layer's visual tokens of every item)."""
    return items_kv_bytes(config.text_config, schedules, text_tokens, batch, dtype)


def random_pixels(config, batch: int = 1, image=BENCH_IMAGE, video=None,
                  generator: torch.Generator | None = None) -> dict:
    """The visual forward arguments of ``batch`` random items of one size, one row per 16 px patch: images of
    ``image`` = (height, width) px resized as the processor would (``pixel_values`` + ``image_grid_thw``), or
    videos of ``video`` = (frames, height, width) (``pixel_values_videos`` + ``video_grid_thw``; Qwen3-VL reads
    time from the prompt's timestamps). The prompt around them is the benchmark's."""
    from .qwen2_5_vl_bench import video_grid

    vc = config.vision_config
    grid = video_grid(config, *video) if video is not None else image_grid(config, *image)
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    row = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    pixels, grids = torch.randn(batch * math.prod(grid), row, generator=g), torch.tensor([list(grid)] * batch)
    if video is not None:
        return {"pixel_values_videos": pixels, "video_grid_thw": grids}
    return {"pixel_values": pixels, "image_grid_thw": grids}


def word_processor(min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS):
    """A ``Qwen3VLProcessor`` over the testbed's word-level vocabulary plus Qwen's vision tokens, a PIL image
    processor (16 px patches) and Qwen3-VL's video processor (which needs torchvision), resizing between
    ``min_pixels`` and ``max_pixels``: for tiny random Qwen3-VL models and architecture benchmarks, where no Qwen
    tokenizer can be downloaded."""
    from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessorPil, Qwen3VLProcessor, Qwen3VLVideoProcessor

    from ..testbed.model import build_tokenizer
    from .qwen2_5_vl_bench import QWEN_TOKENS, qwen_chat_template

    words = build_tokenizer()
    words.add_tokens(list(QWEN_TOKENS), special_tokens=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=words.backend_tokenizer, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", pad_token="<pad>", padding_side="left", model_max_length=1 << 17,
                                  extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    # Qwen3-VL normalises images and videos alike (mean and std 0.5, as its checkpoints' processors do; vLLM
    # normalises both with the image processor's values)
    pixels = dict(size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, patch_size=16,
                  image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return Qwen3VLProcessor(image_processor=Qwen2VLImageProcessorPil(**pixels),
                            video_processor=Qwen3VLVideoProcessor(**pixels), tokenizer=tok,
                            chat_template=qwen_chat_template())


def bench_processor(config):
    """The processor of an architecture benchmark (:func:`word_processor` at the stock pixel bounds), with
    ``config``'s vision token ids (and vocabulary size) set to match it."""
    from .qwen2_5_vl_bench import token_ids

    processor = word_processor()
    for key, value in token_ids(processor.tokenizer).items():
        setattr(config, key, value)
    config.text_config.vocab_size = max(config.text_config.vocab_size, len(processor.tokenizer))
    return processor


class Qwen3VLBench(Qwen2_5_VLBench):
    """Qwen3-VL (and its MoE): as Qwen2.5-VL's view, with this module's geometry and costs; a video's frame groups
    carry their timestamps and delimiters as text."""

    family = "qwen3_vl"
    archs = QWEN3_ARCHS

    @classmethod
    def processor(cls, config):
        return bench_processor(config)

    def item_geometry(self, image_size=None) -> ItemGeometry:
        """One bench item after the processor's resize. An image of ``image_size`` ``(height, width)`` px (default
        :data:`BENCH_IMAGE`, 1280 tokens): one pass of the tower, ``h * w / 4`` tokens. With
        ``bench_item("video")``, a video of ``image_size`` ``(frames, height, width)`` (default
        :data:`BENCH_VIDEO`, 4 temporal groups of 256 tokens): the groups are its crops, and each group's
        timestamp and delimiters are its ``text`` (:data:`GROUP_TEXT` tokens)."""
        cfg = self.model.config
        if self.bench_kind == "video":
            t, h, w = video_grid(cfg, *(image_size or BENCH_VIDEO))
        else:
            t, h, w = image_grid(cfg, *(image_size or BENCH_IMAGE))
        patch = cfg.vision_config.patch_size
        return ItemGeometry(size=(h * patch, w * patch), crops=t, tokens=grid_tokens(cfg, (t, h, w)),
                            text=t * GROUP_TEXT if self.bench_kind == "video" else 0)

    def bench_region(self) -> torch.Tensor:
        """An image: its placeholders. A video: per temporal group a timestamp (:data:`GROUP_TEXT` - 2 plain text
        tokens), ``<|vision_start|>``, the group's placeholders and ``<|vision_end|>``, as the processor writes
        it."""
        if self.bench_kind != "video":
            return super().bench_region()
        geo, cfg = self.item_geometry(), self.model.config
        group = [2] * (GROUP_TEXT - 2) + [cfg.vision_start_token_id] + [cfg.video_token_id] * (
            geo.tokens // geo.crops) + [cfg.vision_end_token_id]
        return torch.tensor(group * geo.crops, dtype=torch.long)

    def bench_note(self, image) -> str:
        note = super().bench_note(image)
        return note + f" + {image.text} timestamp and delimiter tokens (text)" if image.text else note

    def random_images(self, batch: int, generator: torch.Generator | None = None, image_size=None) -> dict:
        if self.bench_kind == "video":
            return random_pixels(self.model.config, batch, video=image_size or BENCH_VIDEO, generator=generator)
        return random_pixels(self.model.config, batch, image=image_size or BENCH_IMAGE, generator=generator)

    def vision_flops(self, image=None) -> int:
        """The tower for one bench item (the mergers excluded: :meth:`projector_flops`)."""
        image = image if image is not None else self.item_geometry()
        patch = self.model.config.vision_config.patch_size
        return vision_flops(self.model.config, (image.crops, image.size[0] // patch, image.size[1] // patch))

    def projector_flops(self, rows: int) -> int:
        """The main merger and every DeepStack merger on ``rows`` kept tokens."""
        return merger_flops(self.model.config, rows)
