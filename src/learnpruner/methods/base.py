"""The method type and the one registry of pruning methods (each method family registers in its own module).

A method pairs a stage-1 rule (after the vision encoder) and/or a stage-2 rule (inside the LLM)
with its paper's defaults and two mappings from a token budget to a :class:`~learnpruner.budget.Schedule`:
``budget="average"`` (the default: the AVERAGE number of visual tokens per LLM layer) and ``budget="paper"``
(the label of the method's published configuration; see :mod:`learnpruner.budget`). Every method also takes
the ``positions`` option (``"original"`` or ``"contiguous"`` position ids after a drop), its default being what
its official code does.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..budget import (
    BUDGETS,
    POSITIONS,
    Schedule,
    UnreachableBudget,
    check_budget,
    describe,
    single_drop,
)

__all__ = ["Method", "Option", "COMMON", "METHODS", "ABLATIONS", "register", "get_method", "positions_for",
           "describe_budgets", "check_layer", "stage1_schedule", "stage2_schedule", "positive_int", "fraction",
           "choice", "boolean", "int_sequence"]


# --- options: declared once per method, typed, with their defaults ------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One option of a method: its name, its default and the check of a given value.

    ``default`` is a value, or a function of the LLM's depth (``num_layers``) giving one (e.g. a stage-2 layer scaled
    with depth); ``None`` means the schedule derives it from the budget (``r1``, ``r2``, ``layers``). ``check``
    raises ``ValueError`` naming a bad value and returns the value as used. :func:`learnpruner.resolve` fills every
    option of a method, records where each came from, and nothing else reads a default.
    """

    name: str
    default: Any = None
    check: Callable[[Any], Any] | None = None
    doc: str = ""
    counts: bool = False  # a given value sets the kept counts itself (r1, r2, PyramidDrop's lam): not the budget

    def default_for(self, num_layers: int | None) -> Any:
        return self.default(num_layers) if callable(self.default) else self.default

    def validate(self, value: Any) -> Any:
        return value if self.check is None or value is None else self.check(value)


def positive_int(name: str, low: int = 1) -> Callable[[Any], int]:
    what = "a positive integer" if low else "a non-negative integer"

    def check(v):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"option {name} must be {what}, got {v!r}")
        return int(v)

    return check


def fraction(name: str, low: float = 0.0, high: float = 1.0, open_low: bool = False, open_high: bool = False):
    def check(v):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (low < v if open_low else low <= v) and \
            (v < high if open_high else v <= high)
        if not ok:
            raise ValueError(f"option {name} must be a number in {'(' if open_low else '['}{low:g}, {high:g}"
                             f"{')' if open_high else ']'}, got {v!r}")
        return float(v) if isinstance(v, float) else v

    return check


def choice(name: str, choices: tuple, listed: bool = True) -> Callable[[Any], Any]:
    shown = ", ".join(repr(c) for c in choices) if listed else repr(choices)

    def check(v):
        if v not in choices:
            raise ValueError(f"option {name} must be one of {shown}, got {v!r}")
        return v

    return check


def boolean(name: str) -> Callable[[Any], bool]:
    def check(v):
        if not isinstance(v, bool):
            raise ValueError(f"option {name} must be True or False, got {v!r}")
        return v

    return check


def int_sequence(name: str) -> Callable[[Any], tuple]:
    def check(v):
        if isinstance(v, (int, str)) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            raise ValueError(f"option {name} must be a sequence of integers, got {v!r}")
        v = tuple(v)
        if list(v) != sorted(set(v)) or not v:
            raise ValueError(f"option {name} must be strictly increasing and non-empty, got {v!r}")
        return v

    return check


def _lpm_check(v):
    from ..lpm import LearnablePruningModule

    if not (isinstance(v, (str, os.PathLike, LearnablePruningModule))):
        raise ValueError(f"option lpm must be a path, a LearnablePruningModule or 'random', got {type(v).__name__}")
    return v


# the options several methods share, with their common defaults (a method may declare its own default instead)
COMMON = {
    "r1": Option("r1", None, positive_int("r1"), "tokens stage 1 keeps (default: the schedule's for the budget)",
                 counts=True),
    "r2": Option("r2", None, positive_int("r2"), "tokens the first LLM drop keeps (default: the schedule's)",
                 counts=True),
    "layer": Option("layer", None, positive_int("layer", 0), "the LLM layer of the (first) drop"),
    "diversity": Option("diversity", 0.1, fraction("diversity"),
                        "share of the stage-1 budget filled by max-min diversity"),
    "seed": Option("seed", 0, positive_int("seed", 0), "the random generator's seed (per item)"),
    "lpm": Option("lpm", None, _lpm_check, "the Learnable Pruning Module: a folder, a module or 'random' (default: "
                  "the model folder's learnpruner-lpm/)"),
}


