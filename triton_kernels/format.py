"""The packed 2:4 format ("sparse24"): pure torch, works on any device.

    values  : [N, K/2]  weight dtype; the two kept entries of every group of 4 consecutive
                        input columns, in ascending column order
    bitmask : [N, K/8]  uint8; bit j of byte b <-> column 8b + j (little-endian bit order), so
                        every nibble (one group of 4 columns) has exactly two bits set

(N, K) = (out_features, in_features); the groups run along K, the reduction dimension.
This is byte-identical to compressed-tensors' `sparse-24-bitmask` (`<name>.compressed`,
`<name>.bitmask`, `<name>.shape`), and 9/16 of the dense bytes for 16-bit weights.

Which two entries of a group are "kept" is decided from an explicit `keep_mask` when the pruner
has one, else from the weight: its non-zeros, topped up with the lowest-index zeros. Testing
`w != 0` treats `-0.0` as zero (IEEE), so pruned entries left as `-0.0` by `w * mask` are fine;
kept values are stored with `-0.0` normalised to `+0.0`.
"""
from __future__ import annotations

import torch

# For a valid nibble n (two bits set), the column (0..3) of the first / second kept entry is
# (LUT >> 2n) & 3. Built from the definition rather than typed in; the kernels use these numbers.
def _build_luts() -> tuple[int, int]:
    lo = hi = 0
    for nib in range(16):
        bits = [j for j in range(4) if nib >> j & 1]
        if len(bits) == 2:
            lo |= bits[0] << (2 * nib)
            hi |= bits[1] << (2 * nib)
    return lo, hi


LUT_FIRST, LUT_SECOND = _build_luts()  # 0x2101000, 0x33c2840: both fit in a signed int32


class Not24Error(ValueError):
    """The weight (or mask) does not have the 2:4 pattern along its input dimension."""


def _check_shape(weight: torch.Tensor) -> tuple[int, int]:
    if weight.dim() != 2:
        raise Not24Error(f"expected a 2-D weight [out_features, in_features], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if k % 8 != 0:
        raise Not24Error(f"in_features={k} is not a multiple of 8; the 2:4 bitmask format needs whole bytes")
    return n, k


def keep_mask_24(weight: torch.Tensor) -> torch.Tensor:
    """Boolean [N, K] mask with exactly two True per group of 4: the non-zeros, topped up with
    the lowest-index zeros. Raises Not24Error when a group has more than two non-zeros."""
    n, k = _check_shape(weight)
    nonzero = (weight != 0).view(n, k // 4, 4)
    count = nonzero.sum(-1)
    if bool((count > 2).any()):
        bad = int((count > 2).sum())
        raise Not24Error(f"weight is not 2:4 sparse along in_features: {bad} of {n * k // 4} groups of 4 "
                         "have more than two non-zeros")
    # Rank the four slots: non-zeros first, then by ascending column; keep the best two.
    col = torch.arange(4, device=weight.device)
    score = nonzero.to(torch.int8) * 8 - col.to(torch.int8)
    top = score.topk(2, dim=-1).indices
    keep = torch.zeros_like(nonzero)
    keep.scatter_(-1, top, True)
    return keep.view(n, k)


def is_24(weight: torch.Tensor) -> bool:
    """True when every group of 4 along in_features has at most two non-zeros (K % 8 == 0)."""
    if weight.dim() != 2 or weight.shape[1] % 8 != 0:
        return False
    n, k = weight.shape
    return bool(((weight != 0).view(n, k // 4, 4).sum(-1) <= 2).all())


def pack_24(weight: torch.Tensor, keep_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense-with-zeros weight [N, K] -> (values [N, K/2] in weight.dtype, bitmask uint8 [N, K/8]).

    keep_mask: optional boolean [N, K] from the pruner (exactly two True per group of 4). With it,
    kept entries that happen to be exactly zero keep their slot; every entry outside it must be 0.
    """
    n, k = _check_shape(weight)
    if keep_mask is None:
        keep = keep_mask_24(weight)
    else:
        if keep_mask.shape != weight.shape:
            raise Not24Error(f"keep_mask shape {tuple(keep_mask.shape)} != weight shape {tuple(weight.shape)}")
        keep = keep_mask.to(device=weight.device, dtype=torch.bool)
        per_group = keep.view(n, k // 4, 4).sum(-1)
        if bool((per_group != 2).any()):
            raise Not24Error("keep_mask is not 2:4: every group of 4 along in_features needs exactly two kept entries")
        if bool((weight[~keep] != 0).any()):
            raise Not24Error("weight has non-zero entries outside keep_mask; apply the mask before packing")
    # Two kept entries per group, in ascending column order: a stable gather by group.
    slots = keep.view(n, k // 4, 4)
    col = torch.arange(4, device=weight.device)
    # Position of the first / second kept entry of each group (ascending).
    order = (slots.to(torch.int8) * 8 - col.to(torch.int8)).topk(2, dim=-1).indices.sort(-1).values
    values = weight.view(n, k // 4, 4).gather(-1, order).reshape(n, k // 2)
    values = values + 0  # a copy, with -0.0 -> +0.0 (x + 0.0 == x for every other value)
    bits = keep.view(n, k // 8, 8).to(torch.uint8) << torch.arange(8, device=weight.device, dtype=torch.uint8)
    bitmask = bits.sum(-1, dtype=torch.uint8)  # distinct bits: the sum is the bitwise or
    return values.contiguous(), bitmask.contiguous()


def unpack_24(values: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """(values [N, K/2], bitmask uint8 [N, K/8]) -> dense weight [N, K] with zeros; no host sync."""
    n, kh = values.shape
    k = kh * 2
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (n, k // 8):
        raise Not24Error(f"bitmask must be uint8 [{n}, {k // 8}] for values {tuple(values.shape)}; "
                         f"got {bitmask.dtype} {tuple(bitmask.shape)}")
    shifts = torch.arange(8, device=bitmask.device, dtype=torch.uint8)
    keep = ((bitmask.unsqueeze(-1) >> shifts) & 1).view(n, k // 4, 4).bool()
    # slot of each column inside its group's pair of values: number of kept columns before it
    slot = (keep.to(torch.int8).cumsum(-1) - keep.to(torch.int8)).clamp_(max=1).long()
    picked = values.view(n, k // 4, 2).gather(-1, slot)
    return torch.where(keep, picked, torch.zeros((), dtype=values.dtype, device=values.device)).view(n, k)


def check_packed(values: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Raise Not24Error unless every nibble of bitmask has exactly two bits set."""
    if bitmask.dtype != torch.uint8 or bitmask.dim() != 2 or values.dim() != 2:
        raise Not24Error("expected values [N, K/2] and a uint8 bitmask [N, K/8]")
    if values.shape[0] != bitmask.shape[0] or values.shape[1] != bitmask.shape[1] * 4:
        raise Not24Error(f"values {tuple(values.shape)} and bitmask {tuple(bitmask.shape)} do not match")
    nibbles = torch.stack([bitmask & 0xF, bitmask >> 4], -1)
    popcount = sum(((nibbles >> j) & 1) for j in range(4))
    if bool((popcount != 2).any()):
        raise Not24Error("bitmask is corrupt: some group of 4 does not have exactly two bits set")


def packed_nbytes(values: torch.Tensor, bitmask: torch.Tensor) -> int:
    return values.numel() * values.element_size() + bitmask.numel() * bitmask.element_size()
