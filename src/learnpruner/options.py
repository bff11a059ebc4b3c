"""Command-line option parsing shared by the ``learnpruner`` command, the lmms-eval model and the testbed tools:
``KEY=VALUE`` method options, ``METHOD:KEY=VALUE`` per-method options and comma-separated lists."""

from __future__ import annotations

__all__ = ["option_value", "method_options", "per_method_options", "parse_list"]


def option_value(text: str):
    """``3`` -> int, ``0.5`` -> float, ``true``/``false`` -> bool, ``2,8,16`` -> tuple of those; else text."""
    if "," in text:
        return tuple(option_value(t) for t in text.split(",") if t)
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def method_options(pairs: list[str]) -> dict:
    """``KEY=VALUE`` options for ``apply`` (values parsed by :func:`option_value`)."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"--option takes KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key] = option_value(value)
    return out


def per_method_options(pairs: list[str], methods: list[str]) -> dict[str, dict]:
    """``METHOD:KEY=VALUE`` pairs -> ``{method: {key: value}}``; the method must be one being evaluated."""
    import learnpruner

    out: dict[str, dict] = {}
    for pair in pairs or []:
        method, sep, rest = pair.partition(":")
        if not sep or "=" not in rest:
            raise ValueError(f"--option takes METHOD:KEY=VALUE (e.g. fastv:layer=1), got {pair!r}")
        if method not in methods:
            raise ValueError(f"--option {pair!r} names method {method!r}, which is not among --methods "
                             f"({', '.join(methods)})")
        option = method_options([rest])
        accepted = learnpruner.get_method(method).options
        for key in option:
            if key not in accepted:
                raise ValueError(f"--option {pair!r}: {method} has no option {key!r}; accepted: "
                                 f"{', '.join(accepted) or 'none'}")
        try:  # the value's type and range, as apply() will check them
            learnpruner.get_method(method).check_options(option)
        except ValueError as e:
            raise ValueError(f"--option {pair!r}: {e}") from None
        out.setdefault(method, {}).update(option)
    return out


def parse_list(value, cast, what: str, unique: bool = False) -> list:
    """A comma-separated list (or a sequence, or one int) as a list of ``cast`` values; ``ValueError`` naming
    ``what`` and the bad value when it is empty, a value does not cast, or (``unique``) a value comes twice."""
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, int):
        items = [value]
    else:
        items = list(value)
    if not items:
        raise ValueError(f"{what} is empty: give at least one value")
    out = []
    for item in items:
        try:
            out.append(cast(item))
        except (TypeError, ValueError):
            raise ValueError(f"{what}: {item!r} is not a valid value (give a comma-separated list)") from None
    if unique:
        seen = set()
        for v in out:
            if v in seen:
                raise ValueError(f"{what} names {v!r} twice: each value once (a repeated cell would run twice and be "
                                 "paired with itself)")
            seen.add(v)
    return out
