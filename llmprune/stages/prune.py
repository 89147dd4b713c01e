"""The `prune` stage kind: zeros in the same matrices (unstructured or N:M), by any pruning method.

Per decoder layer: onload, collect the statistics the method needs (two-pass or true-sequential,
`calibration/engine.py`), prune every targeted matrix with the method at its allocated pattern,
record its keep-mask, propagate the pruned outputs to the next layer. lm_head / embeddings only
when `targets` names them. Allocation (how the target is spread over matrices) is decided before
the layer loop (`llmprune/allocation.py`).

Targets are `arch.Matrix` handles: every linear of the decoder layers and, in MoE models, every routed
expert's 2-D slices of the fused 3-D expert parameters (`...experts.gate_up_proj[5]`), calibrated on the
tokens routed to that expert (`moe.observe.LayerMatrixObserver`: the experts module is one lockstep point
in the true-sequential schedule: all batches arrive, every gate_up slice is pruned, the down slices are
calibrated on the pruned gate_up outputs and pruned, all batches go on). Routers are pruned only when
`targets` names them. An expert that received no calibration token is pruned by magnitude, with a note.
"""
from __future__ import annotations

from typing import Annotated, Callable, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from llmprune import distributed
from llmprune.allocation import global_magnitude_sparsities, owl_layer_sparsities_for_model
from llmprune.arch import (Matrix, TargetSelector, decoder_layers, get_module, head_targets, layer_matrices,
                           prunable_matrices, spec_for, weight_2d)
from llmprune.calibration.engine import LayerStep, capture_layer_inputs, default_true_sequential, layerwise
from llmprune.calibration.observers import LayerObserver
from llmprune.errors import UserError
from llmprune.masks import Pattern, parse_pattern, sparsity_of
from llmprune.methods import LinearStats, MethodSpec, get_method
from llmprune.moe.families import is_moe
from llmprune.moe.observe import LayerMatrixObserver
from llmprune.params import Range
from llmprune.report import ModuleResult, StageRecord, pattern_target
from llmprune.stages import StageContext, stage_kind

ALLOCATIONS = ("uniform", "owl", "global")


def _needs_calibration(params: dict) -> bool:
    return bool(get_method(params["method"]).needs) or params.get("allocation") == "owl"


def _validate(params: dict, where: str) -> dict:
    method = get_method(params["method"])
    try:
        pattern = parse_pattern(params["sparsity"])
    except UserError as exc:
        raise UserError(f"{where}: 'sparsity': {exc}") from None
    if isinstance(params["sparsity"], bool):
        raise UserError(f"{where}: 'sparsity' must be a fraction like 0.5 or N:M like 2:4, got {params['sparsity']!r}")
    params["sparsity"] = str(pattern) if pattern.is_nm else pattern.sparsity
    allocation = params.get("allocation", "uniform")
    if allocation != "uniform" and pattern.is_nm:
        raise UserError(f"{where}: allocation '{allocation}' needs unstructured sparsity, not {pattern}")
    if allocation == "global" and method.name != "magnitude":
        raise UserError(f"{where}: allocation 'global' ranks |W| across matrices and is only for method magnitude")
    if params.get("true_sequential") is not None and not method.needs:
        raise UserError(f"{where}: 'true_sequential' is a calibration schedule; method {method.name} "
                        f"uses no calibration data")
    min_density = params.get("min_density", 0.0)
    if allocation == "global" and min_density > 1 - pattern.sparsity:
        raise UserError(f"{where}: min_density {min_density} cannot be met at sparsity {pattern.sparsity}")
    TargetSelector(params.get("targets"), params.get("ignore"))
    if method.check is not None:
        problem = method.check(pattern, {k: v for k, v in params.items() if k in method.params})
        if problem:
            raise UserError(f"{where}: {problem}")
    return params


