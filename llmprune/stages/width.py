"""The `width` stage kind: remove MLP neurons and attention heads, for a narrower plain checkpoint.

Units are the coupled channel groups of the architecture registry: an MLP neuron (its gate/up rows
and its down_proj column) and an attention KV group (its K/V heads, its query heads and their o_proj
columns; a head for MHA). Every layer keeps the same number of units, because a plain config
holds one width (methods.md §0.1).

Per decoder layer, in order attention -> MLP, calibrated true-sequentially when memory allows:
1. score the units (`criterion`):
   - `activation` (the default without reconstruction; Wanda-sp, FLAP/CFSP repos): channel j of the
     output linear scores ‖X_j‖₂ · mean_i |W_ij|, a unit the sum over its channels;
   - `magnitude`: the L2 norm of all the unit's weights (producer rows and output columns);
   - `maw` (MLP only; the peak-to-peak score of "Fragile Knowledge", optipfair):
     Σ over the unit's producer rows of (max_k W[r, k] + |min_k W[r, k]|);
   - `random`: a seeded permutation (the baseline);
   - `obs` (the default with reconstruction; beyond the anchors; structured Optimal Brain Surgeon, as
     in ZipLM / SlimGPT): remove units greedily, in rounds, by the least increase of the output linear's reconstruction error when the
     kept channels are re-fitted, ΔE_u = tr(W_u [H⁻¹]_uu⁻¹ W_uᵀ), updating W and H⁻¹ after each
     round: it picks the units that reconstruction can replace best;
2. keep the best units;
3. `reconstruct` (default on): re-fit the output linear on the kept channels by least squares on
   the calibration activations, W' = W·H[:, K]·H[K, K]⁻¹ with H = Σ x xᵀ of its input, so the
   layer's output matches the dense one as closely as the kept channels allow; where the output
   linear has a bias, the constant channel is part of the fit (FLAP-style mean compensation);
4. make the layer compute as if the units were gone (`edits.mask_units`), and propagate.
The kept units of every layer go into `ctx.edits`; the edit hooks slice them out for real
(`_edit_layer`: once the stage is done with a layer) and rewrite the config (`_edit_model`: after
the last layer).
"""
from __future__ import annotations

from typing import Annotated, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from llmprune.arch import Dims, Family, channel_map, decoder_layers, dims_of, group_units, spec_for, weight_2d
from llmprune.calibration.engine import LayerStep, capture_layer_inputs, default_true_sequential, layerwise
from llmprune.calibration.observers import LayerObserver
from llmprune.edits import mask_units, rewrite_group_config, slice_units
from llmprune.errors import UserError
from llmprune.methods import LinearStats
from llmprune.params import Range
from llmprune.report import StageRecord
from llmprune.stages import StageContext, stage_kind

Criterion = Literal["activation", "obs", "magnitude", "maw", "random"]
DATA_CRITERIA = ("activation", "obs")


def _needs_calibration(params: dict) -> bool:
    return (params.get("criterion") or "activation") in DATA_CRITERIA or params.get("reconstruct", True)


def default_criterion(reconstruct: bool) -> str:
    """`obs` when the output linear is re-fitted (it picks the units the refit replaces best, and the refit
    already needs its Hessian), else `activation`. Measured (benchmarks/RESULTS.md, structured_bench):
    with reconstruction, obs is the best criterion in every cell, while activation lost to the mean of
    three random draws when dropping a quarter of the KV groups."""
    return "obs" if reconstruct else "activation"


def _validate(params: dict, where: str) -> dict:
    if params.get("mlp_keep") is None and params.get("heads_keep") is None:
        raise UserError(f"{where}: give mlp_keep (fraction of MLP neurons kept) and/or heads_keep "
                        f"(fraction of attention heads kept)")
    if params.get("criterion") == "maw" and params.get("heads_keep") is not None:
        raise UserError(f"{where}: criterion maw scores MLP neurons only (peak-to-peak of gate/up rows); "
                        f"use activation, magnitude or random for heads_keep")
    return params


