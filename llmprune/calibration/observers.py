"""Forward hooks that accumulate per-linear input statistics during calibration.

Linears fed by the *same* input tensor (q/k/v; gate/up) share one `LinearStats`, so a layer's
Hessians cost one `XᵀX` per distinct input rather than one per linear.
"""
from __future__ import annotations

import torch
from torch import nn

from llmprune.methods import LinearStats


class LayerObserver:
    """Context manager: hooks `linears` ({name: module}) and fills `stats` ({name: LinearStats}).

    `needs` is a subset of {"input_sq_norm", "hessian"}; nothing else is computed.
    Call `new_batch()` before each forward so input sharing is detected per forward call.
    """

    def __init__(self, linears: dict[str, nn.Module], needs: frozenset[str] | set[str]):
        self.linears = linears
        self.needs = frozenset(needs)
        self.stats: dict[str, LinearStats] = {}
        self._handles: list = []
        self._seen: list[tuple[torch.Tensor, LinearStats]] = []   # inputs of this forward (kept alive)
        self._done: set[int] = set()                             # id(stats) accumulated this forward

    def __enter__(self) -> "LayerObserver":
        if self.needs:
            for name, module in self.linears.items():
                self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._seen.clear()

    def new_batch(self) -> None:
        self._seen.clear()
        self._done.clear()

    def _shared_stats(self, name: str, x: torch.Tensor) -> LinearStats:
        if name in self.stats:
            return self.stats[name]
        for seen_x, stats in self._seen:      # same tensor as another linear's input?
            if seen_x is x or (seen_x.data_ptr() == x.data_ptr() and seen_x.shape == x.shape
                               and seen_x.stride() == x.stride()):
                self.stats[name] = stats
                return stats
        self.stats[name] = LinearStats()
        return self.stats[name]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output) -> None:
            x = args[0].detach()
            stats = self._shared_stats(name, x)
            self._seen.append((x, stats))
            if id(stats) in self._done:
                return
            self._done.add(id(stats))
            x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)        # [tokens, in]
            stats.n_tokens += x2.shape[0]
            if "input_sq_norm" in self.needs:
                sq = (x2 * x2).sum(0)                                  # [in]
                stats.input_sq_norm = sq if stats.input_sq_norm is None else stats.input_sq_norm.add_(sq)
            if "hessian" in self.needs:
                if stats.hessian is None:
                    stats.hessian = torch.zeros(x2.shape[1], x2.shape[1], dtype=torch.float32, device=x2.device)
                stats.hessian.addmm_(x2.t(), x2)                       # [in, in] += XᵀX
        return hook

    def groups(self) -> int:
        return len({id(s) for s in self.stats.values()})