def _check_targets(model: nn.Module, params: dict, where: str) -> tuple[dict, dict]:
    selector = TargetSelector(params.get("targets"), params.get("ignore"))
    targets, heads = prunable_matrices(model, selector), head_targets(model, selector)
    if not targets and not heads:
        raise UserError(f"{where}: no linear layer matches targets={params.get('targets')!r} "
                        f"ignore={params.get('ignore')!r}")
    if params.get("allocation") == "owl" and is_moe(model):
        raise UserError(f"{where}: allocation owl scores the outliers of each layer's linears and does not see "
                        f"the fused experts of an MoE model yet; use allocation uniform or global")
    pattern = parse_pattern(params["sparsity"])
    method = get_method(params["method"])
    for name, module in {**targets, **heads}.items():
        if isinstance(module, nn.Embedding) and method.needs:
            raise UserError(f"{where}: embeddings ({name}) can only be pruned with method magnitude")
        if pattern.is_nm and weight_2d(module).shape[1] % pattern.m:
            raise UserError(f"{where}: {name} has {weight_2d(module).shape[1]} inputs, not a multiple of "
                            f"{pattern.m}, so it cannot be {pattern}; exclude it with --ignore")
    return targets, heads


def _check_model(model: nn.Module, params: dict, where: str) -> None:
    _check_targets(model, params, where)


@stage_kind("prune", methods=(), needs_calibration=_needs_calibration, validate=_validate, check_model=_check_model,
            streams=True, splits_batches=True, summary="zeros in the same matrices: unstructured or N:M, by a pruning method")
def prune(ctx: StageContext, *, method: str, sparsity: str | float,
          allocation: Literal["uniform", "owl", "global"] = "uniform",
          owl_m: Annotated[float, Range(0, low_open=True)] = 5.0,
          owl_lambda: Annotated[float, Range(0, 1, high_open=True)] = 0.08,
          min_density: Annotated[float, Range(0, 1, high_open=True)] = 0.0,
          targets: str | None = None, ignore: str | None = None,
          true_sequential: bool | None = None, **method_params) -> StageRecord:
    """Prune the targeted linears to `sparsity` (0.5 or N:M) with `method`."""
    model, where = ctx.model, ctx.where
    spec = get_method(method)
    pattern = parse_pattern(sparsity)
    layers_path = spec_for(model).layers
    params = {"method": method, "sparsity": sparsity, "targets": targets, "ignore": ignore}
    linears, heads = _check_targets(model, params, where)
    record = ctx.new_record(target=pattern_target(pattern))
    calib_ids = ctx.calib_ids() if (spec.needs or allocation == "owl") else None
    batch_size = ctx.calibration.batch_size
    if spec.needs:
        if true_sequential is None:        # resolve the default and record the schedule that ran
            true_sequential, note = default_true_sequential(model, spec.true_sequential, calib_ids, ctx.device)
            if note:
                record.notes.append(f"{where}: {note}")
        record.schedule = "true-sequential" if true_sequential else "two-pass"
        record.params["true_sequential"] = true_sequential

    # Per-matrix pattern: uniform, OWL per layer, or global magnitude.
    module_pattern: dict[str, Pattern] = {name: pattern for name in linears}
    if allocation == "global":
        for name, s in global_magnitude_sparsities({**linears, **heads}, pattern.sparsity, min_density).items():
            module_pattern[name] = Pattern(sparsity=s)
    elif allocation == "owl":
        selector = TargetSelector(targets, ignore)
        layer_sparsity = owl_layer_sparsities_for_model(model, calib_ids, batch_size, selector, ctx.device,
                                                        pattern.sparsity, owl_m, owl_lambda, ctx.progress)
        record.layers = {k: round(v, 6) for k, v in layer_sparsity.items()}
        for name in linears:   # "model.layers.3.mlp.up_proj" -> its layer "model.layers.3"
            layer_index = name[len(layers_path) + 1:].split(".", 1)[0]
            module_pattern[name] = Pattern(sparsity=layer_sparsity[f"{layers_path}.{layer_index}"])

    unseen_experts: list[str] = []

    def prune_one(name: str, module: nn.Module | Matrix, stats: LinearStats | None) -> None:
        how, params = spec, method_params
        if spec.needs and stats is None:
            if not (isinstance(module, Matrix) and module.role == "expert"):
                raise UserError(f"{where}: {name} received no input during calibration, so {method} has no "
                                f"statistics for it; exclude it with --ignore")
            # The router sent this expert no calibration token: there is nothing to weigh its inputs by.
            how, params = get_method("magnitude"), {}
            unseen_experts.append(name)
        _prune_module(module, stats, module_pattern.get(name, pattern), how, params, ctx,
                      lambda result: record.modules.__setitem__(name, result))

    selector = TargetSelector(targets, ignore)
    moe = spec_for(model).moe

    def prune_layer(step: LayerStep) -> None:
        layer_targets = {n: m for n, m in layer_matrices(step.layer, step.name, selector, moe).items()
                         if n in linears}
        if not layer_targets:
            return
        if not spec.needs:
            for name, matrix in layer_targets.items():
                prune_one(name, matrix, None)
            distributed.flush()
            return
        # A calibration point is a linear, or a fused experts module for all its expert slices.
        obs = LayerMatrixObserver(layer_targets, spec.needs, bool(true_sequential), moe)

        def prune_point(point: str, stats) -> None:
            for name, matrix_stats in obs.matrix_stats(point, stats):
                prune_one(name, layer_targets[name], matrix_stats)

        with obs.attached():
            if true_sequential:                   # prunes every matrix and propagates, in one pass
                step.forward_lockstep(obs, prune_point)
                return
            with obs.hooked(stop_early=True):
                step.forward_all(obs)
        obs.seal_all()
        for point in list(obs.linears):
            prune_point(point, obs.stats.pop(point, None))
        distributed.flush()           # under torchrun: the matrices above ran on different ranks

    n_layers = len(decoder_layers(model))
    desc = f"{method} {pattern}" + (" (owl)" if allocation == "owl" else "")
    captured = None
    with tqdm(total=n_layers, desc=desc, disable=not ctx.progress, unit="layer") as bar:
        if spec.needs:
            captured = capture_layer_inputs(model, calib_ids, batch_size)
            layerwise(model, captured, ctx.device, layers_path, prune_layer, bar)
        else:   # data-free: no forward passes at all
            layerwise(model, None, ctx.device, layers_path, prune_layer, bar)

    for name, module in heads.items():   # lm_head / embeddings, only when targeted explicitly
        stats = None
        if spec.needs and not isinstance(module, nn.Embedding):
            stats = _head_stats(model, module, captured, spec.needs)
        _prune_module(module, stats, module_pattern.get(name, pattern), spec, method_params, ctx,
                      lambda result, name=name: record.modules.__setitem__(name, result))
    distributed.flush()
    if unseen_experts:
        record.notes.append(f"{where}: {len(unseen_experts)} expert matrices received no calibration token and were "
                            f"pruned by magnitude: {', '.join(unseen_experts[:8])}"
                            + (f" (+{len(unseen_experts) - 8} more)" if len(unseen_experts) > 8 else ""))
    record.achieved = round(record.sparsity, 6)
    return record


