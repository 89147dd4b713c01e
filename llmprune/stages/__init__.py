"""Stage kinds: what one entry of a recipe's `stages:` list does.

`method:` names the stage. Pruning methods (magnitude, wanda, sparsegpt, ...; `llmprune.methods`)
run the `prune` kind; structured kinds answer to their own names (`width`, `layer-drop`, ...).
A kind is a function `run(ctx, **params) -> StageRecord` registered with `@stage_kind`; its
keyword-only parameters, with annotations and defaults, are the stage's YAML keys
(`llmprune.params`). Every kind gets a `StageContext` (the model, calibration windows, device,
the keep-masks of earlier stages) and returns a `StageRecord` for the report and `llmprune.json`.
`run_stage` measures what every stage changed (parameters, zeros, time) the same way for all kinds.

A kind computes first and edits second. Same-shape edits (zeros under a keep-mask) go straight into
the layer it works on. Structural edits are two optional hooks on the kind, fed by what `run` wrote
into `ctx.edits` (JSON-able, string keys: the run journal keeps it):
- `edit_layer(ctx, index, layer) -> new index | None` edits one decoder layer (a real one, or a
  meta-device skeleton layer when a resumed run replays it) and says where it goes (None: removed);
- `edit_model(ctx)` runs once every layer is edited: config and model-level changes.
The layer store (`llmprune.calibration.streaming`) calls them: in memory, on every layer after `run`;
streamed from disk, on each layer as the stage finishes it, just before it is written.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from llmprune.edits import MaskState, parameter_count
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
    edits: dict = field(default_factory=dict)         # what `run` decided, for the kind's edit hooks (JSON-able)
    resumed: StageRecord | None = None                # a resumed run: the record as journalled mid-stage
    record: StageRecord | None = None                 # the record `new_record` handed out (journalled per layer)

    def new_record(self, **fields) -> StageRecord:
        """The stage's record: a fresh one, or in a resumed run the journalled one (what the finished
        layers added is kept; the kind fills in the rest as usual)."""
        record = self.resumed if self.resumed is not None else StageRecord()
        for key, value in fields.items():
            setattr(record, key, value)
        self.record = record
        return record

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
    edit_layer: Callable[[StageContext, int, nn.Module], int | None] | None = None   # see the module doc
    edit_model: Callable[[StageContext], None] | None = None
    streams: bool = False          # works with decoder layers streamed from disk (only opened through the store)
    splits_batches: bool = False   # reduces over batches only through LayerObserver (torchrun splits its batches)


STAGE_KINDS: dict[str, StageKind] = {}      # by kind name
_BY_METHOD: dict[str, str] = {}             # method name -> kind name


def stage_kind(name: str, *, methods: tuple[str, ...] | None = None, summary: str = "",
               needs_calibration: Callable[[dict], bool] = lambda params: True,
               validate=None, check_model=None, edit_layer=None, edit_model=None,
               streams: bool = False, splits_batches: bool = False):
    def wrap(fn):
        kind = StageKind(name=name, run=fn, params=signature_params(fn),
                         summary=summary or (fn.__doc__ or "").strip().splitlines()[0],
                         needs_calibration=needs_calibration, validate=validate, check_model=check_model,
                         methods=tuple(methods) if methods is not None else (name,),
                         edit_layer=edit_layer, edit_model=edit_model, streams=streams,
                         splits_batches=splits_batches)
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
    """Run one stage and record what it changed: parameters, zeros, time. The layer store applies the
    kind's edit hooks (in memory: after `run`; streamed: as each layer is finished)."""
    from llmprune import distributed
    from llmprune.calibration.streaming import layer_store

    kind = kind_for(method)
    layers = layer_store(ctx.model)
    t0 = time.perf_counter()
    params_before = parameter_count(ctx.model)
    call = resolved_params(method, params)
    if ctx.resumed is not None:           # what the interrupted run resolved (e.g. the schedule) holds
        call.update({k: v for k, v in ctx.resumed.params.items() if k in call})
    if kind.name == "prune":
        call["method"] = method
    layers.begin_stage(ctx, kind)
    from llmprune.arch import spec_for

    # Per-expert statistics (moe.observe) are not reduced across ranks: MoE models run every batch on every rank.
    splits = kind.splits_batches and spec_for(ctx.model).moe is None
    with distributed.replicated(not splits):
        record = kind.run(ctx, **call)
    zeros_before, zeros_after, elements = layers.end_stage(ctx, kind)
    record.index, record.method, record.kind = ctx.index, method, kind.name
    # What the kind resolved while running (e.g. the calibration schedule) overrides the defaults.
    record.params = {**{k: v for k, v in call.items() if k != "method"}, **record.params}
    record.parameters_before, record.parameters_after = params_before, parameter_count(ctx.model)
    record.zeros_before = zeros_before
    record.zeros_after, record.linear_elements = zeros_after, elements
    record.seconds = time.perf_counter() - t0
    record.notes = list(dict.fromkeys(ctx.notes + record.notes))
    return record


def replay_stage(ctx: StageContext, method: str) -> None:
    """Re-apply a finished stage's structural edits (`ctx.edits` from the journal) to a resumed run's
    skeleton model: every layer through `edit_layer`, then `edit_model`. Nothing is computed."""
    kind = kind_for(method)
    from llmprune.arch import decoder_layers

    if kind.edit_layer is not None:
        for i, layer in enumerate(decoder_layers(ctx.model)):
            kind.edit_layer(ctx, i, layer)
    if kind.edit_model is not None:
        kind.edit_model(ctx)


def _load_kinds() -> None:
    """Importing the kind modules registers them (imports are cached: cheap after the first call)."""
    from llmprune.stages import depth, experts, heal, prune, width  # noqa: F401
