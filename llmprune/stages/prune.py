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

import inspect
import time
from dataclasses import dataclass, field
from typing import Annotated, Callable, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from llmprune import distributed
from llmprune.allocation import global_magnitude_sparsities, owl_layer_sparsities_for_model
from llmprune.allocation_search import AllocationSearch, LevelGrid, search_units
from llmprune.arch import (Matrix, TargetSelector, decoder_layers, get_module, head_targets, layer_matrices,
                           prunable_matrices, spec_for, weight_2d)
from llmprune.calibration.engine import (CapturedInputs, LayerStep, capture_layer_inputs, default_true_sequential,
                                         layerwise)
from llmprune.calibration.loss import head_loss
from llmprune.calibration.observers import LayerObserver
from llmprune.edits import MaskState
from llmprune.errors import UserError
from llmprune.masks import Pattern, parse_pattern, sparsity_of
from llmprune.methods import LinearStats, MethodSpec, get_method
from llmprune.methods.refine import needs_for, refine_result
from llmprune.moe.families import is_moe
from llmprune.moe.observe import LayerMatrixObserver
from llmprune.params import Range
from llmprune.report import ModuleResult, StageRecord, pattern_target
from llmprune.stages import StageContext, stage_kind
from llmprune.stages.permutation import PERMUTE_NEEDS, ChannelPermutation, Coupling, apply_permutation, \
    model_couplings, prune_permuted

ALLOCATIONS = ("uniform", "owl", "global", "search")


@dataclass(frozen=True)
class MatrixPlan:
    """How every targeted matrix is pruned: the method, then the stage's refinement options."""
    method: MethodSpec
    params: dict
    refine: str = "none"        # "dsnot": mask swaps after the method (methods/refine.py)
    refit: int = 0              # CG steps refitting the kept weights on the final mask
    permute: bool = False       # N:M: input-channel permutation of coupled consumers (stages/permutation.py)

    @property
    def needs(self) -> frozenset[str]:
        """Calibration statistics of every linear's inputs: the method's and the options'."""
        needs = self.method.needs | needs_for(self.refine, self.refit)
        return needs | PERMUTE_NEEDS if self.permute else needs

    def prune(self, weight: torch.Tensor, stats: LinearStats | None, pattern: Pattern) -> tuple[torch.Tensor, torch.Tensor]:
        """(pruned, keep_mask) `[out, in]` from a float32 working copy `weight` (edited in place)."""
        refining = self.refine != "none" or self.refit > 0
        dense = weight.clone() if refining else weight
        result = self.method.fn(weight, stats if stats is not None else LinearStats(), pattern, **self.params)
        # A method returns the pruned weight, or (weight, keep_mask) when kept weights may be exactly zero.
        pruned, keep_mask = result if isinstance(result, tuple) else (result, result != 0)
        if not refining:
            return pruned, keep_mask
        return refine_result(dense, pruned, keep_mask, stats, pattern, refine=self.refine, refit=self.refit)


