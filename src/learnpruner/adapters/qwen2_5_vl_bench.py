"""Benchmark pieces for Qwen2.5-VL: the architectures (random weights), their inputs, analytic FLOPs and KV bytes.

Hooked into :mod:`learnpruner.bench` by :class:`Qwen2_5_VLBench` (the family's benchmark view, which registers
itself with the architectures); every function here also works alone, on a config, without allocating weights.

* :data:`QWEN_ARCHS`: ``qwen2.5-vl-7b`` (``Qwen/Qwen2.5-VL-7B-Instruct``'s dimensions: a 32-block windowed ViT
  of width 1280, full attention in blocks 7/15/23/31, 112 px windows, a 5120 -> 3584 merger, and a 28-layer
  3584-wide LLM with 4 KV heads and M-RoPE sections [16, 24, 24]), ``qwen2.5-vl-mid`` (CPU-friendly, the same
  token geometry) and ``qwen2.5-vl-tiny`` (tests).
* :func:`random_pixels`: the visual inputs of a benchmark sample (its prompt is the benchmark's).
* :data:`BENCH_IMAGE`: an 896x1120 px image, 32 x 40 = 1280 tokens (the stock image processor's largest:
  ``max_pixels`` 1003520 = 1280 x 28^2). :data:`BENCH_VIDEO`: 8 frames of 448x448 px, 4 temporal groups of
  256 tokens = 1024 tokens.
* FLOPs follow ``bench.FLOPS_CONVENTION`` (analytic, prefill, 2 per multiply-add, attention counted full
  non-causal as ``FlopCounterMode`` counts SDPA): the vision tower is the patch Conv3d plus every block on
  every patch (q/k/v/o, the 3-matrix SwiGLU MLP), with attention inside each 112 px window (8x8 patches,
  smaller at the image's right and bottom edges) in the windowed blocks and over each temporal group's
  patches in the full-attention blocks; the merger (the projector) is its two linear layers on the kept rows;
  the LLM counts, per layer, the text tokens plus that layer's visual tokens. Norms and biases are not
  counted.
"""

from __future__ import annotations

import math

import torch

from ..bench.geometry import BenchFamily, ItemGeometry
from ..cost import items_breakdown, items_kv_bytes

__all__ = [
    "QWEN_ARCHS",
    "BENCH_IMAGE",
    "BENCH_VIDEO",
    "qwen_config",
    "image_grid",
    "video_grid",
    "grid_tokens",
    "window_lengths",
    "vision_flops",
    "merger_flops",
    "flops_breakdown",
    "analytic_kv_bytes",
    "random_pixels",
]

BENCH_IMAGE = (896, 1120)  # height, width in px: 32 x 40 merged tokens = 1280
BENCH_VIDEO = (8, 448, 448)  # frames, height, width: 4 temporal groups x 16 x 16 = 1024 tokens

# Qwen/Qwen2.5-VL-7B-Instruct (config.json)
TOKEN_IDS_7B = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                    vision_end_token_id=151653)
VISION_7B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
                 temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31], out_hidden_size=3584,
                 tokens_per_second=2, hidden_act="silu", in_channels=3)
TEXT_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
               rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
               bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)


def qwen_config(vision: dict | None = None, text: dict | None = None, token_ids: dict | None = None):
    """A ``Qwen2_5_VLConfig`` with the 7B's dimensions, ``vision``/``text``/``token_ids`` overriding fields."""
    from transformers import Qwen2_5_VLConfig

    ids = {**TOKEN_IDS_7B, **(token_ids or {})}
    return Qwen2_5_VLConfig(vision_config={**VISION_7B, **(vision or {})}, text_config={**TEXT_7B, **(text or {})},
                            tie_word_embeddings=False, **ids)


def _tiny():
    rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 6, 6]}
    return qwen_config(  # head size 32: the smallest vLLM's CPU attention takes
        vision=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, window_size=56,
                    fullatt_block_indexes=[1], out_hidden_size=64),
        text=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=4096, rope_parameters=rope, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0),
        token_ids=dict(image_token_id=511, video_token_id=510, vision_start_token_id=509, vision_end_token_id=508),
    )


