"""Each family's routing, reproduced from `families.RouterConfig`, and the MoE block's output computed
expert by expert from the 2-D per-expert views.

`route(..., keep=...)` routes as the model will after an expert drop: the removed experts' logits are
excluded before top-k (Lu et al.'s `logits[:, removed] = -inf`: softmax over the kept logits only; a
sigmoid router never chooses them; group-limited selection over the kept experts of each contiguous
group) -- which is what the edited router computes, since the kept router rows, biases and correction
biases are unchanged and a balanced keep set regroups the kept experts into the same groups.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from llmprune.errors import UserError
from llmprune.moe.families import RouterConfig, experts_of, router_tensors


@dataclass
class Routing:
    indices: torch.Tensor   # [T, k] long: chosen experts (original numbering), in descending choice order
    weights: torch.Tensor   # [T, k] float32: what the block multiplies each chosen expert's output by
    scores: torch.Tensor    # [T, E] float32: softmax probability / sigmoid score of every expert (0 where removed)

    def renormalized(self) -> torch.Tensor:
        """[T, k] the chosen weights divided by their per-token sum (REAP's default gate)."""
        return self.weights / self.weights.sum(-1, keepdim=True).clamp_min(1e-30)


# --------------------------------------------------------------------------------------------
# keep-set validation (shared by the criteria and the edit)


def validate_kept_count(rcfg: RouterConfig, kept: int) -> None:
    """Raise UserError unless `kept` experts per layer can route: top_k ≤ kept ≤ E, and for group-limited
    routers an equal count per group that still lets every group be scored and top_k be chosen."""
    if not 1 <= kept <= rcfg.num_experts:
        raise UserError(f"experts to keep must be between 1 and {rcfg.num_experts}, got {kept}")
    if kept < rcfg.top_k:
        raise UserError(f"cannot keep {kept} experts: the router chooses top_k={rcfg.top_k} per token; "
                        f"keep at least {rcfg.top_k}")
    if rcfg.grouped:
        if kept % rcfg.n_group:
            raise UserError(f"cannot keep {kept} experts: the router splits experts into n_group={rcfg.n_group} "
                            f"groups, so the kept count must be a multiple of {rcfg.n_group}")
        per_group = kept // rcfg.n_group
        if per_group < rcfg.group_score_topk:
            raise UserError(f"cannot keep {kept} experts: each of the {rcfg.n_group} groups would keep {per_group}, "
                            f"but a group's score needs its {rcfg.group_score_topk} best experts; keep at least "
                            f"{rcfg.n_group * rcfg.group_score_topk}")
        if rcfg.topk_group * per_group < rcfg.top_k:
            raise UserError(f"cannot keep {kept} experts: the topk_group={rcfg.topk_group} chosen groups would hold "
                            f"{rcfg.topk_group * per_group} experts, fewer than top_k={rcfg.top_k}")


def validate_keep(rcfg: RouterConfig, keep: Sequence[int], balanced: bool = True) -> list[int]:
    """Sorted list of kept expert indices; UserError if they are not a valid keep set for this router.

    `balanced=False` also accepts the intermediate sets of a greedy search on a group-limited router
    (unequal groups, each still able to be scored); only balanced sets can become a model.
    """
    keep = [int(e) for e in keep]
    if len(set(keep)) != len(keep):
        raise UserError(f"kept experts repeat an index: {keep}")
    keep = sorted(keep)
    if keep and (keep[0] < 0 or keep[-1] >= rcfg.num_experts):
        raise UserError(f"kept experts must lie in [0, {rcfg.num_experts}), got {keep}")
    if not rcfg.grouped:
        validate_kept_count(rcfg, len(keep))
        return keep
    size = rcfg.num_experts // rcfg.n_group
    per_group = [sum(1 for e in keep if e // size == g) for g in range(rcfg.n_group)]
    if balanced:
        validate_kept_count(rcfg, len(keep))
        if len(set(per_group)) != 1:
            raise UserError(f"a group-limited router must keep the same number of experts in every group; "
                            f"kept per group: {per_group}")
    elif min(per_group) < rcfg.group_score_topk or sum(sorted(per_group)[:rcfg.topk_group]) < rcfg.top_k:
        raise UserError(f"kept per group {per_group} cannot route top_k={rcfg.top_k} from topk_group="
                        f"{rcfg.topk_group} groups scored by their {rcfg.group_score_topk} best experts")
    return keep


# --------------------------------------------------------------------------------------------
# routing


def router_logits(block: nn.Module, family: dict, rcfg: RouterConfig, x: torch.Tensor) -> torch.Tensor:
    """[T, E] float32 router logits of hidden states x [T, H], computed in the dtype the family uses."""
    weight, bias, _ = router_tensors(block, family)
    if rcfg.logits_float32:
        logits = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    else:
        logits = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    return logits.float()


def route(logits: torch.Tensor, rcfg: RouterConfig, correction_bias: torch.Tensor | None = None,
          keep: Sequence[int] | None = None, balanced: bool = True) -> Routing:
    """Top-k indices and weights from router logits [T, E], as the family's router computes them.

    With `keep`, route as the model will once every other expert is removed: removed experts get a -inf
    logit (softmax) / a 0 score and are never chosen (see module doc). `balanced=False` admits the
    unequal-group intermediate sets of a greedy search (`validate_keep`).
    """
    logits = logits.float()
    tokens, count = logits.shape
    if count != rcfg.num_experts:
        raise ValueError(f"logits have {count} experts, router config {rcfg.num_experts}")
    removed = None
    if keep is not None:
        keep = validate_keep(rcfg, keep, balanced)
        removed = torch.ones(count, dtype=torch.bool, device=logits.device)
        removed[keep] = False
    if rcfg.scoring == "softmax":
        scores = torch.softmax(logits if removed is None else logits.masked_fill(removed, float("-inf")), dim=-1)
    elif rcfg.scoring == "sigmoid":
        scores = logits.sigmoid()
        if removed is not None:
            scores = scores.masked_fill(removed, 0.0)
    else:
        raise ValueError(f"unknown router scoring '{rcfg.scoring}'")
    # The correction bias only steers the choice; the weights come from the unbiased scores.
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if removed is not None:
        choice = choice.masked_fill(removed, float("-inf"))
    if rcfg.grouped:
        # Kept experts stay in their original contiguous groups, which is how the edited router regroups
        # them (every group keeps the same count, in order).
        per_group = count // rcfg.n_group
        group_scores = choice.view(tokens, rcfg.n_group, per_group).topk(rcfg.group_score_topk, dim=-1)[0].sum(-1)
        group_index = torch.topk(group_scores, k=rcfg.topk_group, dim=-1)[1]          # [T, topk_group]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_index, True)
        choice = choice.masked_fill(~group_mask.repeat_interleave(per_group, dim=1), float("-inf"))
    indices = torch.topk(choice, k=rcfg.top_k, dim=-1)[1]                   # [T, k]
    weights = scores.gather(1, indices)
    if rcfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + rcfg.renorm_eps)
    weights = weights * rcfg.routed_scaling_factor
    return Routing(indices=indices, weights=weights, scores=scores)


def route_block(block: nn.Module, family: dict, rcfg: RouterConfig, x: torch.Tensor,
                keep: Sequence[int] | None = None, balanced: bool = True) -> Routing:
    """Route hidden states x [T, H] through the block's router (optionally as if only `keep` remained)."""
    _, _, correction = router_tensors(block, family)
    return route(router_logits(block, family, rcfg, x), rcfg, correction, keep, balanced)


# --------------------------------------------------------------------------------------------
# expert and block outputs from 2-D per-expert views


def expert_hidden(experts: nn.Module, family: dict, expert: int, x: torch.Tensor) -> torch.Tensor:
    """[t, I] the down projection's input h = act(gate x) · up x of one expert (of the fused `experts`
    module) on x [t, H], with its current gate_up weights."""
    gate_up = getattr(experts, family["gate_up_proj"])[expert]             # [2I, H]
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)                       # the model's own op order
    return getattr(experts, family["activation"])(gate) * up


def expert_forward(block: nn.Module, family: dict, expert: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(down input h = act(gate x) · up x [t, I], unweighted expert output [t, H]) of one expert on x [t, H]."""
    experts = experts_of(block, family)
    down = getattr(experts, family["down_proj"])[expert]                   # [H, I]
    hidden = expert_hidden(experts, family, expert, x)
    return hidden, F.linear(hidden, down)


def all_expert_outputs(block: nn.Module, family: dict, x: torch.Tensor,
                       experts: Sequence[int] | None = None) -> torch.Tensor:
    """[len(experts), T, H] every listed expert's unweighted output on every token of x [T, H]."""
    experts = range(getattr(experts_of(block, family), family["gate_up_proj"]).shape[0]) if experts is None else experts
    return torch.stack([expert_forward(block, family, e, x)[1] for e in experts])


def routed_output(block: nn.Module, family: dict, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """[T, H] Σ over each token's chosen experts of weight × expert output (the routed part of the block)."""
    out = torch.zeros_like(x)
    for expert in routing.indices.unique().tolist():
        token, slot = torch.where(routing.indices == expert)
        _, y = expert_forward(block, family, expert, x[token])
        out.index_add_(0, token, (y * routing.weights[token, slot, None]).to(out.dtype))
    return out


def shared_output(block: nn.Module, family: dict, x: torch.Tensor) -> torch.Tensor | None:
    """[T, H] the always-on shared expert's (gated) output, or None for families without one."""
    if not family["shared_expert"]:
        return None
    out = getattr(block, family["shared_expert"])(x)
    if family["shared_expert_gate"]:
        out = torch.sigmoid(getattr(block, family["shared_expert_gate"])(x)) * out
    return out


def block_output(block: nn.Module, family: dict, rcfg: RouterConfig, x: torch.Tensor,
                 keep: Sequence[int] | None = None) -> torch.Tensor:
    """[T, H] the MoE block's output on x [T, H] (shared expert included), optionally as if only `keep` remained."""
    out = routed_output(block, family, x, route_block(block, family, rcfg, x, keep))
    shared = shared_output(block, family, x)
    return out if shared is None else out + shared
