"""How every settings dataclass validates itself on construction: its `Literal` choices by one helper,
its ranges with `check`. Errors name the field (a CLI flag is the field name with dashes)."""

from __future__ import annotations

import dataclasses
import types
import typing

__all__ = ["NOT_A_FLAG", "check", "check_choices"]

NOT_A_FLAG = {"cli": False}
"""Field metadata: the CLI makes no flag for this field (it is set from data, not by a user). Another
metadata key, `flag`, names a field's flag when its own name would clash with another config's."""


def check(cond: bool, msg: str) -> None:
    """Raise ValueError(msg) unless `cond`."""
    if not cond:
        raise ValueError(msg)


def _choices(hint: object) -> tuple | None:
    """The values a `Literal[...]` (or `Literal[...] | None`) annotation allows, None for other types."""
    if typing.get_origin(hint) is typing.Literal:
        return typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if typing.get_origin(arg) is typing.Literal:
                return (*typing.get_args(arg), None) if type(None) in typing.get_args(hint) else typing.get_args(arg)
    return None


def check_choices(obj: object) -> None:
    """Every field annotated with a `Literal` holds one of its values."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        allowed = _choices(hints[f.name])
        value = getattr(obj, f.name)
        if allowed is not None and value not in allowed:
            shown = "|".join("None" if a is None else str(a) for a in allowed)
            raise ValueError(f"{f.name} must be {shown}, got {value!r}")
