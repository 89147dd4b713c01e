"""SparseGPT (Frantar & Alistarh, 2023): OBS column sweep with lazy batch updates.

Reference semantics (IST-DASLab/sparsegpt `fasterprune`), kept exactly:
- dead inputs (diag H == 0): H_dd = 1 and W[:, d] = 0;
- dampening `dampening * mean(diag H)` on the diagonal; Hinv = upper Cholesky factor of H^-1;
- unstructured: the mask of each `block_size`-column block is chosen once at the block start from
  w^2 / [Hinv]_jj^2 over the whole block (all rows), so later blocks adapt to earlier updates;
- N:M: at every M-th column, the N lowest of w^2 / [Hinv]_jj^2 in the next M columns of each row;
- OBS update of the remaining columns with err = (w - q) / [Hinv]_jj, lazily once per block.

What is ours (same result, faster):
- the weight is swept in transposed layout `[in, out]` so each column update is a contiguous row;
- inside a block, columns are processed in sub-blocks with a second level of lazy updates (one GEMM
  per sub-block instead of rank-1 updates over the whole block). Lazy batching is exact, so the
  result equals the column-by-column reference up to float rounding;
- unstructured blocks prune an exact quota, so the matrix total is exactly round(rows*cols*s)
  (the reference thresholds with `<=` and overshoots by ties).
"""
from __future__ import annotations

import warnings
from typing import Annotated

import torch

from llmprune.errors import UserError
from llmprune.masks import Pattern, num_to_prune
from llmprune.methods import LinearStats, register
from llmprune.params import Range

SUB_BLOCK = 32  # columns per inner lazy-update step; a multiple of M is used for N:M


def inverse_cholesky_upper(hessian: torch.Tensor, dampening: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + λI)^-1 (so H^-1 = UᵀU), λ = dampening·mean(diag H).

    The reference computes chol -> cholesky_inverse -> chol(upper). With J the index reversal,
    J·H·J = L'L'ᵀ gives H^-1 = (J L'^-1 J)ᵀ (J L'^-1 J) and J L'^-1 J is upper triangular with a
    positive diagonal, i.e. exactly U: one Cholesky and one triangular inverse (~3x cheaper).
    Retries with 10x more damping; a matrix that stays indefinite falls back to the identity
    (magnitude-like pruning) with a warning, as llm-compressor does.
    """
    mean_diag = torch.mean(torch.diagonal(hessian))
    eye = torch.eye(hessian.shape[0], device=hessian.device, dtype=hessian.dtype)
    damp = dampening
    for _ in range(5):
        flipped_chol, info = torch.linalg.cholesky_ex((hessian + damp * mean_diag * eye).flip(0, 1))
        if int(info) == 0:
            return lower_triangular_inverse(flipped_chol).flip(0, 1), damp
        damp *= 10
    warnings.warn("SparseGPT: Hessian is not positive definite even with heavy dampening; using identity")
    return eye.clone(), float("inf")


def lower_triangular_inverse(lower: torch.Tensor, leaf: int = 512) -> torch.Tensor:
    """L^-1 for lower-triangular L [n, n], by halves: [[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]].

    A triangular solve against the identity does n^3 multiply-adds and ignores that the right-hand
    side is triangular; the recursion does about half of that, as GEMMs (1.6x faster at n=5632).
    """
    n = lower.shape[0]
    if n <= leaf:
        return torch.linalg.solve_triangular(lower, torch.eye(n, device=lower.device, dtype=lower.dtype), upper=False)
    half = n // 2
    a_inv = lower_triangular_inverse(lower[:half, :half], leaf)     # [h, h]
    c_inv = lower_triangular_inverse(lower[half:, half:], leaf)     # [n-h, n-h]
    out = torch.zeros_like(lower)
    out[:half, :half] = a_inv
    out[half:, half:] = c_inv
    out[half:, :half] = -(c_inv @ lower[half:, :half]) @ a_inv     # [n-h, h]
    return out


def inverse_factor(stats: LinearStats, device, dtype, dampening: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead) for these statistics: U the upper Cholesky factor of the damped H^-1 [in, in], dead
    the inputs that never fired [in]. Memoised on `stats`, so q/k/v (gate/up) compute it once."""
    key = ("sparsegpt.inverse_factor", str(device), dtype, dampening)
    if key not in stats.derived:
        hessian = (stats.hessian.to(device, dtype) / max(stats.n_tokens, 1)).clone()  # [in, in]
        dead = torch.diagonal(hessian) == 0
        hessian[dead, dead] = 1.0
        hinv, _ = inverse_cholesky_upper(hessian, dampening)
        stats.derived[key] = (hinv, dead)
    return stats.derived[key]


