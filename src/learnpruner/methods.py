"""The one registry of pruning methods.

A method pairs a stage-1 rule (after the vision encoder) and/or a stage-2 rule (inside the LLM)
with its paper's defaults and two mappings from a token budget to a :class:`~learnpruner.budget.Schedule`:
``budget="average"`` (the default: the AVERAGE number of visual tokens per LLM layer) and ``budget="paper"``
(the label of the method's published configuration; see :mod:`learnpruner.budget`). Every method also takes
the ``positions`` option (``"original"`` or ``"contiguous"`` position ids after a drop), its default being what
its official code does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .budget import (
    BUDGETS,
    POSITIONS,
    Schedule,
    check_budget,
    default_layer,
    describe,
    single_drop,
    two_stage,
)

__all__ = ["Method", "METHODS", "ABLATIONS", "register", "get_method", "positions_for", "describe_budgets"]

# Stage-1 rules: "lpm" (learnable pruning module), "random". Stage-2 rules: "text" (mean attention
# from the instruction tokens after the image), "last" (attention from the last token).
STAGE1_RULES = ("lpm", "random")
STAGE2_RULES = ("text", "last")


@dataclass(frozen=True)
class Method:
    """A named pruning method: its rules, accepted options and budget mappings.

    ``schedule_fn`` maps a budget in the average convention, ``paper_fn`` in the paper convention (``None``:
    the method's paper uses the average convention, so both are the same). ``positions`` is the default of the
    ``positions`` option every method takes: what the method's official code does to the position ids of the
    tokens kept after a drop.
    """

    name: str
    stage1: str | None
    stage2: str | None
    schedule_fn: Callable[[int, int, int, dict], Schedule]
    options: tuple[str, ...] = ()
    doc: str = ""
    # "image": stage 1 ranks all of an image's tokens at once; "crop": on families with crops (LLaVA-NeXT) the
    # image's stage-1 budget is split evenly over its crops and the rule runs on each crop alone
    stage1_unit: str = "image"
    paper_fn: Callable[[int, int, int, dict], Schedule] | None = None
    positions: str = "original"

    def __post_init__(self):
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if "positions" not in self.options:  # every method takes it
            object.__setattr__(self, "options", (*self.options, "positions"))

    @property
    def needs_cls(self) -> bool:
        """Whether its stage-1 rule reads the vision encoder's [CLS] attention (families without one refuse it)."""
        return self._stage1_flag("needs_cls")

    @property
    def needs_lpm(self) -> bool:
        """Whether its stage-1 rule reads a Learnable Pruning Module (option ``lpm``)."""
        return self._stage1_flag("needs_lpm")

    def _stage1_flag(self, name: str) -> bool:
        from .rules import STAGE1_RULES

        return bool(getattr(STAGE1_RULES.get(self.stage1), name, False)) if self.stage1 else False

    def schedule(self, tokens: int, n: int, num_layers: int, options: dict, budget: str = "average") -> Schedule:
        """The token schedule for a budget, ``n`` visual tokens per image and ``num_layers`` layers.

        ``budget`` is the convention ``tokens`` is read in: ``"average"`` (average visual tokens per LLM layer)
        or ``"paper"`` (the label of the method's published configuration). Explicit ``r1``/``r2`` options must
        lie in ``[1, n]``: a larger count would silently break the budget.
        """
        check_budget(budget)
        for key in ("r1", "r2"):
            value = options.get(key)
            if value is not None and value > n:
                raise ValueError(f"option {key}={value} exceeds the image's {n} visual tokens; accepted: 1..{n}")
        fn = self.paper_fn if budget == "paper" and self.paper_fn is not None else self.schedule_fn
        return fn(tokens, n, num_layers, options)

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
        pos = options.get("positions")
        if pos is not None and pos not in POSITIONS:
            raise ValueError(f"option positions must be one of {', '.join(repr(p) for p in POSITIONS)}, got {pos!r}")
        return dict(options)


METHODS: dict[str, Method] = {}
# methods registered by name but not listed in METHODS (the paper's newer ablations): ``get_method`` and
# ``apply`` find them, while ``--methods all`` and sweeps over METHODS leave them out
ABLATIONS: dict[str, Method] = {}


def register(method: Method, listed: bool = True) -> Method:
    """Add a method to the registry (names are unique); ``listed=False`` keeps it out of :data:`METHODS`."""
    if method.name in METHODS or method.name in ABLATIONS:
        raise ValueError(f"a method named {method.name!r} is already registered")
    (METHODS if listed else ABLATIONS)[method.name] = method
    return method


def get_method(name: str) -> Method:
    """Look a method up by name; ``ValueError`` listing the known names otherwise."""
    try:
        return METHODS[name] if name in METHODS else ABLATIONS[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted({**METHODS, **ABLATIONS}))
        raise ValueError(f"unknown method {name!r}; known methods: {known}") from None


def positions_for(method: Method, options: dict) -> tuple[str, bool]:
    """``(positions, explicit)``: the ``positions`` option if given, else the method's default."""
    given = options.get("positions")
    return (given, True) if given is not None else (method.positions, False)


def describe_budgets(method: Method | str, n: int = 576, num_layers: int = 32,
                     labels: tuple[int, ...] = (192, 128, 64, 32), options: dict | None = None) -> list[str]:
    """Lines showing how each budget label maps to visual tokens per layer in both conventions (``learnpruner
    methods NAME`` prints them): for ``n`` visual tokens per image and ``num_layers`` LLM layers (LLaVA-1.5-7B:
    576 and 32). A label a convention cannot serve shows why."""
    m = get_method(method) if isinstance(method, str) else method
    opts = {k: v for k, v in (options or {}).items() if k != "lpm"}
    lines = [f"budgets ({n} visual tokens, {num_layers} LLM layers; visual tokens per layer):"]
    for t in labels:
        for j, budget in enumerate(BUDGETS):
            try:
                text = describe(m.schedule(t, n, num_layers, opts, budget=budget))
            except ValueError as e:
                text = f"not available: {e}"
            head = f"{t:>5}" if j == 0 else " " * 5
            lines.append(f"{head}  {budget:<8} {text}")
    same = m.paper_fn is None
    lines.append(f"  positions after a drop: {m.positions} (official; option positions=original|contiguous)"
                 + ("; both conventions are the same for this method" if same else ""))
    return lines


def check_layer(layer: int, num_layers: int) -> int:
    if not 1 <= layer < num_layers:
        raise ValueError(f"layer must be in [1, {num_layers - 1}] for a {num_layers}-layer LLM, got {layer}")
    return layer


def _none_schedule(tokens: int, n: int, num_layers: int, options: dict) -> Schedule:
    return Schedule(n=n, num_layers=num_layers)


def _random_schedule(tokens: int, n: int, num_layers: int, options: dict) -> Schedule:
    r1 = options.get("r1", tokens)
    return Schedule(n=n, num_layers=num_layers, r1=r1 if r1 < n else None)


def _fastv_schedule(tokens: int, n: int, num_layers: int, options: dict) -> Schedule:
    layer = check_layer(options.get("layer", 2), num_layers)
    if options.get("r2") is not None:
        r2 = options["r2"]
        return Schedule(n=n, num_layers=num_layers, drops=((layer, r2),) if r2 < n else ())
    return single_drop(tokens, n, num_layers, layer, "fastv")


def _fastv_paper(tokens: int, n: int, num_layers: int, options: dict) -> Schedule:
    """FastV's own parametrisation: K=2, ATTENTION_RANK = T tokens kept from layer K on (R = 1 - T / n). K is the
    paper's layer 2 at any depth, as in the average convention (not scaled: on a shallow LLM a drop after
    layer 1 keeps little of the signal FastV relies on)."""
    layer = check_layer(options.get("layer", 2), num_layers)
    r = options.get("r2", tokens)
    return Schedule(n=n, num_layers=num_layers, drops=((layer, r),) if r < n else ())


def learnpruner_schedule(tokens: int, n: int, num_layers: int, options: dict) -> Schedule:
    layer = check_layer(options.get("layer", default_layer(num_layers, 12)), num_layers)
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
        "the same ``tokens``, so the average equals the budget. No official code: positions original by default "
        "(positions='contiguous' renumbers the kept tokens); both budget conventions are the same."
    ),
))

