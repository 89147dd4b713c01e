"""Per-linear input statistics, accumulated from the inputs the linears receive during calibration.

Linears fed by the *same* input tensor (q/k/v; gate/up) share one `LinearStats`, so a layer's
Hessians cost one `XᵀX` per distinct input rather than one per linear. `XᵀX` is symmetric, so only
its upper block triangle is accumulated (about half the flops of a full GEMM); `seal()` mirrors it
into the full matrix once all batches are in, before any method reads it.

Sums over calibration batches are taken in one fixed association order, a pairwise tree over the
batch indices (`PairwiseSum`), whatever process computed which batch: each batch's contribution is
computed on its own, so a run split over several processes (`llmprune.distributed`: every rank
observes its own batches, `seal` combines the ranks' subtrees) gives the same bits as one process.
Float sums in another order would differ in the last bits, and so would the pruned weights.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from llmprune.methods import LinearStats

GRAM_BLOCK = 512   # column block of the triangular XᵀX; big enough that each GEMM runs at full speed


class PairwiseSum:
    """Σ of per-batch values in a canonical order: the binary tree whose perfect subtrees are the aligned
    index blocks [k·2ʲ, (k+1)·2ʲ), the leftover blocks summed right to left at the end.

    Values arrive in index order (any contiguous range of indices); two adjacent blocks of the same size
    whose left one starts at a multiple of twice that size are merged at once (a binary counter), so at
    most log₂(n)+1 partial sums are alive. Any process that adds the same leaves, or that is handed the
    same blocks in order (`push`), forms every node from the same two children: the result is the same
    bits. Values are summed in place (the caller hands over ownership).
    """

    def __init__(self):
        self.blocks: list[tuple[int, int, torch.Tensor]] = []    # (start, size, value), ascending, contiguous

    def add(self, index: int, value: torch.Tensor) -> None:
        self.push(index, 1, value)

    def push(self, start: int, size: int, value: torch.Tensor) -> None:
        """Append the sum of indices [start, start + size): a leaf, or a block another process formed."""
        if self.blocks:
            last_start, last_size, _ = self.blocks[-1]
            if start != last_start + last_size:
                raise RuntimeError(f"pairwise sum: block at {start} after one ending at {last_start + last_size}")
        self.blocks.append((start, size, value))
        while len(self.blocks) >= 2:
            (a, n, left), (_, m, right) = self.blocks[-2], self.blocks[-1]
            if n != m or a % (2 * n):
                break
            self.blocks[-2:] = [(a, 2 * n, left.add_(right))]

    def total(self) -> torch.Tensor | None:
        """The root: the remaining blocks summed from the right (left + right at every node)."""
        if not self.blocks:
            return None
        value = self.blocks[-1][2]
        for _, _, left in reversed(self.blocks[:-1]):
            value = left.add_(value)
        self.blocks = []
        return value


class StopForward(Exception):
    """Raised from a hook (or the engine's input recorder) when the rest of a forward is not needed;
    whoever started that forward catches it."""


def accumulate_gram_upper(hessian: torch.Tensor, x: torch.Tensor) -> None:
    """hessian [in, in] += the upper block triangle (diagonal blocks whole) of xᵀx, x [tokens, in]."""
    cols = x.shape[1]
    for start in range(0, cols, GRAM_BLOCK):
        stop = min(start + GRAM_BLOCK, cols)
        hessian[start:stop, start:].addmm_(x[:, start:stop].t(), x[:, start:])


def mirror_upper(hessian: torch.Tensor) -> None:
    """Copy the strict upper block triangle onto the lower one (in place)."""
    cols = hessian.shape[0]
    for start in range(0, cols, GRAM_BLOCK):
        stop = min(start + GRAM_BLOCK, cols)
        hessian[stop:, start:stop] = hessian[start:stop, stop:].t()


class LayerObserver:
    """Statistics of the inputs of `linears` ({name: module}) over calibration batches.

    `needs` is a subset of {"input_sq_norm", "input_sum", "hessian"}; nothing else is computed.
    Batches are told apart by `start_batch(b)` (input sharing is detected within one batch's
    forward), so batches may also be interleaved, as in the engine's true-sequential lockstep.
    """

    def __init__(self, linears: dict[str, nn.Module], needs: frozenset[str] | set[str]):
        self.linears = linears
        self.needs = frozenset(needs)
        self.stats: dict[str, LinearStats] = {}
        self.batch = 0
        self._seen: dict[int, list[tuple[torch.Tensor, LinearStats]]] = {}  # per batch; keeps inputs alive
        self._done: dict[int, set[int]] = {}       # per batch: id(stats) already accumulated
        self._sealed: set[int] = set()             # id(stats) whose accumulation is finished
        self._sums: dict[int, dict[str, PairwiseSum]] = {}   # id(stats) -> statistic -> its batch sum
        self._calls = 0                            # hooked calls in the current batch
        self.calls_per_batch: int | None = None    # learned from the first complete batch

    # ---- batches -------------------------------------------------------------------------------
    def start_batch(self, batch: int) -> None:
        self.batch = batch
        self._seen.setdefault(batch, [])
        self._done.setdefault(batch, set())
        self._calls = 0

    def end_batch(self, batch: int) -> None:
        if self.calls_per_batch is None:
            self.calls_per_batch = self._calls
        self._seen.pop(batch, None)
        self._done.pop(batch, None)

    # ---- accumulation ----------------------------------------------------------------------------
    def observe(self, name: str, x: torch.Tensor) -> LinearStats:
        """Account for `x`, the input of linear `name` in the current batch; return its stats."""
        x = x.detach()
        stats = self._shared_stats(name, x)
        self._seen[self.batch].append((x, stats))
        done = self._done[self.batch]
        if id(stats) in done or id(stats) in self._sealed:
            return stats
        done.add(id(stats))
        x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)          # [tokens, in]
        stats.n_tokens += x2.shape[0]
        sums = self._sums.setdefault(id(stats), {key: PairwiseSum() for key in sorted(self.needs)})
        if "input_sq_norm" in self.needs:
            sums["input_sq_norm"].add(self.batch, (x2 * x2).sum(0))                  # [in]
        if "input_sum" in self.needs:
            sums["input_sum"].add(self.batch, x2.sum(0))                             # [in]
        if "hessian" in self.needs:
            gram = torch.zeros(x2.shape[1], x2.shape[1], dtype=torch.float32, device=x2.device)
            accumulate_gram_upper(gram, x2)                                           # [in, in] XᵀX (upper half)
            sums["hessian"].add(self.batch, gram)
        return stats

    def _shared_stats(self, name: str, x: torch.Tensor) -> LinearStats:
        if name in self.stats:
            return self.stats[name]
        for seen_x, stats in self._seen[self.batch]:      # same tensor as another linear's input?
            if seen_x is x or (seen_x.data_ptr() == x.data_ptr() and seen_x.shape == x.shape
                               and seen_x.stride() == x.stride()):
                self.stats[name] = stats
                return stats
        self.stats[name] = LinearStats()
        return self.stats[name]

    def seal(self, stats: LinearStats) -> None:
        """No more inputs for `stats`: sum the batches (over every process of a distributed run, in
        the canonical order) and complete the symmetric Hessian."""
        if id(stats) in self._sealed:
            return
        self._sealed.add(id(stats))
        from llmprune import distributed

        sums = self._sums.pop(id(stats), {})
        stats.n_tokens = distributed.sum_ints(stats.n_tokens)
        for key in sorted(self.needs):
            total = distributed.pairwise_total(sums[key]) if key in sums else distributed.pairwise_total(PairwiseSum())
            setattr(stats, key, total)
        if stats.hessian is not None:
            mirror_upper(stats.hessian)

    def is_sealed(self, stats: LinearStats) -> bool:
        return id(stats) in self._sealed

    def seal_all(self) -> None:
        for stats in self.stats.values():
            self.seal(stats)

    def groups(self) -> int:
        return len({id(s) for s in self.stats.values()})

    # ---- hooks (the two-pass schedule) -----------------------------------------------------------
    @contextmanager
    def hooked(self, stop_early: bool = False):
        """Forward pre-hooks on every linear that call `observe`. With `stop_early`, once the first
        batch has shown how many hooked calls a forward makes, later batches raise `StopForward`
        right after the last one: the rest of the layer (e.g. down_proj's GEMM) feeds no statistic."""
        def hook_for(name: str):
            def hook(module: nn.Module, args: tuple) -> None:
                self._calls += 1
                self.observe(name, args[0])
                if stop_early and self._calls == self.calls_per_batch:
                    raise StopForward
            return hook

        handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in self.linears.items()] if self.needs else []
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
