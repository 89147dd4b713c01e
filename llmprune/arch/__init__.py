"""The architecture registry: the only place that knows where things live in each model family.

The knowledge is data (`architectures.json` beside this file, one entry per `model_type`): where
the decoder layers, norms, embeddings and head are; which linears form the coupled channel groups
that structured pruning removes together (an attention KV group with its query heads, an MLP
neuron), in which fused layout; which config fields and module attributes an edit must rewrite;
which config lists are per decoder layer. Methods and stages never see a model family: they ask
this module. Adding a family is adding an entry to the JSON and a tiny-config test case.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from llmprune.errors import UserError

REGISTRY_FILE = Path(__file__).with_name("architectures.json")


@dataclass(frozen=True)
class Projection:
    """A linear that produces a group's units: its output rows are sliced, in `layout`."""
    path: str      # from the decoder layer, e.g. "self_attn.q_proj"
    layout: str    # rows | stacked2 | q | k | v | qkv | qkv_per_head


@dataclass(frozen=True)
class ChannelGroup:
    """Coupled channels removed together: producers' output rows + the output linear's input columns."""
    module: str | None                    # the block holding the group (None: on the layer itself)
    projections: tuple[Projection, ...]
    output: str                           # the linear that consumes the units (o_proj, down_proj, ...)
    attributes: dict[str, str] = field(default_factory=dict)   # module attribute -> dims name
    refuse: str | None = None             # why this group cannot be pruned structurally (one line), or None

    @property
    def linear_paths(self) -> tuple[str, ...]:
        return tuple(p.path for p in self.projections) + (self.output,)


@dataclass(frozen=True)
class Family:
    model_type: str
    layers: str                  # dotted path from the CausalLM to the nn.ModuleList of decoder layers
    final_norm: str              # dotted path of the norm applied before lm_head
    embeddings: tuple[str, ...]  # input embedding modules (never pruned unless targeted)
    lm_head: str
    config: dict                 # llmprune name -> config field (None: the family has none)
    attention: ChannelGroup
    mlp: ChannelGroup
    per_layer_lists: tuple[str, ...] = ()
    per_layer_counts: dict = field(default_factory=dict)
    depth_guards: dict = field(default_factory=dict)
    moe: dict | None = None      # mixture-of-experts data (routers, fused experts, counts); llmprune/moe reads it
    checkpoint_names: dict = field(default_factory=dict)   # module path -> name in saved checkpoints

    def saved_names(self, path: str) -> tuple[str, ...]:
        """A module path and, where transformers renames it on save/load, its checkpoint name."""
        alias = self.checkpoint_names.get(path)
        return (path, alias) if alias else (path,)

    @property
    def head_dim_configurable(self) -> bool:
        """Whether the config can say head_dim: only then can heads be removed in a plain checkpoint."""
        return self.config.get("head_dim") is not None

    def group(self, name: str) -> ChannelGroup:
        return {"attention": self.attention, "mlp": self.mlp}[name]


# Kept for callers that only need the paths (the old name of the registry entry).
ArchSpec = Family


def _group(raw: dict) -> ChannelGroup:
    return ChannelGroup(module=raw.get("module"),
                        projections=tuple(Projection(p["path"], p.get("layout", "rows"))
                                          for p in raw.get("projections") or ()),
                        output=raw.get("output") or "", attributes=dict(raw.get("attributes") or {}),
                        refuse=raw.get("refuse"))


@lru_cache(maxsize=1)
def _registry() -> dict[str, Family]:
    raw = json.loads(REGISTRY_FILE.read_text())
    out: dict[str, Family] = {}

    def resolved(name: str) -> dict:
        entry = dict(raw[name])
        parent = entry.pop("extends", None)
        return {**resolved(parent), **entry} if parent else entry

    for name, entry in raw.items():
        if name.startswith("_") or entry.get("abstract"):
            continue
        e = resolved(name)
        out[name] = Family(model_type=name, layers=e["layers"], final_norm=e["final_norm"],
                           embeddings=tuple(e["embeddings"]), lm_head=e.get("lm_head", "lm_head"),
                           config=dict(e["config"]), attention=_group(e["attention"]), mlp=_group(e["mlp"]),
                           per_layer_lists=tuple(e.get("per_layer_lists") or ()),
                           per_layer_counts=dict(e.get("per_layer_counts") or {}),
                           depth_guards=dict(e.get("depth_guards") or {}), moe=e.get("moe"),
                           checkpoint_names=dict(e.get("checkpoint_names") or {}))
    return out


ARCHITECTURES = _registry()


