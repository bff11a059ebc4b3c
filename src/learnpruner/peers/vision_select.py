"""Pure selection functions of the stage-1 peer methods (VisionZip, VisPruner, DivPrune, CDPruner).

Every function takes tensors and returns tensors; none knows about models. Batched over images
(dim 0); index tensors returned are ``LongTensor[batch, k]`` sorted ascending unless stated.
Computations run in float32 whatever the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..selection import maxmin_extend, topk_sorted

__all__ = [
    "visionzip_split",
    "visionzip_select",
    "vispruner_select",
    "divprune_first",
    "divprune_select",
    "normalize_relevance",
    "conditional_kernel",
    "dpp_greedy",
]


def _cosine(x: torch.Tensor) -> torch.Tensor:
    f = F.normalize(x.float(), dim=-1)
    return f @ f.transpose(-1, -2)


# --- VisionZip ---------------------------------------------------------------------------------------


def visionzip_split(tokens: int, contextual: int | None = None) -> tuple[int, int]:
    """``(dominant, contextual)`` for a budget: the official 64 = 54 + 10, 128 = 108 + 20, 192 = 162 + 30.

    Those three splits all give ``contextual = T * 10 / 64``; other budgets use ``round(T * 10 / 64)``
    (32 -> 27 + 5, 16 -> 13 + 3). ``contextual`` overrides the count of contextual tokens.
    """
    c = round(tokens * 10 / 64) if contextual is None else contextual
    if not 0 <= c <= tokens:
        raise ValueError(f"contextual must be in [0, {tokens}] for a budget of {tokens}, got {c}")
    return tokens - c, c


def visionzip_select(
    scores: torch.Tensor,
    metric: torch.Tensor,
    features: torch.Tensor,
    dominant: int,
    contextual: int,
    merge: str = "official",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VisionZip (Yang et al., CVPR 2025): dominant tokens plus merged contextual tokens.

    The ``dominant`` tokens with the highest ``scores`` ([CLS] attention) are kept as they are. Of the
    ``R`` remaining tokens (in index order), ``contextual`` target tokens are taken with a uniform stride
    ``max(1, R // contextual)`` starting at the first; every other remaining token is assigned to the
    target it is most cosine-similar to under ``metric``, and each target's row becomes
    ``target + mean(assigned)`` (``merge="official"``, what the official code computes) or the plain
    mean of the target and its assigned rows (``merge="mean"``). A target without assigned tokens keeps
    its own row.

    Args:
        scores: ``[b, n]`` importance; ``+inf`` forces a token into the dominant set.
        metric: ``[b, n, dm]`` similarity features (the official code uses the head-mean keys).
        features: ``[b, n, d]`` the rows to merge.

    Returns:
        ``(kept [b, dominant + contextual], replace [b, k, d], replace_mask [b, k])``: the merged rows
        take the slots of their target tokens.
    """
    if merge not in ("official", "mean"):
        raise ValueError(f"merge must be 'official' or 'mean', got {merge!r}")
    b, n, d = features.shape
    if dominant + contextual > n:
        raise ValueError(f"cannot keep {dominant} + {contextual} of {n} tokens")
    dom = topk_sorted(scores, dominant)
    rows = torch.arange(b, device=features.device)[:, None]
    is_dom = torch.zeros(b, n, dtype=torch.bool, device=features.device)
    is_dom[rows, dom] = True
    rest = (~is_dom).nonzero()[:, 1].view(b, n - dominant)  # remaining tokens, index order
    if contextual == 0:
        return dom, features.new_zeros(b, dominant, d), torch.zeros(b, dominant, dtype=torch.bool, device=dom.device)
    r = rest.shape[1]
    step = max(1, r // contextual)
    tpos = torch.arange(0, r, step, device=features.device)[:contextual]  # positions among the remaining
    is_target = torch.zeros(r, dtype=torch.bool, device=features.device)
    is_target[tpos] = True
    targets, others = rest[:, tpos], rest[:, ~is_target]
    m = F.normalize(metric.float(), dim=-1)
    sim = m[rows, others] @ m[rows, targets].transpose(1, 2)  # [b, r - c, c]
    assign = F.one_hot(sim.argmax(dim=-1), contextual).float()  # [b, r - c, c]
    counts = assign.sum(dim=1)[..., None]  # [b, c, 1]
    summed = assign.transpose(1, 2) @ features[rows, others].float()  # [b, c, d]
    own = features[rows, targets].float()
    if merge == "official":
        merged = own + summed / counts.clamp(min=1)
    else:
        merged = (own + summed) / (counts + 1)
    kept = torch.cat([dom, targets], dim=1)
    order = kept.argsort(dim=1)
    kept = kept.gather(1, order)
    replace = torch.cat([features.float().new_zeros(b, dominant, d), merged], dim=1)
    replace = replace.gather(1, order[..., None].expand(-1, -1, d)).to(features.dtype)
    mask = torch.cat([torch.zeros(b, dominant, dtype=torch.bool, device=dom.device),
                      torch.ones(b, contextual, dtype=torch.bool, device=dom.device)], dim=1).gather(1, order)
    return kept, replace, mask


# --- VisPruner ---------------------------------------------------------------------------------------


def vispruner_select(
    scores: torch.Tensor, features: torch.Tensor, k: int, important_ratio: float = 0.5, chunk: int = 8
) -> torch.Tensor:
    """VisPruner (Zhang et al., ICCV 2025): important tokens by [CLS] attention plus diverse tokens.

    ``int(k * important_ratio)`` tokens with the highest ``scores`` are kept. The rest, ordered by
    decreasing score, are thinned to the remaining ``k - k_imp`` by repeated bipartite duplicate
    removal: split them alternately into A (even ranks) and B (odd ranks), score each A token by its
    highest cosine similarity to any B token, drop the ``min(chunk, R - k_div)`` highest-scoring A
    tokens; the survivors (A by decreasing score, then B) are the next round's order.
    """
    if not 0.0 <= important_ratio <= 1.0:
        raise ValueError(f"important_ratio must be in [0, 1], got {important_ratio}")
    b, n, _ = features.shape
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    k_imp = int(k * important_ratio)
    k_div = k - k_imp
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices
    important, residual = order[:, :k_imp], order[:, k_imp:]
    f = F.normalize(features.float(), dim=-1)
    rows = torch.arange(b, device=features.device)[:, None]
    if k_div == 0:
        residual = residual[:, :0]
    while True:
        r = min(chunk, residual.shape[1] - k_div)
        if r <= 0:
            break
        a, bb = residual[:, ::2], residual[:, 1::2]
        dup = (f[rows, a] @ f[rows, bb].transpose(1, 2)).amax(dim=-1)  # [b, |A|]
        rank = torch.sort(dup, dim=-1, descending=True, stable=True).indices[:, r:]
        residual = torch.cat([a.gather(1, rank), bb], dim=1)
    return torch.sort(torch.cat([important, residual], dim=1), dim=-1).values


# --- DivPrune ----------------------------------------------------------------------------------------


def divprune_first(features: torch.Tensor) -> torch.Tensor:
    """``[b]``: the token whose nearest neighbour (cosine) is farthest, DivPrune's first pick."""
    sim = _cosine(features)
    n = sim.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=sim.device)
    return sim.masked_fill(eye, float("-inf")).amax(dim=-1).argmin(dim=-1)


