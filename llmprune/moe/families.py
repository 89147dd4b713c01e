"""Where MoE families keep their routers, experts and expert counts: accessors over the registry's data.

The data is the `moe` section of each MoE family in the one architecture registry
(`llmprune/arch/architectures.json`, transformers 5.24 layout); nothing below branches on a family name.
`family_for(model)` returns that section plus the family's `layers` path. Its fields:

    layers                 dotted path from the CausalLM to the ModuleList of decoder layers (the family's)
    moe_block              attribute of a decoder layer holding the MoE block (a dense MLP sits under the
                           same name in dense layers; `moe_layer_indices` says which layers are MoE)
    router                 attribute of the block holding the router (a bare `weight` [E, H] Parameter)
    router_weight          attribute of the router: logits = x @ weightᵀ            [E, H]
    router_bias            attribute of the router added to the logits, or None      [E]
    router_correction_bias attribute of the router added to the scores for *choosing* experts only
                           (DeepSeek-V3 `e_score_correction_bias`, a buffer), or None [E]
    experts                attribute of the block holding the routed experts
    experts_storage        "fused": 3-D parameters, expert on dim 0 (transformers v5 layout)
    gate_up_proj           attribute of `experts`: [E, 2I, H]; rows [0, I) are the gate projection,
                           rows [I, 2I) the up projection (`gate_up_layout: "concatenated"`)
    down_proj              attribute of `experts`: [E, H, I]
    activation             attribute of `experts` holding the activation applied to the gate
    shared_expert          attribute of the block holding an always-on dense expert, or None
    shared_expert_gate     attribute of the block holding the shared expert's sigmoid gate [1, H], or None
    per_expert_tensors     every parameter/buffer with the expert on dim 0, as "router.<attr>" /
                           "experts.<attr>" (an expert edit slices exactly these; `edit` refuses a block
                           holding any other tensor whose leading dim is E)
    count_attributes       module attributes holding E: "router.<attr>", "experts.<attr>", and
                           "model.<attr>" on the CausalLM itself (its aux-loss expert count)
    config                 config field names: `num_experts` (the count an edit rewrites), `top_k`, and the
                           dense-layer fields `first_k_dense_replace`, `mlp_only_layers`,
                           `decoder_sparse_step` (None where the family has no such field)
    routing                how the router turns logits into (indices, weights); each value is a literal
                           or {"field": name} (read from the config):
                           scoring "softmax" | "sigmoid", norm_topk_prob, routed_scaling_factor,
                           n_group / topk_group (group-limited selection; 1 / 1 = none),
                           group_score_topk (how many best scores in a group make the group's score),
                           renorm_eps (added to the top-k sum before renormalising),
                           logits_float32 (the router casts input and weight to float32 before the
                           matmul; otherwise the logits are computed in the model dtype and only the
                           softmax runs in float32)
    checkpoint_expert_keys what `save_pretrained` writes per expert (transformers reverses the fused layout
                           into the original per-expert keys); informational, the loader converts back
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from llmprune.arch import ARCHITECTURES, spec_for
from llmprune.errors import UserError


# --------------------------------------------------------------------------------------------
# accessors


def _config_of(model_or_config):
    return getattr(model_or_config, "config", model_or_config)


def moe_model_types() -> list[str]:
    """The registry's mixture-of-experts families."""
    return sorted(name for name, fam in ARCHITECTURES.items() if fam.moe is not None)


def is_moe(model_or_config) -> bool:
    fam = ARCHITECTURES.get(getattr(_config_of(model_or_config), "model_type", None))
    return fam is not None and fam.moe is not None


def family_for(model_or_config) -> dict:
    """The family's `moe` data plus its `layers` path, for a model or config (a deep copy: callers may
    not change the registry)."""
    fam = spec_for(_config_of(model_or_config))
    if fam.moe is None:
        raise UserError(f"'{fam.model_type}' is not a mixture-of-experts model; MoE families: "
                        f"{', '.join(moe_model_types())}")
    return {"layers": fam.layers, **copy.deepcopy(fam.moe)}


def config_value(config, spec):
    """A routing value: a literal, or {"field": name} read from the config."""
    if isinstance(spec, dict):
        return getattr(config, spec["field"])
    return spec


def num_experts(model_or_config) -> int:
    config = _config_of(model_or_config)
    return int(getattr(config, family_for(config)["config"]["num_experts"]))


def top_k(model_or_config) -> int:
    config = _config_of(model_or_config)
    return int(getattr(config, family_for(config)["config"]["top_k"]))


def moe_layer_indices(model_or_config) -> list[int]:
    """Decoder layers holding an MoE block, from the config alone (so it can be checked before loading)."""
    config = _config_of(model_or_config)
    fields = family_for(config)["config"]
    if num_experts(config) <= 0:
        return []
    first_dense = getattr(config, fields["first_k_dense_replace"]) if fields["first_k_dense_replace"] else 0
    dense = set(getattr(config, fields["mlp_only_layers"]) or []) if fields["mlp_only_layers"] else set()
    step = getattr(config, fields["decoder_sparse_step"]) if fields["decoder_sparse_step"] else 1
    return [i for i in range(config.num_hidden_layers)
            if i >= (first_dense or 0) and i not in dense and (i + 1) % step == 0]


