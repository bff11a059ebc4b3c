"""Model-family adapters: everything family-specific lives in one small file per family."""

from __future__ import annotations

from torch import nn

from .base import Adapter
from .llava import LlavaAdapter
from .llava_bench import LLAVA_ARCHS
from .llava_bench import bench_processor as llava_bench_processor
from .llava_next import LlavaNextAdapter
from .qwen2_5_vl import Qwen2_5_VLAdapter
from .qwen2_5_vl_bench import QWEN_ARCHS
from .qwen2_5_vl_bench import bench_processor as qwen_bench_processor
from .qwen3_vl import Qwen3VLAdapter
from .qwen3_vl_bench import QWEN3_ARCHS
from .qwen3_vl_bench import bench_processor as qwen3_bench_processor
from .video_llava import VideoLlavaAdapter

__all__ = ["Adapter", "ADAPTERS", "BENCH_ARCHS", "BENCH_PROCESSORS", "adapter_for", "families_of", "register_adapter"]

ADAPTERS: list[type[Adapter]] = [LlavaNextAdapter, LlavaAdapter, Qwen3VLAdapter, Qwen2_5_VLAdapter, VideoLlavaAdapter]
# the benchmark's named architectures (random weights), each family's from its own module
BENCH_ARCHS = {**LLAVA_ARCHS, **QWEN_ARCHS, **QWEN3_ARCHS}
# family -> the processor of an architecture benchmark (word-level tokenizer; sets the config's token ids)
BENCH_PROCESSORS = {"llava": llava_bench_processor, "qwen2_5_vl": qwen_bench_processor,
                    "qwen3_vl": qwen3_bench_processor}


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Add a family's adapter (a subclass of :class:`Adapter`; usable as a class decorator). It is tried before
    the built-in ones, so a subclass of a supported model class can get an adapter of its own."""
    if not (isinstance(cls, type) and issubclass(cls, Adapter)):
        raise TypeError(f"register_adapter takes a subclass of learnpruner.adapters.Adapter, got {cls!r}")
    if cls not in ADAPTERS:
        ADAPTERS.insert(0, cls)
    return cls


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
