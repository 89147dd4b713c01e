"""Per-tensor delta sparsification: DARE (random drop) and magnitude, with the rescale rules.

Notation: `delta = θ_ft − θ_base` (float32), drop rate `p`, density `1 − p`.

* DARE (Yu et al. 2024): keep each entry independently with probability `1 − p`
  (`keep = u >= p`, `u ~ U[0, 1)`), then rescale by `1/(1 − p)` so `E[Δ̂] = Δ`.
* Magnitude (TIES "trim", MergeLM `mask_strategy="magnitude"`): drop exactly the
  `int(p · numel)` smallest `|Δ|` entries of the tensor.
* Rescale: `inverse` = `1/(1 − p)` (DARE), `none`, `q` = `1/q` (DAREx-q, `q ≥ 1 − p`),
  `l1` = `‖Δ‖₁ / ‖keep ⊙ Δ‖₁` (mergekit's `rescale: true` since PR #245; skipped when either
  norm is below 1e-7, as mergekit does).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from llmprune.errors import UserError


@dataclass(frozen=True)
class Rescale:
    kind: str  # inverse | l1 | none | q | auto (auto is resolved to q before any tensor is touched)
    q: float | None = None

    def __str__(self) -> str:
        return f"q={self.q:g}" if self.kind == "q" else self.kind


def parse_rescale(text: str) -> Rescale:
    text = text.strip().lower()
    if text in ("inverse", "l1", "none", "auto"):
        return Rescale(text)
    if text.startswith("q="):
        try:
            q = float(text[2:])
        except ValueError:
            q = float("nan")
        if not q > 0:  # also rejects nan
            raise UserError(f"--rescale {text}: q must be a positive number, e.g. q=0.2")
        return Rescale("q", q)
    raise UserError(f"unknown --rescale {text}; choose inverse, l1, none, q=VALUE or auto")


def tensor_seed(seed: int, name: str, model_index: int = 0) -> int:
    """A 63-bit seed from the run seed, the fine-tune's position and the tensor name.

    Stable across processes and machines (unlike Python's `hash`), so a run is reproducible and
    independent of the order or sharding in which tensors are processed.
    """
    digest = hashlib.sha256(f"{seed}/{model_index}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def dare_keep_mask(shape, drop_rate: float, seed: int):
    """Bernoulli keep mask: each entry kept independently with probability 1 − p."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen, dtype=torch.float32) >= drop_rate


def magnitude_keep_mask(delta, drop_rate: float):
    """Keep all but the `int(p · numel)` smallest |Δ| entries (exact count; ties broken by position)."""
    import torch

    numel = delta.numel()
    n_drop = int(drop_rate * numel)
    if n_drop == 0:
        return torch.ones_like(delta, dtype=torch.bool)
    if n_drop >= numel:
        return torch.zeros_like(delta, dtype=torch.bool)
    magnitude = delta.abs().reshape(-1)
    threshold = magnitude.kthvalue(n_drop).values  # the largest dropped magnitude
    keep = magnitude > threshold
    missing = (numel - n_drop) - int(keep.sum())
    if missing > 0:  # entries tied at the threshold: keep the last `missing` of them
        tied = (magnitude == threshold).nonzero().squeeze(1)
        keep[tied[-missing:]] = True
    return keep.reshape(delta.shape)


def rescale_factor(delta, keep, rescale: Rescale, drop_rate: float) -> float:
    """The scalar that multiplies the kept entries."""
    if rescale.kind == "none":
        return 1.0
    if rescale.kind == "inverse":
        return 1.0 / (1.0 - drop_rate)
    if rescale.kind == "q":
        return 1.0 / rescale.q
    if rescale.kind == "l1":
        full = float(delta.abs().sum())
        kept = float((delta * keep).abs().sum())
        if full < 1e-7 or kept < 1e-7:
            return 1.0
        return full / kept
    raise ValueError(f"rescale {rescale} must be resolved before sparsifying")


def sparsify(delta, strategy: str, drop_rate: float, rescale: Rescale, seed: int):
    """`(keep, factor)` for one float32 delta tensor: `Δ̂ = factor · keep ⊙ Δ`.

    `strategy` is `random` (DARE) or `magnitude`.
    """
    if strategy == "random":
        keep = dare_keep_mask(delta.shape, drop_rate, seed)
    elif strategy == "magnitude":
        keep = magnitude_keep_mask(delta, drop_rate)
    else:
        raise ValueError(f"unknown strategy {strategy}")
    return keep, rescale_factor(delta, keep, rescale, drop_rate)
