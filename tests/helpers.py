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


# --- LLaVA-NeXT (AnyRes) ----------------------------------------------------------------------------

NEXT_PINPOINTS = [[56, 112], [112, 56], [112, 112]]


def tiny_llava_next(attn: str = "sdpa", layers: int = 8, seed: int = 0):
    """A random LLaVA-NeXT: CLIP at 56 px (16 tokens per crop), grids up to 2x2 crops, a LLaMA text model,
    and the testbed's word-level tokenizer (``<image>`` expands per image through the processor)."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    from learnpruner.testbed.model import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(seed)
    text_cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    vision_cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                  image_size=56, patch_size=14, projection_dim=32)
    cfg = LlavaNextConfig(
        vision_config=vision_cfg, text_config=text_cfg, image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_grid_pinpoints=NEXT_PINPOINTS,
    )
    cfg._attn_implementation = attn
    model = LlavaNextForConditionalGeneration(cfg).eval()
    model.set_attn_implementation(attn)
    model.generation_config.suppress_tokens = [cfg.image_token_id]
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def next_processor():
    """LlavaNextProcessor for :func:`tiny_llava_next` (PIL image processor: no torchvision needed)."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    from learnpruner.testbed.model import CHAT_TEMPLATE, build_tokenizer

    images = LlavaNextImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                        image_grid_pinpoints=NEXT_PINPOINTS)
    return LlavaNextProcessor(image_processor=images, tokenizer=build_tokenizer(), patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=CHAT_TEMPLATE)


def next_inputs(processor, sizes=((112, 112), (60, 150)), images_per_prompt=None, seed=0,
                questions=("what colour is the circle ?", "how many squares ?")):
    """A padded batch (left) of chat prompts with PIL images of the given (height, width) sizes."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    per = images_per_prompt or [1] * len(sizes)
    images, texts, k = [], [], 0
    for j, count in enumerate(per):
        content = [{"type": "image"}] * count + [{"type": "text", "text": questions[j % len(questions)]}]
        texts.append(processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))
        for h, w in sizes[k:k + count]:
            pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
            images.append(Image.fromarray(pixels))
        k += count
    processor.tokenizer.padding_side = "left"
    return dict(processor(images=images, text=texts, return_tensors="pt", padding=True))
