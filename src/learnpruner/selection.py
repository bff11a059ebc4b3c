"""Pure token-selection rules.

Every function here takes tensors and returns tensors; none knows about models. Index tensors
returned are ``LongTensor[batch, k]`` sorted ascending, so kept tokens keep their original order.
"""

from __future__ import annotations

import torch

__all__ = [
    "topk_sorted",
    "maxmin_extend",
    "lpm_select",
    "random_select",
    "attention_probs",
    "aggregate_scores",
    "per_image_scores",
]


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest ``scores`` along the last dim, sorted ascending.

    Ties are broken towards the lower index (stable), so the result is deterministic.
    ``scores`` is ``[batch, n]``; entries equal to ``-inf`` are only chosen when fewer than ``k``
    finite ones exist.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [batch, n], got shape {tuple(scores.shape)}")
    n = scores.shape[-1]
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    # A stable descending sort gives lower indices priority among equal scores.
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices[:, :k]
    return torch.sort(order, dim=-1).values


def maxmin_extend(features: torch.Tensor, selected: torch.Tensor, k_extra: int) -> torch.Tensor:
    """Greedy max-min diversity: add ``k_extra`` tokens to ``selected``, one at a time.

    Each step adds the unselected token whose maximum cosine similarity to the already selected
    set is smallest (the token least similar to everything kept), as in DivPrune (Alvar et al.,
    CVPR 2025) and LearnPruner's diversity fill. With an empty ``selected`` the first token is the
    one with the lowest mean similarity to all others.

    Args:
        features: ``[batch, n, d]`` token features.
        selected: ``[batch, m]`` indices already kept (``m`` may be 0).
        k_extra: how many tokens to add.

    Returns:
        ``[batch, m + k_extra]`` indices, sorted ascending.
    """
    b, n, _ = features.shape
    m = selected.shape[1]
    if k_extra < 0 or m + k_extra > n:
        raise ValueError(f"cannot add {k_extra} tokens to {m} selected out of {n}")
    if k_extra == 0:
        return torch.sort(selected, dim=-1).values
    f = torch.nn.functional.normalize(features.float(), dim=-1)
    sim = f @ f.transpose(1, 2)  # [b, n, n]
    rows = torch.arange(b, device=features.device)
    taken = torch.zeros(b, n, dtype=torch.bool, device=features.device)
    if m > 0:
        taken[rows[:, None], selected] = True
        closest = sim.gather(1, selected[:, :, None].expand(b, m, n)).amax(dim=1)  # [b, n]
    else:
        first = sim.mean(dim=-1).argmin(dim=-1)
        taken[rows, first] = True
        closest = sim[rows, first]
        k_extra -= 1
    for _ in range(k_extra):
        nxt = closest.masked_fill(taken, float("inf")).argmin(dim=-1)
        taken[rows, nxt] = True
        closest = torch.maximum(closest, sim[rows, nxt])
    return taken.nonzero()[:, 1].view(b, -1)


def lpm_select(keep_prob: torch.Tensor, features: torch.Tensor, k: int, diversity: float = 0.1) -> torch.Tensor:
    """LearnPruner stage-1 rule (arXiv 2604.23950, Sec. 3): importance plus a diversity fill.

    The top ``k - round(diversity * k)`` tokens by keep-probability are kept, then the remaining
    ``round(diversity * k)`` slots are filled by :func:`maxmin_extend` on ``features``.
    Default ``diversity=0.1`` (10% of the budget), as in the paper.
    """
    if not 0.0 <= diversity <= 1.0:
        raise ValueError(f"diversity must be in [0, 1], got {diversity}")
    n_div = int(round(diversity * k))
    important = topk_sorted(keep_prob, k - n_div)
    return maxmin_extend(features, important, n_div)


def random_select(batch: int, n: int, k: int, generator: torch.Generator, device=None) -> torch.Tensor:
    """``k`` of ``n`` indices uniformly at random per row, sorted; reproducible through ``generator``."""
    noise = torch.rand(batch, n, generator=generator)
    return topk_sorted(noise, k).to(device)


def attention_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    query_index: torch.Tensor,
    key_valid: torch.Tensor,
) -> torch.Tensor:
    """Causal softmax attention probabilities for a few query rows, in float32.

    Args:
        query: ``[batch, heads, q, d]`` queries after RoPE.
        key: ``[batch, kv_heads, s, d]`` keys after RoPE (grouped-query keys are repeated).
        scaling: the softmax temperature of the layer (usually ``d ** -0.5``).
        query_index: ``[batch, q]`` sequence index of each query row (for the causal mask).
        key_valid: ``[batch, s]`` bool, False for padding keys.

    Returns:
        ``[batch, heads, q, s]`` probabilities, equal to what eager attention computes.
    """
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads != kv_heads:
        key = key.repeat_interleave(heads // kv_heads, dim=1)
    logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling
    s = key.shape[2]
    causal = torch.arange(s, device=key.device)[None, None, :] <= query_index[:, :, None]  # [b, q, s]
    allowed = (causal & key_valid[:, None, :])[:, None]  # [b, 1, q, s]
    logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


def aggregate_scores(probs: torch.Tensor, query_valid: torch.Tensor) -> torch.Tensor:
    """Mean attention each key receives over heads and over the valid query rows: ``[batch, s]``."""
    per_query = probs.mean(dim=1)  # [b, q, s]
    w = query_valid.float()[:, :, None]
    return (per_query * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)


def per_image_scores(
    scores: torch.Tensor, vis: torch.Tensor, img: torch.Tensor, num_images: int, n: int
) -> torch.Tensor:
    """Scatter per-position scores ``[batch, s]`` into a ``[num_images, n]`` table.

    ``vis``/``img`` give each position's visual-token index and image number (``-1`` for text);
    tokens absent from the sequence score ``-inf``.
    """
    table = torch.full((num_images, n), float("-inf"), device=scores.device)
    sel = vis >= 0
    table[img[sel], vis[sel]] = scores[sel].float()
    return table
