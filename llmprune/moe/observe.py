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

For the prune stage (Wanda / SparseGPT / magnitude inside experts), `LayerMatrixObserver` extends the
engine's `LayerObserver` to a decoder layer's `arch.Matrix` targets: every linear (and a targeted router)
is observed as before, every fused experts module is one calibration point (`ExpertsPoint`) whose
statistics come from the routing the model itself computed on the batch.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from torch import nn

from llmprune.arch import Matrix
from llmprune.calibration.observers import LayerObserver, accumulate_gram_upper, mirror_upper
from llmprune.methods import LinearStats
from llmprune.moe.families import RouterConfig, family_for, moe_blocks, router_config
from llmprune.moe.routing import expert_forward, expert_hidden, route_block

STAT_NEEDS = frozenset({"input_sq_norm", "input_sum", "hessian"})


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


def _accumulate_inputs(stats: LinearStats, x: torch.Tensor, needs: frozenset[str], upper: bool = False) -> None:
    """LinearStats += inputs x [t, in] (float32, the engine's convention: Σx², Σx, Σxxᵀ). With `upper`,
    only the upper block triangle of Σxxᵀ (as `LayerObserver`; `mirror_upper` completes it)."""
    x = x.to(torch.float32)
    stats.n_tokens += x.shape[0]
    if "input_sq_norm" in needs:
        sq = (x * x).sum(0)                                              # [in]
        stats.input_sq_norm = sq if stats.input_sq_norm is None else stats.input_sq_norm.add_(sq)
    if "input_sum" in needs:
        total = x.sum(0)                                                 # [in]
        stats.input_sum = total if stats.input_sum is None else stats.input_sum.add_(total)
    if "hessian" in needs:
        if stats.hessian is None:
            stats.hessian = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
        if upper:
            accumulate_gram_upper(stats.hessian, x)                      # [in, in] += xᵀx (upper half)
        else:
            stats.hessian.addmm_(x.t(), x)                               # [in, in] += xᵀx


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


def _wanted_blocks(model: nn.Module, layers: Iterable[int] | None) -> dict[int, nn.Module]:
    blocks = moe_blocks(model)
    return blocks if layers is None else {i: blocks[i] for i in layers}


