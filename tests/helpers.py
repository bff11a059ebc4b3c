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


# --- Qwen2.5-VL (M-RoPE; images and video) ------------------------------------------------------------

QWEN_SPECIAL = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
QWEN_PATCH_ROW = 3 * 2 * 14 * 14  # channels x temporal patch x patch x patch: one row of pixel_values


def qwen_tokenizer():
    """The testbed's word-level tokenizer plus Qwen's vision tokens (start, end, image and video placeholders)."""
    from learnpruner.testbed.model import build_tokenizer

    tok = build_tokenizer()
    tok.add_tokens(list(QWEN_SPECIAL), special_tokens=True)
    return tok


def tiny_qwen(attn: str = "sdpa", layers: int = 8, seed: int = 0, window_size: int = 56):
    """A random Qwen2.5-VL: a 3-block windowed vision tower (patch 14, 2x2 merge, 56 px windows so a 112 px image
    has 4 windows and window order differs from raster order; block 1 attends fully), a 64-wide text model with
    head_dim 16 and ``mrope_section`` [2, 3, 3], and :func:`qwen_tokenizer`'s vocabulary."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = qwen_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    torch.manual_seed(seed)
    text = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]},
    )
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=window_size, fullatt_block_indexes=[1], out_hidden_size=64,
                  tokens_per_second=2)
    cfg = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    model.set_attn_implementation(attn)
    # a random model may emit a placeholder id, which would read as another image
    model.generation_config.suppress_tokens = [cfg.image_token_id, cfg.video_token_id]
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model


def qwen_inputs(model, prompts, seed: int = 0, padding: str = "left", second_per_grid_t: float = 1.0):
    """A padded batch of Qwen2.5-VL prompts, as the processor lays them out, with random pixel rows.

    ``prompts``: per sample a list of parts: a string (words), ``("image", (h, w))`` or ``("video", (t, h, w))``
    with the grid in patches (14 px; ``t`` temporal groups of 2 frames), each wrapped in vision start/end
    tokens. Returns ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` and the visual tensors present
    (``pixel_values`` + ``image_grid_thw``, ``pixel_values_videos`` + ``video_grid_thw`` + ``second_per_grid_ts``).
    """
    tok = qwen_tokenizer()
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    seqs, images, videos = [], [], []
    for parts in prompts:
        ids = [tok.bos_token_id]
        for part in parts:
            if isinstance(part, str):
                ids += tok.convert_tokens_to_ids(part.split())
                continue
            kind, grid = part
            thw = (1, *grid) if kind == "image" else tuple(grid)
            n = thw[0] * thw[1] * thw[2] // 4
            pad = cfg.image_token_id if kind == "image" else cfg.video_token_id
            ids += [cfg.vision_start_token_id] + [pad] * n + [cfg.vision_end_token_id]
            (images if kind == "image" else videos).append(thw)
        seqs.append(ids)
    out = _qwen_batch(cfg, seqs, images, videos, tok.pad_token_id, padding, QWEN_PATCH_ROW, g)
    if videos:
        out["second_per_grid_ts"] = torch.full((len(videos),), second_per_grid_t)
    return out


def _qwen_batch(cfg, seqs, images, videos, pad_id: int, padding: str, patch_row: int, g) -> dict:
    """Token sequences padded into a batch (``input_ids``, ``attention_mask``, ``mm_token_type_ids``) and random
    pixel rows for the image and video grids, as the Qwen processors lay them out."""
    width = max(map(len, seqs))
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, ids in enumerate(seqs):
        cols = slice(width - len(ids), width) if padding == "left" else slice(0, len(ids))
        input_ids[i, cols] = torch.tensor(ids)
        mask[i, cols] = 1
    types = torch.where(input_ids == cfg.image_token_id, 1, torch.where(input_ids == cfg.video_token_id, 2, 0))
    out = {"input_ids": input_ids, "attention_mask": mask, "mm_token_type_ids": types}
    for kind, grids in (("image", images), ("video", videos)):
        if grids:
            suffix = "" if kind == "image" else "_videos"
            out[f"{kind}_grid_thw"] = torch.tensor(grids)
            out[f"pixel_values{suffix}"] = torch.randn(int(out[f"{kind}_grid_thw"].prod(-1).sum()), patch_row,
                                                       generator=g)
    return out


def qwen_single(inp, i):
    """Sample ``i`` of a :func:`qwen_inputs` batch alone (padding dropped, its own images and videos)."""
    real = inp["attention_mask"][i].bool()
    out = {k: inp[k][i:i + 1, real] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    for kind, pixels, grid in (("image", "pixel_values", "image_grid_thw"),
                               ("video", "pixel_values_videos", "video_grid_thw")):
        if grid not in inp:
            continue
        code = 1 if kind == "image" else 2
        # items per sample: count the placeholder runs of each kind, row by row
        runs = []
        for row in inp["mm_token_type_ids"]:
            r = (row == code).long()
            runs.append(int(((r[1:] - r[:-1]) == 1).sum()) + int(r[0]))
        first, count = sum(runs[:i]), runs[i]
        if count == 0:
            continue
        rows = inp[grid].prod(-1)
        start = int(rows[:first].sum())
        out[grid] = inp[grid][first:first + count]
        out[pixels] = inp[pixels][start:start + int(rows[first:first + count].sum())]
        if kind == "video":
            out["second_per_grid_ts"] = inp["second_per_grid_ts"][first:first + count]
    return out


QWEN3_PATCH_ROW = 3 * 2 * 16 * 16  # channels x temporal patch x 16 x 16


def tiny_qwen3(attn: str = "sdpa", layers: int = 8, seed: int = 0, moe: bool = False, scale: float = 1.0):
    """A random Qwen3-VL (or Qwen3-VL-MoE): a 3-block vision tower (16 px patches, 2x2 merge, learned position
    grid of 8x8) with DeepStack taps after blocks 0 and 2 (added after LLM layers 0 and 1), a 64-wide text model
    with head_dim 16 and interleaved ``mrope_section`` [2, 3, 3], and :func:`qwen_tokenizer`'s vocabulary.
    ``scale`` multiplies the DeepStack mergers' output weights (at init their additions are tiny)."""
    import transformers

    tok = qwen_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    torch.manual_seed(seed)
    text = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3],
                         "mrope_interleaved": True},
    )
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64, deepstack_visual_indexes=[0, 2],
                  num_position_embeddings=64)
    config_cls = transformers.Qwen3VLMoeConfig if moe else transformers.Qwen3VLConfig
    model_cls = transformers.Qwen3VLMoeForConditionalGeneration if moe else transformers.Qwen3VLForConditionalGeneration
    cfg = config_cls(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    model = model_cls(cfg).eval()
    if scale != 1.0:
        with torch.no_grad():
            for m in model.model.visual.deepstack_merger_list:
                m.linear_fc2.weight.mul_(scale)
    model.set_attn_implementation(attn)
    model.generation_config.suppress_tokens = [cfg.image_token_id, cfg.video_token_id]
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model


def qwen3_inputs(model, prompts, seed: int = 0, padding: str = "left"):
    """A padded batch of Qwen3-VL prompts, as its processor lays them out, with random pixel rows: parts as in
    :func:`qwen_inputs` (grids in 16 px patches); a video is written frame group by frame group, each group's
    placeholders after a timestamp word and inside its own vision start/end tokens."""
    tok = qwen_tokenizer()
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    stamp = tok.convert_tokens_to_ids("the")
    seqs, images, videos = [], [], []
    for parts in prompts:
        ids = [tok.bos_token_id]
        for part in parts:
            if isinstance(part, str):
                ids += tok.convert_tokens_to_ids(part.split())
                continue
            kind, grid = part
            thw = (1, *grid) if kind == "image" else tuple(grid)
            per_group = thw[1] * thw[2] // 4
            if kind == "image":
                ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * per_group + [cfg.vision_end_token_id]
            else:
                for _ in range(thw[0]):
                    ids += [stamp, cfg.vision_start_token_id] + [cfg.video_token_id] * per_group
                    ids += [cfg.vision_end_token_id]
            (images if kind == "image" else videos).append(thw)
        seqs.append(ids)
    return _qwen_batch(cfg, seqs, images, videos, tok.pad_token_id, padding, QWEN3_PATCH_ROW, g)


def qwen3_single(inp, i):
    """Sample ``i`` of a :func:`qwen3_inputs` batch alone (padding dropped, its own images and videos)."""
    real = inp["attention_mask"][i].bool()
    out = {k: inp[k][i:i + 1, real] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    for code, pixels, grid in ((1, "pixel_values", "image_grid_thw"), (2, "pixel_values_videos", "video_grid_thw")):
        if grid not in inp:
            continue
        tokens = (inp[grid].prod(-1) // 4).tolist()  # placeholders of each item
        item, spans = 0, []
        for row in inp["mm_token_type_ids"]:  # items per sample: taken in order until its placeholders are used
            n, first = int((row == code).sum()), item
            while n > 0:
                n -= tokens[item]
                item += 1
            spans.append((first, item))
        first, stop = spans[i]
        if stop == first:
            continue
        rows = inp[grid].prod(-1)
        start = int(rows[:first].sum())
        out[grid] = inp[grid][first:stop]
        out[pixels] = inp[pixels][start:start + int(rows[first:stop].sum())]
    return out


def method_options(method: str) -> dict:
    """The options a test applies ``method`` with on a random tiny model: an untrained LPM for methods that read
    one (from the registry, so a new LPM method is covered), a fixed seed for ``random``."""
    import learnpruner

    if method == "random":
        return {"seed": 1}
    return {"lpm": "random"} if learnpruner.get_method(method).needs_lpm else {}


def tiny_llava_onevision(attn: str = "sdpa", layers: int = 8, seed: int = 0, pinpoints=None):
    """A random LLaVA-OneVision: SigLIP at 56 px (16 tokens per crop, no [CLS]), grids up to 2x2 crops
    (``anyres_max_9`` never interpolates them; ``pinpoints`` may give larger grids), a Qwen2 text model, and the
    testbed's word-level tokenizer (``<image>`` the image token; the video token is one id past it)."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    from learnpruner.testbed.model import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(seed)
    text_cfg = Qwen2Config(
        vocab_size=len(tok) + 1, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    vision_cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                    image_size=56, patch_size=14)
    cfg = LlavaOnevisionConfig(
        vision_config=vision_cfg, text_config=text_cfg, image_token_id=tok.convert_tokens_to_ids("<image>"),
        video_token_id=len(tok), vision_feature_layer=-1, vision_feature_select_strategy="full",
        image_grid_pinpoints=pinpoints or NEXT_PINPOINTS,
    )
    cfg._attn_implementation = attn
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    model.set_attn_implementation(attn)
    model.generation_config.suppress_tokens = [cfg.image_token_id, cfg.video_token_id]
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def tiny_internvl(attn: str = "sdpa", layers: int = 8, seed: int = 0):
    """A random InternVL3: InternViT at 112 px (64 patches, pixel-shuffled to 16 tokens per tile), a Qwen2 text
    model, and the testbed's word-level tokenizer (``<image>`` the placeholder; ``<img>``/``</img>`` two ids past
    the vocabulary)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

    from learnpruner.testbed.model import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(seed)
    text_cfg = Qwen2Config(
        vocab_size=len(tok) + 2, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    vision_cfg = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                      image_size=(112, 112), patch_size=(14, 14))
    cfg = InternVLConfig(vision_config=vision_cfg, text_config=text_cfg, image_token_id=tok.convert_tokens_to_ids(
        "<image>"), image_seq_length=16, downsample_ratio=0.5)
    cfg._attn_implementation = attn
    model = InternVLForConditionalGeneration(cfg).eval()
    model.set_attn_implementation(attn)
    model.generation_config.suppress_tokens = [cfg.image_token_id]
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


class CountingProcessor:
    """A torchvision-free stand-in for a family's processor (the stock OneVision and InternVL processors need a video
    processor, which needs torchvision): ``images`` turns PIL images into the model's pixel inputs, ``counts`` gives
    each image's placeholder text, the testbed's word-level tokenizer and chat template do the rest. The counts come
    from the model's own layout (the adapter), as the stock processors compute them from the config."""

    image_token = "<image>"

    def __init__(self, images, counts):
        from learnpruner.testbed.model import CHAT_TEMPLATE, build_tokenizer

        self.tokenizer = build_tokenizer()
        self.tokenizer.padding_side = "left"
        self.chat_template = CHAT_TEMPLATE
        self._images, self._counts = images, counts
        self.batch_decode = self.tokenizer.batch_decode

    def __call__(self, text, images=None, return_tensors="pt", padding=True, **kwargs):
        from transformers import BatchFeature

        texts = [text] if isinstance(text, str) else list(text)
        out = {}
        if images:
            flat = [im for group in images for im in (group if isinstance(group, list) else [group])]
            px = self._images(flat)
            out.update(px)
            places = iter(self._counts(px))
            texts = ["".join(part + (next(places) if k < t.count(self.image_token) else "")
                             for k, part in enumerate(t.split(self.image_token))) for t in texts]
        out.update(self.tokenizer(texts, return_tensors=return_tensors, padding=True))
        return BatchFeature(out)

    def apply_chat_template(self, messages, add_generation_prompt=False, **kwargs):
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)


def onevision_processor(model):
    """:class:`CountingProcessor` for :func:`tiny_llava_onevision`: OneVision's PIL image processor at 56 px crops."""
    from transformers import LlavaOnevisionImageProcessorPil

    from learnpruner.adapters import adapter_for

    ad = adapter_for(model)
    images = LlavaOnevisionImageProcessorPil(size={"height": 56, "width": 56},
                                             image_grid_pinpoints=model.config.image_grid_pinpoints)

    def counts(px):
        crops = ad._num_crops(px["image_sizes"], None)
        return ["<image>" * int(ad._image_layout(c, s.tolist(), None)[0].numel())
                for c, s in zip(crops, px["image_sizes"])]

    return CountingProcessor(lambda ims: dict(images(images=ims, return_tensors="pt")), counts)


def internvl_processor(model, tiles: int = 2):
    """:class:`CountingProcessor` for :func:`tiny_internvl`: every image resized to ``tiles`` side-by-side 112 px tiles
    (the thumbnail left out), placeholders 16 per tile (``<img>``/``</img>`` left out: plain text here)."""
    import numpy as np

    per = model.config.image_seq_length

    def pixels(ims):
        out = []
        for im in ims:
            arr = np.asarray(im.convert("RGB").resize((112 * tiles, 112)), dtype=np.float32) / 127.5 - 1
            t = torch.from_numpy(arr).permute(2, 0, 1)
            out += [t[:, :, 112 * k:112 * (k + 1)] for k in range(tiles)]
        return {"pixel_values": torch.stack(out)}

    return CountingProcessor(pixels, lambda px: ["<image>" * (per * tiles)] * (px["pixel_values"].shape[0] // tiles))


def save_onevision(path, pinpoints) -> str:
    """A tiny random LLaVA-OneVision (SigLIP at 56 px, 16 tokens a crop; Qwen2 with head size 32 for vLLM's CPU
    attention) and its processor (needs torchvision: the video processor), saved to ``path``."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    from learnpruner.testbed.model import CHAT_TEMPLATE, build_tokenizer

    tok = build_tokenizer()
    tok.add_tokens(["<video>"], special_tokens=True)
    torch.manual_seed(0)
    text = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                image_size=56, patch_size=14, vision_use_head=False)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_grid_pinpoints=pinpoints,
                                  image_token_id=tok.convert_tokens_to_ids("<image>"),
                                  video_token_id=tok.convert_tokens_to_ids("<video>"), vision_feature_layer=-1,
                                  vision_feature_select_strategy="full")
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.model.image_newline.normal_()
    images = LlavaOnevisionImageProcessor(size={"height": 56, "width": 56}, image_grid_pinpoints=pinpoints)
    videos = LlavaOnevisionVideoProcessor(size={"height": 56, "width": 56})
    processor = LlavaOnevisionProcessor(image_processor=images, tokenizer=tok, video_processor=videos,
                                        num_image_tokens=16, vision_feature_select_strategy="full",
                                        chat_template=CHAT_TEMPLATE)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def save_internvl(path) -> str:
    """A tiny random InternVL3 (InternViT at 112 px: 16 tokens a tile; up to 4 tiles plus the thumbnail; Qwen2 with
    head size 32) and its processor (needs torchvision), saved to ``path``; its chat template writes
    ``<IMG_CONTEXT>`` for an image."""
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
        InternVLVisionConfig,
        PreTrainedTokenizerFast,
        Qwen2Config,
    )

    from learnpruner.testbed.model import CHAT_TEMPLATE, build_tokenizer

    words = build_tokenizer()
    special = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
               "video_token": "<video>"}
    words.add_tokens(list(special.values()), special_tokens=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=words.backend_tokenizer, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", pad_token="<pad>", padding_side="left",
                                  extra_special_tokens=special)
    torch.manual_seed(0)
    text = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                  image_size=(112, 112), patch_size=(14, 14))
    config = InternVLConfig(vision_config=vision, text_config=text, image_seq_length=16, downsample_ratio=0.5,
                            image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"))
    model = InternVLForConditionalGeneration(config).eval()
    images = GotOcr2ImageProcessor(size={"height": 112, "width": 112}, crop_to_patches=True, min_patches=1,
                                   max_patches=4)
    processor = InternVLProcessor(image_processor=images, tokenizer=tok,
                                  video_processor=InternVLVideoProcessor(size={"height": 112, "width": 112}),
                                  image_seq_length=16,
                                  chat_template=CHAT_TEMPLATE.replace("<image>", "<IMG_CONTEXT>"))
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)
