"""ALPS (Meng, Behdin, Wang, Mazumder 2024, arXiv 2406.07831): layer reconstruction by ADMM, then a PCG refit.

Per linear, min ‖W X − Ŵ X‖² subject to the sparsity pattern, i.e. min tr((Ŵ − W) H (Ŵ − W)ᵀ), by ADMM
on the split Ŵ = D (D in the pattern) with a penalty ρ that grows as the support settles; mask and
weights are found together. Then the kept weights are refit on the fixed mask by CG (`refit.py`).

Reference semantics (mazumder-lab/ALPS `ALPS_admm`), kept:
- H is damped by 0.01·mean(diag H) and normalised to unit diagonal: H̃ = S⁻¹HS⁻¹, W̃ = W S with
  S = diag(H)^½, so magnitudes of W̃ are Wanda-like scores |W|·‖X_j‖ and ρ is relative to diag(H̃) = 1;
- D starts as the magnitude projection of W̃, V = 0, ρ = 0.1; each iteration
      B = (H̃ + ρI)⁻¹ (W̃H̃ − V + ρD),   D = Proj(B + V/ρ),   V += ρ(B − D);
  Proj keeps the largest |·|: per matrix for unstructured (exact count), per M-group for N:M;
- every `update_every` (3) iterations ρ adapts to how many support entries changed since the last
  check (as a fraction of the kept count): > 10% → ρ·1.3; > 0.5% → ρ·1.2; any change → ρ·1.1, or,
  before ρ has ever grown, ρ/5 and a restart from the initial point; no change → stop once ρ has grown
  (else ρ/5); ρ ≤ 1e6. After `min_iter` (30) iterations, a change below 0.03% also stops;
- the final mask is the projection of B, and CG refits the kept weights (reference: 10 iterations).

What is ours:
- (H̃ + ρI)⁻¹ is rebuilt from a Cholesky factorisation whenever ρ changes, not from one
  eigendecomposition: on a CPU `eigh` of a 4096² matrix costs about ten 4096³ GEMMs (relatively more
  on a GPU), the Cholesky inverse about one, and ρ changes at most every `update_every` iterations;
- `max_iter` defaults to 30 ADMM iterations, not 300: on the trained 4M Llama's matrices and the
  tests' layer the reference schedule stops by itself at about 30 (300 gives the same error), while
  a cut-off below ~20 can be worse than SparseGPT (before ρ has grown, B is still near the dense
  weight, and its magnitude mask is Wanda-like). Cost: each iteration is one GEMM of the weight with
  (H̃ + ρI)⁻¹ and SparseGPT costs about two such GEMMs, so per matrix on a CPU ALPS takes ~24x
  SparseGPT's time at 4096x4096 (error 0.57x SparseGPT's; 9 iterations: 12.6x, 0.70x; 3: 6.1x, 0.89x;
  benchmarks/quality_matrix.py), while the whole `compress()` of the 4M Llama took 3x SparseGPT's
  (forward passes dominate at that size);
- inputs that never fired (diag H = 0) get H_jj = 1 and W[:, j] = 0, as in SparseGPT;
- the per-iteration error print of the reference is not computed.
"""
from __future__ import annotations

import torch

from llmprune.errors import UserError
from llmprune.masks import Pattern, nm_keep_mask, num_to_prune
from llmprune.methods import LinearStats, register
from llmprune.methods.refit import damped_hessian, pcg_on_mask


