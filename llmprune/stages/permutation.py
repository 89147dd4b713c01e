"""`permute: true` of the prune stage: input-channel permutation before N:M selection, function-preserving.

A *coupling* is a consumer linear whose input channels are made row by row by producer linears with only
elementwise operations between them (arch `channel_map`), so permuting the producers' output rows and the
consumer's input columns the same way leaves the layer's function unchanged:
- mlp: down_proj columns and gate/up rows (fc1 / c_fc / gate_up_proj rows: whatever the family's layout);
- attention: o_proj columns and v rows, within each head (attention mixes a head's channels only through
  token weights, so a head's channels may be reordered; q and k are left alone, since rotary embeddings
  pair their channels), one permutation per KV head, shared by every query head that reads it (GQA).

The consumer is pruned twice on the same statistics: in its own column order and in the order found by
`methods.permute.nm_channel_permutation` on its Wanda scores (groups within heads); the one with the lower
reconstruction error tr((W − Ŵ)H(W − Ŵ)ᵀ) wins (the identity when the permutation does not help). The
winner is written in the original column order (N:M holds in the permuted order) while the layer is still
being calibrated, and `apply_permutation` reorders producers and consumer (weights, biases, keep-masks) once
the layer is done, so the layer's outputs never change and the stored consumer is N:M in its own columns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from llmprune.arch import Family, channel_map, dims_of, spec_for, weight_2d
from llmprune.edits import MaskState
from llmprune.masks import Pattern
from llmprune.methods import LinearStats
from llmprune.methods.permute import invert_permutation, nm_channel_permutation, permute_stats
from llmprune.methods.refine import row_errors

PERMUTE_NEEDS = frozenset({"hessian", "input_sq_norm"})   # Wanda scores for the search, H for the comparison


@dataclass(frozen=True)
class Coupling:
    """A consumer and its producers, in blocks whose channels may be permuted among themselves."""
    consumer: str                                      # layer-relative path (down_proj, o_proj)
    columns: torch.Tensor                              # [blocks, replicas, channels]: consumer input columns
    producers: tuple[tuple[str, torch.Tensor], ...]    # (path, rows [blocks, channels, k]): producer output rows


@dataclass(frozen=True)
class ChannelPermutation:
    coupling: Coupling
    local: torch.Tensor     # [blocks, channels]: new channel c of block g is old channel local[g, c]

    def consumer_columns(self, in_features: int) -> torch.Tensor:
        """perm [in_features]: new column j is old column perm[j] (identity outside the coupling)."""
        cols = self.coupling.columns
        perm = torch.arange(in_features)
        perm[cols.reshape(-1)] = cols.gather(2, self.local.unsqueeze(1).expand_as(cols)).reshape(-1)
        return perm

    def producer_rows(self, rows: torch.Tensor, out_features: int) -> torch.Tensor:
        """perm [out_features] of a producer's rows ([blocks, channels, k] in the coupling)."""
        perm = torch.arange(out_features)
        perm[rows.reshape(-1)] = rows.gather(1, self.local.unsqueeze(2).expand_as(rows)).reshape(-1)
        return perm


def layer_couplings(fam: Family, dims, pattern: Pattern) -> dict[str, Coupling]:
    """{consumer path: Coupling} for one decoder layer: the MLP, and attention when a head holds whole
    N:M groups (head_dim a multiple of M)."""
    out: dict[str, Coupling] = {}
    mlp_spec = fam.group("mlp")
    mlp = channel_map(fam, dims, "mlp")
    columns = mlp[mlp_spec.output][1].reshape(1, 1, -1)                             # [1, 1, intermediate]
    producers = tuple((p.path, mlp[p.path][1].unsqueeze(0)) for p in mlp_spec.projections)   # [1, I, k]
    if columns.shape[-1] % pattern.m == 0:
        out[mlp_spec.output] = Coupling(mlp_spec.output, columns, producers)
    d = dims.head_dim
    if d % pattern.m:
        return out
    attn_spec = fam.group("attention")
    attn = channel_map(fam, dims, "attention")
    units = attn[attn_spec.output][1].shape[0]
    columns = attn[attn_spec.output][1].reshape(units, dims.heads_per_kv_head, d)     # [kv heads, query heads each, d]
    producers = tuple((p.path, attn[p.path][1][:, -d:].unsqueeze(2))      # v rows: the last d of a unit's rows
                      for p in attn_spec.projections if p.layout in ("v", "qkv", "qkv_per_head"))
    if producers:
        out[attn_spec.output] = Coupling(attn_spec.output, columns, producers)
    return out