QWEN_ARCHS = {
    "qwen2.5-vl-7b": qwen_config,
    # CPU-friendly: the same patch, merge and window geometry (1280 tokens per BENCH_IMAGE), a small tower and LLM
    "qwen2.5-vl-mid": lambda: qwen_config(
        vision=dict(depth=8, hidden_size=256, intermediate_size=640, num_heads=4, fullatt_block_indexes=[3, 7],
                    out_hidden_size=512),
        text=dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=12, num_attention_heads=8,
                  num_key_value_heads=2,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]}),
    ),
    # for tests: 56 px windows, 8 small layers
    "qwen2.5-vl-tiny": _tiny,
}


# --------------------------------------------------------------------------------------------------
# geometry


def image_grid(config, height: int, width: int, min_pixels: int = 3136, max_pixels: int = 1003520) -> tuple:
    """``(t, h, w)`` in patches of an image of ``height x width`` px after the image processor's ``smart_resize``
    (sides rounded to multiples of 28 px, area kept in ``[min_pixels, max_pixels]``; the defaults are the stock
    processor's)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    vc = config.vision_config
    factor = vc.patch_size * vc.spatial_merge_size
    h, w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return (1, h // vc.patch_size, w // vc.patch_size)


def video_grid(config, frames: int, height: int, width: int) -> tuple:
    """``(t, h, w)`` of ``frames`` frames of ``height x width`` px (multiples of 28 px, an even frame count)."""
    vc = config.vision_config
    factor = vc.patch_size * vc.spatial_merge_size
    if height % factor or width % factor or frames % vc.temporal_patch_size:
        raise ValueError(f"video frames must be multiples of {factor} px and their count a multiple of "
                         f"{vc.temporal_patch_size}, got {frames} x {height}x{width}")
    return (frames // vc.temporal_patch_size, height // vc.patch_size, width // vc.patch_size)


def grid_tokens(config, grid) -> int:
    """LLM tokens of one image or video: ``t * h * w / merge^2``."""
    t, h, w = grid
    return t * h * w // config.vision_config.spatial_merge_size ** 2


def window_lengths(config, grid) -> list[int]:
    """Patches in each attention window of the windowed blocks (every temporal group): windows of
    ``window_size`` px tile each frame's merged grid from its top-left corner, cut at its edges."""
    vc = config.vision_config
    m = vc.spatial_merge_size
    span = vc.window_size // m // vc.patch_size  # window side in merged tokens
    t, h, w = grid
    hh, ww = h // m, w // m
    rows = [min(span, hh - i) for i in range(0, hh, span)]
    cols = [min(span, ww - j) for j in range(0, ww, span)]
    return [r * c * m * m for _ in range(t) for r in rows for c in cols]


# --------------------------------------------------------------------------------------------------
# FLOPs and cache size


def vision_flops(config, grid) -> int:
    """Analytic FLOPs of the vision tower for one image or video of ``grid`` (merger excluded: see
    :func:`merger_flops`)."""
    vc = config.vision_config
    t, h, w = grid
    patches = t * h * w
    d, inter = vc.hidden_size, vc.intermediate_size
    conv = 2 * patches * d * vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    dense = 2 * patches * (4 * d * d + 3 * d * inter)  # qkv + proj, SwiGLU gate/up/down
    windowed = sum(4 * n * n * d for n in window_lengths(config, grid))
    full = t * 4 * (h * w) ** 2 * d  # full-attention blocks: each temporal group's patches attend to each other
    blocks = sum(dense + (full if i in vc.fullatt_block_indexes else windowed) for i in range(vc.depth))
    return conv + blocks


def merger_flops(config, rows: int) -> int:
    """The merger (projector) on ``rows`` kept tokens: ``4d -> 4d -> out_hidden`` (two linear layers)."""
    vc = config.vision_config
    wide = vc.hidden_size * vc.spatial_merge_size ** 2
    return 2 * rows * (wide * wide + wide * vc.out_hidden_size)


