"""After any method: DSnoT mask refinement and/or a least-squares refit of the kept weights, never worse.

`refine_result(dense, pruned, keep, stats, pattern, refine=..., refit=...)` takes a method's result
(pruned weight `[out, in]` and its keep_mask) and

1. `refine: dsnot`: swaps weights of the mask row by row (`dsnot.dsnot_refine`, with its guard on the
   dense weights), keeping every row's kept count and the N:M pattern;
2. refits the kept weights on the (refined) mask by `refit` preconditioned-CG steps
   (`refit.pcg_on_mask`, the ALPS backsolve). A method that updated the kept weights (SparseGPT,
   ALPS) needs a refit on rows whose mask DSnoT changed, since its updates were made for the old
   mask: those rows get `max(refit, DSNOT_REFIT_ITERS)` steps; with `refit: 0` and a method that
   keeps the dense values (Wanda, magnitude), a refined row is the dense row on its new mask;
3. per output row, keeps whichever of the method's row and the new row has the lower reconstruction
   error (w − ŵ)ᵀH(w − ŵ) on the calibration inputs (H = Σ x xᵀ, undamped). So the result's
   ‖WX − ŴX‖² is never above the method's, row by row, and the number of zeros per row (and the
   N:M pattern) is the method's.

Needs `stats.hessian` (and, for DSnoT, the input sums and squared norms; `NEEDS`).
"""
from __future__ import annotations

import torch

from llmprune.errors import UserError
from llmprune.masks import Pattern
from llmprune.methods import LinearStats
from llmprune.methods.dsnot import DSNOT_NEEDS, dsnot_refine
from llmprune.methods.refit import damped_hessian, pcg_on_mask

REFINES = ("none", "dsnot")
DSNOT_REFIT_ITERS = 10      # CG steps for rows DSnoT changed after a method that updates weights


def needs_for(refine: str, refit: int) -> frozenset[str]:
    """Calibration statistics the refinement needs (beyond the method's own)."""
    needs: set[str] = set()
    if refine == "dsnot":
        needs |= DSNOT_NEEDS | {"hessian"}
    if refit:
        needs.add("hessian")
    return frozenset(needs)


def row_errors(dense: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """[out]: (w_i − ŵ_i)ᵀ H (w_i − ŵ_i) per row (float64 sums), dense/weight `[out, in]`, H `[in, in]`."""
    diff = dense - weight                                                  # [out, in]
    return ((diff @ hessian) * diff).sum(1, dtype=torch.float64)


@torch.no_grad()
def refine_result(dense: torch.Tensor, pruned: torch.Tensor, keep: torch.Tensor, stats: LinearStats,
                  pattern: Pattern, *, refine: str = "none", refit: int = 0,
                  dampening: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, keep_mask) `[out, in]`: the method's result refined and/or refit, never worse per row."""
    if refine not in REFINES:
        raise UserError(f"refine must be one of {', '.join(REFINES)}, got {refine!r}")
    if refit < 0:
        raise UserError("refit must be >= 0 CG steps")
    if refine == "none" and refit == 0:
        return pruned, keep
    if stats.hessian is None:
        raise UserError("refine/refit need the Hessian of each linear's inputs (calibration statistic 'hessian')")
    device = pruned.device
    dense = dense.to(device, torch.float32)
    pruned = pruned.to(torch.float32)
    keep = keep.to(device=device, dtype=torch.bool)
    updated = not torch.equal(pruned, dense * keep)     # the method moved kept weights (OBS / ADMM updates)

    new_keep = dsnot_refine(dense, keep, stats, pattern) if refine == "dsnot" else keep
    changed = (new_keep != keep).any(1)                                    # [out] rows DSnoT swapped
    if refit == 0 and not bool(changed.any()):
        return pruned, keep
    # Starting point: the method's weights on unchanged rows; on swapped rows, its weights where they are
    # still kept and the dense values at regrown positions.
    start = torch.where(new_keep, torch.where(keep, pruned, dense), torch.zeros_like(dense))
    if refit == 0 and not updated:
        candidate = start                                                 # Wanda/magnitude: dense on the new mask
    else:
        hessian = damped_hessian(stats.hessian, stats.n_tokens, dampening, device)
        steps = refit if refit > 0 else DSNOT_REFIT_ITERS
        if refit == 0:                       # only the rows DSnoT changed need a refit
            rows = changed.nonzero().squeeze(1)
            candidate = start.clone()
            candidate[rows] = pcg_on_mask(dense[rows], new_keep[rows], hessian, start[rows], steps)
        else:
            candidate = pcg_on_mask(dense, new_keep, hessian, start, steps)
    exact = stats.hessian.to(device, torch.float32)
    better = (row_errors(dense, candidate, exact) < row_errors(dense, pruned, exact)).unsqueeze(1)   # [out, 1]
    final_keep = torch.where(better, new_keep, keep)
    return torch.where(better, candidate, pruned) * final_keep, final_keep
