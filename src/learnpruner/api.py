"""The public API: :func:`apply`, :func:`remove`, :func:`stats`."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .adapters import adapter_for
from .engine import PruneState, Stats, pruned_forward
from .engine.graphs import GraphCache
from .methods import get_method
from .plan import Plan, resolve

__all__ = ["apply", "remove", "stats", "is_pruned"]

_PRUNED_CLASSES: dict[type, type] = {}


def _forward_like(base: type):
    """The engine's forward with ``base.forward``'s signature: arguments bind by the family's own names and
    order, and ``generate()`` sees the family's inputs (it validates model kwargs against the signature).
    ``mm_encoder_outputs`` is left out so ``generate()`` hands raw pixels to the engine."""
    sig = inspect.signature(base.forward)
    sig = sig.replace(parameters=[p for p in sig.parameters.values() if p.name != "mm_encoder_outputs"])

    def forward(self, *args, **kwargs):
        bound = sig.bind(self, *args, **kwargs)
        arguments = dict(bound.arguments)
        arguments.pop(next(iter(sig.parameters)))  # self
        for name, param in sig.parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(arguments.pop(name, {}))
        return pruned_forward(self, **arguments)

    forward.__signature__ = sig
    forward.__doc__ = pruned_forward.__doc__
    return forward


def _pruned_class(base: type) -> type:
    """A per-instance subclass of ``base`` whose ``forward`` is the pruning engine (nothing global)."""
    if base not in _PRUNED_CLASSES:
        _PRUNED_CLASSES[base] = type(
            base.__name__,
            (base,),
            {"forward": _forward_like(base), "__module__": base.__module__, "_learnpruner_base": base},
        )
    return _PRUNED_CLASSES[base]


def is_pruned(model: nn.Module) -> bool:
    """Whether :func:`apply` patched this model instance."""
    return "_learnpruner" in getattr(model, "__dict__", {})


def apply(model: nn.Module, method: str | Plan = "learnpruner", tokens: int | None = None, *,
          ratio: float | None = None, fast: bool = False, stage1_unit: str | None = None, budget: str = "average",
          **options) -> nn.Module:
    """Prune the visual tokens of ``model`` (patched in place; returns it).

    Args:
        model: a supported transformers VLM instance (e.g. ``LlavaForConditionalGeneration``).
        method: a name from :data:`learnpruner.METHODS` (``none``, ``random``, ``fastv``, ``learnpruner``...), or a
            :class:`~learnpruner.Plan` already resolved for this model's family (:func:`learnpruner.resolve`; then
            nothing else but ``fast`` is given).
        tokens: the budget, as the AVERAGE number of visual tokens per LLM layer (per image). A budget of
            at least the image's token count is a no-op. Default 64 when ``ratio`` is not given either.
        ratio: the budget as a fraction ``0 < ratio <= 1`` of each image's own token count (an average per
            LLM layer, ``round(ratio * n)``), for images with different counts (LLaVA-NeXT, Qwen2.5-VL).
            Give ``tokens`` or ``ratio``, not both.
        fast: the fast path. The prefill runs the vision tower and each run of LLM layers between two
            selections on static shapes (the sequence padded to a 64-token bucket), and decoding runs on static
            KV buffers with a step free of host syncs; on GPUs each is captured once as a CUDA graph and
            replayed (at most ``engine.graphs.MAX_GRAPHS`` kept; see :mod:`learnpruner.engine.prefill_static` and
            :mod:`learnpruner.engine.decode_static`). Outputs equal the plain path. Default False.
        stage1_unit: ``"image"`` (a stage-1 rule ranks all tokens of an image or video at once) or ``"crop"``
            (the budget is split evenly over the crops of a LLaVA-NeXT image or the frames of a video, and the
            rule runs on each alone). Default: the method's own (``"crop"`` for VisionZip, as its official code
            runs LLaVA-NeXT; ``"image"`` otherwise).
        budget: ``"adaptive"``: methods with an LPM stage 1 (``learnpruner``, ``lpm-only``) let the LPM decide
            how many tokens each image keeps (keep-probability above a threshold calibrated on validation data
            so that the dataset average meets ``tokens``; see :mod:`learnpruner.adaptive`). Otherwise
            how ``tokens``/``ratio`` is read. ``"average"`` (default): the average number of visual tokens per
            LLM layer, the FLOPs-matched convention of the LearnPruner, FastV and SparseVLM papers. ``"paper"``: the
            label of each method's published configuration, run exactly as its official code does for that label
            (e.g. DART keeps T + 4 tokens after layer 2; SparseVLM its per-layer lists plus recycled tokens), which
            may average more or fewer tokens per layer; ``stats(model).average_tokens`` reports what a forward
            processed. Methods whose papers use the average convention (LearnPruner and every method that prunes
            after the vision encoder) are the same in both; ``learnpruner methods NAME`` shows both mappings.
        **options: method options, e.g. ``lpm=PATH``, ``r1``, ``r2``, ``layer``, ``diversity``, ``seed``, and for every
            method ``positions="original" | "contiguous"`` (position ids of the tokens kept after a drop: their
            original ones, or renumbered consecutively as VisionZip's, PyramidDrop's and SparseVLM's official code
            do; default: what the method's official code does, see its doc).

    Only this instance changes: it gets a private subclass whose ``forward`` runs the pruning engine,
    so ``model(**inputs)`` and ``model.generate(**inputs)`` take the processor's outputs unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply takes a transformers model instance (an nn.Module), got {type(model).__name__}: "
                        f"{model!r:.80}")
    if is_pruned(model):
        raise ValueError("this model is already pruned; call learnpruner.remove(model) before applying again")
    adapter = adapter_for(model)
    if isinstance(method, Plan):
        plan = method
        if tokens is not None or ratio is not None or stage1_unit is not None or budget != "average" or options:
            raise ValueError("apply(model, plan) takes the plan as resolved: give the budget and the options to "
                             "learnpruner.resolve, not to apply")
        if (plan.family, plan.num_layers) != (adapter.family, adapter.text_config.num_hidden_layers):
            raise ValueError(f"this plan was resolved for {plan.family} with {plan.num_layers} LLM layers; the model "
                             f"is {adapter.family} with {adapter.text_config.num_hidden_layers}: resolve it for "
                             "this model")
        if get_method(plan.method).needs_lpm and plan.module is None:
            raise ValueError("this plan's LPM was deferred (defer_lpm=True); resolve it with its LPM to apply it")
    else:
        plan = resolve(model, method, tokens, ratio=ratio, budget=budget, stage1_unit=stage1_unit, **options)
    if fast and adapter.text_config._attn_implementation not in ("sdpa", "eager"):
        raise ValueError(
            f"fast=True supports attn_implementation 'sdpa' and 'eager', not "
            f"{adapter.text_config._attn_implementation!r}"
        )
    lpm = plan.module.to(next(model.parameters()).device).eval() if plan.module is not None else None
    m = get_method(plan.method)
    generator = torch.Generator().manual_seed(plan.options["seed"]) if m.stage1 == "random" else None
    state = PruneState(
        method=m, tokens=plan.tokens, ratio=plan.ratio, options=dict(plan.options), adapter=adapter,
        base_class=type(model), lpm=lpm, generator=generator, fast=bool(fast), stage1_unit=plan.stage1_unit,
        budget=plan.convention, adaptive=plan.threshold, graphs=GraphCache() if fast else None, plan=plan,
    )
    model.__class__ = _pruned_class(type(model))
    model._learnpruner = state
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: the instance gets its original class back and no pruning state."""
    if not is_pruned(model):
        raise ValueError("this model is not pruned by learnpruner")
    state: PruneState = model.__dict__.pop("_learnpruner")
    model.__class__ = state.base_class
    return model


def stats(model: nn.Module) -> Stats | None:
    """What the last forward with images did (see :class:`learnpruner.engine.Stats`); None before one."""
    if not is_pruned(model):
        raise ValueError("this model is not pruned by learnpruner; call learnpruner.apply(model, ...) first")
    return model._learnpruner.last
