"""Tiny random LLaVA models built from transformers' own config classes, and inputs for them."""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    Qwen2Config,
)

VOCAB = 96
IMAGE_TOKEN = VOCAB - 1
PAD = 0


def tiny_llava(
    text: str = "llama",
    strategy: str = "default",
    attn: str = "sdpa",
    layers: int = 8,
    kv_heads: int = 2,
    image_size: int = 112,
    hidden: int = 64,
    seed: int = 0,
) -> LlavaForConditionalGeneration:
    """A random LLaVA with a CLIP tower (patch 14) and a LLaMA/Mistral/Qwen2 text model."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        pad_token_id=PAD,
    )
    text_cfg = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[text](**common)
    vision_cfg = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=image_size, patch_size=14, projection_dim=32,
    )
    cfg = LlavaConfig(
        vision_config=vision_cfg, text_config=text_cfg, image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-2, vision_feature_select_strategy=strategy,
    )
    cfg._attn_implementation = attn
    model = LlavaForConditionalGeneration(cfg).eval()
    model.set_attn_implementation(attn)
    # a random model may emit the image placeholder id, which would read as a second image
    model.generation_config.suppress_tokens = [IMAGE_TOKEN]
    return model


def n_visual(model) -> int:
    vc = model.config.vision_config
    return (vc.image_size // vc.patch_size) ** 2 + (model.config.vision_feature_select_strategy == "full")


def make_inputs(model, prompts_len=(6, 9), after=(5, 3), seed=0, padding="left"):
    """A batch of prompts ``[text][image][text]`` of different lengths, padded, with pixel values."""
    g = torch.Generator().manual_seed(seed)
    n = n_visual(model)
    seqs = []
    for pre, post in zip(prompts_len, after):
        ids = [1] + torch.randint(2, VOCAB - 1, (pre,), generator=g).tolist()
        ids += [IMAGE_TOKEN] * n
        ids += torch.randint(2, VOCAB - 1, (post,), generator=g).tolist()
        seqs.append(ids)
    width = max(map(len, seqs))
    input_ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, ids in enumerate(seqs):
        if padding == "left":
            input_ids[i, width - len(ids):] = torch.tensor(ids)
            mask[i, width - len(ids):] = 1
        else:
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
    vc = model.config.vision_config
    pixel_values = torch.randn(len(seqs), 3, vc.image_size, vc.image_size, generator=g)
    return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": pixel_values}
