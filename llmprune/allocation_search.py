"""Measured sparsity allocation: per-unit sparsities whose weighted mean is the target, chosen by cost.

A *unit* is what gets one sparsity (a decoder layer, or a module type within a layer); its weight is its
parameter count. Levels live on a grid around the target, level(k) = target + k·step for integer
offsets k in [−max_offset, max_offset] (clipped to the open interval (0, 1)), so an assignment is a
list of integer offsets and its weighted mean is exactly the target iff Σ_u w_u·k_u = 0 — checked in
integers (weights are divided by their gcd), never in floats.

- `allocate_from_curves`: given each unit's measured cost at every level (e.g. the layer's relative
  reconstruction error, or the calibration-loss increase when only that unit is pruned), the offsets
  with Σ w·k = 0 that minimise the summed cost, by dynamic programming over the weighted offset sum.
  Uniform (all k = 0) is feasible, so the predicted cost is never above uniform's.
- `evolutionary_search`: EvoPress (Sieberling et al. 2024): a (1 + λ) evolutionary search over offset
  assignments scored by a callback `loss(offsets) -> float` (e.g. calibration loss of the model pruned
  with them). Offspring are the parent plus a few "level switch" mutations that move sparsity from one
  unit to another with Σ w·k unchanged; selection is multi-step (a cheap `screen` loss picks
  `survivors` that the full `loss` decides between); the parent survives unless an offspring is at
  least as good. The start is the best of uniform and any given candidates under `loss`, so the result
  is never worse than uniform on `loss`.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from functools import reduce
from typing import Callable, Sequence

import torch

from llmprune.arch import weight_2d
from llmprune.errors import UserError
from llmprune.masks import Pattern

MAX_DP_STATES = 2_000_000


@dataclass(frozen=True)
class LevelGrid:
    """Sparsity levels target + k·step, k = −max_offset..max_offset, each within (0, 1)."""
    target: float
    step: float
    max_offset: int

    def __post_init__(self):
        if not (0 < self.target < 1) or self.step <= 0 or self.max_offset < 0:
            raise UserError("allocation search: need 0 < target < 1, step > 0 and max_offset >= 0")

    def offsets(self) -> list[int]:
        """The usable offsets, ascending (levels must stay strictly between 0 and 1)."""
        return [k for k in range(-self.max_offset, self.max_offset + 1) if 0.0 < self.level(k) < 1.0]

    def level(self, offset: int) -> float:
        return self.target + offset * self.step

    def sparsities(self, offsets: Sequence[int]) -> list[float]:
        """The per-unit sparsities of an assignment of offsets."""
        return [self.level(k) for k in offsets]


def integer_weights(weights: Sequence[int]) -> list[int]:
    """Parameter counts divided by their gcd (Σ w·k = 0 is then solved over small integers)."""
    ints = [int(w) for w in weights]
    if not ints or any(w <= 0 for w in ints):
        raise UserError("allocation search: every unit needs a positive parameter count")
    g = reduce(math.gcd, ints)
    return [w // g for w in ints]


def weighted_mean(grid: LevelGrid, offsets: Sequence[int], weights: Sequence[int]) -> float:
    total = sum(weights)
    return sum(w * grid.level(k) for w, k in zip(weights, offsets)) / total


def allocate_from_curves(costs: Sequence[Sequence[float]], grid: LevelGrid, weights: Sequence[int]) -> list[int]:
    """Offsets (one per unit) with Σ w_u·k_u = 0 minimising Σ_u costs[u][index of k_u in grid.offsets()].

    costs[u] has one entry per `grid.offsets()` (the measured curve of unit u). Ties prefer the
    offset closer to 0. Exact DP over the weighted offset sum; raises a UserError if the state space
    would exceed MAX_DP_STATES (use a coarser grid or per-layer units).
    """
    offsets = grid.offsets()
    if len(costs) != len(weights):
        raise UserError(f"allocation search: {len(costs)} cost curves for {len(weights)} units")
    for u, curve in enumerate(costs):
        if len(curve) != len(offsets):
            raise UserError(f"allocation search: unit {u} has {len(curve)} costs for {len(offsets)} levels")
    w = integer_weights(weights)
    lo_k, hi_k = offsets[0], offsets[-1]
    span_lo, span_hi = sum(wi * lo_k for wi in w), sum(wi * hi_k for wi in w)
    states = span_hi - span_lo + 1
    if states * len(offsets) > MAX_DP_STATES:
        raise UserError(f"allocation search: {states} offset sums x {len(offsets)} levels is too large for the "
                        f"exact search; use fewer levels (max_offset) or units of more equal size")
    # cost[s] = (summed cost, Σ|k| tie-break) of the best partial assignment with weighted offset sum s;
    # back[u][t] = (s, k): how unit u reached t. Sums that the remaining units cannot bring back to 0
    # are dropped.
    cost: dict[int, tuple[float, int]] = {0: (0.0, 0)}
    back: list[dict[int, tuple[int, int]]] = []
    for u, (wi, curve) in enumerate(zip(w, costs)):
        rest_lo = sum(wj * lo_k for wj in w[u + 1:])
        rest_hi = sum(wj * hi_k for wj in w[u + 1:])
        nxt: dict[int, tuple[float, int]] = {}
        step: dict[int, tuple[int, int]] = {}
        for s, (c, tie) in cost.items():
            for k, unit_cost in zip(offsets, curve):
                t = s + wi * k
                if not (-rest_hi <= t <= -rest_lo):
                    continue
                cand = (c + float(unit_cost), tie + abs(k))
                if t not in nxt or cand < nxt[t]:
                    nxt[t], step[t] = cand, (s, k)
        cost = nxt
        back.append(step)
    if 0 not in cost:
        raise UserError("allocation search: no assignment on this grid has the target mean")
    chosen, t = [], 0
    for step in reversed(back):
        t, k = step[t]
        chosen.append(k)
    return chosen[::-1]


@dataclass
class SearchResult:
    offsets: list[int]
    loss: float
    uniform_loss: float
    evaluations: int
    history: list[float] = field(default_factory=list)     # parent loss after each generation


def _mutate(parent: Sequence[int], w: Sequence[int], allowed: tuple[int, int], switches: int,
            rng: random.Random) -> list[int]:
    """`switches` level switches: unit i goes up by w_j/g steps, unit j down by w_i/g (Σ w·k unchanged)."""
    child = list(parent)
    lo, hi = allowed
    units = len(child)
    for _ in range(switches * 10):            # a bounded number of tries: some moves leave the grid
        if switches == 0:
            break
        i, j = rng.sample(range(units), 2)
        g = math.gcd(w[i], w[j])
        up, down = w[j] // g, w[i] // g
        if child[i] + up <= hi and child[j] - down >= lo:
            child[i] += up
            child[j] -= down
            switches -= 1
    return child


def evolutionary_search(loss: Callable[[list[int]], float], grid: LevelGrid, weights: Sequence[int], *,
                        generations: int = 50, offspring: int = 16, survivors: int = 4, max_switches: int = 3,
                        screen: Callable[[list[int]], float] | None = None,
                        starts: Sequence[Sequence[int]] = (), seed: int = 0,
                        patience: int | None = None) -> SearchResult:
    """EvoPress-style (1 + λ) search over offsets with Σ w·k = 0; never returns worse than uniform on `loss`.

    loss / screen: callables on a list of offsets (one per unit). Without `screen`, every offspring is
    scored by `loss`. `starts`: extra candidate starting points (e.g. `allocate_from_curves`' answer);
    ones that do not keep the mean are rejected. `patience`: stop after that many generations without
    improvement (default: never before `generations`).
    """
    w = integer_weights(weights)
    units = len(w)
    offsets = grid.offsets()
    allowed = (offsets[0], offsets[-1])
    if offspring < 1 or survivors < 1 or max_switches < 1 or generations < 0:
        raise UserError("allocation search: generations >= 0, offspring, survivors and max_switches >= 1")
    cache: dict[tuple, float] = {}

    def full(candidate: Sequence[int]) -> float:
        key = tuple(candidate)
        if key not in cache:
            cache[key] = float(loss(list(candidate)))
        return cache[key]

    uniform = [0] * units
    uniform_loss = full(uniform)
    parent, parent_loss = uniform, uniform_loss
    for start in starts:
        start = [int(k) for k in start]
        if len(start) != units or sum(wi * k for wi, k in zip(w, start)) != 0 \
                or not all(allowed[0] <= k <= allowed[1] for k in start):
            raise UserError("allocation search: a starting assignment does not keep the target mean on this grid")
        if full(start) < parent_loss:
            parent, parent_loss = start, full(start)

    rng = random.Random(seed)
    history = [parent_loss]
    stale = 0
    for _ in range(generations if units > 1 else 0):
        children = []
        for _ in range(offspring):
            child = _mutate(parent, w, allowed, rng.randint(1, max_switches), rng)
            if child != parent:
                children.append(child)
        if not children:
            break
        if screen is not None and len(children) > survivors:
            scored = sorted(children, key=lambda c: float(screen(list(c))))
            children = scored[:survivors]
        best_child = min(children, key=full)
        if full(best_child) <= parent_loss:
            improved = full(best_child) < parent_loss
            parent, parent_loss = best_child, full(best_child)
            stale = 0 if improved else stale + 1
        else:
            stale += 1
        history.append(parent_loss)
        if patience is not None and stale >= patience:
            break
    return SearchResult(offsets=list(parent), loss=parent_loss, uniform_loss=uniform_loss,
                        evaluations=len(cache), history=history)


# ---- `allocation: search` in a prune stage ------------------------------------------------------------
#
# 1. pass A: the stage's per-layer loop at the uniform target (calibrated on the uniform-pruned model's
#    activations, as any run), where every targeted linear is also pruned at each other level of the grid
#    from the same statistics: a database of variants (`AllocationSearch.collect`). The uniform model's
#    calibration loss is the baseline. Each layer goes back to its dense weights once its outputs are
#    propagated, so the model is dense again after the pass.
# 2. curves: on a subset of the calibration windows, from the uniform model, the calibration loss when one
#    unit alone moves to each other level, measured through all the remaining (pruned) layers and the head;
# 3. `allocate_from_curves` (exact DP, mean exactly the target), then `evolutionary_search` on the composed
#    models' subset loss, started from the better of uniform and the DP answer;
# 4. pass B (by the caller): the stage's loop at the chosen levels; the final model's calibration loss on
#    all windows is compared with pass A's and the uniform model is installed from the database when the
#    search's is not lower.


@dataclass(frozen=True)
class SearchUnit:
    """What gets one sparsity level: a decoder layer's targeted linears, or one linear."""
    name: str                       # "model.layers.3" or "model.layers.3.mlp.down_proj"
    layer: int                      # decoder layer index
    linears: tuple[str, ...]        # full module names
    parameters: int


def search_units(linear_sizes: dict[str, int], layers_path: str, granularity: str) -> list[SearchUnit]:
    """Units in layer order: one per decoder layer (`layer`) or one per targeted linear (`module`)."""
    by_layer: dict[int, list[str]] = {}
    for name in linear_sizes:
        by_layer.setdefault(int(name[len(layers_path) + 1:].split(".", 1)[0]), []).append(name)
    units: list[SearchUnit] = []
    for index in sorted(by_layer):
        names = by_layer[index]
        if granularity == "layer":
            units.append(SearchUnit(f"{layers_path}.{index}", index, tuple(names),
                                    sum(linear_sizes[n] for n in names)))
        else:
            units += [SearchUnit(n, index, (n,), linear_sizes[n]) for n in names]
    return units


@dataclass
class SearchOutcome:
    offsets: list[int]                  # chosen, per unit (all 0: uniform)
    curve_offsets: list[int]            # the DP answer on the measured curves
    uniform_loss: float                 # calibration loss on the scoring subset (nats/token)
    curve_loss: float
    loss: float
    evaluations: int
    seconds: float


class AllocationSearch:
    """The database of pruned variants of every targeted linear at every level, and the measurements on it.

    Memory: per targeted linear, its dense weight and one pruned copy per level (in the model's dtype) plus
    a bool keep-mask per level, on `offload` (CPU) for the whole stage: about (2·max_offset + 2) copies of
    the targeted weights.
    """

    def __init__(self, model, linears: dict, units: list[SearchUnit], grid: LevelGrid, earlier_masks,
                 prune_at: Callable, offload: str = "cpu"):
        self.model, self.linears, self.units, self.grid = model, linears, units, grid
        self.levels = grid.offsets()
        self.earlier_masks = earlier_masks          # MaskState of the stages before this one (read only)
        self.prune_at = prune_at                    # (dense float32 [out, in], stats, Pattern) -> (pruned, keep)
        self.offload = offload
        self.dense: dict[str, torch.Tensor] = {}
        self.variants: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._to_restore: list[str] = []

    # -- pass A ---------------------------------------------------------------------------------------
    def collect(self, name: str, module, stats, dense: torch.Tensor, keep: torch.Tensor) -> None:
        """`module` was just pruned at the uniform level (keep: its keep-mask); prune the other levels too."""
        stored = weight_2d(module)
        self.dense[name] = dense.detach().to(self.offload, stored.dtype, copy=True)
        self.variants[name] = {0: (stored.detach().to(self.offload, copy=True), keep.detach().to(self.offload, copy=True))}
        earlier = self.earlier_masks.get(module)
        for k in self.levels:
            if k == 0:
                continue
            pruned, level_keep = self.prune_at(dense, stats, Pattern(sparsity=self.grid.level(k)))
            level_keep = level_keep.to(torch.bool)
            if earlier is not None:
                level_keep = level_keep & earlier.to(level_keep.device)
            self.variants[name][k] = ((pruned * level_keep).to(self.offload, stored.dtype), level_keep.to(self.offload))
        self._to_restore.append(name)

    def restore_collected(self) -> None:
        """Dense weights back into the linears collected so far (after their layer's outputs were propagated)."""
        for name in self._to_restore:
            self._install(name, None)
        self._to_restore = []

    # -- composing models -----------------------------------------------------------------------------
    def _install(self, name: str, offset: int | None) -> None:
        weight = self.dense[name] if offset is None else self.variants[name][offset][0]
        weight_2d(self.linears[name]).copy_(weight)

    def install(self, offsets: Sequence[int | None]) -> None:
        """Every unit's linears at its offset's variant (None: dense)."""
        for unit, k in zip(self.units, offsets):
            for name in unit.linears:
                self._install(name, k)

    def write_final(self, offsets: Sequence[int], masks) -> dict[str, float]:
        """Install the variants of `offsets` as the stage's result: weights and keep-masks (which already hold
        the earlier stages' masks). Returns {linear name: sparsity level}."""
        levels = {}
        for unit, k in zip(self.units, offsets):
            for name in unit.linears:
                module = self.linears[name]
                self._install(name, k)
                masks.masks[module] = self.variants[name][k][1].cpu()
                masks.targets[module] = round(self.grid.level(k), 6)
                levels[name] = self.grid.level(k)
        return levels

    # -- measuring --------------------------------------------------------------------------------------
    def choose(self, hidden: list[torch.Tensor], calls: list, input_ids: list[torch.Tensor], device: str, *,
               generations: int, seed: int = 0) -> SearchOutcome:
        """Curves, DP and evolutionary search on the scoring subset (`hidden`: its layer-0 inputs per batch,
        `calls`: per batch per layer, `input_ids`: per batch). Leaves the model dense."""
        from llmprune.arch import decoder_layers
        from llmprune.calibration.loss import forward_layers, head_loss

        t0 = time.perf_counter()
        n_layers = len(decoder_layers(self.model))
        evaluations = 0

        def loss_from(start: int, states: list[torch.Tensor], batches: int | None = None) -> float:
            nonlocal evaluations
            evaluations += 1
            b = len(states) if batches is None else batches
            outputs = forward_layers(self.model, states[:b], calls[:b], start, n_layers, device, self.offload)
            return head_loss(self.model, input_ids[:b], outputs)

        weights = [u.parameters for u in self.units]
        uniform = [0] * len(self.units)
        self.install(uniform)
        base = loss_from(0, hidden)
        curves = [[base if k == 0 else math.nan for k in self.levels] for _ in self.units]
        states = hidden
        last_layer = max(u.layer for u in self.units)
        for layer in range(last_layer + 1):
            for u, unit in enumerate(self.units):
                if unit.layer != layer:
                    continue
                for j, k in enumerate(self.levels):
                    if k != 0:
                        self.install([k if v == u else 0 for v in range(len(self.units))])
                        curves[u][j] = loss_from(layer, states)
                self.install(uniform)
            if layer < last_layer:
                states = forward_layers(self.model, states, calls, layer, layer + 1, device, self.offload)
        curve_offsets = allocate_from_curves(curves, self.grid, weights)

        measured = {tuple(uniform): base}

        def full(offsets: list[int]) -> float:
            if tuple(offsets) not in measured:
                self.install(offsets)
                measured[tuple(offsets)] = loss_from(0, hidden)
            return measured[tuple(offsets)]

        def screen(offsets: list[int]) -> float:          # multi-step selection: the first batch only
            self.install(offsets)
            return loss_from(0, hidden, batches=1)

        result = evolutionary_search(full, self.grid, weights, generations=generations, offspring=8, survivors=2,
                                     max_switches=2, screen=screen if len(hidden) > 1 else None,
                                     starts=[curve_offsets] if any(curve_offsets) else [], seed=seed, patience=3)
        curve_loss = full(curve_offsets)
        self.install([None] * len(self.units))
        return SearchOutcome(offsets=result.offsets, curve_offsets=curve_offsets, uniform_loss=base,
                             curve_loss=curve_loss, loss=result.loss, evaluations=evaluations,
                             seconds=time.perf_counter() - t0)
