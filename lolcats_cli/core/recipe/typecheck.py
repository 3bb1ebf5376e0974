"""Build typed dataclasses from plain mappings, collecting every error with its key path.

The checks come from the dataclass annotations, never from per-field code: ``int``, ``float`` (an int is
accepted and widened), ``bool``, ``str``, ``None``, ``X | None``, unions, ``Literal[...]`` (with "did you
mean"), ``list[X]``, ``dict[str, X]``, ``Any`` and nested dataclasses. Range limits live in the field
metadata, made with :func:`option`: ``gt``, ``ge``, ``lt``, ``le``, ``min_len`` and ``items`` (limits for
each element of a list).

It is the one engine for every value a user writes: recipe fields, and plugin parameters
(:func:`lolcats_cli.core.model.registry.build_params`). A value is never parsed from a string: recipes and CLI
overrides arrive as parsed YAML, so ``"64"`` where an integer belongs is a quoted number, refused with the fix
(``write it without quotes: 64``); ``64.0`` is not an integer either, and ``true`` is never ``1``. An
annotation this module does not know (not a type: ``Callable[...]``, say) accepts any value, for the owner of
the field to check.

    errors: list[str] = []
    cfg = build(MyConfig, {"lr": "fast"}, "transfer", errors)
    # errors == ["transfer.lr: expected a number, got 'fast'"]
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

from ...errors import did_you_mean

INVALID = object()  # what convert returns for a value it could not convert, after recording why
_QUOTED = {  # a string YAML would have read as a value of the type, had it not been quoted
    bool: re.compile(r"true|false", re.IGNORECASE),
    int: re.compile(r"[+-]?\d+"),
    float: re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?\.inf|\.nan", re.IGNORECASE),
}
_LIMITS = {"gt": (">", lambda v, b: v > b), "ge": (">=", lambda v, b: v >= b),
           "lt": ("<", lambda v, b: v < b), "le": ("<=", lambda v, b: v <= b)}


def option(default: Any = dataclasses.MISSING, **limits: Any) -> Any:
    """A dataclass field with range limits; mutable defaults (list, dict) are copied per instance."""
    unknown = set(limits) - {*_LIMITS, "min_len", "items"}
    if unknown:
        raise TypeError(f"unknown limits {sorted(unknown)}")
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=limits)
    return dataclasses.field(default=default, metadata=limits)


def key(path: str, name: str | int) -> str:
    """``key("transfer", "lr") == "transfer.lr"``; ``key("attention.layers", 1) == "attention.layers[1]"``."""
    if isinstance(name, int):
        return f"{path}[{name}]"
    return f"{path}.{name}" if path else name


def show(value: Any) -> str:
    """A short description of a user's value for an error message."""
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if value is None:
        return "null"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def describe(tp: Any) -> str:
    """The expected type in words: ``int | None`` -> 'an integer or null'."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return "any value"
    if tp is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {_plural(args[0]) if args else 'values'}"
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _plural(tp: Any) -> str:
    return {bool: "booleans", int: "integers", float: "numbers", str: "strings"}.get(tp, describe(tp))


def _matches_shape(tp: Any, value: Any) -> bool:
    """Whether ``value`` has the rough shape of ``tp`` (used to pick the union member to blame)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return any(type(value) is type(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin in (dict, Mapping) or dataclasses.is_dataclass(tp):
        return isinstance(value, Mapping)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(tp, type) and isinstance(value, tp)


def _unquote(tp: Any, value: Any) -> str:
    """``"; write it without quotes: 64"`` when ``value`` is a quoted scalar of a type ``tp`` accepts, else ""."""
    if not isinstance(value, str):
        return ""
    members = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)
    text = value.strip()
    scalar = [m for m in members if m in _QUOTED and _QUOTED[m].fullmatch(text)]
    if not scalar or str in members:
        return ""
    return f"; write it without quotes: {text.lower() if scalar[0] is bool else text}"


def convert(tp: Any, value: Any, path: str, errors: list[str]) -> Any:
    """``value`` checked against (and converted to) ``tp``; returns ``INVALID`` after recording errors."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        for member in members:
            scratch: list[str] = []
            out = convert(member, value, path, scratch)
            if not scratch:
                return out
        blamed = [m for m in members if _matches_shape(m, value)]
        target = blamed[0] if len(blamed) == 1 else members[0] if len(members) == 1 else None
        nested = target is not None and (
            typing.get_origin(target) in (list, tuple, dict, Mapping) or dataclasses.is_dataclass(target)
        )
        if nested or (target is not None and len(members) == 1 and typing.get_origin(target) is Literal):
            convert(target, value, path, errors)  # the member the user clearly meant explains best
        else:
            choices = [str(a) for m in members if typing.get_origin(m) is Literal for a in typing.get_args(m)]
            hint = did_you_mean(value, choices) if isinstance(value, str) else ""
            errors.append(f"{path}: expected {describe(tp)}, got {show(value)}" + (f"; {hint.strip()}" if hint else "")
                          + _unquote(tp, value))
        return INVALID
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        hint = did_you_mean(value, [str(a) for a in args]) if isinstance(value, str) else ""
        errors.append(f"{path}: invalid choice {show(value)}; {hint}choices: {', '.join(repr(a) for a in args)}")
        return INVALID
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path, errors)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            errors.append(f"{path}: expected {describe(tp)}, got {show(value)}")
            return INVALID
        items = [convert(args[0] if args else Any, v, key(path, i), errors) for i, v in enumerate(value)]
        if any(i is INVALID for i in items):
            return INVALID
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            errors.append(f"{path}: expected a mapping, got {show(value)}")
            return INVALID
        kt, vt = args if args else (Any, Any)
        out, ok = {}, True
        for k, v in value.items():
            if convert(kt, k, path, []) is INVALID:
                errors.append(f"{path}: key {show(k)} should be {describe(kt)}")
                ok = False
                continue
            cv = convert(vt, v, key(path, str(k)), errors)
            ok = ok and cv is not INVALID
            out[k] = cv
        return out if ok else INVALID
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is type(None):
        if value is None:
            return None
    elif not isinstance(tp, type):  # an annotation this checker does not know: its owner checks the value
        return value
    elif isinstance(value, tp):
        return value
    errors.append(f"{path}: expected {describe(tp)}, got {show(value)}{_unquote(tp, value)}")
    return INVALID


def check_limits(limits: Mapping[str, Any], value: Any, path: str, errors: list[str]) -> None:
    """Range limits from a field's metadata (see :func:`option`); None values are not checked."""
    if value is None:
        return
    if "min_len" in limits and isinstance(value, (list, str, dict)) and len(value) < limits["min_len"]:
        n = limits["min_len"]
        if isinstance(value, str):
            errors.append(f"{path}: must not be empty" if n == 1 else f"{path}: needs at least {n} characters")
        else:
            errors.append(f"{path}: needs at least {n} item{'s' * (n != 1)}, got {len(value)}")
    if "items" in limits and isinstance(value, list):
        for i, item in enumerate(value):
            check_limits(limits["items"], item, key(path, i), errors)
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    for name, (symbol, ok) in _LIMITS.items():
        if numeric and name in limits and not ok(value, limits[name]):
            errors.append(f"{path}: must be {symbol} {limits[name]}, got {show(value)}")


def build(cls: type, data: Any, path: str, errors: list[str]) -> Any:
    """An instance of dataclass ``cls`` from mapping ``data`` (missing keys take their defaults).

    Every problem is appended to ``errors``; a section that does not validate still returns an instance
    (built from the valid keys) so that checks can go on and report everything at once.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        errors.append(f"{path or 'recipe'}: expected a mapping, got {show(data)}")
        return cls()
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for name in data:
        if name not in fields:
            errors.append(
                f"{key(path, str(name))}: unknown key; {did_you_mean(str(name), fields)}"
                f"valid keys: {', '.join(fields)}"
            )
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        value = convert(hints[name], data[name], key(path, name), errors)
        if value is not INVALID:
            check_limits(f.metadata, value, key(path, name), errors)
            kwargs[name] = value
        elif isinstance(data[name], list) and "items" in f.metadata:  # still report bad numbers in a bad list
            check_limits({"items": f.metadata["items"]}, data[name], key(path, name), errors)
    return cls(**kwargs)


__all__ = ["INVALID", "option", "build", "convert", "check_limits", "describe", "show", "key"]