def kept_units(dims: Dims, fam: Family, group: str, keep: float, round_to: int, where: str) -> int:
    """How many units every layer keeps, or a UserError with the nearest valid value."""
    if fam.group(group).refuse:            # the registry says why this family cannot lose such units
        raise UserError(f"{where}: {fam.group(group).refuse}")
    total = group_units(dims, group)
    if group == "mlp":
        kept = int(round(keep * total / round_to)) * round_to
        if kept < round_to or kept >= total:
            hint = f"mlp_keep between {round_to / total:.4f} and {(total - round_to) / total:.4f}"
            raise UserError(f"{where}: mlp_keep {keep} keeps {keep * total:.1f} of {total} neurons, which rounds to "
                            f"{kept} (a multiple of round_to={round_to}); use {hint}, or another round_to")
        return kept
    if not fam.head_dim_configurable:
        raise UserError(f"{where}: {fam.model_type} computes its head size as hidden/heads, so a plain checkpoint "
                        f"cannot have fewer heads; use mlp_keep only")
    exact = keep * total
    kept = int(round(exact))
    unit = "KV groups (each with its query heads)" if dims.kv_heads != dims.heads else "heads"
    if abs(exact - kept) > 1e-6 or not (1 <= kept < total):
        if total < 2:
            raise UserError(f"{where}: the model has a single {unit[:-1]}; nothing can be removed")
        options = sorted({max(1, min(total - 1, int(exact))), max(1, min(total - 1, int(exact) + 1))})
        nearest = " or ".join(f"{o / total:g}" for o in options)
        raise UserError(f"{where}: heads_keep {keep} keeps {exact:g} of {total} {unit}, not a whole number "
                        f"from 1 to {total - 1}; the nearest valid value: heads_keep {nearest}")
    return kept


def _plan(config, params: dict, where: str) -> dict[str, int]:
    fam, dims = spec_for(config), dims_of(config)
    plan = {}
    if params.get("heads_keep") is not None:
        plan["attention"] = kept_units(dims, fam, "attention", params["heads_keep"], 1, where)
    if params.get("mlp_keep") is not None:
        plan["mlp"] = kept_units(dims, fam, "mlp", params["mlp_keep"], params.get("round_to", 8), where)
    return plan


def _check_model(model: nn.Module, params: dict, where: str) -> None:
    _plan(model.config, params, where)


def _edit_layer(ctx: StageContext, index: int, layer: nn.Module) -> int:
    """Slice the units this stage removed out of one layer (config and attributes: `_edit_model`)."""
    fam, dims = spec_for(ctx.model), dims_of(ctx.model)
    for group, keep in ctx.edits["keep"][str(index)].items():
        slice_units(layer, fam, dims, group, torch.tensor(keep, dtype=torch.long), ctx.masks)
    return index


def _edit_model(ctx: StageContext) -> None:
    """Config fields and module attributes, once every layer kept the same number of units."""
    for group, kept in ctx.edits["plan"].items():
        rewrite_group_config(ctx.model, group, kept)


@stage_kind("width", needs_calibration=_needs_calibration, validate=_validate, check_model=_check_model,
            edit_layer=_edit_layer, edit_model=_edit_model, streams=True, splits_batches=True,
            summary="remove MLP neurons / attention heads: a narrower plain checkpoint")
