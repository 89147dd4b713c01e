"""The `expert-drop` stage kind: remove routed experts of an MoE model, for a smaller plain checkpoint.

Every MoE layer keeps the same number K of routed experts (a plain config holds one expert count,
methods.md §0.1): `experts_keep: K`, or `expert_ratio: R` (the fraction kept, K = round(R·E)). K is
checked before any work, on the config alone: top_k ≤ K ≤ E, and for group-limited routers
(DeepSeek-V3) an equal count per group that still lets top_k be chosen.

Per MoE layer, in order, on the calibration tokens entering its MoE block (captured layer by layer;
with `progressive` (default) the earlier layers already compute as after the drop, Lu et al.'s
progressive pruning, otherwise every layer sees the unpruned model's activations):
1. per-expert statistics (`moe.observe`: routed counts, soft counts, REAP's Σ ĝ·‖f(x)‖);
2. the kept experts (`moe.criteria`, `criterion`):
   - `merge` (default; see below): REAP's keep set, then each kept expert's down projection is refitted
     by least squares so the layer's output stays close to the unpruned one (`merge_mode`);
   - `reap` (Lasby et al. 2025), `frequency`, `router-weight` (soft counts), `reconstruction` (Lu et al.
     2024: the keep set with the least MoE-layer output error; every subset up to 8 experts, greedy
     above), `random` (seeded baseline);
3. the layer is made to compute as if the other experts were gone (`moe.edit.emulate_drop`), merged
   weights written into the kept experts, and the outputs propagate to the next layer.
After the last layer the model is edited once (`moe.edit.drop_experts`): the router's rows, per-expert
buffers (DeepSeek's `e_score_correction_bias`), the fused expert tensors, every expert-count attribute
and the config, together; keep-masks of earlier stages follow their experts.

`merge` modes (`merge_mode`): `reroute-fit` (default) refits each kept expert's down projection to also
produce, on the tokens the router now sends it, its share of the output the removed experts used to
add; `fold-fit` folds each removed expert into the kept expert whose outputs are most similar on its
tokens (the group's routed-mass-weighted output becomes the kept expert's least-squares target);
`average` is MC-SMoE's frequency-weighted parameter average (measured worse than dropping). Why merge
with reroute-fit is the default: benchmarks/RESULTS.md (moe_bench).
"""
from __future__ import annotations

from typing import Annotated, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from llmprune.arch import decoder_layers, spec_for
from llmprune.calibration.engine import LayerStep, capture_layer_inputs, layerwise
from llmprune.calibration.observers import StopForward
from llmprune.errors import UserError
from llmprune.moe.criteria import MERGE_MODES, select_layer
from llmprune.moe.edit import drop_experts, emulate_drop
from llmprune.moe.families import experts_of, family_for, is_moe, moe_blocks, moe_model_types, router_config
from llmprune.moe.observe import new_layer_stats, observe_block
from llmprune.moe.routing import route_block, validate_kept_count
from llmprune.params import Range
from llmprune.report import StageRecord
from llmprune.stages import StageContext, stage_kind

Criterion = Literal["merge", "reap", "frequency", "router-weight", "reconstruction", "random"]
BaseCriterion = Literal["reap", "frequency", "router-weight", "reconstruction", "random"]
DEFAULT_CRITERION = "merge"


def _needs_calibration(params: dict) -> bool:
    return params.get("criterion", DEFAULT_CRITERION) != "random"


def _validate(params: dict, where: str) -> dict:
    if (params.get("experts_keep") is None) == (params.get("expert_ratio") is None):
        raise UserError(f"{where}: give exactly one of experts_keep (routed experts kept per MoE layer) or "
                        f"expert_ratio (the fraction of routed experts kept)")
    criterion = params.get("criterion", DEFAULT_CRITERION)
    for key in ("merge_mode", "merge_base"):
        if key in params and criterion != "merge":
            raise UserError(f"{where}: '{key}' applies to criterion merge only (criterion is {criterion})")
    return params


def kept_experts(config, experts_keep: int | None, expert_ratio: float | None, where: str) -> int:
    """How many routed experts every MoE layer keeps; a UserError (before any work) when it cannot route."""
    if not is_moe(config):
        raise UserError(f"{where}: expert-drop needs a mixture-of-experts model; '{config.model_type}' has no "
                        f"routed experts (MoE families: {', '.join(moe_model_types())})")
    rcfg = router_config(config)
    total = rcfg.num_experts
    if experts_keep is None:
        kept = int(round(expert_ratio * total))
        if abs(kept - expert_ratio * total) > 1e-6:
            raise UserError(f"{where}: expert_ratio {expert_ratio} keeps {expert_ratio * total:g} of {total} experts, not "
                            f"a whole number; use experts_keep, or expert_ratio {kept / total:g}")
    else:
        kept = experts_keep
    if kept >= total:
        raise UserError(f"{where}: keeping {kept} of {total} experts removes none; keep fewer than {total}")
    try:
        validate_kept_count(rcfg, kept)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    return kept


def _check_model(model: nn.Module, params: dict, where: str) -> None:
    kept_experts(model.config, params.get("experts_keep"), params.get("expert_ratio"), where)


@stage_kind("expert-drop", needs_calibration=_needs_calibration, validate=_validate, check_model=_check_model,
            summary="remove routed experts of an MoE model (same count in every MoE layer): a smaller plain checkpoint")