def _prune_module(module: nn.Module, stats: LinearStats | None, pattern: Pattern, method: MethodSpec,
                  params: dict, ctx: StageContext, done: Callable[[ModuleResult], None]) -> None:
    """Run the method on a float32 working copy on the compute device; write weight ⊙ keep_mask back
    and hand the result to `done`. Under torchrun the method runs on the matrix's rank and every rank
    applies the result at the next `distributed.flush()` (at once in a single process)."""
    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        weight = weight_2d(module).to(device=ctx.device, dtype=torch.float32).clone()   # [out, in]
        result = method.fn(weight, stats if stats is not None else LinearStats(), pattern, **params)
        # A method returns the pruned weight, or (weight, keep_mask) when kept weights may be exactly zero.
        return result if isinstance(result, tuple) else (result, result != 0)

    def apply(pruned: torch.Tensor, keep_mask: torch.Tensor, seconds: float) -> None:
        ctx.masks.apply(module, pruned, keep_mask, pattern_target(pattern))
        done(ModuleResult(shape=tuple(pruned.shape), target=pattern_target(pattern),
                          achieved=sparsity_of(weight_2d(module)), seconds=seconds))

    distributed.submit(compute, apply)


@torch.no_grad()
def _head_stats(model, head: nn.Module, captured, needs) -> LinearStats:
    """Statistics for lm_head: the final norm applied to the last decoder layer's (pruned) outputs."""
    norm = get_module(model, spec_for(model).final_norm)
    norm_device = next(norm.parameters()).device
    head_device = weight_2d(head).device
    obs = LayerObserver({"head": head}, needs)
    with obs.hooked():
        for b, hidden in enumerate(captured.hidden):
            obs.start_batch(captured.batch_ids[b])
            x = norm(hidden.to(norm_device))
            head(x.to(head_device))
            obs.end_batch(captured.batch_ids[b])
    obs.seal_all()
    return obs.stats["head"]