def flops_breakdown(config, schedules, grids, text_tokens: int, batch: int = 1, lm_head: str = "last") -> dict:
    """Analytic prefill FLOPs of one prompt with the items ``grids`` (images and videos) pruned by ``schedules``
    (one :class:`~learnpruner.budget.Schedule` per item, e.g. ``state.schedule(n)``), times ``batch``:
    ``vision`` (the tower on every item, unpruned), ``projector`` (the merger on each item's stage-1 rows),
    ``llm`` and ``lm_head`` (:func:`learnpruner.cost.items_breakdown`)."""
    check_items(config, schedules, grids)
    return items_breakdown(config.text_config, schedules, text_tokens, sum(vision_flops(config, g) for g in grids),
                           lambda rows: merger_flops(config, rows), batch, lm_head)


def check_items(config, schedules, grids) -> None:
    """``ValueError`` unless there is one schedule per grid, each for its grid's token count."""
    if len(schedules) != len(grids):
        raise ValueError(f"{len(schedules)} schedule(s) for {len(grids)} item(s)")
    for s, g in zip(schedules, grids):
        if s.n != grid_tokens(config, g):
            raise ValueError(f"a schedule for {s.n}-token items given for a grid of {grid_tokens(config, g)} tokens")


def analytic_kv_bytes(config, schedules, text_tokens: int, batch: int = 1, dtype=torch.bfloat16) -> int:
    """Bytes of the KV cache after the prefill: per layer keys and values of the text and that layer's visual
    tokens of every item (what ``bench.kv_cache_bytes`` measures on the real cache)."""
    return items_kv_bytes(config.text_config, schedules, text_tokens, batch, dtype)


# --------------------------------------------------------------------------------------------------
# inputs


def random_pixels(config, batch: int = 1, image=BENCH_IMAGE, video=None,
                  generator: torch.Generator | None = None, second_per_grid_t: float = 1.0) -> dict:
    """The visual forward arguments of ``batch`` random items of one size, as the processor lays them out (one
    row per patch): an image of ``image`` = (height, width) px, resized as the processor would (``pixel_values``
    + ``image_grid_thw``), or a video of ``video`` = (frames, height, width) (``pixel_values_videos`` +
    ``video_grid_thw`` + ``second_per_grid_ts``). The prompt around them is the benchmark's
    (:mod:`learnpruner.bench.inputs`), with the adapter's ``prompt_inputs``."""
    vc = config.vision_config
    grid = video_grid(config, *video) if video is not None else image_grid(config, *image)
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    row = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    pixels = torch.randn(batch * math.prod(grid), row, generator=g)
    grids = torch.tensor([list(grid)] * batch)
    if video is not None:
        return {"pixel_values_videos": pixels, "video_grid_thw": grids,
                "second_per_grid_ts": torch.full((batch,), second_per_grid_t)}
    return {"pixel_values": pixels, "image_grid_thw": grids}


# --------------------------------------------------------------------------------------------------
# a processor for architectures with random weights (no Qwen tokenizer can be downloaded)


QWEN_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def qwen_chat_template() -> str:
    """The testbed's chat template (``USER: ... ASSISTANT:``) with Qwen's vision tags: an image as
    ``<|vision_start|><|image_pad|><|vision_end|>``, a video with ``<|video_pad|>``, as Qwen's own templates write
    them (the processor then expands each pad to the item's tokens)."""
    from ..testbed.model import CHAT_TEMPLATE

    llava = "{% if c['type'] == 'image' %}<image>\n{% else %}"
    if llava not in CHAT_TEMPLATE:
        raise RuntimeError("the testbed's chat template no longer writes an image as <image>")
    qwen = ("{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
            "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>{% else %}")
    return CHAT_TEMPLATE.replace(llava, qwen)


def word_processor(min_pixels: int = 3136, max_pixels: int = 1003520):
    """A ``Qwen2_5_VLProcessor`` over the testbed's word-level vocabulary plus Qwen's vision tokens
    (:data:`QWEN_TOKENS`; the tokenizer names ``<|image_pad|>`` and ``<|video_pad|>`` as its image and video
    tokens, so the processor expands them), a PIL image processor and Qwen's video processor (which needs
    torchvision), resizing between ``min_pixels`` and ``max_pixels``: for tiny random Qwen2.5-VL models and
    architecture benchmarks, where no Qwen tokenizer can be downloaded."""
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessorPil,
        Qwen2VLVideoProcessor,
    )

    from ..testbed.model import build_tokenizer

    words = build_tokenizer()
    words.add_tokens(list(QWEN_TOKENS), special_tokens=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=words.backend_tokenizer, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", pad_token="<pad>", padding_side="left", model_max_length=1 << 17,
                                  extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    pixels = dict(min_pixels=min_pixels, max_pixels=max_pixels)
    return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessorPil(**pixels),
                               video_processor=Qwen2VLVideoProcessor(**pixels), tokenizer=tok,
                               chat_template=qwen_chat_template())