@contextmanager
def _block_input_hooks(blocks: dict[int, nn.Module], on_input) -> Iterator[None]:
    """Within the block, `on_input(layer, module, hidden_states)` sees what enters each of `blocks`."""
    def hook_for(index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            on_input(index, module, args[0])
        return hook

    handles = [block.register_forward_pre_hook(hook_for(i)) for i, block in blocks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def observing(model: nn.Module, needs: Iterable[str] = (),
              layers: Iterable[int] | None = None) -> Iterator[dict[int, ExpertLayerStats]]:
    """Within the block, every forward of `model` adds the hidden states entering each MoE block (of
    `layers`, default all) to the yielded {layer: ExpertLayerStats}. Batches should hold no padding."""
    family, rcfg = family_for(model), router_config(model)
    wanted = _wanted_blocks(model, layers)
    stats = {i: new_layer_stats(rcfg.num_experts, needs) for i in wanted}
    with _block_input_hooks(wanted, lambda i, module, hidden: observe_block(stats[i], module, family, rcfg, hidden)):
        yield stats


@contextmanager
def capturing_inputs(model: nn.Module, layers: Iterable[int] | None = None) -> Iterator[dict[int, list[torch.Tensor]]]:
    """Within the block, every forward of `model` appends the hidden states entering each MoE block
    ([tokens, H], detached) to the yielded {layer: [tensors]} (what the criteria take as calibration)."""
    wanted = _wanted_blocks(model, layers)
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in wanted}
    with _block_input_hooks(wanted, lambda i, module, hidden: captured[i].append(
            hidden.detach().reshape(-1, hidden.shape[-1]))):
        yield captured


@torch.no_grad()
def capture_moe_inputs(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[int, torch.Tensor]:
    """{MoE layer: [tokens, H]} the hidden states entering each MoE block over `batches` of input ids
    [B, S] (no padding), from one forward of the unedited model per batch."""
    with capturing_inputs(model) as captured:
        for input_ids in batches:
            model(input_ids=input_ids, use_cache=False)
    return {i: torch.cat(xs) for i, xs in captured.items()}


# --------------------------------------------------------------------------------------------
# the prune stage: fused experts as calibration points


def _routed_tokens(indices: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(expert, token indices routed to it) for top-k indices [T, k], experts ascending."""
    flat = indices.reshape(-1)
    order = flat.argsort(stable=True)
    experts, counts = torch.unique_consecutive(flat[order], return_counts=True)
    tokens = order // indices.shape[-1]
    for expert, chunk in zip(experts.tolist(), tokens.split(counts.tolist())):
        yield expert, chunk


class ExpertsPoint:
    """One MoE layer's fused experts module as a calibration point of the prune stage.

    A forward pre-hook records the routing the model computed for the call (the experts module's
    `top_k_index` argument [T, k]); `observe` then adds the tokens routed to each expert to the statistics
    of that expert's gate_up slice. The down slice's input is h = act(gate x)·up x of the same tokens:
    two-pass, it is computed right away from the unpruned gate_up; true-sequential (`keep_inputs`), the
    inputs wait until every batch has arrived, the caller prunes every gate_up slice, and only then is h
    computed, from the pruned gate_up (`matrix_stats`), as SparseGPT's true-sequential order asks.
    An expert that received no token has `n_tokens == 0`: `matrix_stats` yields None for it.
    """

    def __init__(self, name: str, experts: nn.Module, family: dict, matrices: dict[str, Matrix],
                 needs: Iterable[str], keep_inputs: bool):
        self.name, self.experts, self.family = name, experts, family
        self.matrices = matrices                       # the selected slices of this module, by name
        self.needs = frozenset(needs)
        self.keep_inputs = keep_inputs
        count = getattr(experts, family["gate_up_proj"]).shape[0]
        self.gate_up_stats = [LinearStats() for _ in range(count)]
        self.down_stats = [LinearStats() for _ in range(count)]
        wanted = {(m.param, m.expert) for m in matrices.values()}
        self.wants_gate_up = {e for e in range(count) if (family["gate_up_proj"], e) in wanted}
        self.wants_down = {e for e in range(count) if (family["down_proj"], e) in wanted}
        self.inputs: list[tuple[torch.Tensor, torch.Tensor]] = []   # keep_inputs: (x [T, H], indices [T, k])
        self.sealed = False
        self._indices: torch.Tensor | None = None
        self._mirrored: set[int] = set()

    # ---- observation ---------------------------------------------------------------------------
    def record_routing(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._indices = args[1] if len(args) > 1 else kwargs["top_k_index"]

    def observe(self, x: torch.Tensor) -> None:
        """Add the call's inputs x [T, H] (routing recorded by the pre-hook that ran just before)."""
        indices, self._indices = self._indices, None
        if indices is None:
            raise RuntimeError(f"{self.name} was called without the routing hook attached")
        x = x.detach().reshape(-1, x.shape[-1])
        indices = indices.detach().reshape(x.shape[0], -1)
        for expert, token in _routed_tokens(indices):
            if expert in self.wants_gate_up:
                _accumulate_inputs(self.gate_up_stats[expert], x[token], self.needs, upper=True)
            if expert in self.wants_down and not self.keep_inputs:
                with torch.no_grad():
                    hidden = expert_hidden(self.experts, self.family, expert, x[token])      # [t, I]
                _accumulate_inputs(self.down_stats[expert], hidden, self.needs, upper=True)
        if self.keep_inputs:
            self.inputs.append((x, indices))

    @torch.no_grad()
    def _down_from_inputs(self) -> None:
        """h from the current (pruned) gate_up slices, for every kept batch."""
        for x, indices in self.inputs:
            for expert, token in _routed_tokens(indices):
                if expert in self.wants_down:
                    hidden = expert_hidden(self.experts, self.family, expert, x[token])
                    _accumulate_inputs(self.down_stats[expert], hidden, self.needs, upper=True)
        self.inputs = []

    def _sealed(self, stats: LinearStats) -> LinearStats | None:
        """The statistics with the Hessian's lower triangle completed (once), or None without tokens."""
        if stats.n_tokens == 0:
            return None
        if stats.hessian is not None and id(stats) not in self._mirrored:
            mirror_upper(stats.hessian)
            self._mirrored.add(id(stats))
        return stats

    def matrix_stats(self) -> Iterator[tuple[str, LinearStats | None]]:
        """(matrix name, its statistics, or None for an expert that received no calibration token):
        every gate_up slice first; the down slices' statistics are completed when the generator resumes
        after the last gate_up slice, i.e. after the caller pruned them (true-sequential)."""
        gate_up, down = self.family["gate_up_proj"], self.family["down_proj"]
        for name, matrix in self.matrices.items():
            if matrix.param == gate_up:
                yield name, self._sealed(self.gate_up_stats[matrix.expert])
        if self.keep_inputs:
            self._down_from_inputs()
        for name, matrix in self.matrices.items():
            if matrix.param == down:
                yield name, self._sealed(self.down_stats[matrix.expert])


class LayerMatrixObserver(LayerObserver):
    """`LayerObserver` over a decoder layer's `arch.Matrix` targets: a matrix held alone by its module
    (a linear, a targeted router) is observed exactly as `LayerObserver` does; the expert slices of one
    fused experts module form one point (`ExpertsPoint`), hooked on that module. `linears` maps point
    names to the hooked modules, as the engine's schedules expect; `matrix_stats(point, stats)` turns
    what a point collected into per-matrix statistics. Use inside `attached()`."""

    def __init__(self, matrices: dict[str, Matrix], needs: Iterable[str], true_sequential: bool = False,
                 family: dict | None = None):
        singles = {name: m.module for name, m in matrices.items() if m.expert is None}
        grouped: dict[nn.Module, dict[str, Matrix]] = {}
        for name, m in matrices.items():
            if m.expert is not None:
                grouped.setdefault(m.module, {})[name] = m
        self.points: dict[str, ExpertsPoint] = {}
        for module, slices in grouped.items():
            point = next(iter(slices)).rsplit(".", 1)[0]             # "model.layers.3.mlp.experts"
            self.points[point] = ExpertsPoint(point, module, family, slices, needs, keep_inputs=true_sequential)
        super().__init__({**singles, **{name: p.experts for name, p in self.points.items()}}, needs)

    @contextmanager
    def attached(self):
        """Routing-recording pre-hooks on the experts modules (ahead of any other hook on them)."""
        handles = [p.experts.register_forward_pre_hook(p.record_routing, prepend=True, with_kwargs=True)
                   for p in self.points.values()]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def observe(self, name: str, x: torch.Tensor):
        point = self.points.get(name)
        if point is None:
            return super().observe(name, x)
        point.observe(x)
        self.stats[name] = point
        return point

    def seal(self, stats) -> None:
        if isinstance(stats, ExpertsPoint):
            stats.sealed = True
        else:
            super().seal(stats)

    def is_sealed(self, stats) -> bool:
        return stats.sealed if isinstance(stats, ExpertsPoint) else super().is_sealed(stats)

    def matrix_stats(self, point: str, stats) -> Iterator[tuple[str, LinearStats | None]]:
        """(matrix name, statistics) of every matrix of `point`, in the order they should be pruned."""
        if point in self.points:
            yield from self.points[point].matrix_stats()
        else:
            yield point, stats
