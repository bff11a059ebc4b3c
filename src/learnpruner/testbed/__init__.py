"""ShapesVQA testbed: a synthetic VQA dataset and a tiny LLaVA model trained on it from scratch."""

from .model import build_model, build_processor, encode_conversation, question_prompt, save
from .shapes import (
    QTYPES,
    SceneObject,
    TextBox,
    VQAItem,
    answer_question,
    generate_item,
    load_split,
    render_scene,
    to_jsonl,
    train_stream,
)

__all__ = [
    "QTYPES", "SceneObject", "TextBox", "VQAItem", "answer_question", "build_model", "build_processor",
    "encode_conversation", "question_prompt", "generate_item", "load_split", "render_scene", "save", "to_jsonl",
    "train_stream",
]