def width(ctx: StageContext, *,
          mlp_keep: Annotated[float, Range(0, 1, low_open=True, high_open=True)] | None = None,
          heads_keep: Annotated[float, Range(0, 1, low_open=True, high_open=True)] | None = None,
          criterion: Criterion | None = None,
          round_to: Annotated[int, Range(1)] = 8,
          reconstruct: bool = True,
          true_sequential: bool | None = None,
          seed: int = 0) -> StageRecord:
    """Keep `mlp_keep` of the MLP neurons and `heads_keep` of the attention heads in every layer."""
    model = ctx.model
    fam, dims = spec_for(model), dims_of(model)
    plan = _plan(model.config, {"mlp_keep": mlp_keep, "heads_keep": heads_keep, "round_to": round_to}, ctx.where)
    record = ctx.new_record(target={k: v for k, v in (("mlp_keep", mlp_keep), ("heads_keep", heads_keep)) if v})
    criterion = criterion or default_criterion(reconstruct)
    record.params["criterion"] = criterion
    needs = set()
    if criterion == "activation":
        needs |= {"input_sq_norm"}
    if criterion == "obs":
        needs |= {"hessian"}
    if reconstruct:
        needs |= {"hessian", "input_sum"}
    ctx.edits["plan"] = dict(plan)
    keep_of: dict[str, dict[str, list[int]]] = ctx.edits.setdefault("keep", {})   # layer -> group -> kept units
    scores_of: dict[str, list[list[float]]] = {group: record.scores.setdefault(group, []) for group in plan}

    def prune_group(step: LayerStep, group: str, stats: LinearStats | None) -> None:
        output = step.layer.get_submodule(fam.group(group).output)
        if criterion == "obs":
            keep, scores = obs_keep(output, fam, dims, group, stats, plan[group])
        else:
            scores = unit_scores(step.layer, fam, dims, group, criterion, stats, seed + step.index)
            keep = torch.topk(scores, plan[group]).indices.sort().values
        if reconstruct:
            refit_output(output, fam, dims, group, keep, stats, ctx.masks.get(output))
        mask_units(step.layer, fam, dims, group, keep)
        keep_of.setdefault(str(step.index), {})[group] = keep.tolist()
        scores_of[group].append([round(float(s), 6) for s in scores])

    def step_fn(step: LayerStep) -> None:
        outputs = {f"{step.name}.{fam.group(g).output}": g for g in ("attention", "mlp") if g in plan}
        if not needs:
            for group in outputs.values():
                prune_group(step, group, None)
            return
        linears = {name: step.layer.get_submodule(name[len(step.name) + 1:]) for name in outputs}
        obs = LayerObserver(linears, needs)
        if schedule_true_sequential:       # attention is pruned before the MLP is calibrated
            step.forward_lockstep(obs, lambda name, stats: prune_group(step, outputs[name], stats))
            return
        with obs.hooked(stop_early=True):
            step.forward_all(obs)
        obs.seal_all()
        for name, group in outputs.items():
            prune_group(step, group, obs.stats.get(name))

    layers_path = fam.layers
    schedule_true_sequential = False
    n_layers = len(decoder_layers(model))
    desc = "width " + " ".join(f"{g} {plan[g]}/{group_units(dims, g)}" for g in plan)
    with tqdm(total=n_layers, desc=desc, disable=not ctx.progress, unit="layer") as bar:
        if needs:
            calib_ids = ctx.calib_ids()
            if true_sequential is None:
                true_sequential, note = default_true_sequential(model, True, calib_ids, ctx.device)
                if note:
                    record.notes.append(f"{ctx.where}: {note}")
            schedule_true_sequential = true_sequential
            record.schedule = "true-sequential" if true_sequential else "two-pass"
            record.params["true_sequential"] = true_sequential
            captured = capture_layer_inputs(model, calib_ids, ctx.calibration.batch_size)
            layerwise(model, captured, ctx.device, layers_path, step_fn, bar)
        else:                                # data-free criteria without reconstruction
            layerwise(model, None, ctx.device, layers_path, step_fn, bar)

    # The edit hooks slice every layer and rewrite the config (all layers keep the same count).
    names = {"attention": "kv_groups" if dims.kv_heads != dims.heads else "heads", "mlp": "mlp_neurons"}
    for group, kept in plan.items():
        record.removed[names[group]] = {"before": group_units(dims, group), "after": kept}
    record.achieved = {k: plan[g] / group_units(dims, g) for k, g in (("mlp_keep", "mlp"), ("heads_keep", "attention"))
                       if g in plan}
    record.scores = {group: s for group, s in scores_of.items()}
    return record