def token_ids(tokenizer) -> dict:
    """The config fields naming :data:`QWEN_TOKENS` in ``tokenizer`` (for a Qwen2.5-VL config)."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_TOKENS}
    return dict(vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"])


def bench_processor(config):
    """The processor of an architecture benchmark: :func:`word_processor` at the stock image processor's pixel
    bounds, with ``config``'s vision token ids (and vocabulary size) set to match it."""
    processor = word_processor()
    for key, value in token_ids(processor.tokenizer).items():
        setattr(config, key, value)
    config.text_config.vocab_size = max(config.text_config.vocab_size, len(processor.tokenizer))
    return processor


class Qwen2_5_VLBench(BenchFamily):
    """Qwen2.5-VL: a bench item is one image (:data:`BENCH_IMAGE`) or, with ``bench_item("video")``, one video
    (:data:`BENCH_VIDEO`); no structure either way."""

    family = "qwen2_5_vl"
    archs = QWEN_ARCHS
    bench_kinds = ("image", "video")

    @classmethod
    def processor(cls, config):
        return bench_processor(config)

    @property
    def bench_token_id(self) -> int:
        """The placeholder id of a bench item: the image token, or the video token for a video."""
        return self.video_token_id if self.bench_kind == "video" else self.image_token_id

    def prompt_inputs(self, input_ids: torch.Tensor) -> dict:
        return {"mm_token_type_ids": self.mm_token_type_ids(input_ids)}

    def item_geometry(self, image_size=None) -> ItemGeometry:
        """One bench item after the processor's resize. An image of ``image_size`` ``(height, width)`` px (default
        :data:`BENCH_IMAGE`, 1280 tokens): one pass of the tower, ``h * w / 4`` tokens. With
        ``bench_item("video")``, a video of ``image_size`` ``(frames, height, width)`` (default
        :data:`BENCH_VIDEO`, 4 temporal groups of 256 tokens): its temporal groups are the crops."""
        cfg = self.model.config
        if self.bench_kind == "video":
            grid = video_grid(cfg, *(image_size or BENCH_VIDEO))
        else:
            grid = image_grid(cfg, *(image_size or BENCH_IMAGE))
        t, h, w = grid
        patch = cfg.vision_config.patch_size
        return ItemGeometry(size=(h * patch, w * patch), crops=t, tokens=grid_tokens(cfg, grid))

    def bench_note(self, image) -> str:
        h, w = image.size
        if self.bench_kind == "video":
            frames = image.crops * self.model.config.vision_config.temporal_patch_size
            return (f"one {frames}-frame video ({h}x{w} frames, {image.crops} temporal groups): "
                    f"{image.tokens} visual tokens")
        return f"one {h}x{w} image: {image.tokens} visual tokens"

    def random_images(self, batch: int, generator: torch.Generator | None = None, image_size=None) -> dict:
        """Forward arguments of ``batch`` random items of one size, as the processor lays them out: one row per
        patch in ``pixel_values`` and ``image_grid_thw``, or for a video ``pixel_values_videos``,
        ``video_grid_thw`` and ``second_per_grid_ts``."""
        if self.bench_kind == "video":
            return random_pixels(self.model.config, batch, video=image_size or BENCH_VIDEO, generator=generator)
        return random_pixels(self.model.config, batch, image=image_size or BENCH_IMAGE, generator=generator)

    def vision_flops(self, image=None) -> int:
        """The tower for one bench item, every temporal group of a video (the merger excluded:
        :meth:`projector_flops`)."""
        image = image if image is not None else self.item_geometry()
        patch = self.model.config.vision_config.patch_size
        return vision_flops(self.model.config, (image.crops, image.size[0] // patch, image.size[1] // patch))

    def projector_flops(self, rows: int) -> int:
        """The merger's two linear layers on the kept rows."""
        return merger_flops(self.model.config, rows)