register(Method(
    name="fastv",
    stage1=None,
    stage2="last",
    schedule_fn=_fastv_schedule,
    paper_fn=_fastv_paper,
    options=("layer", "r2"),
    doc=(
        "FastV (Chen et al., 'An Image is Worth 1/2 Tokens After Layer 2', ECCV 2024). After LLM layer K-1 "
        "(paper default K=2) the visual tokens receiving the least attention from the LAST token (mean over "
        "heads) are dropped for layers K..L-1. The paper states a ratio R (50%); here the number kept is "
        "mapped to the average budget: r = (T L - K n) / (L - K). With K=2 a budget below about 2n/L (37 of "
        "576 for 32 layers) is unreachable and raises ValueError; pass layer=1 to prune earlier, or r2= to "
        "set the kept count directly. The official code scores with eager attention weights; here the same "
        "probabilities are computed from the layer's queries and keys, so SDPA and FlashAttention work. "
        "budget='paper': FastV's own parametrisation (official code pkunlp-icler/FastV, "
        "src/transformers/src/transformers/models/llama/modeling_llama.py: AGG_LAYER K and ATTENTION_RANK, the "
        "tokens kept from layer K on): K=2 and T kept, i.e. R = 1 - T/n (192/128/64 -> 192/128/64 from layer 2, "
        "averages 216.0/156.0/96.0 for n=576, L=32), as DART's paper reports FastV; the SparseVLM and VisionZip "
        "tables instead matched FastV's average (budget='average'). Positions: original (as official: "
        "position_ids = keep_indexs)."
    ),
))

register(Method(
    name="learnpruner",
    stage1="lpm",
    stage2="text",
    schedule_fn=learnpruner_schedule,
    options=("lpm", "r1", "r2", "layer", "diversity"),
    doc=(
        "LearnPruner (arXiv 2604.23950). Stage 1: a learnable pruning module scores each visual token from "
        "the vision feature layer; the top r1 by keep-probability are kept, 10% of r1 (diversity=0.1) filled "
        "by max-min cosine diversity. Stage 2: after LLM layer K-1 (K=12 for 32 layers, scaled with depth: "
        "round(12 L / 32)), tokens are scored by the attention they receive from all instruction tokens after "
        "the image (mean over those queries and heads) and the top r2 are kept for layers K..L-1. Budget split "
        "r1:r2 = 3:1 (64 -> 111/37, 32 -> 55/18 for 32 layers). No official code exists; defaults follow the "
        "paper's text. The paper reports the average convention, so budget='paper' is the same. Positions: "
        "original (kept tokens keep their position ids, as the paper does)."
    ),
))
