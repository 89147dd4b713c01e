"""Stage kinds: what one entry of a recipe's `stages:` list does.

`method:` names the stage. Pruning methods (magnitude, wanda, sparsegpt, ...; `llmprune.methods`)
run the `prune` kind; structured kinds answer to their own names (`width`, `layer-drop`, ...).
A kind is a function `run(ctx, **params) -> StageRecord` registered with `@stage_kind`; its
keyword-only parameters, with annotations and defaults, are the stage's YAML keys
(`llmprune.params`). Every kind gets a `StageContext` (the model, calibration windows, device,
the keep-masks of earlier stages) and returns a `StageRecord` for the report and `llmprune.json`.
`run_stage` measures what every stage changed (parameters, zeros, time) the same way for all kinds.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from llmprune.edits import MaskState, linear_zeros, parameter_count
from llmprune.errors import UserError
from llmprune.params import check_params, defaults, signature_params
from llmprune.report import StageRecord


@dataclass
class StageContext:
    model: nn.Module
    tokenizer: Any
    calibration: Any                  # recipe.Calibration: the recipe's calibration settings
    calib: Any                        # api.CalibrationSet (ids [n, seqlen] + spec) or None
    device: str
    progress: bool
    masks: MaskState
    index: int
    where: str                        # "stage 1 (width)", for messages
    notes: list[str] = field(default_factory=list)
    teacher: Callable[[], nn.Module] | None = None    # the unpruned model, loaded on first call

    def calib_ids(self):
        if self.calib is None:
            raise UserError(f"{self.where}: needs calibration data (give calib= or a calibration source)")
        return self.calib.ids


@dataclass(frozen=True)
class StageKind:
    name: str
    run: Callable[..., StageRecord]
    params: dict[str, inspect.Parameter]
    summary: str
    needs_calibration: Callable[[dict], bool]
    validate: Callable[[dict, str], dict] | None = None       # cross-key checks, no model needed
    check_model: Callable[[nn.Module, dict, str], None] | None = None   # against a meta-device model
    methods: tuple[str, ...] = ()                             # the `method:` names it answers to


STAGE_KINDS: dict[str, StageKind] = {}      # by kind name
_BY_METHOD: dict[str, str] = {}             # method name -> kind name


def stage_kind(name: str, *, methods: tuple[str, ...] | None = None, summary: str = "",
               needs_calibration: Callable[[dict], bool] = lambda params: True,
               validate=None, check_model=None):
    def wrap(fn):
        kind = StageKind(name=name, run=fn, params=signature_params(fn),
                         summary=summary or (fn.__doc__ or "").strip().splitlines()[0],
                         needs_calibration=needs_calibration, validate=validate, check_model=check_model,
                         methods=tuple(methods) if methods is not None else (name,))
        STAGE_KINDS[name] = kind
        for method in kind.methods:
            _BY_METHOD[method] = name
        return fn
    return wrap


def kind_for(method: str) -> StageKind:
    """The stage kind a `method:` value names (a pruning method runs the `prune` kind)."""
    _load_kinds()
    if method in _BY_METHOD:
        return STAGE_KINDS[_BY_METHOD[method]]
    from llmprune.methods import METHODS

    if method in METHODS:
        return STAGE_KINDS["prune"]
    raise UserError(f"unknown method '{method}'; choose one of {', '.join(sorted(all_methods()))}")


def all_methods() -> list[str]:
    _load_kinds()
    from llmprune.methods import METHODS

    return sorted({*METHODS, *_BY_METHOD})


def stage_params(method: str) -> dict[str, inspect.Parameter]:
    """Every YAML key a stage with this `method:` accepts (the prune kind adds the method's own)."""
    kind = kind_for(method)
    params = {k: p for k, p in kind.params.items() if k != "method"}
    if kind.name == "prune":
        from llmprune.methods import get_method

        params.update(get_method(method).params)
    return params


def validate_stage(method: str, given: dict, where: str) -> dict:
    """Check a stage's keys and values (no model needed); returns them coerced."""
    kind = kind_for(method)
    params = stage_params(method)
    checked = check_params(params, given, where, allowed_extra=("method",))
    for key, p in params.items():
        if p.default is inspect.Parameter.empty and key not in checked:
            raise UserError(f"{where} is missing '{key}'")
    if kind.validate is not None:
        checked = kind.validate({"method": method, **checked}, where)
        checked.pop("method", None)
    return checked


def resolved_params(method: str, given: dict) -> dict:
    """The stage's parameters with the defaults of every key it did not give."""
    return {**defaults(stage_params(method)), **given}


def run_stage(ctx: StageContext, method: str, params: dict) -> StageRecord:
    """Run one stage and record what it changed: parameters, zeros, time."""
    kind = kind_for(method)
    t0 = time.perf_counter()
    params_before = parameter_count(ctx.model)
    zeros_before, _ = linear_zeros(ctx.model)
    call = resolved_params(method, params)
    if kind.name == "prune":
        call["method"] = method
    record = kind.run(ctx, **call)
    record.index, record.method, record.kind = ctx.index, method, kind.name
    # What the kind resolved while running (e.g. the calibration schedule) overrides the defaults.
    record.params = {**{k: v for k, v in call.items() if k != "method"}, **record.params}
    record.parameters_before, record.parameters_after = params_before, parameter_count(ctx.model)
    record.zeros_before = zeros_before
    record.zeros_after, record.linear_elements = linear_zeros(ctx.model)
    record.seconds = time.perf_counter() - t0
    record.notes = ctx.notes + record.notes
    return record


def _load_kinds() -> None:
    """Importing the kind modules registers them (imports are cached: cheap after the first call)."""
    from llmprune.stages import depth, experts, heal, prune, width  # noqa: F401
