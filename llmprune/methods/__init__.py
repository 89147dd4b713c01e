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
from llmprune.params import signature_params


@dataclass
class LinearStats:
    """Statistics of one linear's inputs over all calibration tokens (float32)."""
    n_tokens: int = 0
    input_sq_norm: torch.Tensor | None = None   # [in]      sum_t x_tj^2   (Wanda)
    input_sum: torch.Tensor | None = None       # [in]      sum_t x_tj     (means: FLAP, DSnoT)
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
    true_sequential: bool = False               # default calibration schedule (see stages/prune.py)
    check: Callable | None = None               # check(pattern, params) -> problem text or None (before loading)


METHODS: dict[str, MethodSpec] = {}


def register(name: str, needs: set[str] | frozenset[str] = frozenset(), summary: str = "",
             true_sequential: bool = False, check: Callable | None = None):
    def wrap(fn: Callable) -> Callable:
        params = signature_params(fn)     # the method's recipe keys, validated from their annotations
        METHODS[name] = MethodSpec(name=name, fn=fn, needs=frozenset(needs), params=params,
                                   summary=summary or (fn.__doc__ or "").strip().splitlines()[0],
                                   true_sequential=true_sequential, check=check)
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
