"""Pruning methods: one file each, one small interface, one registry.

A method is a plain function

    fn(weight, stats, pattern, **params) -> pruned_weight

- `weight`  float32 `[out_features, in_features]` working copy on the compute device (may be edited),
- `stats`   the `LinearStats` the engine collected for this linear's inputs (only what `needs` asks for),
- `pattern` the target `Pattern` for this matrix (unstructured sparsity, possibly OWL-adjusted, or N:M),
- `params`  keyword-only arguments with defaults; they are the method's recipe/YAML parameters.

`@register("name", needs={...})` records it in `METHODS`. Methods never know the model family.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch

from llmprune.errors import UserError


@dataclass
class LinearStats:
    """Statistics of one linear's inputs over all calibration tokens (float32)."""
    n_tokens: int = 0
    input_sq_norm: torch.Tensor | None = None   # [in]      sum_t x_tj^2   (Wanda)
    input_sum: torch.Tensor | None = None       # [in]      sum_t x_tj     (DSnoT: mean, variance)
    hessian: torch.Tensor | None = None         # [in, in]  sum_t x_t x_t^T (SparseGPT; H up to scale)
    # What a method derives from these statistics alone (e.g. SparseGPT's inverse Hessian factor),
    # memoised here: linears that share an input (q/k/v, gate/up) share one LinearStats.
    derived: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable
    needs: frozenset[str]                       # subset of {"input_sq_norm", "input_sum", "hessian"}
    params: dict[str, inspect.Parameter] = field(default_factory=dict)
    summary: str = ""
    true_sequential: bool = False               # default calibration schedule (see recipe.Stage)

    def check_params(self, given: dict, where: str, common_keys: tuple[str, ...] = ()) -> dict:
        """Validate recipe parameters against the function signature; coerce simple types."""
        out = {}
        for key, value in given.items():
            if key not in self.params:
                allowed = ", ".join([*common_keys, *sorted(self.params)])
                raise UserError(f"{where}: unknown key '{key}' for method {self.name} (allowed: {allowed})")
            default = self.params[key].default
            if default is not None and not isinstance(value, type(default)):
                try:
                    value = type(default)(value)
                except (TypeError, ValueError):
                    raise UserError(f"{where}: parameter '{key}' of {self.name} must be {type(default).__name__}, got {value!r}") from None
            out[key] = value
        return out


METHODS: dict[str, MethodSpec] = {}


def register(name: str, needs: set[str] | frozenset[str] = frozenset(), summary: str = "",
             true_sequential: bool = False):
    def wrap(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        params = {p.name: p for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}
        METHODS[name] = MethodSpec(name=name, fn=fn, needs=frozenset(needs), params=params,
                                   summary=summary or (fn.__doc__ or "").strip().splitlines()[0],
                                   true_sequential=true_sequential)
        return fn
    return wrap


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise UserError(f"unknown method '{name}'; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


# Importing the modules registers them.
from llmprune.methods import alps, magnitude, sparsegpt, wanda  # noqa: E402,F401
# Mask refinement, refit and channel permutation: helpers the engine applies around a method.
from llmprune.methods import dsnot, permute, refit  # noqa: E402,F401
