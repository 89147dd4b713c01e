"""Edits: what a stage does to a model, applied by one set of functions.

A stage computes first and edits second (gpt-fast's quantize two-step): it builds new weights and
keep-masks, or decides which units/layers go, and the functions here apply that to the modules and
rewrite the config so the checkpoint stays a plain `from_pretrained`-able one.

- keep-masks (unstructured / N:M): `MaskState.apply(module or arch.Matrix, weight, keep_mask)`; masks
  are kept for the whole run (a kept weight may be exactly zero), so later stages and `heal` can respect them;
- coupled channel slices (width): `mask_units` makes a layer compute as if units were removed
  (zeroing the output linear's columns) while calibration is still running; `slice_units` removes
  them for real at the end of the stage, then `rewrite_group_config`;
- dropped decoder layers (depth): `drop_layers` (ModuleList, `layer_idx`, per-layer config lists).

`verify_config(model)` checks that every tensor has the shape the config implies (a checkpoint that
disagrees with its config loads as garbage or not at all).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from llmprune.arch import (Dims, Family, Matrix, decoder_layers, decoder_matrices, dims_of, group_slices, spec_for,
                           weight_2d, write_dims)
from llmprune.errors import UserError


# ---- keep-masks --------------------------------------------------------------------------------

def _mask_key(target):
    """What a keep-mask is stored under: a module (one matrix) or (module, parameter, expert)."""
    return target.key if isinstance(target, Matrix) else target


@dataclass
class MaskState:
    """Keep-masks of pruned matrices for one run. Keys: the module for a module holding one matrix (a
    linear, a router), `(experts module, parameter, expert)` for an expert's slice of a fused 3-D
    parameter (`arch.Matrix.key`); module identity survives renumbering. Methods take a module or a
    `Matrix`."""
    masks: dict[object, torch.Tensor] = field(default_factory=dict)       # bool [out, in] on CPU
    targets: dict[object, float | str] = field(default_factory=dict)      # the pattern each was pruned to

    def get(self, module) -> torch.Tensor | None:
        return self.masks.get(_mask_key(module))

    def apply(self, module, weight: torch.Tensor, keep_mask: torch.Tensor,
              target: float | str | None = None) -> None:
        """Write `weight ⊙ keep_mask` into `module` (a module or a `Matrix`, in its own layout/dtype),
        combined with any mask an earlier stage left: what was pruned stays pruned. `target` is the
        pattern it was pruned to."""
        key = _mask_key(module)
        keep_mask = keep_mask.to(device=weight.device, dtype=torch.bool)
        earlier = self.masks.get(key)
        if earlier is not None:
            keep_mask = keep_mask & earlier.to(weight.device)
        stored = weight_2d(module)
        stored.copy_((weight * keep_mask).to(device=stored.device, dtype=stored.dtype))
        self.masks[key] = keep_mask.cpu()
        if target is not None:
            self.targets[key] = target

    def forget(self, modules) -> None:
        """Drop the masks of `modules` (and of every expert slice they hold)."""
        modules = set(modules)
        for key in [k for k in self.masks.keys() | self.targets.keys()
                    if (k[0] if isinstance(k, tuple) else k) in modules]:
            self.masks.pop(key, None)
            self.targets.pop(key, None)

    def renumber_experts(self, module: nn.Module, param: str, keep: list[int]) -> None:
        """After an expert edit kept experts `keep` (old indices, in new order) of `module.param`: their
        masks move to the new indices, the others are dropped."""
        new_index = {old: new for new, old in enumerate(keep)}
        for store in (self.masks, self.targets):
            moved = {}
            for key in [k for k in store if isinstance(k, tuple) and k[0] is module and k[1] == param]:
                value = store.pop(key)
                if key[2] in new_index:
                    moved[(module, param, new_index[key[2]])] = value
            store.update(moved)

    def by_name(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """{matrix name: keep_mask} for the matrices still in `model` (expert slices as `...gate_up_proj[5]`)."""
        names = {m: n for n, m in model.named_modules()}
        out = {}
        for key, mask in self.masks.items():
            module = key[0] if isinstance(key, tuple) else key
            if module in names:
                out[names[module] if not isinstance(key, tuple) else f"{names[module]}.{key[1]}[{key[2]}]"] = mask
        return out


# ---- coupled channel slices -------------------------------------------------------------------------

def _resize_linear(module: nn.Module, weight_2d_new: torch.Tensor, bias_new: torch.Tensor | None) -> None:
    """Replace a linear's parameters by ones of a new shape (same module object, same layout/dtype)."""
    old = module.weight
    stored = weight_2d_new.t() if type(module).__name__ == "Conv1D" else weight_2d_new   # Conv1D: [in, out]
    module.weight = nn.Parameter(stored.to(dtype=old.dtype, device=old.device).contiguous(),
                                 requires_grad=old.requires_grad)
    if getattr(module, "bias", None) is not None and bias_new is not None:
        module.bias = nn.Parameter(bias_new.to(dtype=module.bias.dtype, device=module.bias.device).contiguous(),
                                   requires_grad=module.bias.requires_grad)
    out_features, in_features = weight_2d_new.shape
    if isinstance(module, nn.Linear):
        module.in_features, module.out_features = in_features, out_features
    elif type(module).__name__ == "Conv1D":
        module.nx, module.nf = in_features, out_features


def mask_units(layer: nn.Module, fam: Family, dims: Dims, group: str, keep_units: torch.Tensor) -> None:
    """Make `layer` compute as if only `keep_units` of `group` existed: zero the output linear's input
    columns of the removed units (their producers' rows then feed nothing). `slice_units` of the
    same units later gives the same function with smaller matrices."""
    slices = group_slices(fam, dims, group, keep_units)
    output = layer.get_submodule(fam.group(group).output)
    _, kept_cols = slices[fam.group(group).output]
    weight = weight_2d(output)                                   # [out, in] view
    drop = torch.ones(weight.shape[1], dtype=torch.bool)
    drop[kept_cols] = False
    weight[:, drop.to(weight.device)] = 0