def _needs_calibration(params: dict) -> bool:
    return (bool(get_method(params["method"]).needs) or params.get("allocation") in ("owl", "search")
            or bool(needs_for(params.get("refine", "none"), params.get("refit", 0))) or bool(params.get("permute")))


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
    refine, refit, permute = params.get("refine", "none"), params.get("refit", 0), params.get("permute", False)
    if params.get("true_sequential") is not None and not (method.needs or needs_for(refine, refit) or permute):
        raise UserError(f"{where}: 'true_sequential' is a calibration schedule; method {method.name} "
                        f"uses no calibration data")
    if (permute or allocation == "search") and distributed.env_world_size() > 1:
        raise UserError(f"{where}: {'permute' if permute else 'allocation search'} runs in one process; "
                        f"run without torchrun")
    if permute and not pattern.is_nm:
        raise UserError(f"{where}: 'permute' reorders input channels before N:M selection; it needs an N:M "
                        f"sparsity like 2:4, not {pattern}")
    # A recipe as run records every default, so only values that differ from the defaults are "given".
    defaults = inspect.signature(prune).parameters
    given_search = sorted(k for k in params if k.startswith("search_") and k in defaults
                          and params[k] != defaults[k].default)
    if given_search and allocation != "search":
        raise UserError(f"{where}: {', '.join(given_search)} only apply to allocation: search")
    if allocation == "search":
        grid = LevelGrid(pattern.sparsity, params.get("search_step", 0.05), params.get("search_levels", 2))
        if len(grid.offsets()) < 2:
            raise UserError(f"{where}: search_step {grid.step} leaves no other level in (0, 1) around "
                            f"{pattern.sparsity}; use a smaller search_step")
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
    if params.get("allocation") == "search" and is_moe(model):
        raise UserError(f"{where}: allocation search does not handle the fused experts of an MoE model yet; "
                        f"use allocation uniform or global")
    if params.get("permute") and is_moe(model):
        raise UserError(f"{where}: permute couples dense MLP and attention channels and does not handle the fused "
                        f"experts of an MoE model yet; leave it off")
    if params.get("allocation") == "search" and heads:
        raise UserError(f"{where}: allocation search spreads the target over the decoder layers; prune "
                        f"{', '.join(heads)} in a stage of its own")
    if params.get("allocation") == "search" and not targets:
        raise UserError(f"{where}: allocation search needs targeted linears in the decoder layers")
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
          allocation: Literal["uniform", "owl", "global", "search"] = "uniform",
          owl_m: Annotated[float, Range(0, low_open=True)] = 5.0,
          owl_lambda: Annotated[float, Range(0, 1, high_open=True)] = 0.08,
          min_density: Annotated[float, Range(0, 1, high_open=True)] = 0.0,
          search_step: Annotated[float, Range(0, 0.5, low_open=True)] = 0.05,
          search_levels: Annotated[int, Range(1, 10)] = 2,
          search_units: Literal["layer", "module"] = "layer",
          search_samples: Annotated[int, Range(1)] = 16,
          search_generations: Annotated[int, Range(0)] = 4,
          refine: Literal["none", "dsnot"] = "none",
          refit: Annotated[int, Range(0)] = 0,
          permute: bool = False,
          targets: str | None = None, ignore: str | None = None,
          true_sequential: bool | None = None, **method_params) -> StageRecord:
    """Prune the targeted linears to `sparsity` (0.5 or N:M) with `method`."""
    model, where = ctx.model, ctx.where
    spec = get_method(method)
    plan = MatrixPlan(spec, method_params, refine, refit, permute)
    pattern = parse_pattern(sparsity)
    layers_path = spec_for(model).layers
    params = {"method": method, "sparsity": sparsity, "targets": targets, "ignore": ignore, "allocation": allocation}
    linears, heads = _check_targets(model, params, where)
    record = ctx.new_record(target=pattern_target(pattern))
    calib_ids = ctx.calib_ids() if (plan.needs or allocation in ("owl", "search")) else None
    batch_size = ctx.calibration.batch_size
    if plan.needs:
        if true_sequential is None:        # resolve the default and record the schedule that ran
            true_sequential, note = default_true_sequential(model, spec.true_sequential, calib_ids, ctx.device)
            if note:
                record.notes.append(f"{where}: {note}")
        record.schedule = "true-sequential" if true_sequential else "two-pass"
        record.params["true_sequential"] = true_sequential

    # Per-matrix pattern: uniform, OWL per layer, or global magnitude (search: decided by measuring, below).
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

    loop = LayerLoop(ctx=ctx, plan=plan, linears=linears, calib_ids=calib_ids, true_sequential=bool(true_sequential),
                     selector=TargetSelector(targets, ignore), couplings=model_couplings(model, pattern) if permute else {},
                     desc=f"{method} {pattern}" + (f" ({allocation})" if allocation != "uniform" else ""))
    if allocation == "search":
        captured = prune_with_search(loop, pattern, record, step=search_step, levels=search_levels,
                                     units=search_units, samples=search_samples, generations=search_generations)
    else:
        captured = loop.run(module_pattern, ctx.masks, record.modules)
    if loop.permuted:
        record.scores["permuted"] = dict(loop.permuted)

    for name, module in heads.items():   # lm_head / embeddings, only when targeted explicitly
        stats = None
        if plan.needs and not isinstance(module, nn.Embedding):
            stats = _head_stats(model, module, captured, plan.needs)
        _prune_module(module, stats, module_pattern.get(name, pattern), plan, ctx.device, ctx.masks,
                      lambda result, name=name: record.modules.__setitem__(name, result))
    distributed.flush()
    if loop.unseen_experts:
        unseen = loop.unseen_experts
        record.notes.append(f"{where}: {len(unseen)} expert matrices received no calibration token and were "
                            f"pruned by magnitude: {', '.join(unseen[:8])}"
                            + (f" (+{len(unseen) - 8} more)" if len(unseen) > 8 else ""))
    record.achieved = round(record.sparsity, 6)
    return record