# True-sequential by default: the reference code offers it (`--true-sequential`), the per-linear
# reconstruction is as good (benchmarks/RESULTS.md), and it needs one forward per layer, not two.
def _check(pattern: Pattern, params: dict) -> str | None:
    block_size = params.get("block_size", 128)
    if pattern.is_nm and block_size % pattern.m:
        return f"block_size {block_size} must be a multiple of M={pattern.m} for {pattern}"
    return None


@register("sparsegpt", needs={"hessian"}, summary="OBS reconstruction: prune + update remaining weights (H = XᵀX)",
          true_sequential=True, check=_check)
def sparsegpt(weight: torch.Tensor, stats: LinearStats, pattern: Pattern, *,
              block_size: Annotated[int, Range(1)] = 128,
              dampening: Annotated[float, Range(0)] = 0.01) -> torch.Tensor:
    """Prune with the OBS update, 128-column blocks, dampening 0.01·mean(diag H)."""
    if (problem := _check(pattern, {"block_size": block_size})) is not None:
        raise UserError(f"sparsegpt: {problem}")
    rows, cols = weight.shape
    device = weight.device
    with _no_tf32():
        dtype = torch.promote_types(weight.dtype, torch.float32)   # float32, or float64 when given
        hinv, dead = inverse_factor(stats, device, dtype, dampening)   # [in, in] upper triangular, [in]
        w_t = weight.to(dtype).t().contiguous()                # [in, out]: row j of w_t is input column j
        w_t[dead] = 0.0

        sub = SUB_BLOCK if not pattern.is_nm else max(pattern.m, (SUB_BLOCK // pattern.m) * pattern.m)
        for b0 in range(0, cols, block_size):
            b1 = min(b0 + block_size, cols)
            block = w_t[b0:b1]                         # [B, out] view
            hinv_block = hinv[b0:b1, b0:b1]            # [B, B]
            d = torch.diagonal(hinv_block)             # [B]
            prune = torch.zeros_like(block, dtype=torch.bool)
            if not pattern.is_nm:
                quota = num_to_prune(rows * b1, pattern.sparsity) - num_to_prune(rows * b0, pattern.sparsity)
                if quota:
                    score = (block ** 2) / (d ** 2).unsqueeze(1)
                    prune.view(-1)[torch.topk(score.flatten(), quota, largest=False, sorted=False).indices] = True
            err_block = torch.zeros_like(block)        # [B, out]
            for s0 in range(0, b1 - b0, sub):
                s1 = min(s0 + sub, b1 - b0)
                for i in range(s0, s1):
                    if pattern.is_nm and i % pattern.m == 0:
                        score = (block[i:i + pattern.m] ** 2) / (d[i:i + pattern.m] ** 2).unsqueeze(1)  # [M, out]
                        drop = torch.topk(score, pattern.n, dim=0, largest=False).indices              # [N, out]
                        prune[i:i + pattern.m].scatter_(0, drop, True)
                    err = block[i] * prune[i] / d[i]   # [out]: (w - q)/d with q = w·keep
                    block[i:s1].addr_(hinv_block[i, i:s1], err, alpha=-1.0)   # in-block OBS update
                    err_block[i] = err
                if s1 < b1 - b0:                       # lazy update of the rest of this block
                    block[s1:] -= hinv_block[s0:s1, s1:].t() @ err_block[s0:s1]
            block[prune] = 0.0
            if b1 < cols:                              # lazy update of all later blocks
                w_t[b1:] -= hinv[b0:b1, b1:].t() @ err_block
    return w_t.t()


class _no_tf32:
    """TF32 off for the sweep (the reference disables it; errors compound over columns)."""

    def __enter__(self):
        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved
