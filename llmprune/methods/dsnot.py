"""DSnoT (Zhang et al., ICLR 2024, "Dynamic Sparse No Training"): training-free prune-and-grow mask swaps.

Reference semantics (zyxxmu/DSnoT `lib/prune.py::prune_DSnoT`, `layerwrapper.py`), per output row i of
the DENSE weight W with keep_mask M (found by any method):
- the expected reconstruction error of the row is ε_i = Σ_{j pruned} w_ij·E[x_j];
- regrow candidates are the pruned weights sorted once by w_ij·E[x_j] / Var(x_j)^pow_of_var_regrowing;
  with ε_i > 0 the next one from the top (largest) is regrown, otherwise the next from the bottom;
- prune candidates (unstructured) are kept weights whose w_ij·E[x_j] pulls ε towards 0: with ε_i ≥ 0
  the next kept weight with w·E[x] < 0, with ε_i < 0 the next with w·E[x] > 0, each list in increasing
  Wanda score |w_ij|·‖x_j‖;
  N:M: the kept weight with the lowest initial score in the regrown weight's M-block (swaps stay
  inside the block, so the pattern holds);
- each cycle takes one candidate pair per row (both pointers advance whether or not it is accepted);
  the swap is accepted while |ε_i| > update_threshold (and, for N:M, while ε_i after the swap keeps the
  sign ε_i had at the start); a row that rejects once stops for good; at most `max_cycles` (50) cycles.
  The reference's unstructured branch skips the sign condition (`--without_same_sign` is a bool flag
  that is always true); `same_sign=None` keeps both defaults.

Units: the reference accumulates Σ_t x_t / n_samples = (tokens per sample)·E[x] with 2048-token
samples, so its threshold 0.1 is on ε·2048. We use per-token means and divide `update_threshold` by
REFERENCE_SEQLEN, so recipe values match the paper's.

What is ours:
- Var(x_j) is the variance over all calibration tokens (input_sq_norm/n − mean²); the reference
  averages per-sample variances (it omits the between-sample part);
- regrow candidates are only pruned weights and prune candidates only weights kept by the starting
  mask, so the count (and the N:M pattern) is exact; the reference's sorted lists also hold kept
  weights with a zero metric and its N:M block search can pick an already pruned weight (a candidate
  pair that would break the pattern is skipped here, the row continues);
- rows are processed together (gather/scatter per cycle, no Python loop over rows);
- `guard=True` (default) with a Hessian in `stats`: any row whose true reconstruction error
  (w_i − ŵ_i)ᵀH(w_i − ŵ_i) on the dense weights is higher after the swaps goes back to its starting
  mask, so the refinement never increases ‖WX − ŴX‖². DSnoT's ε is a first-moment proxy and can.

Scope: the reference's default `--skip_layer mlp` refines only the attention linears; which linears
to refine is the caller's choice here. 50 swaps per row suits 4096-wide rows: on the 128-wide rows
of the tests, unguarded DSnoT raised ‖WX − ŴX‖² up to 30x (the guard reverts those rows). Measured
with the guard (benchmarks/quality_matrix.py): Wanda's error −26% at 70% and −24% at 2:4 on a
4096x4096 synthetic layer, 0-7% on the trained 4M Llama's linears.

Composition with methods that update weights (SparseGPT, ALPS): DSnoT reasons about the dense weight
under a mask. Take the mask of their result (weight != 0), refine it here, then call
`refit.refit_on_mask(dense_weight, refined_mask, H)` for the least-squares kept weights on the new
mask (`refine_and_refit`). Applying the refined mask to the updated weights instead would mix
weights that were updated for a different mask.
"""
from __future__ import annotations

import torch

from llmprune.errors import UserError
from llmprune.masks import Pattern, nm_violations
from llmprune.methods import LinearStats

REFERENCE_SEQLEN = 2048       # tokens per calibration sample in the reference's statistics
DSNOT_NEEDS = frozenset({"input_sum", "input_sq_norm"})   # + "hessian" for the guard / a refit


