"""Benchmark architectures of the LLaVA-like families (LLaVA-1.5, LLaVA-NeXT, Video-LLaVA): their configs with
the published dimensions (random weights; nothing downloaded), CPU-friendly and test-sized variants."""

from __future__ import annotations

__all__ = ["LLAVA_ARCHS", "NEXT_PINPOINTS", "bench_processor"]


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
