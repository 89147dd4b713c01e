"""Merging sparsified deltas of several fine-tunes: linear (task arithmetic) or TIES sign election.

Both follow mergekit's `GeneralizedTaskArithmeticMerge` (methods.md §4.4):
  weighted_i = w_i · Δ̂_i
  linear:  mixed = Σ_i weighted_i                                  (normalize: / Σ_i w_i)
  TIES:    majority = +1 where Σ_i weighted_i ≥ 0 else −1
           keep_i   = sign(weighted_i) == majority  (zeros never vote and are never kept)
           mixed    = Σ_i keep_i · weighted_i                       (normalize: / Σ_i keep_i · w_i,
                                                                    divisor 0 -> 1)
The caller adds `λ · mixed` to the base.
"""
from __future__ import annotations

CONSENSUS = ("linear", "ties")


def merge_deltas(deltas, weights, consensus: str, normalize: bool):
    """Merge float32 deltas of one tensor (same shape). Returns a new float32 tensor."""
    import torch

    if len(deltas) != len(weights):
        raise ValueError("one weight per delta")
    weighted = [d * w for d, w in zip(deltas, weights)]
    if consensus == "linear":
        mixed = torch.zeros_like(deltas[0])
        for wd in weighted:
            mixed += wd
        if normalize:
            total = sum(weights)
            mixed /= total if total != 0 else 1.0
        return mixed
    if consensus != "ties":
        raise ValueError(f"unknown consensus {consensus}")
    sign_weight = torch.zeros_like(deltas[0])
    for wd in weighted:
        sign_weight += wd
    majority = torch.where(sign_weight >= 0, 1.0, -1.0)
    del sign_weight
    mixed = torch.zeros_like(deltas[0])
    divisor = torch.zeros_like(deltas[0]) if normalize else None
    for wd, w in zip(weighted, weights):
        agree = wd.sign() == majority
        mixed += torch.where(agree, wd, 0.0)
        if normalize:
            divisor += agree.to(divisor.dtype) * w
    if normalize:
        divisor[divisor == 0] = 1.0
        mixed /= divisor
    return mixed
