"""Where MoE families keep their routers, experts and expert counts: data, plus small accessors.

`MOE_FAMILIES` is plain JSON-able data (one entry per `config.model_type`, transformers 5.24 layout);
nothing below branches on a family name. The fields of an entry:

    layers                 dotted path from the CausalLM to the ModuleList of decoder layers
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

from llmprune.errors import UserError

_FUSED_EXPERTS = {
    "experts": "experts",
    "experts_storage": "fused",
    "gate_up_proj": "gate_up_proj",
    "down_proj": "down_proj",
    "gate_up_layout": "concatenated",
    "activation": "act_fn",
}
_SOFTMAX_ROUTING = {"scoring": "softmax", "routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1,
                    "group_score_topk": 2, "renorm_eps": 0.0, "logits_float32": False}
_NO_DENSE_FIELDS = {"first_k_dense_replace": None, "mlp_only_layers": None, "decoder_sparse_step": None}
_QWEN_DENSE_FIELDS = {"first_k_dense_replace": None, "mlp_only_layers": "mlp_only_layers",
                      "decoder_sparse_step": "decoder_sparse_step"}

MOE_FAMILIES: dict[str, dict] = {
    "mixtral": {
        "layers": "model.layers", "moe_block": "mlp",
        "router": "gate", "router_weight": "weight", "router_bias": None, "router_correction_bias": None,
        **_FUSED_EXPERTS,
        "shared_expert": None, "shared_expert_gate": None,
        "per_expert_tensors": ["router.weight", "experts.gate_up_proj", "experts.down_proj"],
        "count_attributes": ["router.num_experts", "experts.num_experts", "model.num_experts"],
        "config": {"num_experts": "num_local_experts", "top_k": "num_experts_per_tok", **_NO_DENSE_FIELDS},
        # Mixtral always renormalises the top-k softmax probabilities (no config field).
        "routing": {**_SOFTMAX_ROUTING, "norm_topk_prob": True},
        "checkpoint_expert_keys": "block_sparse_moe.experts.{e}.w1/w3/w2.weight",
    },
    "qwen2_moe": {
        "layers": "model.layers", "moe_block": "mlp",
        "router": "gate", "router_weight": "weight", "router_bias": None, "router_correction_bias": None,
        **_FUSED_EXPERTS,
        "shared_expert": "shared_expert", "shared_expert_gate": "shared_expert_gate",
        "per_expert_tensors": ["router.weight", "experts.gate_up_proj", "experts.down_proj"],
        "count_attributes": ["router.num_experts", "experts.num_experts", "model.num_experts"],
        "config": {"num_experts": "num_experts", "top_k": "num_experts_per_tok", **_QWEN_DENSE_FIELDS},
        "routing": {**_SOFTMAX_ROUTING, "norm_topk_prob": {"field": "norm_topk_prob"}},
        "checkpoint_expert_keys": "mlp.experts.{e}.gate_proj/up_proj/down_proj.weight",
    },
    "qwen3_moe": {
        "layers": "model.layers", "moe_block": "mlp",
        "router": "gate", "router_weight": "weight", "router_bias": None, "router_correction_bias": None,
        **_FUSED_EXPERTS,
        "shared_expert": None, "shared_expert_gate": None,
        "per_expert_tensors": ["router.weight", "experts.gate_up_proj", "experts.down_proj"],
        "count_attributes": ["router.num_experts", "experts.num_experts", "model.num_experts"],
        # Qwen3MoeConfig aliases num_experts -> num_local_experts (attribute_map): config.json holds
        # "num_local_experts"; setting either name sets the one stored value.
        "config": {"num_experts": "num_experts", "top_k": "num_experts_per_tok", **_QWEN_DENSE_FIELDS},
        "routing": {**_SOFTMAX_ROUTING, "norm_topk_prob": {"field": "norm_topk_prob"}},
        "checkpoint_expert_keys": "mlp.experts.{e}.gate_proj/up_proj/down_proj.weight",
    },
    "olmoe": {
        "layers": "model.layers", "moe_block": "mlp",
        "router": "gate", "router_weight": "weight", "router_bias": None, "router_correction_bias": None,
        **_FUSED_EXPERTS,
        "shared_expert": None, "shared_expert_gate": None,
        "per_expert_tensors": ["router.weight", "experts.gate_up_proj", "experts.down_proj"],
        "count_attributes": ["router.num_experts", "experts.num_experts", "model.num_experts"],
        "config": {"num_experts": "num_experts", "top_k": "num_experts_per_tok", **_NO_DENSE_FIELDS},
        "routing": {**_SOFTMAX_ROUTING, "norm_topk_prob": {"field": "norm_topk_prob"}},
        "checkpoint_expert_keys": "mlp.experts.{e}.gate_proj/up_proj/down_proj.weight",
    },
    "deepseek_v3": {
        "layers": "model.layers", "moe_block": "mlp",
        "router": "gate", "router_weight": "weight", "router_bias": None,
        "router_correction_bias": "e_score_correction_bias",
        **_FUSED_EXPERTS,
        "shared_expert": "shared_experts", "shared_expert_gate": None,
        "per_expert_tensors": ["router.weight", "router.e_score_correction_bias",
                               "experts.gate_up_proj", "experts.down_proj"],
        # DeepseekV3ForCausalLM holds no expert count of its own.
        "count_attributes": ["router.num_experts", "experts.num_experts"],
        "config": {"num_experts": "n_routed_experts", "top_k": "num_experts_per_tok",
                   "first_k_dense_replace": "first_k_dense_replace", "mlp_only_layers": None,
                   "decoder_sparse_step": None},
        "routing": {"scoring": "sigmoid", "norm_topk_prob": {"field": "norm_topk_prob"},
                    "routed_scaling_factor": {"field": "routed_scaling_factor"},
                    "n_group": {"field": "n_group"}, "topk_group": {"field": "topk_group"},
                    "group_score_topk": 2, "renorm_eps": 1e-20, "logits_float32": True},
        "checkpoint_expert_keys": "mlp.experts.{e}.gate_proj/up_proj/down_proj.weight",
    },
}


# --------------------------------------------------------------------------------------------
# accessors


def _config_of(model_or_config):
    return getattr(model_or_config, "config", model_or_config)


def is_moe(model_or_config) -> bool:
    return getattr(_config_of(model_or_config), "model_type", None) in MOE_FAMILIES


def family_for(model_or_config) -> dict:
    """The family entry for a model or config (a deep copy: callers may not change the table)."""
    model_type = getattr(_config_of(model_or_config), "model_type", None)
    if model_type not in MOE_FAMILIES:
        raise UserError(f"'{model_type}' is not a supported MoE architecture; supported: "
                        f"{', '.join(sorted(MOE_FAMILIES))}")
    return copy.deepcopy(MOE_FAMILIES[model_type])


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
