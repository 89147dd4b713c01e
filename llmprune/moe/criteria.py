"""Which experts an MoE layer keeps: per-expert scores and keep-set selection, the same count K in every
MoE layer (plain HF configs hold one expert count).

Criteria (`CRITERIA`):
    frequency       tokens routed to the expert                          (stats.routed_count)
    router-weight   soft counts: Σ router probability over all tokens     (stats.router_prob_sum)
    reap            REAP (Lasby et al. 2025): mean over routed tokens of ĝ·‖f(x)‖₂, ĝ renormalised over top-k
    reconstruction  Lu et al. 2024: the keep set with the least ‖Z − Z_S‖_F of the MoE layer's output on the
                    calibration tokens (every subset when E ≤ 8, greedy removal above), float64 sums
    random          seeded baseline
    merge           a keep set by `merge_base`, then the removed experts' function is folded into the kept
                    ones (`merge_experts`, modes below)

Group-limited routers (DeepSeek-V3) keep the same count in every group; every keep count is validated
(`routing.validate_kept_count`: top_k ≤ K, group constraints) before any work.

Reconstruction error note: Lu et al. sum per-batch Frobenius norms; here the error is the Frobenius norm
over all calibration tokens at once (the square root of a float64 sum of squares), which does not depend
on how the tokens are batched and ranks keep sets the same way on a single batch.

Merge modes (`MERGE_MODES`; default reroute-fit on a REAP keep set):
    average     MC-SMoE style: each removed expert joins the kept expert whose outputs are most similar on the
                removed expert's tokens (mean cosine); the group's gate_up and down are averaged, weighted by
                routed mass (Σ gate weight). Averaging unaligned experts mixes unrelated hidden neurons, and the
                SwiGLU is not linear in the weights, so this is not function-preserving.
    fold-fit    same groups; the kept expert's gate_up (so its hidden activations h) stays, and its down
                projection is the least-squares solution reproducing, from h, the mass-weighted mix of the
                group's outputs on the tokens originally routed to the group -- exact for the down projection
                given the fixed hidden activations.
    reroute-fit no similarity groups: after the drop each token's removed experts are replaced by the kept
                experts the router now picks; each kept expert's down projection is refitted (least squares,
                weights w'²) to output f_i(x) + Δ(x)/s(x) on the tokens it now receives, where Δ = Z − Z_S is
                the layer output lost by the drop and s the token's summed routing weights, so that if every
                fit were exact the layer output would equal the original one.

Measured through the expert-drop stage (benchmarks/moe_bench.py, benchmarks/RESULTS.md: 4-layer Mixtral, 8
experts, top-2, held-out perplexity 77.4 unpruned; at 6/8, 4/8, 2/8 experts kept, progressive calibration):
frequency 110.2 / 148.3 / 251.9, router-weight 104.8 / 162.8 / 243.5, reap 98.8 / 140.8 / 279.7,
reconstruction 95.6 / 126.0 / 228.0, random 107.7 / 150.3 / 249.5 (3 seeds); merge average 124.0 / 195.0 /
474.2 (worse than dropping), fold-fit 89.6 / 108.8 / 110.9, reroute-fit 79.6 / 83.8 / 90.9 (on a
reconstruction keep set 78.9 / 83.0 / 90.0, at 2-3x the selection time; REAP is the default base since
greedy reconstruction above 8 experts costs E block evaluations per removal). The stage's default
criterion is merge with reroute-fit on a REAP keep set.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from llmprune.errors import UserError
from llmprune.moe.families import RouterConfig, experts_of, family_for, moe_blocks, router_config
from llmprune.moe.observe import ExpertLayerStats
from llmprune.moe.routing import (Routing, expert_forward, route_block, validate_keep,
                                  validate_kept_count)

CRITERIA = ("frequency", "router-weight", "reap", "reconstruction", "random", "merge")
MERGE_MODES = ("average", "fold-fit", "reroute-fit")
EXHAUSTIVE_MAX_EXPERTS = 8
CHUNK_TOKENS = 2048
DAMP = 0.01            # ridge of the down-projection refits: DAMP × mean diagonal of the Gram matrix


# --------------------------------------------------------------------------------------------
# scores and score-based selection


def expert_scores(stats: ExpertLayerStats, criterion: str) -> torch.Tensor:
    """[E] float64 score per expert (higher = keep) for the statistics-based criteria."""
    if criterion == "frequency":
        return stats.routed_count.double()
    if criterion == "router-weight":
        return stats.router_prob_sum.clone()
    if criterion == "reap":
        return stats.reap()
    raise ValueError(f"criterion '{criterion}' has no per-expert score")


def _groups(rcfg: RouterConfig) -> list[list[int]]:
    size = rcfg.num_experts // rcfg.n_group
    return [list(range(g * size, (g + 1) * size)) for g in range(rcfg.n_group)]


def keep_top(scores: torch.Tensor, kept: int, rcfg: RouterConfig) -> list[int]:
    """The `kept` best-scoring experts (ties: lower index first); group-limited routers keep the
    kept/n_group best of every group."""
    validate_kept_count(rcfg, kept)
    per_group = kept // rcfg.n_group
    keep: list[int] = []
    for group in _groups(rcfg):
        ranked = sorted(group, key=lambda e: (-float(scores[e]), e))
        keep += ranked[:per_group]
    return sorted(keep)


def keep_random(rcfg: RouterConfig, kept: int, seed: int = 0) -> list[int]:
    """A uniformly random keep set (per group for group-limited routers), reproducible from `seed`."""
    validate_kept_count(rcfg, kept)
    generator = torch.Generator().manual_seed(seed)
    per_group = kept // rcfg.n_group
    keep: list[int] = []
    for group in _groups(rcfg):
        keep += [group[i] for i in torch.randperm(len(group), generator=generator)[:per_group].tolist()]
    return sorted(keep)


# --------------------------------------------------------------------------------------------
# MoE-layer output error (the reconstruction criterion's loss)


def _combine(outputs: torch.Tensor, routing: Routing, experts: Sequence[int]) -> torch.Tensor:
    """[t, H] Σ_k weight_k · outputs[slot of expert_k] for precomputed outputs [len(experts), t, H]."""
    slot_of = torch.full((int(max(experts)) + 1,), -1, dtype=torch.long)
    slot_of[torch.tensor(list(experts))] = torch.arange(len(experts))
    slots = slot_of[routing.indices.cpu()].to(outputs.device)               # [t, k]
    tokens = torch.arange(outputs.shape[1], device=outputs.device)[:, None]
    chosen = outputs[slots, tokens]                                          # [t, k, H]
    return (chosen * routing.weights[..., None].to(chosen.dtype)).sum(1)


def _chunks(x: torch.Tensor, size: int = CHUNK_TOKENS):
    for start in range(0, x.shape[0], size):
        yield x[start: start + size]


@torch.no_grad()
def keep_set_errors(block: nn.Module, family: dict, rcfg: RouterConfig, x: torch.Tensor,
                    keep_sets: Sequence[Sequence[int]], balanced: bool = True) -> list[float]:
    """‖Z − Z_S‖_F over the tokens x [T, H] for every keep set S: Z is the routed output of the block with
    all its experts, Z_S with only S (router restricted to S). The shared expert cancels out.
    `balanced=False` admits a greedy search's unequal-group sets (`routing.validate_keep`)."""
    experts = list(range(rcfg.num_experts))
    keep_sets = [validate_keep(rcfg, s, balanced) for s in keep_sets]
    sq = torch.zeros(len(keep_sets), dtype=torch.float64)
    for xc in _chunks(x.reshape(-1, x.shape[-1])):
        outputs = torch.stack([expert_forward(block, family, e, xc)[1] for e in experts]).double()  # [E', t, H]
        full = _combine(outputs, route_block(block, family, rcfg, xc), experts)
        for i, keep in enumerate(keep_sets):
            diff = full - _combine(outputs, route_block(block, family, rcfg, xc, keep, balanced), experts)
            sq[i] += (diff * diff).sum().item()
    return sq.sqrt().tolist()


