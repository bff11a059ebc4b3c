"""The method type and the one registry of pruning methods (each method family registers in its own module).

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

from ..budget import (
    BUDGETS,
    POSITIONS,
    Schedule,
    check_budget,
    describe,
    single_drop,
)

__all__ = ["Method", "METHODS", "ABLATIONS", "register", "get_method", "positions_for", "describe_budgets",
           "check_layer", "stage1_schedule", "stage2_schedule"]


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
        from ..rules import STAGE1_RULES

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


def stage1_schedule(tokens: int, n: int, num_layers: int, options: dict) -> Schedule:
    """Stage 1 keeps ``tokens``; every LLM layer sees them (the average equals the budget): the schedule of every
    method that prunes after the vision encoder only."""
    return Schedule(n=n, num_layers=num_layers, r1=tokens if tokens < n else None)


def stage2_schedule(tokens: int, n: int, num_layers: int, options: dict, layer: int, method: str) -> Schedule:
    """One LLM drop at ``layer`` (``check_layer``-ed by the caller) keeping ``r2`` (option) or the count that makes
    the average ``tokens`` (:func:`~learnpruner.budget.single_drop`): methods that prune inside the LLM only."""
    if options.get("r2") is not None:
        r2 = options["r2"]
        return Schedule(n=n, num_layers=num_layers, drops=((layer, r2),) if r2 < n else ())
    return single_drop(tokens, n, num_layers, layer, method)