@torch.no_grad()
def obs_keep(output: nn.Module, fam: Family, dims: Dims, group: str, stats: LinearStats, n_keep: int,
             rounds: int = 16, dampening: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Structured OBS: (kept units, removal order score) for the output linear of `group`.

    Removing units U with the kept weights re-fitted raises ‖WX − ŴX‖² by tr(W_U [H⁻¹]_UU⁻¹ W_Uᵀ)
    (group OBS). Each round scores every remaining unit alone, removes the cheapest ones (the
    remaining count split over `rounds`), and applies the optimal compensation to W and the
    matching downdate to H⁻¹, so later rounds see what the earlier removals left. The returned
    score is the round in which a unit was removed (kept units score highest), for the record.
    """
    weight = weight_2d(output).to(torch.float64)                              # [out, in]
    _, cols = channel_map(fam, dims, group)[fam.group(group).output]          # [units, per]
    hessian = stats.hessian.to(weight.device, torch.float64) / max(stats.n_tokens, 1)
    dead = torch.diagonal(hessian) == 0
    hessian[dead, dead] = 1.0
    damp = dampening * torch.diagonal(hessian).mean()
    hinv = torch.linalg.inv(hessian + damp * torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device))
    cols = cols.to(weight.device)
    alive = torch.arange(cols.shape[0], device=weight.device)                 # unit ids still in
    order = torch.full((cols.shape[0],), float(rounds), dtype=torch.float32)
    position = torch.arange(hessian.shape[0], device=weight.device)           # channel -> row of the live H⁻¹
    work = weight.clone()                                                     # [out, live channels]
    for r in range(rounds):
        to_remove = len(alive) - n_keep
        if to_remove <= 0:
            break
        take = -(-to_remove // (rounds - r))                                  # ceil: spread over rounds left
        index = position[cols[alive]]                                         # [alive, per] rows of H⁻¹
        blocks = hinv[index.unsqueeze(2), index.unsqueeze(1)]                 # [alive, per, per]
        w_u = work[:, index].permute(1, 2, 0)                                 # [alive, per, out]
        cost = (torch.linalg.solve(blocks, w_u) * w_u).sum((1, 2))            # tr(W_u H_uu⁻¹ W_uᵀ) per unit
        chosen = torch.topk(cost, take, largest=False).indices
        drop = index[chosen].flatten()                                        # rows of H⁻¹ / cols of work
        keep_rows = torch.ones(hinv.shape[0], dtype=torch.bool, device=hinv.device)
        keep_rows[drop] = False
        h_uu, h_ku = hinv[drop][:, drop], hinv[keep_rows][:, drop]            # [d, d], [k, d]
        gain = torch.linalg.solve(h_uu, h_ku.t())                             # [d, k] = H_uu⁻¹ H_uk
        work = work[:, keep_rows] - work[:, drop] @ gain                       # optimal compensation
        hinv = hinv[keep_rows][:, keep_rows] - h_ku @ gain                    # H⁻¹ of the kept channels
        remap = torch.cumsum(keep_rows.long(), 0) - 1                         # current row -> next row
        remap[~keep_rows] = -1
        position = torch.where(position >= 0, remap[position.clamp_min(0)], position)
        order[alive[chosen].cpu()] = r
        alive = alive[torch.isin(torch.arange(len(alive), device=alive.device), chosen, invert=True)]
    return alive.sort().values.cpu(), order


def unit_scores(layer: nn.Module, fam: Family, dims: Dims, group: str, criterion: str,
                stats: LinearStats | None, seed: int) -> torch.Tensor:
    """Importance of every unit of `group` in one layer ([units], higher = keep)."""
    where = channel_map(fam, dims, group)
    n_units = group_units(dims, group)
    if criterion == "random":
        return torch.rand(n_units, generator=torch.Generator().manual_seed(seed))
    output_path = fam.group(group).output
    if criterion == "activation":
        weight = weight_2d(layer.get_submodule(output_path)).float()          # [out, in]
        input_norm = stats.input_sq_norm.to(weight.device).sqrt()             # [in]
        channel = weight.abs().mean(0) * input_norm                           # [in]  Wanda-sp
        _, cols = where[output_path]                                          # [units, per_unit]
        return channel.cpu()[cols].sum(1)
    total = torch.zeros(n_units, dtype=torch.float64)
    for path, (axis, index) in where.items():
        if criterion == "maw" and path == output_path:
            continue                                       # PPM uses the producer rows only
        weight = weight_2d(layer.get_submodule(path)).float().cpu()            # [out, in]
        if criterion == "magnitude":
            per_index = (weight ** 2).sum(1 if axis == "rows" else 0)          # squared norm per row/col
        else:                                                                  # maw: max + |min| per row
            per_index = weight.max(1).values + weight.min(1).values.abs()
        total += per_index.double()[index].sum(1)
    return (total.sqrt() if criterion == "magnitude" else total).float()


@torch.no_grad()
def refit_output(output: nn.Module, fam: Family, dims: Dims, group: str, keep: torch.Tensor,
                 stats: LinearStats, keep_mask: torch.Tensor | None, dampening: float = 0.01) -> None:
    """Least-squares re-fit of the output linear on its kept input channels (written into the module).

    min_W' Σ_t ‖W x_t + b − W' x_t[K] − b'‖² + λ‖W' − W[:, K]‖², i.e. [W' b'] = ([W b]·H̃[:, K̃] +
    λ[W_K 0])·(H̃[K̃, K̃] + λI_K)⁻¹ with H̃ the second-moment matrix of [x; 1] (the constant only when
    the linear has a bias: FLAP-style mean compensation, never damped). The damping λ =
    dampening·mean(diag H[K, K]) keeps the solve well-posed and pulls towards the original weights
    (λ → ∞ is no refit), not towards zero. An earlier keep-mask on the output linear is re-applied.
    """
    weight = weight_2d(output)                                                # [out, in] view
    work = weight.double()
    _, cols = channel_map(fam, dims, group)[fam.group(group).output]
    kept = cols[keep].flatten().sort().values.to(work.device)                 # [k]
    hessian = stats.hessian.to(work.device, torch.float64) / max(stats.n_tokens, 1)   # [in, in]
    damp = dampening * torch.diagonal(hessian)[kept].mean().clamp_min(1e-12)
    ridge = torch.full((len(kept),), float(damp), dtype=torch.float64, device=work.device)   # [k]
    anchor = work[:, kept] * damp                                             # [out, k]
    bias = getattr(output, "bias", None)
    if bias is not None:
        mean = (stats.input_sum.to(work.device, torch.float64) / max(stats.n_tokens, 1)).unsqueeze(1)  # [in, 1]
        one = torch.ones(1, 1, dtype=torch.float64, device=work.device)
        hessian = torch.cat([torch.cat([hessian, mean], 1), torch.cat([mean.t(), one], 1)])      # [in+1, in+1]
        work = torch.cat([work, bias.detach().double().unsqueeze(1)], 1)     # [out, in + 1]
        kept = torch.cat([kept, torch.tensor([hessian.shape[0] - 1], device=work.device)])
        ridge = torch.cat([ridge, ridge.new_zeros(1)])
        anchor = torch.cat([anchor, anchor.new_zeros(anchor.shape[0], 1)], 1)
    h_kk = hessian[kept][:, kept] + torch.diag(ridge)                         # [k, k]
    rhs = work @ hessian[:, kept] + anchor                                    # [out, k]
    refit = torch.linalg.solve(h_kk, rhs.t()).t()                             # [out, k] = rhs · h_kk⁻¹
    if bias is not None:
        bias.data.copy_(refit[:, -1].to(bias.dtype))
        refit, kept = refit[:, :-1], kept[:-1]
    if keep_mask is not None:
        refit = refit * keep_mask.to(refit.device)[:, kept]
    weight[:, kept] = refit.to(weight.dtype)