def moe_output_error(block: nn.Module, family: dict, rcfg: RouterConfig, x: torch.Tensor,
                     keep: Sequence[int]) -> float:
    """‖Z − Z_S‖_F of the MoE layer's output on x [T, H] when only `keep` remains."""
    return keep_set_errors(block, family, rcfg, x, [keep])[0]


def _balanced_subsets(rcfg: RouterConfig, kept: int) -> list[list[int]]:
    per_group = kept // rcfg.n_group
    per_group_choices = [list(itertools.combinations(g, per_group)) for g in _groups(rcfg)]
    return [sorted(e for part in combo for e in part) for combo in itertools.product(*per_group_choices)]


def keep_reconstruction(block: nn.Module, family: dict, rcfg: RouterConfig, x: torch.Tensor, kept: int,
                        exhaustive_max: int = EXHAUSTIVE_MAX_EXPERTS) -> tuple[list[int], float]:
    """Lu et al.: the keep set with the least MoE-layer output error on x [T, H]. With at most
    `exhaustive_max` experts every (group-balanced) subset is tried; above, experts are removed greedily,
    one at a time, each time the one whose removal costs least. Returns (keep, error)."""
    validate_kept_count(rcfg, kept)
    if rcfg.num_experts <= exhaustive_max:
        subsets = _balanced_subsets(rcfg, kept)
        errors = keep_set_errors(block, family, rcfg, x, subsets)
        best = min(range(len(subsets)), key=lambda i: (errors[i], subsets[i]))
        return subsets[best], errors[best]
    keep = list(range(rcfg.num_experts))
    per_group = kept // rcfg.n_group
    group_size = rcfg.num_experts // rcfg.n_group
    error = 0.0
    while len(keep) > kept:
        # Only experts of groups still above their target count may go (equal counts per group).
        left = [sum(1 for k in keep if k // group_size == g) for g in range(rcfg.n_group)]
        removable = [e for e in keep if left[e // group_size] > per_group]
        candidates = [[k for k in keep if k != e] for e in removable]
        errors = keep_set_errors(block, family, rcfg, x, candidates, balanced=False)
        best = min(range(len(candidates)), key=lambda i: (errors[i], removable[i]))
        keep, error = candidates[best], errors[best]
    return keep, error


# --------------------------------------------------------------------------------------------
# merging removed experts into kept ones


@dataclass
class MergePlan:
    keep: list[int]                              # kept experts (original numbering), sorted
    mode: str
    gate_up_proj: torch.Tensor                   # [K, 2I, H] the kept experts' new fused gate_up (model dtype)
    down_proj: torch.Tensor                      # [K, H, I]
    assignment: dict[int, int] = field(default_factory=dict)  # removed expert -> kept expert it joined


def _ridge_solve(gram: torch.Tensor, cross: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """argmin_D Σ ω‖t − D h‖² + λ‖D‖² = cross · (gram + λI)⁻¹ with gram = Σ ω h hᵀ [I, I],
    cross = Σ ω t hᵀ [H, I]; λ = DAMP × mean diag(gram). `fallback` if the expert saw no token."""
    if gram.diagonal().sum() <= 0:
        return fallback.double()
    damp = DAMP * gram.diagonal().mean()
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + damp * eye, cross.t()).t()


@torch.no_grad()
def output_similarity(block: nn.Module, family: dict, rcfg: RouterConfig, x: torch.Tensor,
                      removed: Sequence[int], keep: Sequence[int]) -> torch.Tensor:
    """[len(removed), len(keep)] mean cosine similarity between each removed expert's output and each kept
    expert's output, over the tokens routed to the removed expert (all tokens if it received none)."""
    sums = torch.zeros(len(removed), len(keep), dtype=torch.float64)
    counts = torch.zeros(len(removed), dtype=torch.float64)
    all_sums = torch.zeros_like(sums)
    for xc in _chunks(x.reshape(-1, x.shape[-1])):
        routing = route_block(block, family, rcfg, xc)
        kept_out = torch.stack([expert_forward(block, family, e, xc)[1] for e in keep]).double()   # [K, t, H]
        for r, j in enumerate(removed):
            out_j = expert_forward(block, family, j, xc)[1].double()                               # [t, H]
            cos = F.cosine_similarity(kept_out, out_j[None], dim=-1)                               # [K, t]
            routed = (routing.indices == j).any(-1)
            sums[r] += cos[:, routed].sum(-1).cpu()
            counts[r] += routed.sum().item()
            all_sums[r] += cos.sum(-1).cpu()
    tokens = x.reshape(-1, x.shape[-1]).shape[0]
    seen = counts > 0
    sims = torch.where(seen[:, None], sums / counts.clamp_min(1)[:, None], all_sums / max(tokens, 1))
    return sims


@torch.no_grad()
def merge_experts(block: nn.Module, family: dict, rcfg: RouterConfig, x: torch.Tensor,
                  stats: ExpertLayerStats, keep: Sequence[int], mode: str = "reroute-fit") -> MergePlan:
    """Fold the experts outside `keep` into the kept ones (see the module doc for the modes); returns the
    kept experts' new fused tensors. Nothing in the model is changed."""
    if mode not in MERGE_MODES:
        raise UserError(f"unknown merge mode '{mode}'; choose one of {', '.join(MERGE_MODES)}")
    keep = validate_keep(rcfg, keep)
    experts = experts_of(block, family)
    gate_up_all = getattr(experts, family["gate_up_proj"]).data                # [E, 2I, H]
    down_all = getattr(experts, family["down_proj"]).data                      # [E, H, I]
    removed = [e for e in range(rcfg.num_experts) if e not in keep]
    x = x.reshape(-1, x.shape[-1])
    slot = {e: i for i, e in enumerate(keep)}

    assignment: dict[int, int] = {}
    if mode in ("average", "fold-fit") and removed:
        sims = output_similarity(block, family, rcfg, x, removed, keep)
        assignment = {j: keep[int(sims[r].argmax())] for r, j in enumerate(removed)}
    members = {i: [i] + [j for j, target in assignment.items() if target == i] for i in keep}

    gate_up = gate_up_all[keep].clone()
    down = down_all[keep].clone()
    if mode == "average":
        mass = stats.routed_weight_sum
        for i in keep:
            group = members[i]
            m = mass[group].to(torch.float64)
            if len(group) == 1 or m.sum() <= 0:
                continue
            w = (m / m.sum()).to(device=gate_up_all.device, dtype=gate_up_all.dtype)
            gate_up[slot[i]] = torch.einsum("g,gab->ab", w, gate_up_all[group])
            down[slot[i]] = torch.einsum("g,gab->ab", w, down_all[group])
        return MergePlan(keep=keep, mode=mode, gate_up_proj=gate_up, down_proj=down, assignment=assignment)

    inter = down_all.shape[-1]
    hidden_size = down_all.shape[1]
    # Normal equations of every kept expert's down refit, on the compute device (float64).
    gram = torch.zeros(len(keep), inter, inter, dtype=torch.float64, device=x.device)
    cross = torch.zeros(len(keep), hidden_size, inter, dtype=torch.float64, device=x.device)
    for xc in _chunks(x):
        full = route_block(block, family, rcfg, xc)
        kept_routing = route_block(block, family, rcfg, xc, keep)
        needed = sorted(set(full.indices.unique().tolist()) | set(keep))
        hid, out = {}, {}
        for e in needed:
            h, y = expert_forward(block, family, e, xc)
            hid[e], out[e] = h.double(), y.double()
        if mode == "fold-fit":
            # Target of kept expert i: the mass-weighted mix of its group's outputs on tokens routed to the group.
            for i in keep:
                weight_sum = torch.zeros(xc.shape[0], dtype=torch.float64, device=xc.device)
                target = torch.zeros(xc.shape[0], hidden_size, dtype=torch.float64, device=xc.device)
                for e in members[i]:
                    token, k = torch.where(full.indices == e)
                    w = full.weights[token, k].double()
                    weight_sum.index_add_(0, token, w)
                    target.index_add_(0, token, w[:, None] * out[e][token])
                routed = weight_sum > 0
                omega = weight_sum[routed]
                t = target[routed] / omega[:, None]
                h = hid[i][routed]
                gram[slot[i]] += (h * omega[:, None]).t() @ h
                cross[slot[i]] += (t * omega[:, None]).t() @ h
        else:
            # reroute-fit: each kept expert absorbs, on the tokens it now receives, its share of the lost output.
            outputs = torch.stack([out[e] for e in needed])
            lost = _combine(outputs, full, needed) - _combine(outputs, kept_routing, needed)        # [t, H] Δ
            share = kept_routing.weights.double().sum(-1).clamp_min(1e-30)                         # [t] s
            for i in keep:
                token, k = torch.where(kept_routing.indices == i)
                if token.numel() == 0:
                    continue
                w2 = kept_routing.weights[token, k].double() ** 2
                t = out[i][token] + lost[token] / share[token, None]
                h = hid[i][token]
                gram[slot[i]] += (h * w2[:, None]).t() @ h
                cross[slot[i]] += (t * w2[:, None]).t() @ h
    for i in keep:
        down[slot[i]] = _ridge_solve(gram[slot[i]], cross[slot[i]], down_all[i]).to(down.dtype)
    return MergePlan(keep=keep, mode=mode, gate_up_proj=gate_up, down_proj=down, assignment=assignment)


# --------------------------------------------------------------------------------------------
# per layer and per model


@dataclass
class LayerSelection:
    keep: list[int]                              # kept experts (original numbering), sorted
    criterion: str
    scores: torch.Tensor | None = None           # [E] where the criterion scores experts
    error: float | None = None                   # MoE-layer output error of the keep set on the calibration tokens
    merge: MergePlan | None = None               # merged tensors (criterion "merge")


def select_layer(criterion: str, kept: int, block: nn.Module, family: dict, rcfg: RouterConfig,
                 x: torch.Tensor | None = None, stats: ExpertLayerStats | None = None, seed: int = 0,
                 merge_base: str = "reap", merge_mode: str = "reroute-fit") -> LayerSelection:
    """Choose the kept experts of one MoE layer. `x` [T, H] (calibration hidden states entering the block)
    is needed by reconstruction and merge; `stats` by frequency, router-weight, reap (and merge's base)."""
    if criterion not in CRITERIA:
        raise UserError(f"unknown expert criterion '{criterion}'; choose one of {', '.join(CRITERIA)}")
    validate_kept_count(rcfg, kept)
    if criterion in ("frequency", "router-weight", "reap"):
        scores = expert_scores(stats, criterion)
        return LayerSelection(keep=keep_top(scores, kept, rcfg), criterion=criterion, scores=scores)
    if criterion == "random":
        return LayerSelection(keep=keep_random(rcfg, kept, seed), criterion=criterion)
    if criterion == "reconstruction":
        keep, error = keep_reconstruction(block, family, rcfg, x, kept)
        return LayerSelection(keep=keep, criterion=criterion, error=error)
    if merge_base == "merge":
        raise UserError("merge_base must be a criterion that selects experts, not 'merge'")
    base = select_layer(merge_base, kept, block, family, rcfg, x, stats, seed)
    plan = merge_experts(block, family, rcfg, x, stats, base.keep, merge_mode)
    return LayerSelection(keep=base.keep, criterion=criterion, scores=base.scores, error=base.error, merge=plan)


def select_experts(model: nn.Module, criterion: str, kept: int, inputs: dict[int, torch.Tensor] | None = None,
                   stats: dict[int, ExpertLayerStats] | None = None, seed: int = 0, merge_base: str = "reap",
                   merge_mode: str = "reroute-fit") -> dict[int, LayerSelection]:
    """{MoE layer: LayerSelection} with the same `kept` count in every MoE layer. `inputs`: calibration
    hidden states entering each MoE block (`observe.capture_moe_inputs`); `stats`: per-layer statistics
    (`observe.observing`). The kept count is validated before any work. Random uses seed + layer index."""
    family, rcfg = family_for(model), router_config(model)
    validate_kept_count(rcfg, kept)
    if criterion not in CRITERIA:
        raise UserError(f"unknown expert criterion '{criterion}'; choose one of {', '.join(CRITERIA)}")
    needs_inputs = criterion in ("reconstruction", "merge")
    scored = ("frequency", "router-weight", "reap")
    needs_stats = criterion in scored or (criterion == "merge" and (merge_base in scored or merge_mode == "average"))
    blocks = moe_blocks(model)
    for index in blocks:
        if needs_inputs and (inputs is None or index not in inputs):
            raise ValueError(f"criterion '{criterion}' needs the calibration inputs of MoE layer {index}")
        if needs_stats and (stats is None or index not in stats):
            raise ValueError(f"criterion '{criterion}' needs the expert statistics of MoE layer {index}")
    return {index: select_layer(criterion, kept, block, family, rcfg,
                                None if inputs is None else inputs.get(index),
                                None if stats is None else stats.get(index), seed + index, merge_base, merge_mode)
            for index, block in blocks.items()}