def expert_drop(ctx: StageContext, *,
                experts_keep: Annotated[int, Range(1)] | None = None,
                expert_ratio: Annotated[float, Range(0, 1, low_open=True, high_open=True)] | None = None,
                criterion: Criterion = DEFAULT_CRITERION,
                merge_mode: Literal["reroute-fit", "fold-fit", "average"] = "reroute-fit",
                merge_base: BaseCriterion = "reap",
                progressive: bool = True,
                seed: int = 0) -> StageRecord:
    """Keep `experts_keep` (or `expert_ratio` of the) routed experts in every MoE layer, chosen by `criterion`."""
    assert merge_mode in MERGE_MODES
    model, where = ctx.model, ctx.where
    kept = kept_experts(model.config, experts_keep, expert_ratio, where)
    family, rcfg = family_for(model), router_config(model)
    blocks = moe_blocks(model)
    record = StageRecord(target={"experts_keep": kept})
    keep_of: dict[int, list[int]] = {}
    scores: dict[str, dict] = {"kept": {}, "routed_share_before": {}, "routed_share_after": {},
                               "routed_share_removed": {}}
    restore = []
    merges: list = []            # (block, keep, MergePlan) to write into the kept experts
    deferred: list = []

    def install_merges() -> None:
        while merges:
            block, keep, plan = merges.pop()
            experts = experts_of(block, family)
            for param, new in ((family["gate_up_proj"], plan.gate_up_proj), (family["down_proj"], plan.down_proj)):
                tensor = getattr(experts, param).data                          # [E, out, in]
                for slot, expert in enumerate(keep):
                    mask = ctx.masks.masks.get((experts, param, expert))     # an earlier stage's zeros stay
                    value = new[slot].to(device=tensor.device, dtype=tensor.dtype)
                    tensor[expert] = value if mask is None else value * mask.to(value.device, value.dtype)

    def select(layer: int, block: nn.Module, x: torch.Tensor | None) -> None:
        stats = None
        if x is not None:
            stats = new_layer_stats(rcfg.num_experts)
            for chunk in x.split(8192):
                observe_block(stats, block, family, rcfg, chunk)
        selection = select_layer(criterion, kept, block, family, rcfg, x, stats, seed + layer, merge_base, merge_mode)
        keep = selection.keep
        if selection.merge is not None:
            # The kept experts' merged weights: written now when the next layers calibrate on this layer's
            # pruned outputs, else after the last layer (every layer then sees the unpruned model).
            (merges if progressive else deferred).append((block, keep, selection.merge))
            install_merges()
            if selection.merge.assignment:
                scores.setdefault("merged_into", {})[str(layer)] = {str(j): i for j, i in
                                                                     selection.merge.assignment.items()}
        keep_of[layer] = keep
        key = str(layer)
        scores["kept"][key] = keep
        if stats is not None:
            before = stats.routed_share()
            scores["routed_share_before"][key] = [round(float(v), 6) for v in before]
            scores["routed_share_removed"][key] = round(float(before[[e for e in range(rcfg.num_experts)
                                                                      if e not in keep]].sum()), 6)
            after = torch.zeros(rcfg.num_experts, dtype=torch.float64)
            for chunk in x.split(8192):
                routed = route_block(block, family, rcfg, chunk, keep).indices.flatten().cpu()
                after += torch.bincount(routed, minlength=rcfg.num_experts).double()
            scores["routed_share_after"][key] = [round(float(v), 6) for v in (after[keep] / after.sum())]
        if selection.scores is not None:
            scores.setdefault("criterion_scores", {})[key] = [round(float(v), 6) for v in selection.scores]
        if selection.error is not None:
            scores.setdefault("layer_output_error", {})[key] = round(float(selection.error), 6)
        if progressive:
            restore.append(emulate_drop(block, family, rcfg, keep))

    n_layers = len(decoder_layers(model))
    desc = f"expert-drop {kept}/{rcfg.num_experts} ({criterion})"
    try:
        with tqdm(total=n_layers, desc=desc, disable=not ctx.progress, unit="layer") as bar:
            if criterion == "random":                     # data-free: no forward passes
                for layer, block in blocks.items():
                    select(layer, block, None)
                bar.update(n_layers)
            else:
                def step_fn(step: LayerStep) -> None:
                    block = blocks.get(step.index)
                    if block is None:
                        return                            # a dense layer: its outputs simply propagate
                    captured: list[torch.Tensor] = []

                    def capture(module: nn.Module, args: tuple) -> None:
                        captured.append(args[0].detach().reshape(-1, args[0].shape[-1]))
                        raise StopForward                 # the rest of the layer feeds nothing here

                    handle = block.register_forward_pre_hook(capture)
                    try:
                        step.forward_all()
                    finally:
                        handle.remove()
                    select(step.index, block, torch.cat(captured))

                captured_inputs = capture_layer_inputs(model, ctx.calib_ids(), ctx.calibration.batch_size)
                if not progressive:                       # every layer sees the unpruned model's activations
                    record.notes.append(f"{where}: layer-wise selection (progressive: false): each MoE layer is "
                                        f"calibrated on the unpruned model's activations")
                layerwise(model, captured_inputs, ctx.device, spec_for(model).layers, step_fn, bar)
    finally:
        for undo in restore:
            undo()
    merges.extend(deferred)
    install_merges()

    # Edit: every MoE layer at once (router rows, per-expert buffers, fused experts, counts, config).
    report = drop_experts(model, keep_of, masks=ctx.masks)
    record.removed = {"experts": {"before": report.experts_before, "after": report.experts_after}}
    shares = list(scores["routed_share_removed"].values())
    record.achieved = {"experts_keep": kept}
    if shares:
        record.achieved["routed_share_removed"] = round(sum(shares) / len(shares), 6)
    record.scores = {k: v for k, v in scores.items() if v}
    if rcfg.scoring == "softmax" and not rcfg.norm_topk_prob:
        record.notes.append(f"{where}: this router does not renormalise its top-k weights, so after the drop the "
                            f"softmax over the kept experts gives them the removed experts' probability mass "
                            f"(larger gate values; cannot be undone without a router bias)")
    return record