def magnitude_keep_mask(values: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """keep_mask `[out, in]`: largest |values| per matrix (exact count) or per N:M group.

    Unstructured uses the exact k-th smallest magnitude as a threshold (`kth_smallest`; a topk over
    16M entries is slow on a CPU) and breaks ties at the threshold by position, so the pruned count is
    exactly round(numel·s).
    """
    if pattern.is_nm:
        return nm_keep_mask(values.abs(), pattern.n, pattern.m)
    magnitude = values.abs().flatten()
    k = num_to_prune(magnitude.numel(), pattern.sparsity)
    if k == 0:
        return torch.ones_like(values, dtype=torch.bool)
    threshold = kth_smallest(magnitude, k)
    keep = magnitude > threshold
    surplus = k - int((~keep).sum())          # < 0 when several entries tie at the threshold
    if surplus < 0:
        tied = torch.nonzero(magnitude == threshold).squeeze(1)
        keep[tied[:-surplus]] = True
    return keep.view_as(values)


def kth_smallest(values: torch.Tensor, k: int, sample: int = 1 << 16) -> torch.Tensor:
    """Exactly `torch.kthvalue(values, k).values` for a 1-D tensor (k is 1-based), usually faster.

    The quantile k/n of a fixed random sample brackets the answer with high probability; the k-th
    value is then selected among the few entries inside the bracket (one pass to count, one to
    gather), with a full `kthvalue` only if the bracket missed.
    """
    n = values.numel()
    if n <= 4 * sample:
        return torch.kthvalue(values, k).values
    index = torch.randint(0, n, (sample,), generator=torch.Generator().manual_seed(0)).to(values.device)
    ordered = torch.sort(values[index]).values
    q = k / n
    margin = 4.0 * (q * (1.0 - q) / sample) ** 0.5 + 2.0 / sample
    low = ordered[max(0, int((q - margin) * sample))]
    high = ordered[min(sample - 1, int((q + margin) * sample))]
    below = int((values < low).sum())
    band = values[(values >= low) & (values <= high)]
    if below < k <= below + band.numel():
        return torch.kthvalue(band, k - below).values
    return torch.kthvalue(values, k).values


def _ridge_inverse(hessian: torch.Tensor, rho: float) -> torch.Tensor:
    """(H + ρI)⁻¹ `[in, in]` for a unit-diagonal SPD H (float32 is enough: ρ bounds the conditioning).

    Cholesky + `cholesky_inverse`: about one 4096³ GEMM's time on a CPU thread.
    """
    shifted = hessian.clone()
    torch.diagonal(shifted).add_(rho)
    return torch.cholesky_inverse(torch.linalg.cholesky(shifted))


def _normalised(stats: LinearStats, device, dampening: float, rho: float):
    """(H̃ [in, in] unit-diagonal damped Hessian, S = diag(H)^½ [in], dead inputs [in], (H̃ + ρI)⁻¹ [in, in]).

    Memoised on `stats`: linears that share an input (q/k/v, gate/up) share all four, the first
    inverse included (every ADMM run starts at the same ρ).
    """
    key = ("alps.normalised", str(device), dampening, rho)
    if key not in stats.derived:
        hessian = damped_hessian(stats.hessian, stats.n_tokens, dampening, device)   # [in, in]
        dead = torch.diagonal(stats.hessian).to(device) == 0                          # [in]
        scale = torch.diagonal(hessian).sqrt()                                         # [in]  ‖X_j‖ (damped)
        hessian /= scale.unsqueeze(0)
        hessian /= scale.unsqueeze(1)                                                  # unit diagonal
        stats.derived[key] = (hessian, scale, dead, _ridge_inverse(hessian, rho))
    return stats.derived[key]


@register("alps", needs={"hessian"}, summary="ADMM layer reconstruction (mask and weights together) + CG refit")
def alps(weight: torch.Tensor, stats: LinearStats, pattern: Pattern, *,
         rho: float = 0.1, max_iter: int = 30, update_every: int = 3, min_iter: int = 30,
         refit_iters: int = 10, dampening: float = 0.01) -> torch.Tensor:
    """ADMM with an adaptive penalty on ‖WX − ŴX‖², then a conjugate-gradient refit of the kept weights."""
    if rho <= 0 or max_iter < 1 or update_every < 1 or min_iter < 0 or refit_iters < 0 or dampening < 0:
        raise UserError("alps: need rho > 0, max_iter >= 1, update_every >= 1, min_iter >= 0, "
                        "refit_iters >= 0, dampening >= 0")
    rows, cols = weight.shape
    if pattern.is_nm and cols % pattern.m:
        raise UserError(f"a matrix with {cols} input columns cannot be {pattern} sparse ({cols} is not a multiple of {pattern.m})")
    device = weight.device
    with _no_tf32():
        hessian, scale, dead, first_inverse = _normalised(stats, device, dampening, rho)
        w = weight.to(torch.float32) * scale                                           # [out, in] W̃
        w[:, dead] = 0.0
        kept = rows * cols - (rows * (cols // pattern.m) * pattern.n if pattern.is_nm
                              else num_to_prune(rows * cols, pattern.sparsity))

        keep = magnitude_keep_mask(w, pattern)
        d_init = w * keep
        # Scaled dual U = V/ρ (rescaled when ρ changes): D = Proj(B + U), U += B − D, and the B-step
        # B = (W̃H̃ + ρ(D − U))(H̃+ρI)⁻¹ = W̃ + ρ(D − U − W̃)(H̃+ρI)⁻¹, as W̃H̃(H̃+ρI)⁻¹ = W̃ − ρW̃(H̃+ρI)⁻¹.
        b, d, u = w.clone(), d_init.clone(), torch.zeros_like(w)
        inverse = first_inverse
        last_keep, grown = keep, False
        for it in range(max_iter):
            b = torch.sub(d, u).sub_(w).mul_(rho).matmul(inverse).add_(w)
            z = u.add_(b)                                  # B + U (in place: U is rebuilt below)
            keep = magnitude_keep_mask(z, pattern)
            d = z * keep
            u = z.sub_(d)                                  # U + B − D
            if (it + 1) % update_every:
                continue
            changed = int((keep != last_keep).sum())
            last_keep = keep
            old_rho = rho
            if changed / kept > 0.1:
                rho, grown = rho * 1.3, True
            elif changed / kept > 0.005:
                rho, grown = rho * 1.2, True
            elif changed > 0:
                if grown:
                    rho *= 1.1
                else:           # ρ too large from the start: the support never moved; retry smaller
                    rho /= 5
                    b, d, u = w.clone(), d_init.clone(), torch.zeros_like(w)
            elif grown:
                break
            else:
                rho /= 5
            rho = min(rho, 1e6)
            if it >= min_iter and changed / kept < 3e-4:
                break
            u.mul_(old_rho / rho)                          # V is unchanged, so U = V/ρ scales
            inverse = _ridge_inverse(hessian, rho)

        keep = magnitude_keep_mask(b, pattern)
        b = pcg_on_mask(w, keep, hessian, b, refit_iters)
    return b / scale


class _no_tf32:
    """TF32 off (the reference disables it): the ADMM and CG products feed back into themselves."""

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.saved