@dataclass
class LayerLoop:
    """The stage's pass over the decoder layers; the allocation search runs it twice."""
    ctx: StageContext
    plan: MatrixPlan
    linears: dict[str, nn.Module]
    calib_ids: torch.Tensor | None
    true_sequential: bool
    selector: TargetSelector
    couplings: dict[str, Coupling]          # permute: consumer path (layer-relative) -> its coupling
    desc: str
    permuted: dict[str, bool] | None = None  # permute: consumer name -> whether its permutation won
    unseen_experts: list[str] = field(default_factory=list)   # MoE: expert slices no token reached

    def run(self, module_pattern: dict[str, Pattern], masks: MaskState, results: dict[str, ModuleResult],
            collector: AllocationSearch | None = None, captured: CapturedInputs | None = None,
            desc: str | None = None, final: bool = True) -> CapturedInputs | None:
        """Prune every targeted linear at `module_pattern[name]`, recording keep-masks in `masks` and results
        in `results`. With a `collector`, each pruned linear is also handed to `collector.collect` (with its
        dense weight), and each layer's dense weights are restored once its outputs are propagated.
        Returns the captured inputs, whose hidden states end as the last layer's outputs (None: data-free)."""
        ctx, plan, where = self.ctx, self.plan, self.ctx.where
        model = ctx.model
        layers_path = spec_for(model).layers
        moe = spec_for(model).moe
        needs = plan.needs
        self.permuted = self.permuted if self.permuted is not None else {}

        def prune_one(name: str, module: nn.Module | Matrix, stats: LinearStats | None, layer_name: str,
                      pending: list[ChannelPermutation]) -> None:
            how = plan
            if needs and stats is None:
                if not (isinstance(module, Matrix) and module.role == "expert"):
                    raise UserError(f"{where}: {name} received no input during calibration, so {plan.method.name} "
                                    f"has no statistics for it; exclude it with --ignore")
                # The router sent this expert no calibration token: there is nothing to weigh its inputs by.
                how = MatrixPlan(get_method("magnitude"), {})
                self.unseen_experts.append(name)
            dense = weight_2d(module).detach().clone() if collector is not None else None
            coupling = self.couplings.get(name[len(layer_name) + 1:])
            permutation = _prune_module(module, stats, module_pattern[name], how, ctx.device, masks,
                                        lambda result: results.__setitem__(name, result), coupling)
            if coupling is not None:
                self.permuted[name] = permutation is not None
            if permutation is not None:
                pending.append(permutation)
            if collector is not None:
                collector.collect(name, module, stats, dense, masks.get(module))

        def prune_layer(step: LayerStep) -> None:
            if collector is not None:
                collector.restore_collected()        # the previous layer's outputs are propagated by now
            layer_targets = {n: m for n, m in layer_matrices(step.layer, step.name, self.selector, moe).items()
                             if n in self.linears}
            if not layer_targets:
                return
            pending: list[ChannelPermutation] = []
            if not needs:
                for name, matrix in layer_targets.items():
                    prune_one(name, matrix, None, step.name, pending)
                distributed.flush()
                return
            # A calibration point is a linear, or a fused experts module for all its expert slices.
            obs = LayerMatrixObserver(layer_targets, needs, self.true_sequential, moe)

            def prune_point(point: str, stats) -> None:
                for name, matrix_stats in obs.matrix_stats(point, stats):
                    prune_one(name, layer_targets[name], matrix_stats, step.name, pending)

            with obs.attached():
                if self.true_sequential:          # prunes every matrix and propagates, in one pass
                    step.forward_lockstep(obs, prune_point)
                else:
                    with obs.hooked(stop_early=True):
                        step.forward_all(obs)
            if not self.true_sequential:
                obs.seal_all()
                for point in list(obs.linears):
                    prune_point(point, obs.stats.pop(point, None))
            distributed.flush()                   # under torchrun: the matrices above ran on different ranks
            for permutation in pending:           # function-preserving: the layer's outputs are unchanged
                apply_permutation(step.layer, permutation, masks)

        n_layers = len(decoder_layers(model))
        with tqdm(total=n_layers, desc=desc or self.desc, disable=not ctx.progress, unit="layer") as bar:
            if needs or collector is not None or captured is not None:
                if captured is None:
                    captured = capture_layer_inputs(model, self.calib_ids, ctx.calibration.batch_size)
                layerwise(model, captured, ctx.device, layers_path, prune_layer, bar, final=final)
            else:   # data-free: no forward passes at all
                layerwise(model, None, ctx.device, layers_path, prune_layer, bar, final=final)
        if collector is not None:
            collector.restore_collected()
        return captured


