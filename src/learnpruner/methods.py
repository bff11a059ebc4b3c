"""The one registry of pruning methods.

A method pairs a stage-1 rule (after the vision encoder) and/or a stage-2 rule (inside the LLM)
with its paper's defaults and a mapping from a token budget to a :class:`~learnpruner.budget.Schedule`.
Budgets are the AVERAGE number of visual tokens per LLM layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .budget import Schedule, default_layer, single_drop, two_stage

__all__ = ["Method", "METHODS", "register", "get_method"]

# Stage-1 rules: "lpm" (learnable pruning module), "random". Stage-2 rules: "text" (mean attention
# from the instruction tokens after the image), "last" (attention from the last token).
STAGE1_RULES = ("lpm", "random")
STAGE2_RULES = ("text", "last")


@dataclass(frozen=True)
class Method:
    """A named pruning method: its rules, accepted options and budget mapping."""

    name: str
    stage1: str | None
    stage2: str | None
    schedule_fn: Callable[[int, int, int, dict], Schedule]
    options: tuple[str, ...] = ()
    doc: str = ""
    # "image": stage 1 ranks all of an image's tokens at once; "crop": on families with crops (LLaVA-NeXT) the
    # image's stage-1 budget is split evenly over its crops and the rule runs on each crop alone
    stage1_unit: str = "image"

    def schedule(self, tokens: int, n: int, num_layers: int, options: dict) -> Schedule:
        """The token schedule for a budget, ``n`` visual tokens per image and ``num_layers`` layers.

        Explicit ``r1``/``r2`` options must lie in ``[1, n]``: a larger count would silently break the budget.
        """
        for key in ("r1", "r2"):
            value = options.get(key)
            if value is not None and value > n:
                raise ValueError(f"option {key}={value} exceeds the image's {n} visual tokens; accepted: 1..{n}")
        return self.schedule_fn(tokens, n, num_layers, options)

    def check_options(self, options: dict) -> dict:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            accepted = ", ".join(self.options) or "none"
            raise ValueError(f"method {self.name!r} does not take option(s) {unknown}; accepted: {accepted}")
        for key, low in (("r1", 1), ("r2", 1), ("layer", 0), ("seed", 0)):
            value = options.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                what = "a positive integer" if low else "a non-negative integer"
                raise ValueError(f"option {key} must be {what}, got {value!r}")
        div = options.get("diversity")
        if div is not None and not (isinstance(div, (int, float)) and 0.0 <= div <= 1.0):
            raise ValueError(f"option diversity must be a number in [0, 1], got {div!r}")
        return dict(options)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry (names are unique)."""
    if method.name in METHODS:
        raise ValueError(f"a method named {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """Look a method up by name; ``ValueError`` listing the known names otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}") from None


def _check_layer(layer: int, num_layers: int) -> int:
    if not 1 <= layer < num_layers:
        raise ValueError(f"layer must be in [1, {num_layers - 1}] for a {num_layers}-layer LLM, got {layer}")
    return layer


def _none_schedule(tokens: int, n: int, num_layers: int, options: dict) -> Schedule:
    return Schedule(n=n, num_layers=num_layers)


def _random_schedule(tokens: int, n: int, num_layers: int, options: dict) -> Schedule:
    r1 = options.get("r1", tokens)
    return Schedule(n=n, num_layers=num_layers, r1=r1 if r1 < n else None)


def _fastv_schedule(tokens: int, n: int, num_layers: int, options: dict) -> Schedule:
    layer = _check_layer(options.get("layer", 2), num_layers)
    if options.get("r2") is not None:
        r2 = options["r2"]
        return Schedule(n=n, num_layers=num_layers, drops=((layer, r2),) if r2 < n else ())
    return single_drop(tokens, n, num_layers, layer, "fastv")


def _learnpruner_schedule(tokens: int, n: int, num_layers: int, options: dict) -> Schedule:
    layer = _check_layer(options.get("layer", default_layer(num_layers, 12)), num_layers)
    s = two_stage(tokens, n, num_layers, layer)
    r1 = options.get("r1", s.r1)
    r2 = options.get("r2", s.r2)
    if r1 is not None and r1 >= n:
        r1 = None
    first = n if r1 is None else r1
    if r2 is not None and r2 >= first:
        r2 = None
    return Schedule(n=n, num_layers=num_layers, r1=r1, drops=((layer, r2),) if r2 is not None else ())


register(Method(
    name="none",
    stage1=None,
    stage2=None,
    schedule_fn=_none_schedule,
    doc="No pruning: every visual token is kept. The reference every method is compared with.",
))

register(Method(
    name="random",
    stage1="random",
    stage2=None,
    schedule_fn=_random_schedule,
    options=("seed", "r1"),
    doc=(
        "Random pruning after the vision encoder: keep ``tokens`` visual tokens chosen uniformly at random "
        "(default seed 0; each forward draws new indices from the seeded generator). Every LLM layer sees "
        "the same ``tokens``, so the average equals the budget."
    ),
))

register(Method(
    name="fastv",
    stage1=None,
    stage2="last",
    schedule_fn=_fastv_schedule,
    options=("layer", "r2"),
    doc=(
        "FastV (Chen et al., 'An Image is Worth 1/2 Tokens After Layer 2', ECCV 2024). After LLM layer K-1 "
        "(paper default K=2) the visual tokens receiving the least attention from the LAST token (mean over "
        "heads) are dropped for layers K..L-1. The paper states a ratio R (50%); here the number kept is "
        "mapped to the average budget: r = (T L - K n) / (L - K). With K=2 a budget below about 2n/L (37 of "
        "576 for 32 layers) is unreachable and raises ValueError; pass layer=1 to prune earlier, or r2= to "
        "set the kept count directly. The official code scores with eager attention weights; here the same "
        "probabilities are computed from the layer's queries and keys, so SDPA and FlashAttention work."
    ),
))

register(Method(
    name="learnpruner",
    stage1="lpm",
    stage2="text",
    schedule_fn=_learnpruner_schedule,
    options=("lpm", "r1", "r2", "layer", "diversity"),
    doc=(
        "LearnPruner (arXiv 2604.23950). Stage 1: a learnable pruning module scores each visual token from "
        "the vision feature layer; the top r1 by keep-probability are kept, 10% of r1 (diversity=0.1) filled "
        "by max-min cosine diversity. Stage 2: after LLM layer K-1 (K=12 for 32 layers, scaled with depth: "
        "round(12 L / 32)), tokens are scored by the attention they receive from all instruction tokens after "
        "the image (mean over those queries and heads) and the top r2 are kept for layers K..L-1. Budget split "
        "r1:r2 = 3:1 (64 -> 111/37, 32 -> 55/18 for 32 layers). No official code exists; defaults follow the "
        "paper's text."
    ),
))
