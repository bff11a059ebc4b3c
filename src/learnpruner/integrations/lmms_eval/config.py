"""The ``learnpruner`` lmms-eval model's arguments: parsed and checked before any weights load, then the loader.

``--model_args pretrained=ID_OR_PATH,method=M,tokens=T|ratio=R,lpm=PATH,dtype=D,device=D,batch_size=N`` plus
``attn_implementation=sdpa|eager|...``, :func:`learnpruner.apply`'s keyword arguments (``fast=true``,
``budget=paper``, ``stage1_unit=crop``: whatever ``apply`` names, read from its signature) and method options
(``diversity=0.1``, ``layer=8``, ``recycle=false``, ``layers=[8,16,24]``), all parsed like the CLI's
``--option`` values (ints, floats, bools; a list in brackets or quotes, since ``,`` separates model args).

:func:`check_model` runs :func:`learnpruner.apply` on a weightless copy of the model (built from its config
on the ``meta`` device), so an unknown method, bad options, a budget the method cannot reach, an LPM that does
not fit and an unsupported model family fail with ``apply``'s own message before a checkpoint is read.

Families: whatever ``AutoModelForImageTextToText`` builds and :mod:`learnpruner.adapters` supports (LLaVA-1.5,
LLaVA-NeXT, Qwen2.5-VL); a new adapter makes its family work here with no change to this module. Visual kinds
other than images (video) are added in one place, ``LearnPrunerLMM._visuals`` / ``_inputs``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

import learnpruner

from ...budget import check_ratio, check_tokens
from ...hub import BUILTIN_MODELS, check_device, parse_dtype, resolve
from ...options import option_value
from ...plan import DEFAULT_TOKENS

__all__ = ["ModelArgs", "APPLY_KEYWORDS", "parse_model_args", "parse_option", "check_model", "load_model",
           "default_device"]

# apply()'s own keyword arguments besides the budget (fast, stage1_unit, budget, ...); other model args are options
APPLY_KEYWORDS = tuple(name for name, p in inspect.signature(learnpruner.apply).parameters.items()
                       if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "ratio")

@dataclass
class ModelArgs:
    pretrained: str
    method: str = "learnpruner"
    tokens: int | None = None
    ratio: float | None = None
    options: dict = field(default_factory=dict)  # method options, ``lpm`` included
    dtype: str = "auto"
    device: str | None = None
    batch_size: int = 1
    attn_implementation: str | None = None
    keywords: dict = field(default_factory=dict)  # apply()'s keyword arguments: fast, budget, stage1_unit, ...

    def budget(self) -> dict:
        """``apply``'s budget keywords: ``tokens=`` or ``ratio=`` (neither: apply's default)."""
        return {"tokens": self.tokens} if self.ratio is None else {"ratio": self.ratio}

    def apply_kwargs(self) -> dict:
        """Everything :func:`learnpruner.apply` takes after ``method``."""
        return {**self.budget(), **self.keywords, **self.options}

    @property
    def fast(self) -> bool:
        return bool(self.keywords.get("fast", False))

    def describe(self) -> str:
        budget = f"ratio={self.ratio}" if self.ratio is not None else f"tokens={self.tokens or DEFAULT_TOKENS}"
        opts = "".join(f",{k}={v}" for k, v in {**self.keywords, **self.options}.items())
        return f"method={self.method},{budget}{opts}"


def parse_option(value):
    """A method option from ``--model_args``: strings parsed like the CLI's ``--option`` values.

    lmms-eval already turns ``true``/``false`` and numbers into Python values; ``[1,2,4]`` and ``"1,2,4"``
    (quoted or bracketed, since ``,`` separates model args) become ``(1, 2, 4)``.
    """
    if not isinstance(value, str):
        return value
    text = value.strip()
    if len(text) >= 2 and text[0] + text[-1] in ("[]", "()"):
        return tuple(option_value(t.strip()) for t in text[1:-1].split(",") if t.strip())
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1].strip()
    return option_value(text)


def _flag(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{name} must be true or false, got {value!r}")


def parse_model_args(pretrained: str | None = None, method: str = "learnpruner", tokens=None, ratio=None,
                     lpm: str | None = None, dtype: str = "auto", device: str | None = None, batch_size=1,
                     max_batch_size=None, attn_implementation: str | None = None, **options) -> ModelArgs:
    """Check the model args that need no model: method, budget, option values, dtype, device, batch size.

    ``ValueError`` / ``TypeError`` with :func:`learnpruner.apply`'s message for what ``apply`` checks.
    """
    if not pretrained or not isinstance(pretrained, str):
        raise ValueError("model_args needs pretrained=ID_OR_PATH (a hub id, a local folder or a built-in name: "
                         f"{', '.join(BUILTIN_MODELS)})")
    m = learnpruner.get_method(method)
    if tokens is not None and ratio is not None:
        raise ValueError(f"give tokens= or ratio=, not both (got tokens={tokens!r}, ratio={ratio!r})")
    ratio = check_ratio(ratio) if ratio is not None else None
    tokens = check_tokens(tokens) if tokens is not None else None
    keywords = {k: parse_option(options.pop(k)) for k in APPLY_KEYWORDS if k in options}
    if "fast" in keywords:
        keywords["fast"] = _flag("fast", keywords["fast"])
    opts = {k: parse_option(v) for k, v in options.items()}
    if lpm is not None:
        opts["lpm"] = str(lpm)
    m.check_options(opts)
    parse_dtype(str(dtype))
    if device is not None:
        check_device(str(device))
    try:
        batch = int(batch_size)
    except (TypeError, ValueError):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r} (auto is not supported)") from None
    if batch <= 0 or str(batch_size).strip() != str(batch):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return ModelArgs(pretrained=pretrained, method=method, tokens=tokens, ratio=ratio, options=opts,
                     dtype=str(dtype), device=None if device is None else str(device), batch_size=batch,
                     attn_implementation=attn_implementation, keywords=keywords)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _skeleton(args: ModelArgs):
    """The model without its weights (parameters on the ``meta`` device), from its config alone."""
    from transformers import AutoModelForImageTextToText

    from ...adapters import ADAPTERS
    from ...hub import load_config

    if args.pretrained in BUILTIN_MODELS and BUILTIN_MODELS[args.pretrained] is None:
        from ...hub import load

        return load(args.pretrained)[0]  # built in code with random weights: nothing to download or read
    config = load_config(args.pretrained)
    kwargs = {"attn_implementation": args.attn_implementation} if args.attn_implementation else {}
    try:
        with torch.device("meta"):
            return AutoModelForImageTextToText.from_config(config, **kwargs)
    except ValueError:  # not an image-text-to-text architecture at all
        name = ", ".join(getattr(config, "architectures", None) or [type(config).__name__])
        supported = ", ".join(c for a in ADAPTERS for c in a.model_classes)
        raise TypeError(f"learnpruner does not support {name}; supported model classes: {supported}") from None


def check_model(args: ModelArgs) -> None:
    """Everything :func:`learnpruner.apply` checks (family, method on it, budget, options, LPM), on a model
    built without weights; raises what ``apply`` raises."""
    model = _skeleton(args)
    learnpruner.apply(model, args.method, **args.apply_kwargs())
    learnpruner.remove(model)


def load_model(args: ModelArgs, device: str):
    """``(model, processor)``: loaded straight onto ``device`` in eval mode, pruned as ``args`` say."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    check_device(device)
    if args.pretrained in BUILTIN_MODELS and BUILTIN_MODELS[args.pretrained] is None:
        from ...hub import load

        model, processor = load(args.pretrained, device=device, dtype=args.dtype)
    else:
        path = resolve(args.pretrained)
        kwargs = {"dtype": parse_dtype(args.dtype), "device_map": device}
        if args.attn_implementation:
            kwargs["attn_implementation"] = args.attn_implementation
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs).eval()
        processor = AutoProcessor.from_pretrained(path)
    learnpruner.apply(model, args.method, **args.apply_kwargs())
    return model, processor
