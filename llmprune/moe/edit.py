"""Remove (or replace by merged ones) routed experts of every MoE layer, compute-then-edit.

Everything is validated and every new tensor is built first; only then is the model touched, so a bad
request leaves the model as it was. Per MoE block, the tensors listed in the family's
`per_expert_tensors` (router weight, router bias, `e_score_correction_bias`, fused expert parameters) are
sliced along dim 0 with the same keep indices; every module attribute in `count_attributes` and the
config's expert count are set to the new count. Shared experts, their gates and `top_k` are untouched.
The result loads with stock `from_pretrained` (one uniform expert count in every MoE layer).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from llmprune.errors import UserError
from llmprune.moe.families import RouterConfig, experts_of, family_for, moe_blocks, router_config, router_of
from llmprune.moe.routing import block_output, validate_keep


@dataclass
class ExpertDropReport:
    kept: dict[int, list[int]]                   # MoE layer -> kept experts (original numbering)
    experts_before: int
    experts_after: int
    parameters_before: int
    parameters_after: int
    merged_layers: list[int]


def _owner(role: str, block: nn.Module, family: dict, model: nn.Module) -> nn.Module:
    if role == "router":
        return router_of(block, family)
    if role == "experts":
        return experts_of(block, family)
    if role == "model":
        return model
    raise ValueError(f"unknown module role '{role}' in the MoE family table")


def _per_expert_tensors(block: nn.Module, family: dict) -> dict[tuple[str, str], torch.Tensor]:
    """{(role, attr): tensor} of the block's listed per-expert tensors; refuses unlisted ones of leading dim E."""
    listed = {tuple(path.split(".", 1)) for path in family["per_expert_tensors"]}
    count = getattr(experts_of(block, family), family["gate_up_proj"]).shape[0]
    found = {}
    for role in ("router", "experts"):
        module = _owner(role, block, family, None)
        tensors = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
        for name, tensor in tensors.items():
            if (role, name) in listed:
                found[(role, name)] = tensor
            elif tensor.dim() >= 1 and tensor.shape[0] == count:
                raise UserError(f"{type(module).__name__}.{name} has a leading dimension of {count} (one row per "
                                "expert?) but the MoE family table does not list it; refusing to drop experts")
    missing = listed - set(found)
    if missing:
        raise UserError(f"the MoE family table lists {sorted('.'.join(m) for m in missing)} but the block has none")
    return found


def _replace(module: nn.Module, name: str, new: torch.Tensor) -> None:
    old = getattr(module, name)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        module.register_buffer(name, new, persistent=name not in module._non_persistent_buffers_set)


