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
    "coverage_similarity",
    "coverage_greedy",
    "coverage_sample",
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


def coverage_similarity(features: torch.Tensor, coords: torch.Tensor | None = None, gamma: float | torch.Tensor = 0.0
                        ) -> torch.Tensor:
    """``[b, n, n]`` cosine similarity of tokens in a joint appearance-and-place space (learnpruner-set's metric).

    Each token is ``normalize([normalize(x); gamma * coords])``: its unit feature ``x`` (``features`` ``[b, n, d]``)
    beside its grid position (``coords`` ``[b, n, c]``, e.g. (row, column) in ``[-1, 1]``) weighted by ``gamma``,
    so two patches that look alike but lie apart (two objects of one kind) are told apart, and two far-apart
    patches of one plain background still count as near. ``gamma = 0`` (or no ``coords``) is the plain cosine
    similarity of the features. Differentiable in ``gamma``.
    """
    z = torch.nn.functional.normalize(features.float(), dim=-1)
    if coords is not None:
        z = torch.cat([z, coords.to(z) * gamma], dim=-1)
        z = torch.nn.functional.normalize(z, dim=-1)
    return z @ z.transpose(1, 2)


def _coverage_scores(sim: torch.Tensor, closest: torch.Tensor | None, quality: torch.Tensor | None) -> torch.Tensor:
    """Each token's pick score: its quality minus its highest similarity to the set kept so far (``closest``; for
    the empty set, to its nearest other token, DivPrune's first pick)."""
    if closest is None:
        eye = torch.eye(sim.shape[-1], dtype=torch.bool, device=sim.device)
        closest = sim.masked_fill(eye, float("-inf")).amax(dim=-1)
    return -closest if quality is None else quality - closest


def coverage_greedy(sim: torch.Tensor, k: int, quality: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy max-min coverage with a per-token quality bonus: ``[b, k]`` sorted indices.

    Each step keeps the unkept token maximising ``quality_i - max_{s in kept} sim[i, s]`` (the first one:
    ``quality_i - max_{j != i} sim[i, j]``). Without ``quality`` this is DivPrune's rule (Alvar et al., CVPR 2025)
    on ``sim``; ``sim`` from :func:`coverage_similarity`, ``quality`` ``[b, n]`` (learnpruner-set's learned term).
    """
    b, n, _ = sim.shape
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    rows = torch.arange(b, device=sim.device)
    taken = torch.zeros(b, n, dtype=torch.bool, device=sim.device)
    closest = None
    for _ in range(k):
        best = _coverage_scores(sim, closest, quality).masked_fill(taken, float("-inf")).argmax(dim=-1)
        taken[rows, best] = True
        picked = sim[rows, best]
        closest = picked if closest is None else torch.maximum(closest, picked)
    return taken.nonzero()[:, 1].view(b, k)


def coverage_sample(sim: torch.Tensor, k: int, quality: torch.Tensor | None, tau: float,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The stochastic policy of :func:`coverage_greedy`: each step draws the next token from ``softmax(score /
    tau)`` over the unkept ones (``tau -> 0`` is the greedy rule). Returns ``(kept [b, k] sorted, log_prob [b])``,
    the log-probability of the drawn sequence, differentiable in ``sim`` and ``quality`` (for REINFORCE)."""
    b, n, _ = sim.shape
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    if not tau > 0:
        raise ValueError(f"tau must be positive, got {tau}")
    rows = torch.arange(b, device=sim.device)
    taken = torch.zeros(b, n, dtype=torch.bool, device=sim.device)
    closest, log_prob = None, sim.new_zeros(b)
    for _ in range(k):
        logp = torch.log_softmax((_coverage_scores(sim, closest, quality) / tau).masked_fill(taken, float("-inf")),
                                 dim=-1)
        u = torch.rand(b, n, generator=generator).to(sim.device).clamp(1e-12, 1 - 1e-12)
        pick = (logp.detach() - torch.log(-torch.log(u))).argmax(dim=-1)  # Gumbel-max: a draw from softmax
        log_prob = log_prob + logp[rows, pick]
        taken = taken.clone()
        taken[rows, pick] = True
        picked = sim[rows, pick]
        closest = picked if closest is None else torch.maximum(closest, picked)
    return taken.nonzero()[:, 1].view(b, k), log_prob


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
