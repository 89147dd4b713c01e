"""Sparsity patterns and mask primitives (flat tensor functions, shapes in comments).

Conventions: a weight is `[rows=out_features, cols=in_features]`; a *score* has the same shape
and larger means more important; a `keep_mask` is bool, True where the weight survives.
`N:M` means N zeros in every group of M consecutive input columns of each row (the reference
semantics of Wanda/SparseGPT: `topk(prune_n, largest=False)` per group of M).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llmprune.errors import UserError


@dataclass(frozen=True)
class Pattern:
    """Unstructured (`sparsity` in (0, 1)) or N:M (`n` zeros per `m` columns; sparsity = n/m)."""
    sparsity: float
    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.sparsity:g}"

    def with_sparsity(self, sparsity: float) -> "Pattern":
        if self.is_nm:
            raise ValueError("an N:M pattern has a fixed sparsity")
        return Pattern(sparsity=sparsity)


def parse_pattern(value) -> Pattern:
    """`0.5` / `"0.5"` -> unstructured; `"2:4"` -> N:M. Anything else is a UserError."""
    text = str(value).strip()
    if ":" in text:
        parts = text.split(":")
        try:
            n, m = (int(p) for p in parts)
        except ValueError:
            raise UserError(f"sparsity {text!r} is not N:M with integers (e.g. 2:4)") from None
        if len(parts) != 2 or not (0 < n < m):
            raise UserError(f"sparsity {text!r} is not valid N:M: need 0 < N < M (N zeros per M columns, e.g. 2:4)")
        return Pattern(sparsity=n / m, n=n, m=m)
    try:
        s = float(text)
    except ValueError:
        raise UserError(f"sparsity {text!r} is neither a fraction like 0.5 nor N:M like 2:4") from None
    if not (0.0 < s < 1.0) or math.isnan(s):
        raise UserError(f"sparsity {text} must be strictly between 0 and 1 (e.g. 0.5) or N:M (e.g. 2:4)")
    return Pattern(sparsity=s)


def num_to_prune(numel: int, sparsity: float) -> int:
    return int(round(numel * sparsity))


def rowwise_keep_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """score [rows, cols] -> keep_mask [rows, cols]: prune the lowest-scoring entries of each row.

    Each row prunes the same count (±1 so the matrix total is exact); the Wanda comparison group.
    """
    rows, cols = score.shape
    total = num_to_prune(rows * cols, sparsity)
    base, extra = divmod(total, rows)
    keep = torch.ones_like(score, dtype=torch.bool)
    if not extra:   # the common case (cols·s integral): an unsorted topk is all we need
        keep.scatter_(1, torch.topk(score, base, dim=1, largest=False, sorted=False).indices, False)
        return keep
    # Otherwise the remainder goes to the rows whose next candidate has the smallest score.
    low_values, low_index = torch.topk(score, min(base + 1, cols), dim=1, largest=False, sorted=True)
    keep.scatter_(1, low_index[:, :base], False)
    extra_rows = torch.topk(low_values[:, base], extra, largest=False).indices     # [extra]
    keep[extra_rows, low_index[extra_rows, base]] = False
    return keep


def global_keep_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """score [...] -> keep_mask [...]: prune exactly round(numel·s) lowest entries of the whole tensor."""
    k = num_to_prune(score.numel(), sparsity)
    keep = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
    if k:
        keep[torch.topk(score.flatten(), k, largest=False, sorted=False).indices] = False
    return keep.view_as(score)


def nm_keep_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """score [rows, cols] -> keep_mask: in each group of m consecutive columns, drop the n lowest.

    One vectorised topk over [rows, cols/m, m], no Python loop over groups.
    """
    rows, cols = score.shape
    if cols % m:
        raise UserError(f"a matrix with {cols} input columns cannot be {n}:{m} sparse ({cols} is not a multiple of {m})")
    nm_groups = score.reshape(rows, cols // m, m)             # [rows, groups, m]
    drop = torch.topk(nm_groups, n, dim=-1, largest=False).indices
    keep = torch.ones_like(nm_groups, dtype=torch.bool)
    keep.scatter_(-1, drop, False)
    return keep.reshape(rows, cols)


def keep_mask_for(score: torch.Tensor, pattern: Pattern, comparison: str = "row") -> torch.Tensor:
    """Dispatch: N:M groups, or unstructured compared per `row` or over the whole `matrix`."""
    if pattern.is_nm:
        return nm_keep_mask(score, pattern.n, pattern.m)
    if comparison == "row":
        return rowwise_keep_mask(score, pattern.sparsity)
    return global_keep_mask(score, pattern.sparsity)


def sparsity_of(weight: torch.Tensor) -> float:
    return float((weight == 0).sum().item()) / weight.numel()


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """Number of m-column groups (per row) with fewer than n zeros."""
    rows, cols = weight.shape
    zeros = (weight.reshape(rows, cols // m, m) == 0).sum(-1)
    return int((zeros < n).sum().item())
