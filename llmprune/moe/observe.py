"""Per-expert calibration statistics of an MoE layer, from the hidden states entering its MoE block.

For every expert e of a layer, over the calibration tokens the router sends to e:
frequency (routed token count), soft counts (Σ router probability over all tokens), routed mass
(Σ the weight the block multiplies e's output by), REAP's Σ ĝ·‖f_e(x)‖₂ (ĝ: gate renormalised over
the token's top-k, REAP's default), Σ‖f_e(x)‖₂, and -- for pruning inside experts -- `LinearStats` of
the inputs of e's gate_up projection (x) and down projection (act(gate x)·up x), computed from the 2-D
per-expert views. An expert that received no token keeps `n_tokens == 0` and `None` statistics
(`unseen_experts()` lists them), so no method can run on empty statistics by accident.

The caller either passes [tokens, H] tensors to `observe_block`, or uses `observing(model)` to hook
every MoE block during its own forwards.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from torch import nn

from llmprune.methods import LinearStats
from llmprune.moe.families import RouterConfig, family_for, moe_blocks, router_config
from llmprune.moe.routing import expert_forward, route_block

STAT_NEEDS = frozenset({"input_sq_norm", "hessian"})


@dataclass
class ExpertLayerStats:
    """Statistics of one MoE layer's experts over calibration tokens. Sums are float64."""
    num_experts: int
    needs: frozenset[str] = frozenset()       # which LinearStats fields to collect ({"input_sq_norm", "hessian"})
    n_tokens: int = 0                         # tokens that entered the block
    routed_count: torch.Tensor = None         # [E] int64  tokens routed to e (frequency)
    router_prob_sum: torch.Tensor = None      # [E] Σ over all tokens of e's softmax prob / sigmoid score
    routed_weight_sum: torch.Tensor = None    # [E] Σ over routed tokens of the weight applied to e's output
    reap_sum: torch.Tensor = None             # [E] Σ over routed tokens of ĝ_e(x)·‖f_e(x)‖₂
    output_norm_sum: torch.Tensor = None      # [E] Σ over routed tokens of ‖f_e(x)‖₂
    gate_up_inputs: list[LinearStats] = field(default_factory=list)   # per expert: inputs x        [H]
    down_inputs: list[LinearStats] = field(default_factory=list)      # per expert: act(gate)·up    [I]

    def __post_init__(self):
        zeros = lambda dtype: torch.zeros(self.num_experts, dtype=dtype)  # noqa: E731
        for name in ("router_prob_sum", "routed_weight_sum", "reap_sum", "output_norm_sum"):
            if getattr(self, name) is None:
                setattr(self, name, zeros(torch.float64))
        if self.routed_count is None:
            self.routed_count = zeros(torch.int64)
        if not self.gate_up_inputs:
            self.gate_up_inputs = [LinearStats() for _ in range(self.num_experts)]
            self.down_inputs = [LinearStats() for _ in range(self.num_experts)]

    # ---- derived scores ------------------------------------------------------------------------
    def unseen_experts(self) -> list[int]:
        return [e for e in range(self.num_experts) if int(self.routed_count[e]) == 0]

    def frequency(self) -> torch.Tensor:
        """[E] share of tokens routed to each expert (a token counts once per chosen expert)."""
        return self.routed_count.double() / max(self.n_tokens, 1)

    def routed_share(self) -> torch.Tensor:
        """[E] each expert's share of all routed (token, expert) pairs; sums to 1."""
        return self.routed_count.double() / self.routed_count.sum().clamp_min(1)

    def reap(self) -> torch.Tensor:
        """[E] REAP: mean over routed tokens of ĝ·‖f‖₂ (0 for an expert that received no token)."""
        return self.reap_sum / self.routed_count.double().clamp_min(1)

    def mean_output_norm(self) -> torch.Tensor:
        """[E] mean over routed tokens of ‖f‖₂ (MAN); 0 for an unseen expert."""
        return self.output_norm_sum / self.routed_count.double().clamp_min(1)


def new_layer_stats(num_experts: int, needs: Iterable[str] = ()) -> ExpertLayerStats:
    needs = frozenset(needs)
    if not needs <= STAT_NEEDS:
        raise ValueError(f"unknown statistics {sorted(needs - STAT_NEEDS)}; choose from {sorted(STAT_NEEDS)}")
    return ExpertLayerStats(num_experts=num_experts, needs=needs)


