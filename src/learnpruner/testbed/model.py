"""A tiny LLaVA (CLIP vision tower + Llama text model) and its processor for the ShapesVQA testbed.

Everything is a stock Hugging Face class (``LlavaForConditionalGeneration``, ``LlavaProcessor``), so the
saved directory loads with ``from_pretrained`` like any LLaVA-1.5 checkpoint: 336 px images, patch 14,
576 visual tokens, ``vision_feature_layer=-2``, ``vision_feature_select_strategy="default"``.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from .shapes import IMAGE_SIZE, PATCH, vocabulary

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
PROMPT_WORDS = ("user", "assistant", ":")
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # 576

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}USER: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %} "
    "{% else %}ASSISTANT: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{{ m['content'][0]['text'] }}{% endif %}"
    " </s> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

DEFAULT_VISION: dict[str, Any] = dict(
    image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=96, intermediate_size=384, num_hidden_layers=4,
    num_attention_heads=4, projection_dim=96, attention_dropout=0.0,
)
DEFAULT_TEXT: dict[str, Any] = dict(
    hidden_size=192, intermediate_size=512, num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=2,
    max_position_embeddings=1024, rms_norm_eps=1e-5, attention_dropout=0.0, tie_word_embeddings=True,
)
TINY_VISION: dict[str, Any] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
TINY_TEXT: dict[str, Any] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=1)


def question_prompt(question: str) -> str:
    """The single-turn LLaVA-1.5 prompt the testbed is trained and evaluated with (for any model and its chat
    template, :func:`learnpruner.hub.format_prompt`)."""
    return f"USER: <image>\n{question} ASSISTANT:"


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the ShapesVQA vocabulary (lowercasing, punctuation split, prepends ``<s>``)."""
    words = list(SPECIAL_TOKENS) + list(PROMPT_WORDS) + [w for w in vocabulary() if w not in PROMPT_WORDS]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left", model_max_length=1024,
    )
    return fast


def _image_processor():
    try:
        import torchvision  # noqa: F401
        from transformers import CLIPImageProcessor as cls
    except ImportError:  # transformers 5 needs torchvision for the default (torch) backend
        from transformers import CLIPImageProcessorPil as cls
    return cls(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
               do_center_crop=True, do_resize=True, do_normalize=True, image_mean=OPENAI_CLIP_MEAN,
               image_std=OPENAI_CLIP_STD)


def build_processor() -> LlavaProcessor:
    """LlavaProcessor (word-level tokenizer + 336 px CLIP image processor) expanding ``<image>`` to 576 tokens."""
    return LlavaProcessor(image_processor=_image_processor(), tokenizer=build_tokenizer(), patch_size=PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE, image_token="<image>")


def build_config(tokenizer: PreTrainedTokenizerFast | None = None, vision: dict | None = None,
                 text: dict | None = None, tiny: bool = False) -> LlavaConfig:
    """LlavaConfig for the testbed; ``vision``/``text`` override CLIPVisionConfig/LlamaConfig fields.
    ``tiny`` starts from a very small config (for unit tests)."""
    tok = tokenizer or build_tokenizer()
    v = {**DEFAULT_VISION, **(TINY_VISION if tiny else {}), **(vision or {})}
    t = {**DEFAULT_TEXT, **(TINY_TEXT if tiny else {}), **(text or {})}
    t.update(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
             eos_token_id=tok.eos_token_id)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(**v), text_config=LlamaConfig(**t),
        image_token_id=tok.convert_tokens_to_ids("<image>"), projector_hidden_act="gelu",
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=NUM_IMAGE_TOKENS,
        tie_word_embeddings=t.get("tie_word_embeddings", True),
    )
    cfg.pad_token_id = tok.pad_token_id
    return cfg


def build_model(tokenizer: PreTrainedTokenizerFast | None = None, vision: dict | None = None,
                text: dict | None = None, tiny: bool = False, seed: int | None = None,
                ) -> LlavaForConditionalGeneration:
    """A randomly initialised tiny LlavaForConditionalGeneration (see ``build_config``)."""
    cfg = build_config(tokenizer, vision, text, tiny)
    if seed is not None:
        torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    gc = model.generation_config
    tok = tokenizer or build_tokenizer()
    gc.pad_token_id, gc.eos_token_id, gc.bos_token_id = tok.pad_token_id, tok.eos_token_id, tok.bos_token_id
    gc.do_sample, gc.max_new_tokens = False, 4
    return model


def save(model: LlavaForConditionalGeneration, processor: LlavaProcessor, out_dir: str,
         dtype: torch.dtype | None = None) -> None:
    """``save_pretrained`` model (safetensors, optionally cast to ``dtype``) and processor into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    m = model if dtype is None else copy.deepcopy(model).to(dtype)
    m.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)


def encode_conversation(tokenizer: PreTrainedTokenizerFast, qas: list[tuple[str, str]],
                        num_image_tokens: int = NUM_IMAGE_TOKENS) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 except answer words and ``</s>``) for a multi-turn conversation whose
    first turn is exactly ``question_prompt(question)`` as expanded by the processor."""
    ids: list[int] = [tokenizer.bos_token_id] + [tokenizer.convert_tokens_to_ids("<image>")] * num_image_tokens
    labels: list[int] = [-100] * len(ids)
    for k, (q, a) in enumerate(qas):
        prompt = f"USER: {q} ASSISTANT:" if k else f"\n{q} ASSISTANT:"
        if k == 0:
            head = tokenizer("USER:", add_special_tokens=False)["input_ids"]
            ids[1:1] = head
            labels[1:1] = [-100] * len(head)
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ans = tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids += p + ans
        labels += [-100] * len(p) + ans
    return ids, labels