@torch.no_grad()
def drop_experts(model: nn.Module, keep: dict[int, Sequence[int]],
                 merged: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
                 masks=None) -> ExpertDropReport:
    """Keep only `keep[layer]` experts in every MoE layer (the same count everywhere).

    `merged[layer] = (gate_up [K, 2I, H], down [K, H, I])` replaces the kept experts' fused tensors
    (in `keep` order) instead of slicing them (e.g. `criteria.MergePlan.gate_up_proj/down_proj`).
    `masks` (an `edits.MaskState`): keep-masks of earlier stages follow their experts to the new indices
    (a pruned router's mask loses the removed rows), and merged tensors keep the kept experts' zeros.
    """
    family, rcfg = family_for(model), router_config(model)
    blocks = moe_blocks(model)
    merged = merged or {}
    if set(keep) != set(blocks):
        raise UserError(f"expert keep sets are given for layers {sorted(keep)} but the MoE layers are "
                        f"{sorted(blocks)}; give one per MoE layer (the config holds one expert count)")
    keep = {layer: validate_keep(rcfg, experts) for layer, experts in keep.items()}
    counts = {len(experts) for experts in keep.values()}
    if len(counts) != 1:
        raise UserError(f"every MoE layer must keep the same number of experts (plain HF configs hold one "
                        f"count); got {sorted(counts)}")
    kept = counts.pop()
    if set(merged) - set(blocks):
        raise UserError(f"merged tensors given for non-MoE layers {sorted(set(merged) - set(blocks))}")

    # ---- compute ---------------------------------------------------------------------------------
    parameters_before = sum(p.numel() for p in model.parameters())
    new_tensors: list[tuple[nn.Module, str, torch.Tensor]] = []
    for layer, block in blocks.items():
        tensors = _per_expert_tensors(block, family)
        for (role, name), tensor in tensors.items():
            if tensor.shape[0] != rcfg.num_experts:
                raise UserError(f"layer {layer}: {role}.{name} has {tensor.shape[0]} experts, the config says "
                                f"{rcfg.num_experts}")
        index = torch.tensor(keep[layer], dtype=torch.long)
        replacement = {}
        if layer in merged:
            gate_up, down = merged[layer]
            expected = {"gate_up_proj": gate_up, "down_proj": down}
            for key, new in expected.items():
                old = tensors[("experts", family[key])]
                if tuple(new.shape) != (kept, *old.shape[1:]):
                    raise UserError(f"layer {layer}: merged {key} has shape {tuple(new.shape)}, expected "
                                    f"{(kept, *old.shape[1:])}")
                replacement[("experts", family[key])] = new.to(dtype=old.dtype, device=old.device)
        for (role, name), tensor in tensors.items():
            new = replacement.get((role, name))
            if new is None:
                new = tensor.detach().index_select(0, index.to(tensor.device))
            new_tensors.append((_owner(role, block, family, model), name, new.contiguous()))

    # ---- edit ------------------------------------------------------------------------------------
    for module, name, new in new_tensors:
        _replace(module, name, new)
    if masks is not None:
        _follow_masks(masks, blocks, family, keep)
    for block in blocks.values():
        for path in family["count_attributes"]:
            role, attr = path.split(".", 1)
            setattr(_owner(role, block, family, model), attr, kept)
    setattr(model.config, family["config"]["num_experts"], kept)

    return ExpertDropReport(kept=keep, experts_before=rcfg.num_experts, experts_after=kept,
                            parameters_before=parameters_before,
                            parameters_after=sum(p.numel() for p in model.parameters()),
                            merged_layers=sorted(merged))


def _follow_masks(masks, blocks: dict[int, nn.Module], family: dict, keep: dict[int, list[int]]) -> None:
    """Keep-masks after the edit: expert slices renumbered (removed ones forgotten), a router mask sliced
    to the kept rows, and every kept slice's zeros re-applied (merged tensors are new values)."""
    for layer, block in blocks.items():
        experts, router = experts_of(block, family), router_of(block, family)
        for param in (family["gate_up_proj"], family["down_proj"]):
            masks.renumber_experts(experts, param, keep[layer])
            tensor = getattr(experts, param).data                                   # [K, out, in]
            for index in range(tensor.shape[0]):
                mask = masks.masks.get((experts, param, index))
                if mask is not None:
                    tensor[index].mul_(mask.to(device=tensor.device, dtype=tensor.dtype))
        router_mask = masks.masks.get(router)
        if router_mask is not None:
            masks.masks[router] = router_mask.index_select(0, torch.tensor(keep[layer], dtype=torch.long))


def emulate_drop(block: nn.Module, family: dict, rcfg: RouterConfig, keep: Sequence[int]):
    """Make `block` compute, until the returned function is called, what it will compute once only `keep`
    remain (router restricted to them: `routing.block_output(..., keep)`), without changing any tensor's
    shape: an expert-drop stage calibrates the next layers on these outputs before it edits the model."""
    keep = list(keep)

    def forward(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        return block_output(block, family, rcfg, x, keep).reshape(hidden_states.shape)

    block.forward = forward

    def restore() -> None:
        if "forward" in block.__dict__:
            del block.forward
    return restore