def model_couplings(model: nn.Module, pattern: Pattern) -> dict[str, Coupling]:
    return layer_couplings(spec_for(model), dims_of(model), pattern)


def prune_permuted(weight: torch.Tensor, stats: LinearStats, pattern: Pattern, coupling: Coupling,
                   prune: Callable[[torch.Tensor, LinearStats], tuple[torch.Tensor, torch.Tensor]]
                   ) -> tuple[torch.Tensor, torch.Tensor, ChannelPermutation | None]:
    """Prune the consumer `weight` [out, in] in its own order and in the best permuted order found; return
    (pruned, keep_mask) of the better one in the ORIGINAL column order, and its permutation (None: identity).

    `prune(weight, stats)` runs the method (and any refinement) and returns (pruned, keep_mask)."""
    rows, cols_in = weight.shape
    cols = coupling.columns
    blocks, replicas, channels = cols.shape
    score = weight.abs() * stats.input_sq_norm.to(weight.device).sqrt()              # [out, in]  Wanda
    # [out·replicas, blocks·channels]: a query head's columns are extra rows of its KV head's block.
    grouped = score[:, cols.reshape(-1).to(weight.device)].view(rows, blocks, replicas, channels)
    grouped = grouped.permute(0, 2, 1, 3).reshape(rows * replicas, blocks * channels)
    flat = nm_channel_permutation(grouped, pattern.n, pattern.m, blocks=channels).cpu()
    local = flat.view(blocks, channels) - (torch.arange(blocks) * channels).unsqueeze(1)
    plain, plain_keep = prune(weight.clone(), stats)
    if torch.equal(local, torch.arange(channels).expand(blocks, channels)):
        return plain, plain_keep, None
    permutation = ChannelPermutation(coupling, local)
    perm = permutation.consumer_columns(cols_in)
    moved_stats = permute_stats(stats, perm)
    moved, moved_keep = prune(weight[:, perm.to(weight.device)].clone(), moved_stats)
    hessian = stats.hessian.to(weight.device, torch.float32)
    plain_error = row_errors(weight, plain, hessian).sum()
    moved_error = row_errors(weight[:, perm.to(weight.device)], moved,
                             moved_stats.hessian.to(weight.device, torch.float32)).sum()
    if moved_error >= plain_error:
        return plain, plain_keep, None
    back = invert_permutation(perm).to(weight.device)
    return moved[:, back], moved_keep[:, back], permutation


def _permute_module(module: nn.Module, perm: torch.Tensor, dim: int, masks: MaskState) -> None:
    weight = weight_2d(module)                                     # [out, in] view
    weight.copy_(weight.index_select(dim, perm.to(weight.device)))
    bias = getattr(module, "bias", None)
    if dim == 0 and bias is not None:
        bias.data.copy_(bias.data.index_select(0, perm.to(bias.device)))
    mask = masks.get(module)
    if mask is not None:
        masks.masks[module] = mask.index_select(dim, perm.to(mask.device))


@torch.no_grad()
def apply_permutation(layer: nn.Module, permutation: ChannelPermutation, masks: MaskState) -> None:
    """Reorder the coupling's producer rows (weights, biases, keep-masks) and consumer columns in `layer`."""
    coupling = permutation.coupling
    for path, rows in coupling.producers:
        module = layer.get_submodule(path)
        _permute_module(module, permutation.producer_rows(rows, weight_2d(module).shape[0]), 0, masks)
    consumer = layer.get_submodule(coupling.consumer)
    _permute_module(consumer, permutation.consumer_columns(weight_2d(consumer).shape[1]), 1, masks)
