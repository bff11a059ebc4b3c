"""Shared pieces of the peers that prune inside the LLM: per-image views of the engine's LLM context, and the
staged schedules (PyramidDrop, SparseVLM) that keep a fraction at several layers."""

from __future__ import annotations

import torch

from ..budget import Schedule, UnreachableBudget, default_layer
from ..engine.layout import image_samples, instruction_rows
from ..rules import LLMContext


def _image_sample(ctx: LLMContext) -> torch.Tensor:
    """``[num_images]`` batch row holding each image."""
    return image_samples(ctx.img, ctx.num_images)


def _instruction_rows(ctx: LLMContext) -> torch.Tensor:
    """``[b, s]`` bool: the instruction rows of each sample (the shared definition, no fallback)."""
    return instruction_rows(ctx.vis, ctx.mask)


def _per_image(ctx: LLMContext, values: torch.Tensor, fill=float("-inf")) -> torch.Tensor:
    """Scatter per-position values ``[b, s, ...]`` into ``[num_images, n, ...]`` (``fill`` where absent)."""
    table = values.new_full((ctx.num_images, ctx.n, *values.shape[2:]), fill)
    p = ctx.vis >= 0
    table[ctx.img[p], ctx.vis[p]] = values[p]
    return table


def _layers_option(options: dict, num_layers: int, default_of_32: tuple[int, ...]) -> tuple[int, ...]:
    layers = options.get("layers")
    if layers is None:
        layers = tuple(default_layer(num_layers, x) for x in default_of_32)
        layers = tuple(sorted(set(layers)))
    else:
        if isinstance(layers, int) or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
            raise ValueError(f"option layers must be a sequence of integers, got {layers!r}")
        layers = tuple(layers)
        if list(layers) != sorted(set(layers)) or not layers:
            raise ValueError(f"option layers must be strictly increasing and non-empty, got {layers!r}")
    if not all(1 <= x < num_layers for x in layers):
        raise ValueError(f"layers must lie in [1, {num_layers - 1}] for a {num_layers}-layer LLM, got {layers}")
    return layers


def lambda_schedule(n: int, num_layers: int, layers, lam: float) -> Schedule:
    """PyramidDrop's stages: after the j-th of ``layers`` keep ``int(n * lam ** (j + 1))`` tokens (at least 1)."""
    counts, current = [], n
    for j in range(len(layers)):
        current = max(1, min(current, int(n * lam ** (j + 1))))
        counts.append(current)
    drops = tuple((layer, c) for layer, c in zip(layers, counts) if c < n)
    return Schedule(n=n, num_layers=num_layers, drops=drops)


def staged_schedule(
    tokens: int, n: int, num_layers: int, layers: tuple[int, ...], profile: list[float], method: str
) -> Schedule:
    """Drops at ``layers`` keeping counts proportional to ``profile`` with an average of ``tokens``.

    The counts ``s * profile`` are scaled by the one factor ``s`` that meets the budget, rounded, made
    non-increasing and within ``[1, n]``; the rounding slack is then moved onto the earliest stage that
    can absorb it, so the average is within ``1 / L`` per stage of ``tokens`` when reachable. Budgets
    below ``(K1 n + L - K1) / L`` (every stage keeping one token) raise ``ValueError``.
    """
    if tokens >= n:
        return Schedule(n=n, num_layers=num_layers)
    bounds = list(layers) + [num_layers]
    widths = [bounds[j + 1] - bounds[j] for j in range(len(layers))]
    target = tokens * num_layers - layers[0] * n
    if target < sum(widths):
        lowest = -(-(layers[0] * n + sum(widths)) // num_layers)
        raise UnreachableBudget(
            f"{method} first prunes at LLM layer {layers[0]} of {num_layers}, so its average budget is at least "
            f"{lowest} visual tokens for {n}-token images; got tokens={tokens}. Use tokens >= {lowest} or earlier "
            f"layers (layers=...)."
        )
    s = target / sum(w * p for w, p in zip(widths, profile))
    counts = []
    for p in profile:
        c = max(1, min(n if not counts else counts[-1], round(s * p)))
        counts.append(c)
    for j in range(len(counts)):  # move the rounding / saturation slack onto the earliest stage that can take it
        slack = target - sum(w * c for w, c in zip(widths, counts))
        hi = n if j == 0 else counts[j - 1]
        lo = counts[j + 1] if j + 1 < len(counts) else 1
        counts[j] = max(lo, min(hi, counts[j] + round(slack / widths[j])))
    drops = tuple((layer, c) for layer, c in zip(layers, counts))
    return Schedule(n=n, num_layers=num_layers, drops=drops)