def dense_layer_fields_after_drop(config, keep: list[int]) -> dict[str, object]:
    """The config fields that say which layers are dense, rewritten for a model that keeps only decoder
    layers `keep` (old indices, ascending), so that every kept layer stays MoE or dense as it was:
    `first_k_dense_replace` counts the kept leading dense layers; `mlp_only_layers` lists the kept dense
    layers' new indices and `decoder_sparse_step` becomes 1 (a step pattern does not survive renumbering).
    Raises ValueError if the family's fields cannot express the kept pattern (a bug, not user input)."""
    fields = family_for(config)["config"]
    moe_before = set(moe_layer_indices(config))
    dense_new = [new for new, old in enumerate(keep) if old not in moe_before]
    out: dict[str, object] = {}
    if fields["mlp_only_layers"]:
        out[fields["mlp_only_layers"]] = dense_new
        if fields["decoder_sparse_step"]:
            out[fields["decoder_sparse_step"]] = 1
    elif fields["first_k_dense_replace"]:
        out[fields["first_k_dense_replace"]] = len(dense_new)
        if dense_new != list(range(len(dense_new))):
            raise ValueError(f"dense layers {dense_new} after the drop are not the leading ones")
    elif dense_new:
        raise ValueError(f"{config.model_type} has no config field for dense layers, but layers {dense_new} are dense")
    return out


def moe_blocks(model: nn.Module) -> dict[int, nn.Module]:
    """{decoder layer index: MoE block} for every MoE layer of the model."""
    family = family_for(model)
    layers = model.get_submodule(family["layers"])
    blocks = {}
    for index in moe_layer_indices(model):
        block = getattr(layers[index], family["moe_block"])
        if not hasattr(block, family["router"]) or not hasattr(block, family["experts"]):
            raise UserError(f"layer {index}: the config says it is an MoE layer but its "
                            f"'{family['moe_block']}' has no router/experts ({type(block).__name__})")
        blocks[index] = block
    return blocks


def router_of(block: nn.Module, family: dict) -> nn.Module:
    return getattr(block, family["router"])


def experts_of(block: nn.Module, family: dict) -> nn.Module:
    experts = getattr(block, family["experts"])
    if family["experts_storage"] != "fused":
        raise UserError(f"expert storage '{family['experts_storage']}' is not supported (transformers v5 "
                        "fused 3-D experts only)")
    return experts


def router_tensors(block: nn.Module, family: dict) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(weight [E, H], bias [E] or None, correction bias [E] or None) of the block's router."""
    router = router_of(block, family)
    weight = getattr(router, family["router_weight"])
    bias = getattr(router, family["router_bias"]) if family["router_bias"] else None
    correction = getattr(router, family["router_correction_bias"]) if family["router_correction_bias"] else None
    return weight, bias, correction


def expert_matrices(block: nn.Module, family: dict, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """2-D views (gate [I, H], up [I, H], down [H, I]) of one routed expert; in-place edits reach the model."""
    views = expert_weight_views(block, family, expert)
    gate_up, down = views[family["gate_up_proj"]], views[family["down_proj"]]   # [2I, H], [H, I]
    inter = gate_up.shape[0] // 2
    return gate_up[:inter], gate_up[inter:], down


def expert_weight_views(block: nn.Module, family: dict, expert: int) -> dict[str, torch.Tensor]:
    """The expert's two matrices as 2-D `[out_features, in_features]` views, keyed by the fused parameter
    name: gate_up [2I, H] (input: the token x; `observe` gate_up_inputs) and down [H, I] (input:
    act(gate x)·up x; `observe` down_inputs). In-place edits (pruning masks) reach the model."""
    experts = experts_of(block, family)
    return {family["gate_up_proj"]: getattr(experts, family["gate_up_proj"]).data[expert],
            family["down_proj"]: getattr(experts, family["down_proj"]).data[expert]}


def expert_activation(block: nn.Module, family: dict):
    return getattr(experts_of(block, family), family["activation"])


@dataclass(frozen=True)
class RouterConfig:
    """Everything `routing.route` needs to turn router logits into (indices, weights)."""
    num_experts: int
    top_k: int
    scoring: str                    # "softmax" | "sigmoid"
    norm_topk_prob: bool            # renormalise the chosen weights to sum 1
    routed_scaling_factor: float = 1.0
    n_group: int = 1                # group-limited routing: experts split into n_group contiguous groups,
    topk_group: int = 1             # only the topk_group best groups may be chosen
    group_score_topk: int = 2       # a group's score is the sum of its group_score_topk best scores
    renorm_eps: float = 0.0
    logits_float32: bool = False

    @property
    def grouped(self) -> bool:
        return self.n_group > 1


def router_config(model_or_config) -> RouterConfig:
    config = _config_of(model_or_config)
    routing = family_for(config)["routing"]
    n_group = config_value(config, routing["n_group"]) or 1
    topk_group = config_value(config, routing["topk_group"]) or 1
    return RouterConfig(
        num_experts=num_experts(config), top_k=top_k(config), scoring=routing["scoring"],
        norm_topk_prob=bool(config_value(config, routing["norm_topk_prob"])),
        routed_scaling_factor=float(config_value(config, routing["routed_scaling_factor"]) or 1.0),
        n_group=int(n_group), topk_group=int(topk_group), group_score_topk=int(routing["group_score_topk"]),
        renorm_eps=float(routing["renorm_eps"]), logits_float32=bool(routing["logits_float32"]),
    )