def divprune_select(features: torch.Tensor, k: int) -> torch.Tensor:
    """DivPrune (Alvar et al., CVPR 2025): greedy max-min diversity over cosine distance.

    Starts from :func:`divprune_first` (as the official code: the largest distance to the nearest other
    token), then repeatedly adds the token whose highest similarity to the selected set is lowest
    (:func:`learnpruner.selection.maxmin_extend`).
    """
    b, n, _ = features.shape
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    if k == 0:
        return torch.zeros(b, 0, dtype=torch.long, device=features.device)
    return maxmin_extend(features, divprune_first(features)[:, None], k - 1)


# --- CDPruner ----------------------------------------------------------------------------------------


def normalize_relevance(relevance: torch.Tensor, theta: float | None = None) -> torch.Tensor:
    """Min-max normalise ``[b, n]`` relevance per row to ``(0, 1]`` (as the official code, per image).

    With ``theta`` (the paper's trade-off, in ``[0, 1)``) the result is ``exp(alpha r)`` with
    ``alpha = theta / (2 (1 - theta))``; ``None`` keeps the normalised relevance (official default).
    """
    r = relevance.float()
    lo, hi = r.amin(dim=-1, keepdim=True), r.amax(dim=-1, keepdim=True)
    r = (r - lo + 1e-6) / (hi - lo).clamp(min=1e-6)
    if theta is not None:
        if not 0.0 <= theta < 1.0:
            raise ValueError(f"theta must be in [0, 1), got {theta}")
        r = torch.exp(theta / (2 * (1 - theta)) * r)
    return r


