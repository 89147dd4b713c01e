"""Refit the kept weights of a fixed mask: least squares on the calibration inputs, all rows at once.

For a dense weight W `[out, in]`, a keep_mask M and H = Σ_t x_t x_tᵀ `[in, in]`, each row solves

    min over ŵ with supp(ŵ) ⊆ M_i of  (ŵ − w_i)ᵀ H (ŵ − w_i)      i.e.  H_SS ŵ_S = (H w_i)_S,

the weights that best reproduce the dense layer's outputs W X on the calibration data given the mask.
This is the "backsolve" of ALPS (Meng et al. 2024, mazumder-lab/ALPS `cg_batch`): conjugate gradients
on the masked normal equations, one GEMM with H per iteration for all rows together. ALPS runs it in
coordinates where diag(H) = 1; Jacobi preconditioning (diag(H)^-1) here is the same iteration in the
original coordinates. Dampening adds `dampening·mean(diag H)` to the diagonal, as SparseGPT does, so a
singular H (inputs that never fire, fewer tokens than inputs) still has a unique solution; the ridge
pulls the kept weights towards their dense values.
"""
from __future__ import annotations

import torch

from llmprune.errors import UserError


def damped_hessian(hessian: torch.Tensor, n_tokens: int, dampening: float, device, dtype=torch.float32) -> torch.Tensor:
    """H/n + dampening·mean(diag)·I `[in, in]`; inputs that never fired get H_jj = 1 first (SparseGPT's rule)."""
    h = (hessian.to(device, dtype) / max(n_tokens, 1)).clone()     # [in, in]
    diag = torch.diagonal(h)
    diag[diag == 0] = 1.0
    diag += dampening * diag.mean()
    return h


def pcg_on_mask(target: torch.Tensor, keep_mask: torch.Tensor, hessian: torch.Tensor, init: torch.Tensor,
                iters: int, tol: float = 1e-6) -> torch.Tensor:
    """Preconditioned CG for min_{X on mask} tr((X − T) H (X − T)ᵀ), rows independent, from `init`.

    target `[out, in]` (the dense weight), keep_mask `[out, in]` bool, hessian `[in, in]` SPD (damped),
    init `[out, in]` (zero off the mask is enforced). Stops early once every row's masked residual has
    fallen below `tol` times its starting value. Row sums in float32 (pairwise), scalars per row in float64.
    """
    mask = keep_mask.to(target.dtype)
    x = init * mask                                          # [out, in]
    inv_diag = 1.0 / torch.diagonal(hessian)                 # [in]   Jacobi preconditioner
    r = torch.sub(target, x).matmul(hessian).mul_(mask)      # [out, in] = −gradient/2 on the support
    z = r * inv_diag
    p = z.clone()
    rz = torch.linalg.vecdot(r, z).double()                  # [out]
    start = rz.clone()
    for _ in range(iters):
        hp = p @ hessian                                     # [out, in]  the one GEMM per iteration
        php = torch.linalg.vecdot(p, hp).double()
        alpha = torch.where(php > 0, rz / php.clamp_min(1e-300), torch.zeros_like(rz)).to(x.dtype).unsqueeze(1)
        x.addcmul_(p, alpha)
        r.addcmul_(hp.mul_(mask), alpha, value=-1.0)
        torch.mul(r, inv_diag, out=z)
        rz_next = torch.linalg.vecdot(r, z).double()
        if bool((rz_next <= (tol * tol) * start).all()):
            break
        beta = torch.where(rz > 0, rz_next / rz.clamp_min(1e-300), torch.zeros_like(rz)).to(x.dtype).unsqueeze(1)
        p.mul_(beta).add_(z)
        rz = rz_next
    return x


def refit_on_mask(dense_weight: torch.Tensor, keep_mask: torch.Tensor, hessian: torch.Tensor, *,
                  iters: int = 20, dampening: float = 0.01, n_tokens: int = 1,
                  init: torch.Tensor | None = None) -> torch.Tensor:
    """The kept weights that minimise tr((Ŵ − W) H (Ŵ − W)ᵀ) on `keep_mask`, by Jacobi-PCG.

    dense_weight `[out, in]`, keep_mask `[out, in]` bool, hessian `[in, in]` (Σ x xᵀ; `n_tokens` only
    rescales it). `init` (e.g. SparseGPT's updated weights) is a warm start; default the masked dense
    weight. Returns float32 `[out, in]`, exactly zero off the mask.
    """
    if iters < 0 or dampening < 0:
        raise UserError("refit: iters must be >= 0 and dampening >= 0")
    if keep_mask.shape != dense_weight.shape or hessian.shape != (dense_weight.shape[1],) * 2:
        raise ValueError(f"refit: shapes do not match: weight {tuple(dense_weight.shape)}, "
                         f"mask {tuple(keep_mask.shape)}, hessian {tuple(hessian.shape)}")
    device = dense_weight.device
    target = dense_weight.to(torch.float32)
    h = damped_hessian(hessian, n_tokens, dampening, device)
    start = (init if init is not None else target).to(device, torch.float32)
    return pcg_on_mask(target, keep_mask.to(device), h, start, iters)
