"""The public API: :func:`apply`, :func:`remove`, :func:`stats`."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import torch
from torch import nn

from .adapters import adapter_for
from .adaptive import adaptive_threshold, lpm_options
from .budget import BUDGETS, UnreachableBudget, check_budget, check_ratio, check_tokens, tokens_for
from .engine import PruneState, Stats, pruned_forward
from .engine.graphs import GraphCache
from .lpm import LearnablePruningModule, LPMConfig
from .methods import get_method

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


def _resolve_lpm(lpm, adapter, model, seed: int) -> LearnablePruningModule:
    """An LPM from a path, a module, ``"random"`` (untrained, seeded) or the model folder's default."""
    if lpm is None:
        folder = getattr(model.config, "_name_or_path", "") or ""
        default = Path(folder) / "learnpruner-lpm"
        if folder and (default / "lpm.json").is_file():
            lpm = default
        else:
            raise ValueError(
                "method 'learnpruner' needs a Learnable Pruning Module: pass lpm=PATH (a folder written by "
                "`learnpruner train`), lpm=<LearnablePruningModule>, or lpm='random' for an untrained one"
            )
    if isinstance(lpm, str) and lpm == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = LearnablePruningModule(
                LPMConfig(
                    feature_dim=adapter.feature_dim(),
                    family=adapter.family,
                    feature_layer=adapter.feature_layer(),
                    num_tokens=adapter.num_visual_tokens(),
                )
            )
    elif isinstance(lpm, (str, os.PathLike)):
        module = LearnablePruningModule.load(lpm)
    elif isinstance(lpm, LearnablePruningModule):
        module = lpm
    else:
        raise TypeError(f"lpm must be a path, a LearnablePruningModule or 'random', got {type(lpm).__name__}")
    module.check_compatible(adapter.family, adapter.feature_dim(), adapter.feature_layer())
    param = next(model.parameters())
    return module.to(param.device).eval()


DEFAULT_TOKENS = 64


def apply(model: nn.Module, method: str = "learnpruner", tokens: int | None = None, *, ratio: float | None = None,
          fast: bool = False, stage1_unit: str | None = None, budget: str = "average", **options) -> nn.Module:
    """Prune the visual tokens of ``model`` (patched in place; returns it).

    Args:
        model: a supported transformers VLM instance (e.g. ``LlavaForConditionalGeneration``).
        method: a name from :data:`learnpruner.METHODS` (``none``, ``random``, ``fastv``, ``learnpruner``...).
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
    m = get_method(method)
    if tokens is not None and ratio is not None:
        raise ValueError(f"give tokens= or ratio=, not both (got tokens={tokens!r}, ratio={ratio!r})")
    ratio = check_ratio(ratio) if ratio is not None else None
    tokens = check_tokens(tokens if tokens is not None else DEFAULT_TOKENS) if ratio is None else None
    adaptive = budget == "adaptive"
    if not adaptive and budget not in BUDGETS:
        raise ValueError(f"budget must be one of {', '.join(repr(b) for b in (*BUDGETS, 'adaptive'))} (average "
                         "visual tokens per LLM layer, the label of each method's published configuration, or a "
                         f"per-image count the LPM decides), got {budget!r}")
    budget = "average" if adaptive else check_budget(budget)
    opts = m.check_options(options)
    if stage1_unit not in (None, "image", "crop"):
        raise ValueError(f"stage1_unit must be 'image' or 'crop', got {stage1_unit!r}")
    adapter.check_method(m)
    adapter.check_options(m, opts)
    n = adapter.num_visual_tokens()
    num_layers = adapter.text_config.num_hidden_layers
    try:  # early: options, and the budget where every image has n tokens
        m.schedule(tokens_for(n, tokens, ratio), n, num_layers, {k: v for k, v in opts.items() if k != "lpm"}, budget)
    except UnreachableBudget:
        if adapter.uniform_token_count:
            raise
        # items with their own counts (n is nominal): each item's budget is met, or refused naming its count, at
        # the forward; here only the options are checked (at the full budget no schedule drops anything)
        m.schedule(n, n, num_layers, {k: v for k, v in opts.items() if k != "lpm"}, budget)
    seed = opts.get("seed", 0)
    lpm = _resolve_lpm(opts.pop("lpm", None), adapter, model, seed) if m.needs_lpm else None
    if lpm is not None:  # settings validated with this LPM (lpm.json), for the options the caller left out
        opts = m.check_options({**lpm_options(lpm, m), **opts})
    generator = torch.Generator().manual_seed(seed) if m.stage1 == "random" else None
    threshold = adaptive_threshold(m, lpm, tokens, ratio) if adaptive else None
    if fast and adapter.text_config._attn_implementation not in ("sdpa", "eager"):
        raise ValueError(
            f"fast=True supports attn_implementation 'sdpa' and 'eager', not "
            f"{adapter.text_config._attn_implementation!r}"
        )
    state = PruneState(
        method=m, tokens=tokens, ratio=ratio, options=opts, adapter=adapter, base_class=type(model), lpm=lpm,
        generator=generator, fast=bool(fast), stage1_unit=stage1_unit or m.stage1_unit, budget=budget,
        adaptive=threshold, graphs=GraphCache() if fast else None,
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
