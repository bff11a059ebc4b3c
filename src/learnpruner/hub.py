"""Loading models by name: hub ids and local paths through ``from_pretrained``, plus built-in names.

Built-in names need no network:

- ``shapes-tiny``: the small LLaVA trained on ShapesVQA that ships inside the package (with its LPM).
- ``shapes-tiny-full``: the same architecture fine-tuned with every visual token in every step (no token
  dropping), shipped in half precision and loaded in float32 on a CPU.
- ``tiny-random-llava``: the ShapesVQA architecture with random weights (answers are noise), for
  checking the pipeline end to end on a fresh machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["BUILTIN_MODELS", "load", "resolve", "format_prompt", "parse_dtype", "check_device", "available_devices"]

ASSETS = Path(__file__).resolve().parent / "assets"
BUILTIN_MODELS = {
    "shapes-tiny": ASSETS / "shapes-tiny",
    "shapes-tiny-full": ASSETS / "shapes-tiny-full",
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
                "`python -m recipes.testbed.train`); pass a hub id, a local path, or tiny-random-llava"
            )
        return str(path)
    return name


def load_config(name: str):
    """The configuration of a hub id, local folder or built-in name; ``FileNotFoundError`` naming ``name`` and
    what is accepted when it is none of them (a local folder without ``config.json``, or an id neither in the
    local Hugging Face cache nor reachable)."""
    from transformers import AutoConfig

    path = resolve(name)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"model {name!r}: the folder {path} holds no config.json (not a saved model)")
    try:
        return AutoConfig.from_pretrained(path)
    except OSError:
        builtin = ", ".join(BUILTIN_MODELS)
        raise FileNotFoundError(
            f"model {name!r} is not a local folder, a built-in name ({builtin}), nor a hub id in the local Hugging "
            "Face cache or reachable online; pass a folder saved with save_pretrained or a downloaded hub id"
        ) from None


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
    config = load_config(name)  # a name that is nowhere: the project's message, not transformers' repo-id one
    if torch_dtype == "auto" and name in BUILTIN_MODELS and torch.device(device).type == "cpu" and \
            getattr(config, "dtype", None) in (torch.float16, torch.bfloat16, "float16", "bfloat16"):
        torch_dtype = torch.float32  # a built-in model stored in half precision: CPUs compute float32 faster
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


def format_turn(processor, text: str, kind: str = "image") -> str:
    """The text to feed the processor for one user turn of LLaVA-format data (an eval question): an
    ``<image>`` (``<video>``) tag in ``text`` marks where the media goes, as LLaVA data writes it, and the turn
    goes through the processor's chat template either way. A processor without a chat template gets
    :func:`format_prompt`'s rule (the text as it is if it holds the processor's own placeholder)."""
    from .media import TAGS, turn_content

    if not getattr(processor, "chat_template", None):
        return format_prompt(processor, text, kind)
    own = getattr(processor, f"{kind}_token", None)
    tag = TAGS[kind] if TAGS[kind] in text or not own else own
    messages = [{"role": "user", "content": turn_content(text, kind, tag)}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def context_length(model) -> int | None:
    """The longest sequence the model's text model takes (``max_position_embeddings``), or None if unknown."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = getattr(cfg, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def check_context(model, lengths, max_new_tokens: int, names) -> None:
    """Refuse prompts that do not fit the model's context: ``ValueError`` naming the first that does not, its
    length (visual tokens included) and the limit, before any generation runs. ``lengths``: tokens per prompt
    (padding excluded); ``names``: how each prompt is named in the message."""
    limit = context_length(model)
    if limit is None:
        return
    for n, name in zip(lengths, names):
        if int(n) + max_new_tokens > limit:
            raise ValueError(
                f"{name}: the prompt is {int(n)} tokens (visual tokens included), and {max_new_tokens} new tokens "
                f"would pass the model's context of {limit} (max_position_embeddings); shorten the question or "
                "lower --max-new-tokens (nothing is truncated silently)"
            )


def _config_dict(config) -> dict:
    """A model configuration without what does not change the model's answers (versions, paths, the dtype it
    was saved in: the dtype it runs in is recorded apart)."""
    volatile = {"transformers_version", "_name_or_path", "dtype", "torch_dtype", "architectures"}

    def clean(d):
        return {k: clean(v) if isinstance(v, dict) else v for k, v in d.items() if k not in volatile}

    return clean(config.to_dict())


def model_fingerprint(model) -> dict:
    """``{"model": name, "fingerprint": hash}``: the name it was loaded from, and a hash of its configuration and
    of a strided sample of every weight (64 values a tensor, in float64), so another model, or the same folder
    retrained, is told apart without reading every weight."""
    import hashlib
    import json

    h = hashlib.sha256(json.dumps(_config_dict(model.config), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.device.type == "meta":
                continue
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 64)][:64].to("cpu", torch.float64)
            h.update(f"{name} {tuple(p.shape)}".encode())
            h.update(sample.numpy().tobytes())
    return {"model": str(getattr(model, "name_or_path", "") or type(model).__name__),
            "fingerprint": h.hexdigest()[:16]}
