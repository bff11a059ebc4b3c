"""Model-family adapters: everything family-specific lives in one small file per family."""

from __future__ import annotations

from torch import nn

from .base import Adapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .qwen2_5_vl import Qwen2_5_VLAdapter
from .video_llava import VideoLlavaAdapter

__all__ = ["Adapter", "ADAPTERS", "adapter_for", "families_of"]

ADAPTERS: list[type[Adapter]] = [LlavaNextAdapter, LlavaAdapter, Qwen2_5_VLAdapter, VideoLlavaAdapter]


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter that handles ``model``; ``TypeError`` naming the supported classes otherwise."""
    for cls in ADAPTERS:
        if cls.matches(model):
            return cls(model)
    supported = ", ".join(name for a in ADAPTERS for name in a.model_classes)
    raise TypeError(f"learnpruner does not support {type(model).__name__}; supported model classes: {supported}")


def families_of(method) -> list[str]:
    """The model families (adapter ``family`` names) a registered method runs on."""
    return [a.family for a in ADAPTERS if a.has_cls or not method.needs_cls]