def _accumulate_inputs(stats: LinearStats, x: torch.Tensor, needs: frozenset[str]) -> None:
    """LinearStats += inputs x [t, in] (float32, the engine's convention: Σx², full Σxxᵀ)."""
    x = x.to(torch.float32)
    stats.n_tokens += x.shape[0]
    if "input_sq_norm" in needs:
        sq = (x * x).sum(0)                                              # [in]
        stats.input_sq_norm = sq if stats.input_sq_norm is None else stats.input_sq_norm.add_(sq)
    if "hessian" in needs:
        if stats.hessian is None:
            stats.hessian = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
        stats.hessian.addmm_(x.t(), x)                                   # [in, in] += xᵀx


@torch.no_grad()
def observe_block(stats: ExpertLayerStats, block: nn.Module, family: dict, rcfg: RouterConfig,
                  x: torch.Tensor) -> None:
    """Add the tokens x [T, H] entering `block` (one MoE layer) to `stats`."""
    x = x.reshape(-1, x.shape[-1])
    routing = route_block(block, family, rcfg, x)
    gate = routing.renormalized()                                        # [T, k] ĝ (REAP default)
    stats.n_tokens += x.shape[0]
    stats.router_prob_sum += routing.scores.double().sum(0).cpu()
    for expert in routing.indices.unique().tolist():
        token, slot = torch.where(routing.indices == expert)             # tokens routed to `expert`
        hidden, out = expert_forward(block, family, expert, x[token])    # [t, I], [t, H]
        norm = out.double().norm(dim=-1)                                 # [t] ‖f_e(x)‖₂
        stats.routed_count[expert] += token.numel()
        stats.routed_weight_sum[expert] += routing.weights[token, slot].double().sum().item()
        stats.reap_sum[expert] += (gate[token, slot].double() * norm).sum().item()
        stats.output_norm_sum[expert] += norm.sum().item()
        if stats.needs:
            _accumulate_inputs(stats.gate_up_inputs[expert], x[token], stats.needs)
            _accumulate_inputs(stats.down_inputs[expert], hidden, stats.needs)


# --------------------------------------------------------------------------------------------
# hooks


@contextmanager
def observing(model: nn.Module, needs: Iterable[str] = (),
              layers: Iterable[int] | None = None) -> Iterator[dict[int, ExpertLayerStats]]:
    """Within the block, every forward of `model` adds the hidden states entering each MoE block (of
    `layers`, default all) to the yielded {layer: ExpertLayerStats}. Batches should hold no padding."""
    family, rcfg = family_for(model), router_config(model)
    blocks = moe_blocks(model)
    wanted = blocks if layers is None else {i: blocks[i] for i in layers}
    stats = {i: new_layer_stats(rcfg.num_experts, needs) for i in wanted}

    def hook_for(index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            observe_block(stats[index], module, family, rcfg, args[0])
        return hook

    handles = [block.register_forward_pre_hook(hook_for(i)) for i, block in wanted.items()]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capturing_inputs(model: nn.Module, layers: Iterable[int] | None = None) -> Iterator[dict[int, list[torch.Tensor]]]:
    """Within the block, every forward of `model` appends the hidden states entering each MoE block
    ([tokens, H], detached) to the yielded {layer: [tensors]} (what the criteria take as calibration)."""
    blocks = moe_blocks(model)
    wanted = blocks if layers is None else {i: blocks[i] for i in layers}
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in wanted}

    def hook_for(index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            captured[index].append(args[0].detach().reshape(-1, args[0].shape[-1]))
        return hook

    handles = [block.register_forward_pre_hook(hook_for(i)) for i, block in wanted.items()]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def capture_moe_inputs(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[int, torch.Tensor]:
    """{MoE layer: [tokens, H]} the hidden states entering each MoE block over `batches` of input ids
    [B, S] (no padding), from one forward of the unedited model per batch."""
    with capturing_inputs(model) as captured:
        for input_ids in batches:
            model(input_ids=input_ids, use_cache=False)
    return {i: torch.cat(xs) for i, xs in captured.items()}