def input_moments(stats: LinearStats, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean [in], variance [in], ‖x_j‖ [in]) per input channel over the calibration tokens."""
    if stats.input_sum is None or stats.input_sq_norm is None or stats.n_tokens < 1:
        raise UserError("dsnot needs the input sums and squared norms of each linear "
                        "(calibration statistics 'input_sum' and 'input_sq_norm')")
    n = float(stats.n_tokens)
    mean = stats.input_sum.to(device, torch.float64) / n
    second = stats.input_sq_norm.to(device, torch.float64) / n
    variance = (second - mean * mean).clamp_min(0.0)
    return mean.float(), variance.float(), stats.input_sq_norm.to(device, torch.float32).sqrt()


def dsnot_refine(dense_weight: torch.Tensor, keep_mask: torch.Tensor, stats: LinearStats, pattern: Pattern, *,
                 max_cycles: int = 50, update_threshold: float = 0.1, pow_of_var_regrowing: float = 1.0,
                 same_sign: bool | None = None, initial_score: torch.Tensor | None = None,
                 guard: bool = True) -> torch.Tensor:
    """Refined keep_mask `[out, in]` with the same number of kept weights per row (and per N:M group).

    dense_weight `[out, in]`, keep_mask `[out, in]` bool. `initial_score` `[out, in]` orders the N:M
    prune candidates within a block (the reference uses the initial method's score); default Wanda's
    |W|·‖x‖, which is also the unstructured prune order.
    """
    if max_cycles < 0 or update_threshold < 0:
        raise UserError("dsnot: max_cycles and update_threshold must be >= 0")
    rows, cols = dense_weight.shape
    device = dense_weight.device
    w = dense_weight.to(torch.float32)
    start_keep = keep_mask.to(device=device, dtype=torch.bool)
    if pattern.is_nm and (cols % pattern.m or nm_violations(w * start_keep, pattern.n, pattern.m)):
        raise UserError(f"dsnot: the starting mask is not {pattern} (need {pattern.n} pruned in every group of {pattern.m})")
    mean, variance, norm = input_moments(stats, device)
    metric = w * mean                                        # [out, in]  w_ij·E[x_j]: ε contributions
    threshold = update_threshold / REFERENCE_SEQLEN
    wanda = w.abs() * norm                                   # [out, in]
    score = wanda if initial_score is None else initial_score.to(device, torch.float32)
    check_sign = pattern.is_nm if same_sign is None else same_sign
    arange = torch.arange(rows, device=device)

    keep = start_keep.clone()
    pruned = ~start_keep
    error = (metric * pruned).sum(1)                         # [out]  ε
    start_sign = torch.sign(error)

    # Regrow list: pruned weights ascending by metric/Var^pow; kept ones sorted to the end (+inf).
    regrow_key = metric / variance.clamp_min(1e-12).pow(pow_of_var_regrowing) if pow_of_var_regrowing else metric
    regrow_order = torch.argsort(torch.where(pruned, regrow_key, torch.inf), dim=1, stable=True)   # [out, in]
    low = torch.zeros(rows, dtype=torch.long, device=device)             # next from the bottom
    high = pruned.sum(1) - 1                                             # next from the top
    if not pattern.is_nm:
        # Prune lists: kept weights with a negative / positive metric, each by increasing Wanda score.
        neg_order = torch.argsort(torch.where(start_keep & (metric < 0), wanda, torch.inf), dim=1, stable=True)
        pos_order = torch.argsort(torch.where(start_keep & (metric > 0), wanda, torch.inf), dim=1, stable=True)
        neg_count, pos_count = (start_keep & (metric < 0)).sum(1), (start_keep & (metric > 0)).sum(1)
        neg_next = torch.zeros(rows, dtype=torch.long, device=device)
        pos_next = torch.zeros(rows, dtype=torch.long, device=device)
    else:
        block_offsets = torch.arange(pattern.m, device=device)

    active = torch.ones(rows, dtype=torch.bool, device=device)
    for _ in range(max_cycles):
        if not bool(active.any()):
            break
        from_top = error > 0
        valid = low <= high                                              # regrow candidates left
        slot = torch.where(from_top, high, low).clamp(0, cols - 1)
        grow = regrow_order[arange, slot]                                # [out]
        high = high - from_top.long()
        low = low + (~from_top).long()
        if not pattern.is_nm:
            from_neg = ~(error < 0)
            nxt = torch.where(from_neg, neg_next, pos_next)
            valid &= nxt < torch.where(from_neg, neg_count, pos_count)
            nxt = nxt.clamp(max=cols - 1)
            cut = torch.where(from_neg, neg_order[arange, nxt], pos_order[arange, nxt])
            neg_next = neg_next + from_neg.long()
            pos_next = pos_next + (~from_neg).long()
        else:
            block = (grow - grow % pattern.m).unsqueeze(1) + block_offsets          # [out, m]
            candidates = start_keep.gather(1, block) & keep.gather(1, block)        # still kept, kept at start
            block_score = torch.where(candidates, score.gather(1, block), torch.inf)
            cut = block.gather(1, block_score.argmin(1, keepdim=True)).squeeze(1)
            valid &= candidates.any(1)
        grow_metric = metric[arange, grow]
        cut_metric = metric[arange, cut]
        after = error + cut_metric - grow_metric
        accept = active & (error.abs() > threshold)
        if check_sign:
            accept &= torch.sign(after) == start_sign
        active = accept                                                  # a rejection ends the row
        accept = accept & valid                                          # exhausted / pattern-breaking: skip
        rows_ok = arange[accept]
        keep[rows_ok, cut[accept]] = False
        keep[rows_ok, grow[accept]] = True
        error = torch.where(accept, after, error)

    if guard and stats.hessian is not None:
        keep = _keep_better_rows(w, start_keep, keep, stats.hessian.to(device, torch.float32))
    return keep


def _keep_better_rows(weight: torch.Tensor, start_keep: torch.Tensor, keep: torch.Tensor,
                      hessian: torch.Tensor) -> torch.Tensor:
    """Per row, the mask of lower true error (w − w⊙m)ᵀH(w − w⊙m): start rows where the swaps hurt.

    e_new − e_start = (r_new − r_start)ᵀ H (r_new + r_start) with r = w⊙¬m; r_new − r_start has at
    most 2·max_cycles entries per row, so the product with H is a sparse-dense multiply.
    """
    r_start = weight * ~start_keep
    r_new = weight * ~keep
    diff = r_new - r_start                                           # [out, in], few nonzeros per row
    if not bool(diff.any()):
        return keep
    change = (torch.sparse.mm(diff.to_sparse(), hessian) * (r_new + r_start)).sum(1)   # [out]
    worse = change > 0
    return torch.where(worse.unsqueeze(1), start_keep, keep)


def refine_and_refit(dense_weight: torch.Tensor, pruned_weight: torch.Tensor, stats: LinearStats, pattern: Pattern, *,
                     refit_iters: int = 20, dampening: float = 0.01, **dsnot_params) -> torch.Tensor:
    """After a method that updates weights: refine the mask of `pruned_weight` with DSnoT on the dense
    weight, then refit the kept weights by least squares (needs `stats.hessian`). Returns `[out, in]`."""
    from llmprune.methods.refit import refit_on_mask
    if stats.hessian is None:
        raise UserError("dsnot with a refit needs the Hessian of each linear's inputs (calibration statistic 'hessian')")
    keep = dsnot_refine(dense_weight, pruned_weight != 0, stats, pattern, **dsnot_params)
    return refit_on_mask(dense_weight, keep, stats.hessian, iters=refit_iters, dampening=dampening,
                         n_tokens=stats.n_tokens, init=torch.where(keep, pruned_weight.to(torch.float32), dense_weight.to(torch.float32)))
