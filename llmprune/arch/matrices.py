"""Prunable matrices: what a pruning stage targets, beyond `nn.Linear`.

A `Matrix` is a small handle on one 2-D weight `[out_features, in_features]` of a decoder layer:
- a linear's weight (`model.layers.3.self_attn.q_proj`; GPT-2's Conv1D through `weight_2d`);
- one routed expert's slice of a fused 3-D expert parameter (transformers v5 MoE layout:
  `model.layers.3.mlp.experts.gate_up_proj[5]` is `gate_up_proj[5]`, `[2I, H]`, rows [0, I) gate and
  [I, 2I) up, both fed the tokens routed to expert 5; `...down_proj[5]` is `[H, I]`);
- a router's bare `weight` Parameter (`model.layers.3.mlp.gate`, `[E, H]`).
`weight` is a view: in-place edits reach the model, and the checkpoint keeps its fused layout. `key`
identifies the matrix for the run's keep-masks (`edits.MaskState`): the module itself when the module
holds one matrix, `(module, parameter, expert)` for an expert slice (module identity survives renumbering).

Routers (and shared-expert gates) decide where tokens go; they are never pruned unless the user's
`targets` regex names them, as lm_head and embeddings. Where each family keeps its MoE blocks is the
registry's data (`architectures.json`, `moe` section).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmprune.arch import TargetSelector, decoder_layers, is_linear, spec_for, weight_2d


@dataclass(frozen=True, eq=False)
class Matrix:
    name: str                      # full model name; expert slices end in `[expert]`
    module: nn.Module              # the linear, the router, or the experts module holding the 3-D parameter
    param: str = "weight"          # the parameter of `module` that holds the matrix
    expert: int | None = None      # index on dim 0 of a fused 3-D expert parameter
    role: str = "linear"           # "linear" | "expert" | "router"

    @property
    def key(self):
        """Identity for keep-masks: the module (one matrix per module) or (module, parameter, expert)."""
        return self.module if self.expert is None else (self.module, self.param, self.expert)

    @property
    def weight(self) -> torch.Tensor:
        """The `[out, in]` view of the matrix (in-place edits reach the model)."""
        if self.expert is not None:
            return getattr(self.module, self.param).data[self.expert]
        if self.role == "router":
            return getattr(self.module, self.param).data
        return weight_2d(self.module)


def expert_matrix_name(experts_name: str, param: str, expert: int) -> str:
    return f"{experts_name}.{param}[{expert}]"


def matrix_type(name: str) -> str:
    """`model.layers.3.self_attn.q_proj` -> `q_proj`; `...experts.gate_up_proj[5]` -> `gate_up_proj`."""
    return name.rsplit(".", 1)[-1].split("[", 1)[0]


def _moe_parts(layer: nn.Module, moe: dict) -> tuple[str, nn.Module] | None:
    """(block path, block) when this decoder layer holds an MoE block (dense layers hold a plain MLP there)."""
    block = getattr(layer, moe["moe_block"], None)
    if block is None or not hasattr(block, moe["experts"]) or not hasattr(block, moe["router"]):
        return None
    return moe["moe_block"], block


def layer_matrices(layer: nn.Module, prefix: str, selector: TargetSelector | None = None,
                   moe: dict | None = None) -> dict[str, Matrix]:
    """Every prunable matrix of one decoder layer (`prefix`: its name), in module order: its linears and
    each routed expert's gate_up / down slices. Routers and shared-expert gates only when `selector.targets`
    names them. Without a selector: every matrix, routers included (what accounting counts)."""
    routers: dict[str, str] = {}            # layer-relative path -> role of router-like modules
    experts_path = None
    if moe is not None and (parts := _moe_parts(layer, moe)) is not None:
        block_path, _ = parts
        routers[f"{block_path}.{moe['router']}"] = "router"
        if moe.get("shared_expert_gate"):
            routers[f"{block_path}.{moe['shared_expert_gate']}"] = "linear"
        experts_path = f"{block_path}.{moe['experts']}"

    def wanted(name: str, router: bool) -> bool:
        if selector is None:
            return True
        if router and selector.targets is None:
            return False
        return selector.wants(name)

    out: dict[str, Matrix] = {}
    for path, module in layer.named_modules():
        if not path:
            continue
        name = f"{prefix}.{path}"
        if path == experts_path:
            count = getattr(module, moe["gate_up_proj"]).shape[0]
            for expert in range(count):
                for param in (moe["gate_up_proj"], moe["down_proj"]):
                    matrix_name = expert_matrix_name(name, param, expert)
                    if wanted(matrix_name, False):
                        out[matrix_name] = Matrix(matrix_name, module, param, expert, "expert")
        elif path in routers:
            if wanted(name, True):
                weight_attr = moe["router_weight"] if routers[path] == "router" else "weight"
                out[name] = Matrix(name, module, weight_attr, None,
                                   "linear" if is_linear(module) else "router")
        elif is_linear(module) and wanted(name, False):
            out[name] = Matrix(name, module)
    return out


def prunable_matrices(model: nn.Module, selector: TargetSelector | None = None) -> dict[str, Matrix]:
    """Selected matrices of the decoder layers (lm_head and embeddings excluded; routers only when
    `targets` names them), by full name."""
    selector = selector or TargetSelector()
    fam = spec_for(model)
    out: dict[str, Matrix] = {}
    for i, layer in enumerate(decoder_layers(model)):
        out.update(layer_matrices(layer, f"{fam.layers}.{i}", selector, fam.moe))
    return out


def decoder_matrices(model: nn.Module) -> dict[str, Matrix]:
    """Every matrix of the decoder layers, routers included: what zero counts and reports cover."""
    fam = spec_for(model)
    out: dict[str, Matrix] = {}
    for i, layer in enumerate(decoder_layers(model)):
        out.update(layer_matrices(layer, f"{fam.layers}.{i}", None, fam.moe))
    return out
