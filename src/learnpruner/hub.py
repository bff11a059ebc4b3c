"""Loading models by name: hub ids and local paths through ``from_pretrained``, plus built-in names.

Built-in names need no network:

- ``shapes-tiny``: the small LLaVA trained on ShapesVQA that ships inside the package (with its LPM).
- ``tiny-random-llava``: the ShapesVQA architecture with random weights (answers are noise), for
  checking the pipeline end to end on a fresh machine.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["BUILTIN_MODELS", "load", "resolve", "format_prompt", "parse_dtype", "check_device", "available_devices"]

ASSETS = Path(__file__).resolve().parent / "assets"
BUILTIN_MODELS = {
    "shapes-tiny": ASSETS / "shapes-tiny",
    "tiny-random-llava": None,
}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "auto": "auto"}


def parse_dtype(name: str):
    """``float32``/``fp32``, ``float16``/``fp16``, ``bfloat16``/``bf16`` or ``auto``."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; accepted: {', '.join(DTYPES)}") from None


def available_devices() -> list[str]:
    """The devices this torch can use: ``cpu``, then each CUDA GPU (``cuda:N``), then ``mps``."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def check_device(device: str) -> str:
    """``device`` unchanged if this machine has it; ``ValueError`` naming what is available otherwise."""
    available = ", ".join(available_devices())
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; accepted: cpu, cuda, cuda:N, mps (available here: "
                         f"{available})") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise ValueError(f"device {device!r} is not available: this torch {torch.__version__} sees no CUDA GPU; "
                             f"available: {available}")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {device!r} is not available: {count} CUDA GPU(s); available: {available}")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} is not available on this machine; available: {available}")
    elif dev.type not in ("cpu", "cuda", "mps", "meta"):
        backend = getattr(torch, dev.type, None)
        if backend is not None and hasattr(backend, "is_available") and not backend.is_available():
            raise ValueError(f"device {device!r} is not available on this machine; available: {available}")
    return device


def resolve(name: str) -> str:
    """A built-in name's local folder, or ``name`` unchanged (a hub id or a local path)."""
    if name in BUILTIN_MODELS and BUILTIN_MODELS[name] is not None:
        path = BUILTIN_MODELS[name]
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"built-in model {name!r} is not installed at {path} (this build ships without it: train it with "
                "`python -m learnpruner.testbed.train`); pass a hub id, a local path, or tiny-random-llava"
            )
        return str(path)
    return name


def load(name: str, device: str = "cpu", dtype: str = "auto"):
    """``(model, processor)`` for a hub id, a local folder or a built-in name, in eval mode on ``device``."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    check_device(device)
    torch_dtype = parse_dtype(dtype)
    if name == "tiny-random-llava":
        from .testbed.model import build_model, build_processor

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            processor = build_processor()
            model = build_model(processor.tokenizer)
        model = model.to(device, torch.float32 if torch_dtype == "auto" else torch_dtype)
        return model.eval(), processor
    path = resolve(name)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype)
    processor = AutoProcessor.from_pretrained(path)
    return model.to(device).eval(), processor


def format_prompt(processor, prompt: str, kind: str = "image") -> str:
    """The text to feed the processor: the user's text if it holds the processor's image (or video) token, else
    one user turn (the image or video, then the text) through the processor's own chat template, so each
    family formats its way."""
    image_token = getattr(processor, f"{kind}_token", None) or f"<{kind}>"
    if image_token in prompt:
        return prompt
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    raise ValueError(
        f"the processor has no chat template, so the prompt must place the image itself: put {image_token!r} "
        f"in the prompt (e.g. 'USER: {image_token}\\n{prompt} ASSISTANT:' for LLaVA-1.5), got {prompt!r}"
    )