def conditional_kernel(features: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """CDPruner's conditional DPP kernel ``L = diag(r) S diag(r)``, ``S`` the cosine similarity: ``[b, n, n]``."""
    r = relevance.float()
    return r[:, :, None] * _cosine(features) * r[:, None, :]


def dpp_greedy(kernel: torch.Tensor, k: int, eps: float = 1e-10, rtol: float = 1e-5) -> torch.Tensor:
    """Greedy MAP inference of a DPP (Chen et al., NeurIPS 2018), batched: ``[b, k]`` sorted indices.

    Each step adds the item with the largest marginal gain ``log det(L_{S+j}) - log det(L_S)``, kept up
    to date by an incremental Cholesky factor (``O(n k)`` per step). When every remaining gain has
    collapsed (below ``rtol`` times the largest diagonal: the kernel's rank is below ``k``, as for
    cosine kernels of features narrower than ``k``), the rest are picked by their diagonal (quality)
    without further updates, so ``k`` distinct items come back; dividing by a collapsed gain would
    otherwise blow the factor up and repeat items.
    """
    b, n, _ = kernel.shape
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    L = kernel.float()
    rows = torch.arange(b, device=L.device)
    chol = L.new_zeros(k, b, n)
    gain = torch.diagonal(L, dim1=1, dim2=2).clone()
    quality = gain.clone()
    tol = (rtol * quality.amax(dim=-1)).clamp(min=eps)
    picked = torch.empty(b, k, dtype=torch.long, device=L.device)
    for i in range(k):
        best = gain.argmax(dim=-1)
        collapsed = ~(gain[rows, best] > tol)  # also catches NaN
        j = torch.where(collapsed, quality.argmax(dim=-1), best)
        picked[:, i] = j
        proj = torch.einsum("tb,tbn->bn", chol[:i, rows, j], chol[:i])
        e = (L[rows, j] - proj) / gain[rows, j].clamp(min=eps).sqrt()[:, None]
        e = torch.where(collapsed[:, None], torch.zeros_like(e), e)
        chol[i] = e
        gain = gain - e.square()
        gain[rows, j] = float("-inf")
        quality[rows, j] = float("-inf")
    return torch.sort(picked, dim=-1).values


# --- SCOPE -------------------------------------------------------------------------------------------


def scope_select(features: torch.Tensor, k: int, saliency: torch.Tensor | None = None,
                 alpha: float = 1.0) -> torch.Tensor:
    """SCOPE (Deng et al., NeurIPS 2025): greedy saliency x coverage gain over cosine similarity.

    The set's coverage of token ``j`` is its highest cosine similarity to a selected token (0 for the empty
    set); token ``i``'s coverage gain is ``sum_j max(0, sim(j, i) - cover_j)`` over every token ``j``; each step
    adds the unselected token with the largest ``gain_i * saliency_i ** alpha`` (as kinredon/SCOPE,
    scope/clip_encoder.py, ``COMBINED=multi``, ``ALPHA=1.0``). ``saliency`` ``[b, n]`` >= 0 (None: 1, coverage
    alone). Returns ``[b, k]`` sorted indices.
    """
    b, n, _ = features.shape
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    sim = _cosine(features)
    weight = torch.ones(b, n, device=features.device) if saliency is None else saliency.float().clamp(min=0) ** alpha
    rows = torch.arange(b, device=features.device)
    taken = torch.zeros(b, n, dtype=torch.bool, device=features.device)
    cover = torch.zeros(b, n, device=features.device)
    for _ in range(k):
        gain = (sim - cover[:, :, None]).clamp(min=0).sum(dim=1)  # [b, n]: column i's gain over rows j
        best = (gain * weight).masked_fill(taken, float("-inf")).argmax(dim=-1)
        taken[rows, best] = True
        cover = torch.maximum(cover, sim[rows, best])
    return taken.nonzero()[:, 1].view(b, k)


# --- IDPruner (maximal marginal relevance) ---------------------------------------------------------------


def mmr_select(features: torch.Tensor, importance: torch.Tensor, k: int, lam: float = 0.5) -> torch.Tensor:
    """IDPruner's maximal marginal relevance (Tencent/AngelSlim, arXiv 2602.13315): the first pick is the most
    important token; each next one maximises ``lam * imp_i - (1 - lam) * max_{s in S} cos(i, s)``, ``imp`` the
    importance min-max normalised to ``[0, 1]`` per image (as the official ``_default_importance_compute``).
    ``features`` ``[b, n, d]`` (the official code: the projected visual tokens), ``importance`` ``[b, n]``.
    Returns ``[b, k]`` sorted indices."""
    b, n, _ = features.shape
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    imp = importance.float()
    lo, hi = imp.amin(dim=-1, keepdim=True), imp.amax(dim=-1, keepdim=True)
    imp = (imp - lo) / (hi - lo + 1e-6)
    sim = _cosine(features)
    rows = torch.arange(b, device=features.device)
    taken = torch.zeros(b, n, dtype=torch.bool, device=features.device)
    closest = torch.full((b, n), -2.0, device=features.device)
    for step in range(k):
        score = imp.clone() if step == 0 else lam * imp - (1 - lam) * closest
        best = score.masked_fill(taken, float("-inf")).argmax(dim=-1)
        taken[rows, best] = True
        closest = torch.maximum(closest, sim[rows, best])
    return taken.nonzero()[:, 1].view(b, k)