@dataclass(frozen=True)
class Method:
    """A named pruning method: its rules, accepted options and budget mappings.

    ``schedule_fn`` maps a budget in the average convention, ``paper_fn`` in the paper convention (``None``:
    the method's paper uses the average convention, so both are the same). ``positions`` is the default of the
    ``positions`` option every method takes: what the method's official code does to the position ids of the
    tokens kept after a drop. ``options``: the :class:`Option` declarations (or names of :data:`COMMON` ones);
    after construction ``options`` holds their names and ``specs`` the declarations by name.
    """

    name: str
    stage1: str | None
    stage2: str | None
    schedule_fn: Callable[[int, int, int, dict], Schedule]
    options: tuple = ()
    doc: str = ""
    # "image": stage 1 ranks all of an image's tokens at once; "crop": on families with crops (LLaVA-NeXT) the
    # image's stage-1 budget is split evenly over its crops and the rule runs on each crop alone
    stage1_unit: str = "image"
    paper_fn: Callable[[int, int, int, dict], Schedule] | None = None
    positions: str = "original"
    summary: str = ""  # where it prunes, in a few words (the methods table)
    paper: str = ""  # its paper, short (the methods table; ``doc`` cites it in full)
    # the model folder's LPM this method reads when no lpm= is given (methods with their own trained module)
    lpm_folder: str = "learnpruner-lpm"
    specs: dict | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        known = {**COMMON, **(self.specs or {})}  # a copy of a method (Method(**m.__dict__)) brings its specs
        specs = {}
        for o in self.options:
            if o == "positions" and "positions" not in known:
                continue  # every method's, added below
            spec = known.get(o) if isinstance(o, str) else o
            if not isinstance(spec, Option):
                raise TypeError(f"method {self.name!r}: an option is an Option or a common option's name, got {o!r}")
            specs[spec.name] = spec
        specs.setdefault("positions", Option("positions", self.positions, choice("positions", POSITIONS),
                                             "position ids of the tokens kept after a drop"))
        object.__setattr__(self, "specs", specs)
        object.__setattr__(self, "options", tuple(specs))

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
        """The token schedule for a budget, ``n`` visual tokens per image and ``num_layers`` layers: the method's
        mapping, which :meth:`learnpruner.plan.Plan.schedule` calls (the one place a budget becomes a schedule).

        ``budget`` is the convention ``tokens`` is read in: ``"average"`` (average visual tokens per LLM layer)
        or ``"paper"`` (the label of the method's published configuration). Options left out take their declared
        defaults. Explicit ``r1``/``r2`` options must lie in ``[1, n]``: a larger count would silently break the
        budget.
        """
        check_budget(budget)
        options = {**self.defaults(num_layers), **{k: v for k, v in options.items() if k != "lpm"}}
        for key in ("r1", "r2"):
            value = options.get(key)
            if value is not None and value > n:
                raise ValueError(f"option {key}={value} exceeds the image's {n} visual tokens; accepted: 1..{n}")
        fn = self.paper_fn if budget == "paper" and self.paper_fn is not None else self.schedule_fn
        schedule = fn(tokens, n, num_layers, options)
        if budget == "average" and tokens < n and not schedule.is_noop and not any(
                options.get(k) is not None for k, o in self.specs.items() if o.counts):
            check_reached(schedule, tokens, self.name)
        return schedule

    def check_options(self, options: dict) -> dict:
        """The given options checked (names and values, each by its declaration); ``ValueError`` naming the first
        bad one and what is accepted."""
        unknown = sorted(set(options) - set(self.specs))
        if unknown:
            accepted = ", ".join(self.options) or "none"
            raise ValueError(f"method {self.name!r} does not take option(s) {unknown}; accepted: {accepted}")
        return {k: self.specs[k].validate(v) for k, v in options.items()}

    def defaults(self, num_layers: int | None) -> dict:
        """Every option's default for an LLM of ``num_layers`` layers (``lpm`` excluded: it is resolved apart)."""
        return {k: o.default_for(num_layers) for k, o in self.specs.items() if k != "lpm"}


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
    from ..plan import resolve

    m = get_method(method) if isinstance(method, str) else method
    opts = {k: v for k, v in (options or {}).items() if k != "lpm"}
    lines = [f"budgets ({n} visual tokens, {num_layers} LLM layers; visual tokens per layer):"]
    for t in labels:
        for j, budget in enumerate(BUDGETS):
            try:
                plan = resolve("llava", m.name, t, budget=budget, num_layers=num_layers, defer_lpm=True,
                               uniform_count=n, **opts)
                text = describe(plan.schedule(n))
            except ValueError as e:
                text = f"not available: {e}"
            head = f"{t:>5}" if j == 0 else " " * 5
            lines.append(f"{head}  {budget:<8} {text}")
    same = m.paper_fn is None
    lines.append(f"  positions after a drop: {m.positions} (official; option positions=original|contiguous)"
                 + ("; both conventions are the same for this method" if same else ""))
    return lines


def check_reached(schedule: Schedule, tokens: int, method: str) -> None:
    """Refuse a schedule whose average is not the asked budget beyond rounding (``max(0.5, 15%)`` of it), naming what
    it reaches: e.g. LearnPruner at ``tokens=1`` keeps ``r1 = 3, r2 = 1`` (its 3 : 1 split needs ``r2 >= 1``), 1.75 to
    2.0 per layer, which a table must never show as a 1-token cell. Within rounding (64 -> 111/37 = 64.75 on 32
    layers) the reached average is what ``stats`` and every eval record report, and tables flag it."""
    reached = schedule.average
    if abs(reached - tokens) > max(0.5, 0.15 * tokens):
        raise UnreachableBudget(
            f"{method} cannot average {tokens} visual tokens per layer for {schedule.n}-token items: its schedule "
            f"({describe(schedule)}) reaches {reached:.1f}; use a budget it reaches (or r1=/r2= to set the counts)")


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