def slice_units(layer: nn.Module, fam: Family, dims: Dims, group: str, keep_units: torch.Tensor,
                masks: MaskState | None = None) -> None:
    """Remove every unit of `group` not in `keep_units` from one decoder layer (weights, biases,
    keep-masks). Module attributes and the config are rewritten by `rewrite_group_config`."""
    for path, (axis, index) in group_slices(fam, dims, group, keep_units).items():
        module = layer.get_submodule(path)
        weight = weight_2d(module)                                # [out, in]
        idx = index.to(weight.device)
        bias = getattr(module, "bias", None)
        if axis == "rows":
            new_weight, new_bias = weight.index_select(0, idx), (bias.data.index_select(0, idx) if bias is not None else None)
        else:
            new_weight, new_bias = weight.index_select(1, idx), (bias.data if bias is not None else None)
        mask = masks.get(module) if masks is not None else None
        _resize_linear(module, new_weight.clone(), None if new_bias is None else new_bias.clone())
        if mask is not None:
            masks.masks[module] = mask.index_select(0 if axis == "rows" else 1, index)


def rewrite_group_config(model: nn.Module, group: str, kept_units: int) -> None:
    """Config fields and module attributes after every layer of `model` kept `kept_units` units."""
    fam = spec_for(model)
    dims = dims_of(model)
    config = model.config
    if group == "mlp":
        write_dims(config, fam, intermediate=kept_units)
        new = {"intermediate": kept_units}
    else:
        heads = kept_units * dims.heads_per_kv_head
        values = {"heads": heads, "head_dim": dims.head_dim}     # head_dim always written explicitly
        if fam.config.get("kv_heads"):
            values["kv_heads"] = kept_units
        write_dims(config, fam, **values)
        new = {"heads": heads, "kv_heads": kept_units if fam.config.get("kv_heads") else heads,
               "heads_per_kv_head": dims.heads_per_kv_head}
    spec = fam.group(group)
    for layer in decoder_layers(model):
        holder = layer.get_submodule(spec.module) if spec.module else layer
        for attr, name in spec.attributes.items():
            if hasattr(holder, attr) and name in new:
                setattr(holder, attr, new[name])


# ---- dropped decoder layers ----------------------------------------------------------------------

def check_can_drop_layers(config, fam: Family, where: str) -> None:
    for flag, why in fam.depth_guards.items():
        if getattr(config, flag, False):
            raise UserError(f"{where}: cannot drop layers: {why}")


def drop_layers(model: nn.Module, keep: list[int], masks: MaskState | None = None) -> None:
    """Keep only decoder layers `keep` (old indices, ascending): ModuleList, every `layer_idx`,
    `num_layers`, and the per-layer config fields of the family."""
    fam = spec_for(model)
    layers = decoder_layers(model)
    keep = sorted(keep)
    if not keep:
        raise UserError("cannot drop every decoder layer")
    check_can_drop_layers(model.config, fam, "layer-drop")
    if masks is not None:
        for i, layer in enumerate(layers):
            if i not in keep:
                masks.forget(layer.modules())
    parent_path, _, attr = fam.layers.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, nn.ModuleList([layers[i] for i in keep]))
    for new_index, layer in enumerate(decoder_layers(model)):
        for module in layer.modules():          # the KV cache is indexed by layer_idx
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    config = model.config
    old_count = len(layers)
    for name in ("layer_types", *fam.per_layer_lists):
        value = getattr(config, name, None)
        if isinstance(value, list) and len(value) == old_count:
            setattr(config, name, [value[i] for i in keep])
    for name, rule in fam.per_layer_counts.items():
        value = getattr(config, name, None)
        if isinstance(value, int) and rule == "kept_below":
            setattr(config, name, sum(1 for i in keep if i < value))
    if fam.moe is not None:        # which kept layers are dense vs MoE must not change with their numbers
        from llmprune.moe.families import dense_layer_fields_after_drop

        for name, value in dense_layer_fields_after_drop(config, keep).items():
            setattr(config, name, value)
    write_dims(config, fam, num_layers=len(keep))


# ---- the config must describe the tensors -----------------------------------------------------------

def verify_config(model: nn.Module) -> None:
    """Every parameter's shape equals what `model.config` implies (a meta-device model built from
    the config); raises RuntimeError naming the first mismatch (a bug in an edit, not user input)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(config)
    expected = {name: tuple(p.shape) for name, p in reference.named_parameters()}
    for name, param in model.named_parameters():
        if name in expected and tuple(param.shape) != expected[name]:
            raise RuntimeError(f"after editing, {name} has shape {tuple(param.shape)} but the config implies "
                               f"{expected[name]}")
    missing = set(expected) - {n for n, _ in model.named_parameters()}
    if missing:
        raise RuntimeError(f"after editing, the config implies parameters the model lacks: {sorted(missing)[:3]}")


def parameter_count(model: nn.Module) -> int:
    """Parameters of the model, tied ones once."""
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    return total


def linear_zeros(model: nn.Module) -> tuple[int, int]:
    """(zeros, elements) over every matrix of the decoder layers (`arch.decoder_matrices`): the linears'
    weights, routers, and every expert's slices of the fused 3-D expert parameters."""
    zeros = total = 0
    for matrix in decoder_matrices(model).values():
        w = matrix.weight
        zeros += int((w == 0).sum().item())
        total += w.numel()
    return zeros, total