def prune_with_search(loop: LayerLoop, pattern: Pattern, record: StageRecord, *, step: float, levels: int,
                      units: str, samples: int, generations: int) -> CapturedInputs:
    """`allocation: search` (allocation_search.py): pass A at the uniform target building the database of
    variants, the measured choice, pass B at the chosen levels, and the comparison with uniform on the
    calibration loss of all windows; records the per-layer sparsities that won."""
    ctx, plan = loop.ctx, loop.plan
    model, where = ctx.model, ctx.where
    t0 = time.perf_counter()
    layers_path = spec_for(model).layers
    sizes = {n: weight_2d(m).numel() for n, m in loop.linears.items()}
    unit_list = search_units(sizes, layers_path, units)
    grid = LevelGrid(pattern.sparsity, step, levels)
    search = AllocationSearch(model, loop.linears, unit_list, grid, ctx.masks,
                              prune_at=lambda dense, stats, p: plan.prune(
                                  dense.to(ctx.device, torch.float32).clone(), stats, p))
    batch_size = ctx.calibration.batch_size
    ids = loop.calib_ids
    id_batches = [ids[s:s + batch_size] for s in range(0, ids.shape[0], batch_size)]
    subset = max(1, min(len(id_batches), -(-samples // batch_size)))    # whole calibration batches

    # Pass A: uniform, with every other level of every linear from the same statistics.
    captured = capture_layer_inputs(model, ids, batch_size)
    subset_hidden = [h.clone() for h in captured.hidden[:subset]]
    uniform_masks = MaskState(masks=dict(ctx.masks.masks), targets=dict(ctx.masks.targets))
    uniform_modules: dict[str, ModuleResult] = {}
    loop.run({n: pattern for n in loop.linears}, uniform_masks, uniform_modules, collector=search, captured=captured,
             desc=f"{loop.desc}: uniform + levels", final=False)
    uniform_loss = head_loss(model, id_batches, captured.hidden)
    t_pass_a = time.perf_counter() - t0

    outcome = search.choose(subset_hidden, captured.calls[:subset], id_batches[:subset], ctx.device,
                            generations=generations)
    searched_loss = None
    t_pass_b = 0.0
    if any(outcome.offsets):
        t1 = time.perf_counter()
        chosen = {name: Pattern(sparsity=grid.level(k)) for unit, k in zip(unit_list, outcome.offsets)
                  for name in unit.linears}
        searched_modules: dict[str, ModuleResult] = {}
        captured = loop.run(chosen, ctx.masks, searched_modules, captured=capture_layer_inputs(model, ids, batch_size),
                            desc=f"{loop.desc}: searched levels")
        searched_loss = head_loss(model, id_batches, captured.hidden)
        t_pass_b = time.perf_counter() - t1
    kept_search = searched_loss is not None and searched_loss < uniform_loss
    final_offsets = outcome.offsets if kept_search else [0] * len(unit_list)
    if kept_search:
        record.modules.update(searched_modules)
    else:            # the uniform model from the database; replaces pass B's weights and keep-masks
        search.write_final(final_offsets, ctx.masks)
        record.modules.update(uniform_modules)

    zeros: dict[str, float] = {}          # per decoder layer: Σ level·size over its targeted linears
    for unit, k in zip(unit_list, final_offsets):
        for name in unit.linears:
            layer = f"{layers_path}.{unit.layer}"
            zeros[layer] = zeros.get(layer, 0.0) + grid.level(k) * sizes[name]
    layer_sizes: dict[str, int] = {}
    for unit in unit_list:
        layer_sizes[f"{layers_path}.{unit.layer}"] = layer_sizes.get(f"{layers_path}.{unit.layer}", 0) + unit.parameters
    record.layers = {layer: round(zeros[layer] / layer_sizes[layer], 6) for layer in zeros}
    seconds = time.perf_counter() - t0
    record.scores["search"] = {
        "units": units, "levels": [round(grid.level(k), 6) for k in grid.offsets()],
        "chosen": {u.name: round(grid.level(k), 6) for u, k in zip(unit_list, outcome.offsets)},
        "kept": "search" if kept_search else "uniform",
        "calibration_loss": {"uniform": round(uniform_loss, 6),
                             "searched": None if searched_loss is None else round(searched_loss, 6)},
        "subset_loss": {"uniform": round(outcome.uniform_loss, 6), "curves": round(outcome.curve_loss, 6),
                        "search": round(outcome.loss, 6), "windows": sum(b.shape[0] for b in id_batches[:subset])},
        "evaluations": outcome.evaluations,
        "seconds": {"uniform_pass": round(t_pass_a, 2), "search": round(outcome.seconds, 2),
                    "searched_pass": round(t_pass_b, 2), "total": round(seconds, 2)}}
    if kept_search:
        record.notes.append(f"{where}: allocation search: calibration loss {searched_loss:.4f} vs uniform "
                            f"{uniform_loss:.4f} ({100 * (searched_loss / uniform_loss - 1):+.2f}%), "
                            f"{outcome.evaluations} subset evaluations, {seconds:.1f} s; per-layer sparsity "
                            + ", ".join(f"{layer.rsplit('.', 1)[-1]}: {s:.3f}" for layer, s in record.layers.items()))
    elif searched_loss is None:
        record.notes.append(f"{where}: allocation search kept uniform sparsity: no level assignment had a lower "
                            f"calibration loss on the scoring windows ({outcome.evaluations} evaluations)")
    else:
        record.notes.append(f"{where}: allocation search kept uniform sparsity: the searched levels' model had "
                            f"calibration loss {searched_loss:.4f}, uniform {uniform_loss:.4f}")
    return captured


def _prune_module(module: nn.Module, stats: LinearStats | None, pattern: Pattern, plan: MatrixPlan, device: str,
                  masks: MaskState, done: Callable[[ModuleResult], None],
                  coupling: Coupling | None = None) -> ChannelPermutation | None:
    """Run the plan on a float32 working copy on the compute device; write weight ⊙ keep_mask back and hand
    the result to `done`. Under torchrun the plan runs on the matrix's rank and every rank applies the
    result at the next `distributed.flush()` (at once in a single process).
    With a coupling (permute; one process only, checked before work), the consumer is pruned in the better
    of its own and a permuted column order; the permutation, if it won, is returned for the caller to
    apply once the layer is done."""
    target = pattern_target(pattern)

    def apply(pruned: torch.Tensor, keep_mask: torch.Tensor, seconds: float) -> None:
        masks.apply(module, pruned, keep_mask, target)
        done(ModuleResult(shape=tuple(pruned.shape), target=target, achieved=sparsity_of(weight_2d(module)),
                          seconds=seconds))

    if coupling is not None:
        t0 = time.perf_counter()
        weight = weight_2d(module).to(device=device, dtype=torch.float32).clone()   # [out, in]
        pruned, keep_mask, permutation = prune_permuted(weight, stats, pattern, coupling,
                                                        lambda w, s: plan.prune(w, s, pattern))
        apply(pruned, keep_mask, time.perf_counter() - t0)
        return permutation

    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        weight = weight_2d(module).to(device=device, dtype=torch.float32).clone()   # [out, in]
        return plan.prune(weight, stats, pattern)

    distributed.submit(compute, apply)
    return None


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
