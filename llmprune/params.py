"""Recipe parameters from function signatures (mergekit's `@merge_method` style).

A stage kind or a pruning method declares its YAML keys as keyword-only parameters with type
annotations and defaults; `check_value` validates a recipe value against the annotation before
any model is loaded, naming where it came from:

    def sparsegpt(weight, stats, pattern, *, block_size: Annotated[int, Range(1)] = 128,
                  dampening: Annotated[float, Range(0)] = 0.01): ...

Supported annotations: int, float, bool, str, Literal[...], `X | None`, list[int], and
`Annotated[T, Range(low, high, ...)]`. An int key refuses 1.9 (and True); a float key accepts 2.
"""
from __future__ import annotations

import inspect
import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args, get_origin

from llmprune.errors import UserError


@dataclass(frozen=True)
class Range:
    low: float | None = None
    high: float | None = None
    low_open: bool = False      # low < value instead of low <= value
    high_open: bool = False

    def check(self, value, where: str, key: str) -> None:
        ok = True
        if self.low is not None:
            ok &= value > self.low if self.low_open else value >= self.low
        if self.high is not None:
            ok &= value < self.high if self.high_open else value <= self.high
        if not ok:
            lo = "" if self.low is None else f"{self.low} {'<' if self.low_open else '<='} "
            hi = "" if self.high is None else f" {'<' if self.high_open else '<='} {self.high}"
            raise UserError(f"{where}: '{key}' must satisfy {lo}{key}{hi}, got {value!r}")


def signature_params(fn) -> dict[str, inspect.Parameter]:
    """The keyword-only parameters of `fn`: its recipe keys. Annotations are resolved."""
    hints = typing.get_type_hints(fn, include_extras=True)
    out = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind is inspect.Parameter.KEYWORD_ONLY:
            out[p.name] = p.replace(annotation=hints.get(p.name, p.annotation))
    return out


def _describe(tp) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp) if a is not type(None))
    if origin is list:
        return f"a list of {_describe(get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(tp, value, where: str, key: str):
    """`value` as type `tp`, or a UserError naming `key`."""
    origin = get_origin(tp)
    if origin is Annotated:
        base, *extras = get_args(tp)
        value = _coerce(base, value, where, key)
        if value is not None:
            for extra in extras:
                if isinstance(extra, Range):
                    extra.check(value, where, key)
        return value
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, where, key)
            except UserError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise UserError(f"{where}: '{key}' must be {_describe(tp)}, got {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if value in choices and not isinstance(value, bool):
            return value
        raise UserError(f"{where}: '{key}' must be one of {', '.join(map(str, choices))}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: '{key}' must be {_describe(tp)}, got {value!r}")
        return [_coerce(get_args(tp)[0], v, where, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any or tp is inspect.Parameter.empty:
        return value
    raise UserError(f"{where}: '{key}' must be {_describe(tp)}, got {value!r}")


def check_value(param: inspect.Parameter, value, where: str):
    return _coerce(param.annotation, value, where, param.name)


def check_params(params: dict[str, inspect.Parameter], given: dict, where: str, allowed_extra=()) -> dict:
    """Validate every key of `given` against `params`; unknown keys are an error naming the allowed ones."""
    out = {}
    for key, value in given.items():
        if key not in params:
            allowed = ", ".join(sorted({*allowed_extra, *params}))
            raise UserError(f"{where}: unknown key '{key}' (allowed: {allowed})")
        out[key] = check_value(params[key], value, where)
    return out


def defaults(params: dict[str, inspect.Parameter]) -> dict:
    return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
