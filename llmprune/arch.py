"""The architecture registry: the only place that knows where things live in each model family.

Methods never see a model family: the engine asks this registry for the decoder layers, the
linears inside them, and (when explicitly targeted) the head. Adding a family is adding a row to
`ARCHITECTURES` and a tiny-config test case.

transformers v5 note: MoE experts are fused 3-D parameters (not nn.Linear); `experts` names the
module holding them so that a later expert-pruning method can find them here too.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from llmprune.errors import UserError


@dataclass(frozen=True)
class ArchSpec:
    layers: str                  # dotted path from the CausalLM to the nn.ModuleList of decoder layers
    final_norm: str              # dotted path of the norm applied before lm_head
    embeddings: tuple[str, ...]  # input embedding modules (never pruned unless targeted)
    attention: str               # attribute of a decoder layer holding attention
    mlp: str | None              # attribute holding the MLP (None: the MLP linears sit on the layer itself)
    experts: str | None = None   # attribute of `mlp` holding routed experts (MoE families)
    lm_head: str = "lm_head"


_LLAMA_LIKE = ArchSpec(layers="model.layers", final_norm="model.norm", embeddings=("model.embed_tokens",),
                       attention="self_attn", mlp="mlp")

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "opt": ArchSpec(layers="model.decoder.layers", final_norm="model.decoder.final_layer_norm",
                    embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
                    attention="self_attn", mlp=None),
    "gpt2": ArchSpec(layers="transformer.h", final_norm="transformer.ln_f",
                     embeddings=("transformer.wte", "transformer.wpe"), attention="attn", mlp="mlp"),
    "gpt_neox": ArchSpec(layers="gpt_neox.layers", final_norm="gpt_neox.final_layer_norm",
                         embeddings=("gpt_neox.embed_in",), attention="attention", mlp="mlp",
                         lm_head="embed_out"),
}


def spec_for(model_or_config) -> ArchSpec:
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UserError(f"architecture '{model_type}' is not supported yet; supported: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[model_type]


def get_module(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return get_module(model, spec_for(model).layers)


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or GPT-2's Conv1D (a linear whose weight is stored transposed)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def weight_2d(module: nn.Module) -> torch.Tensor:
    """The weight as `[out_features, in_features]` (a view: in-place edits reach the module)."""
    if isinstance(module, nn.Linear):
        return module.weight.data
    if type(module).__name__ == "Conv1D":  # weight is [in, out]
        return module.weight.data.t()
    if isinstance(module, nn.Embedding):  # [vocab, hidden]: rows are what gets looked up
        return module.weight.data
    raise TypeError(f"no 2-D weight view for {type(module).__name__}")


def set_weight_2d(module: nn.Module, new_weight: torch.Tensor) -> None:
    """Write an `[out, in]` weight back in the module's own layout and dtype."""
    weight_2d(module).copy_(new_weight.to(module.weight.dtype))


def layer_linears(layer: nn.Module, prefix: str) -> dict[str, nn.Module]:
    """All linears inside one decoder layer, by full model name (`prefix` is the layer's name)."""
    return {f"{prefix}.{name}": mod for name, mod in layer.named_modules() if name and is_linear(mod)}


@dataclass(frozen=True)
class TargetSelector:
    """Which linears a stage prunes: every linear in the decoder layers by default.

    `targets`/`ignore` are regexes searched in full module names. lm_head and embeddings are only
    pruned when `targets` names them explicitly (a default-all selection never includes them).
    """
    targets: str | None = None
    ignore: str | None = None

    def __post_init__(self):
        for flag, pattern in (("--targets", self.targets), ("--ignore", self.ignore)):
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise UserError(f"{flag} {pattern!r} is not a valid regular expression ({exc})") from None

    def wants(self, name: str) -> bool:
        if self.targets is not None and not re.search(self.targets, name):
            return False
        return not (self.ignore is not None and re.search(self.ignore, name))


def prunable_linears(model: nn.Module, selector: TargetSelector | None = None) -> dict[str, nn.Module]:
    """Selected linears inside the decoder layers (lm_head and embeddings excluded), by full name."""
    selector = selector or TargetSelector()
    spec = spec_for(model)
    out = {}
    for i, layer in enumerate(decoder_layers(model)):
        for name, mod in layer_linears(layer, f"{spec.layers}.{i}").items():
            if selector.wants(name):
                out[name] = mod
    return out


def head_targets(model: nn.Module, selector: TargetSelector) -> dict[str, nn.Module]:
    """lm_head / embeddings, but only when the user's `targets` regex names them explicitly."""
    if selector.targets is None:
        return {}
    spec = spec_for(model)
    out = {}
    for name in (spec.lm_head, *spec.embeddings):
        try:
            mod = get_module(model, name)
        except AttributeError:
            continue
        if selector.wants(name) and (is_linear(mod) or isinstance(mod, nn.Embedding)):
            out[name] = mod
    return out
