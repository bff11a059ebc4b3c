"""PyramidDrop (Xing et al., CVPR 2025): staged drops by the last instruction token's attention."""

from __future__ import annotations

from ..budget import Schedule, UnreachableBudget
from ..methods import Method, Option, fraction, int_sequence, register
from .llm_common import _layers_option, lambda_schedule, staged_schedule


def _pdrop_schedule(tokens: int, n: int, num_layers: int, options: dict) -> Schedule:
    layers = _layers_option(options, num_layers, (8, 16, 24))
    lam = options.get("lam")
    if lam is not None:
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 < lam <= 1.0:
            raise ValueError(f"option lam must be a number in (0, 1], got {lam!r}")
        return lambda_schedule(n, num_layers, layers, lam)
    if tokens >= n:
        return Schedule(n=n, num_layers=num_layers)
    bounds = list(layers) + [num_layers]

    def average(x: float) -> float:
        return (layers[0] * n + sum((bounds[j + 1] - bounds[j]) * n * x ** (j + 1) for j in range(len(layers))))

    lo, hi = 0.0, 1.0
    for _ in range(60):  # the average grows with lambda: bisection
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if average(mid) < tokens * num_layers else (lo, mid)
    profile = [lo ** (j + 1) for j in range(len(layers))]
    return staged_schedule(tokens, n, num_layers, layers, profile, "pyramiddrop")


# PyramidDrop's published configurations (Cooperx521/PyramidDrop): the repository's one configuration
# (scripts/v1_5/pdrop_eval/*.sh: layer_list [8,16,24], image_token_ratio_list [0.5,0.25,0.125], an average of 270
# for 576 tokens), and the maintainer's recipe for the paper's lower budgets (issue #29, 2025-11-11: keep the
# lambda, lambda^2, ... structure, move the stages earlier, e.g. layers 2/8/16, and solve lambda for the average:
# lambda = 0.19 at layers 2/8/16 for 64 tokens)
_PDROP_PAPER_LAYERS = (2, 8, 16)
_PDROP_PAPER_LAMBDA = {270: 0.5, 64: 0.19}


def _pdrop_average(layers: tuple[int, ...], n: int, num_layers: int, lam: float) -> float:
    bounds = list(layers) + [num_layers]
    counts = [int(n * lam ** (j + 1)) for j in range(len(layers))]
    return (layers[0] * n + sum((bounds[j + 1] - bounds[j]) * c for j, c in enumerate(counts))) / num_layers


def pdrop_paper_lambda(tokens: int, n: int = 576, num_layers: int = 32,
                       layers: tuple[int, ...] = _PDROP_PAPER_LAYERS) -> float:
    """lambda for a label under the maintainer's recipe: the two-decimal lambda whose average (counts
    ``int(n lambda^j)``, as the official ``int(cur_image_token * ratio)``) is nearest ``tokens`` (0.19 for 64)."""
    grid = [j / 100 for j in range(1, 100)]
    return min(grid, key=lambda lam: (abs(_pdrop_average(layers, n, num_layers, lam) - tokens), lam))


def _pdrop_paper(tokens: int, n: int, num_layers: int, options: dict) -> Schedule:
    if tokens >= n:
        return Schedule(n=n, num_layers=num_layers)
    if options.get("lam") is not None:
        return _pdrop_schedule(tokens, n, num_layers, options)
    if options.get("layers") is None and tokens == 270 and n == 576:  # the repository's configuration
        layers, lam = _layers_option({}, num_layers, (8, 16, 24)), 0.5
    else:
        layers = _layers_option(options, num_layers, _PDROP_PAPER_LAYERS)
        lowest = -(-(layers[0] * n) // num_layers) + 1
        if tokens < lowest:
            raise UnreachableBudget(
                f"pyramiddrop (budget='paper') first prunes at LLM layer {layers[0]} of {num_layers}, so its average "
                f"is at least {lowest} visual tokens for {n}-token images; got tokens={tokens}. Use tokens >= "
                f"{lowest} or earlier layers (layers=...)."
            )
        lam = _PDROP_PAPER_LAMBDA.get(tokens) if (n, num_layers, layers) == (576, 32, _PDROP_PAPER_LAYERS) else None
        lam = lam if lam is not None else pdrop_paper_lambda(tokens, n, num_layers, layers)
    return lambda_schedule(n, num_layers, layers, lam)


register(Method(
    name="pyramiddrop",
    summary="LLM layers 8/16/24: last instruction token's attention",
    paper='PyramidDrop, CVPR 2025',
    stage1=None,
    stage2="last",
    schedule_fn=_pdrop_schedule,
    paper_fn=_pdrop_paper,
    positions="contiguous",
    options=(Option("layers", None, int_sequence("layers"),
                    "drop layers (default: 8/16/24 of 32, scaled with depth; budget='paper' below 270: 2/8/16)"),
             Option("lam", None, fraction("lam", open_low=True),
                    "the ratio kept at each stage (default: solved for the budget)", counts=True)),
    doc=(
        "PyramidDrop (Xing et al., 'PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid "
        "Visual Redundancy Reduction', CVPR 2025). The LLM is split into stages at layers 8/16/24 (32 layers; "
        "scaled round(l L / 32) for other depths); entering each stage the visual tokens are ranked by the "
        "attention of the LAST instruction token (the last prompt token, mean over heads) and a fraction "
        "lambda of them is kept (official lambda=0.5: 576 -> 288/144/72, an average of 270). Budget mapping "
        "(ours): the stage layers are kept and lambda is solved so that the average equals T "
        "(counts round(n lambda^j), rounding slack put on the first stage): 192 -> lambda=0.25, counts "
        "146/37/9, average 192.0 for n=576, L=32; tokens=270 gives the official 288/144/72. With the first "
        "drop at layer 8 budgets below ceil((8 n + 24) / 32) = 145 are unreachable (128, 64, 32 raise "
        "ValueError): pass layers=(2, 8, 16) or similar to move the stages, or lam= to set lambda directly "
        "(tokens is then ignored). Differences from the official code: official scores with the q/k of the "
        "first layer of the new stage on its input; the engine scores with the attention of the layer before "
        "the drop (the last layer of the previous stage), computed exactly from its q/k after RoPE. Positions: "
        "contiguous by default, as official (modeling_llama_pdrop.py, pdrop_rank_drop renumbers the kept rows "
        "0..len-1 and decoding subtracts each stage's dropped count); positions='original' keeps the original ids. "
        "Official loops over the batch; here batched with padding. budget='paper' (the label T as the paper's "
        "average, with the maintainer's published configurations): T=270 is the repository's configuration "
        "(scripts/v1_5/pdrop_eval/*.sh: layers 8/16/24, lambda=0.5: 288/144/72); other labels follow the "
        "maintainer's recipe for the paper's budgets (issue #29: stages at layers 2/8/16, lambda solved for the "
        "average to two decimals; published: lambda=0.19 for 64): 192 -> lambda=0.56: 322/180/101 (average 191.9), "
        "128 -> 0.42: 241/101/42 (127.4), 64 -> 0.19: 109/20/3 (62.9); counts int(n lambda^j) as official; labels "
        "below ceil(2 n / 32) + 1 = 37 (32) are unreachable."
    ),
))