def spec_for(model_or_config) -> Family:
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UserError(f"architecture '{model_type}' is not supported yet; supported: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[model_type]


family = spec_for


# ---- dimensions ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Dims:
    """The sizes of one uniform decoder stack, read through the family's config field names."""
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    @property
    def heads_per_kv_head(self) -> int:
        return self.heads // self.kv_heads

    @property
    def attention_units(self) -> int:
        """Units of the attention group: KV groups (each with its query heads)."""
        return self.kv_heads


def config_field(config, fam: Family, name: str):
    key = fam.config.get(name)
    return None if key is None else getattr(config, key, None)


def dims_of(model_or_config) -> Dims:
    config = getattr(model_or_config, "config", model_or_config)
    fam = spec_for(config)
    hidden = config_field(config, fam, "hidden")
    heads = config_field(config, fam, "heads")
    kv_heads = config_field(config, fam, "kv_heads") or heads
    head_dim = config_field(config, fam, "head_dim") or hidden // heads
    intermediate = config_field(config, fam, "intermediate")
    if intermediate is None:          # GPT-2's n_inner=None means 4 x hidden
        intermediate = fam.config.get("intermediate_default", 4) * hidden
    return Dims(num_layers=config_field(config, fam, "num_layers"), hidden=hidden, heads=heads,
                kv_heads=kv_heads, head_dim=head_dim, intermediate=intermediate)


def write_dims(config, fam: Family, **values) -> None:
    """Set config fields by llmprune name (num_layers, heads, kv_heads, head_dim, intermediate)."""
    for name, value in values.items():
        key = fam.config.get(name)
        if key is None:
            raise ValueError(f"{fam.model_type} has no config field for {name}")
        setattr(config, key, value)


# ---- coupled channel groups -------------------------------------------------------------------------

def unit_channels(unit_size: int, units: torch.Tensor) -> torch.Tensor:
    """Channel indices of `units` when each unit owns `unit_size` consecutive channels."""
    return (units.unsqueeze(1) * unit_size + torch.arange(unit_size)).flatten()


def group_units(dims: Dims, group: str) -> int:
    """How many units a group has per layer: KV groups (query heads when there are no KV heads) or neurons."""
    return dims.kv_heads if group == "attention" else dims.intermediate


def channel_map(fam: Family, dims: Dims, group: str) -> dict[str, tuple[str, torch.Tensor]]:
    """Where every unit of a group lives: {layer-relative linear path: ("rows" | "cols", index [units, per_unit])}.

    attention: a unit is a KV group with its `heads_per_kv_head` query heads (a query head when the
    family has no KV heads); rows of q/k/v (in their fused layout) and columns of the output linear.
    mlp: a unit is one neuron: its producer rows (gate and up) and its output-linear column.
    """
    spec = fam.group(group)
    units = torch.arange(group_units(dims, group))
    out: dict[str, tuple[str, torch.Tensor]] = {}
    if group == "mlp":
        for proj in spec.projections:
            if proj.layout == "rows":
                out[proj.path] = ("rows", units.unsqueeze(1))
            elif proj.layout == "stacked2":          # [gate; up]: neuron j is rows j and I + j
                out[proj.path] = ("rows", torch.stack([units, units + dims.intermediate], 1))
            else:
                raise ValueError(f"layout {proj.layout} is not an MLP layout")
        out[spec.output] = ("cols", units.unsqueeze(1))
        return out
    d, per = dims.head_dim, dims.heads_per_kv_head
    n = len(units)
    q_rows = unit_channels(per * d, units).view(n, per * d)     # the query heads of each KV group
    kv_rows = unit_channels(d, units).view(n, d)
    q_size, kv_size = dims.heads * d, dims.kv_heads * d
    for proj in spec.projections:
        if proj.layout == "q":
            out[proj.path] = ("rows", q_rows)
        elif proj.layout in ("k", "v"):
            out[proj.path] = ("rows", kv_rows)
        elif proj.layout == "qkv":                          # [q (heads·d); k (kv·d); v (kv·d)]
            out[proj.path] = ("rows", torch.cat([q_rows, q_size + kv_rows, q_size + kv_size + kv_rows], 1))
        elif proj.layout == "qkv_per_head":                 # per head [q_h; k_h; v_h] (MHA: unit = head)
            out[proj.path] = ("rows", unit_channels(3 * d, units).view(n, 3 * d))
        else:
            raise ValueError(f"layout {proj.layout} is not an attention layout")
    out[spec.output] = ("cols", q_rows)
    return out


def group_slices(fam: Family, dims: Dims, group: str, keep_units: torch.Tensor) -> dict[str, tuple[str, torch.Tensor]]:
    """For kept units of a group: {layer-relative linear path: ("rows" | "cols", kept indices in order)}."""
    keep_units = torch.as_tensor(keep_units, dtype=torch.long)
    return {path: (axis, index[keep_units].flatten().sort().values)
            for path, (axis, index) in channel_map(fam, dims, group).items()}


def get_module(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return get_module(model, spec_for(model).layers)


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or GPT-2's Conv1D (a linear whose weight is stored transposed)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def weight_2d(module: nn.Module) -> torch.Tensor:
    """The weight as `[out_features, in_features]` (a view: in-place edits reach the module). Also takes
    a `Matrix` handle (an expert's slice of a fused 3-D parameter, a router weight)."""
    if isinstance(module, Matrix):
        return module.weight
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


# Matrix handles (linears, routers, experts' slices of fused 3-D parameters); imported last: they use the above.
from llmprune.arch.matrices import Matrix, decoder_matrices, layer_matrices, matrix_type, prunable_matrices  # noqa: E402,F401
