"""Input-channel permutation before N:M selection (RIA, Zhang et al. ICLR 2024; Pool & Yu, NeurIPS 2021).

N:M keeps the best M−N of every M *consecutive* input columns of each row. If the important columns of
a matrix sit next to each other, whole groups must drop important weights. Permuting the input channels
first (and the producer's output rows the same way, so the layer's function is unchanged) lets every
group hold a mix. The search maximises the score retained after N:M selection on the permuted columns:

    retained(π) = Σ_rows Σ_groups (sum of the M−N largest of score[row, π(group)]).

1. Start: the better of the identity and RIA's "heuristic channel reallocation": sort the columns by
   their summed score, cut the sorted list into M equal chunks, and give group g the g-th column of
   chunk 0, the g-th from the end of chunk 1, the g-th of chunk 2, ... (a snake, so every group gets
   one column of each importance level).
2. Refine by channel swaps (Pool & Yu's swap search; RIA instead solves one linear assignment per group
   position with scipy, which we do not depend on): each round pairs the groups at random and, for
   every pair, evaluates all M×M single-column swaps at once; the best improving swap of each pair is
   applied (pairs are disjoint, so all of them together). The gain of putting value x into a group
   that lost column i is exact and O(1) per row: with S the group without i, K = M−N,
       topK(S ∪ {x}) = topK(S) + max(0, x − (K-th largest of S)).
   A round whose swaps would lower the recomputed total (float rounding) is undone, so the result never
   retains less than the start.

`blocks` restricts every move to channel blocks (e.g. attention heads: v rows / o columns may only be
permuted within a head). `permute_channels` applies a permutation to coupled producer rows and
consumer columns (gate/up rows + down_proj columns; v rows + o_proj columns); `permute_stats` gives
the consumer's calibration statistics in the new channel order.
"""
from __future__ import annotations

from typing import Sequence

import torch

from llmprune.errors import UserError
from llmprune.methods import LinearStats

PAIR_CHUNK_ELEMENTS = 1 << 24     # floats per chunk of the [pairs, M, M, rows] swap-gain tensor


def _kept_in_group(values: torch.Tensor, keep: int) -> torch.Tensor:
    """values [G, m, rows] -> bool [G, m, rows]: is column i among the `keep` largest of its group (per
    row; ties to the lower index, like a stable sort). m comparisons instead of a sort along a short,
    non-contiguous dim, which is slow."""
    m = values.shape[1]
    rank = torch.zeros(values.shape, dtype=torch.uint8, device=values.device)
    index = torch.arange(m, device=values.device).view(1, m, 1)
    for j in range(m):
        other = values[:, j:j + 1]                                          # [G, 1, rows]
        rank += (other > values) | ((other == values) & (j < index))
    return rank < keep


def nm_retained(score: torch.Tensor, n: int, m: int) -> float:
    """Σ over rows and M-groups of the M−N largest scores: what N:M selection keeps of `score` [out, in]."""
    rows, cols = score.shape
    values = score.reshape(rows, cols // m, m).permute(1, 2, 0)            # [G, m, rows]
    return float((values * _kept_in_group(values, m - n)).sum(dtype=torch.float64))


def _block_sizes(cols: int, m: int, blocks: int | Sequence[int] | None) -> list[int]:
    if blocks is None:
        sizes = [cols]
    elif isinstance(blocks, int):
        if blocks < 1 or cols % blocks:
            raise UserError(f"permutation: block size {blocks} does not divide {cols} channels")
        sizes = [blocks] * (cols // blocks)
    else:
        sizes = [int(b) for b in blocks]
    if sum(sizes) != cols or any(s < 1 or s % m for s in sizes):
        raise UserError(f"permutation: blocks {sizes[:8]}{'...' if len(sizes) > 8 else ''} must be multiples of "
                        f"M={m} that add up to the {cols} channels")
    return sizes


def ria_reallocation(score: torch.Tensor, m: int, sizes: Sequence[int]) -> torch.Tensor:
    """RIA's heuristic channel reallocation inside each block: perm [in]."""
    importance = score.sum(0, dtype=torch.float64)                        # [in]
    parts, start = [], 0
    for size in sizes:
        order = torch.argsort(importance[start:start + size], stable=True) + start   # ascending
        groups = size // m
        chunks = order.reshape(m, groups)                                # chunk c = c-th importance band
        chunks[1::2] = chunks[1::2].flip(1)                              # snake: odd chunks reversed
        parts.append(chunks.t().reshape(-1))                             # group g = column g of each chunk
        start += size
    return torch.cat(parts)


def _random_pairs(group_block: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random disjoint pairs of groups within the same block: (a [P], b [P])."""
    groups = group_block.numel()
    noise = torch.rand(groups, generator=generator).to(group_block.device)
    order = torch.argsort(group_block.double() * 2 + noise)              # shuffled within each block
    a, b = order[0:groups - 1:2], order[1:groups:2]
    same = group_block[a] == group_block[b]
    return a[same], b[same]


def _swap_round(score: torch.Tensor, perm: torch.Tensor, n: int, m: int, a: torch.Tensor, b: torch.Tensor
                ) -> torch.Tensor:
    """One round of best-swap-per-pair; returns the new perm (the caller checks the total).

    For group g, row r, with column i removed, the K-th largest of what is left is the (K+1)-th of the
    group if i was in the top K, else the K-th: two values per (g, r). So the retained score after
    swapping column i of a with column j of b is, summed over rows, a sum over "i in top K" masks
    times relu terms, i.e. batched [m, rows] x [rows, m] products, not an [m, m, rows] tensor.
    """
    rows, cols = score.shape
    keep = m - n
    values = score[:, perm].reshape(rows, cols // m, m).permute(1, 2, 0).contiguous()   # [G, m, rows]
    kept = _kept_in_group(values, keep)                                    # column i among the K kept?
    in_top = kept.to(values.dtype)
    kth = torch.where(kept, values, torch.inf).amin(1)                     # [G, rows] K-th largest
    after = torch.where(kept, -torch.inf, values).amax(1)                  # (K+1)-th largest
    # Retained change from removing column i (≤ 0): in the top K, the (K+1)-th moves up in its place.
    loss = (in_top * (after.unsqueeze(1) - values)).sum(-1)                # [G, m]

    new_perm = perm.clone()
    step = max(1, PAIR_CHUNK_ELEMENTS // (m * rows))
    for s in range(0, a.numel(), step):
        pa, pb = a[s:s + step], b[s:s + step]
        va, vb, top_a, top_b = values[pa], values[pb], in_top[pa], in_top[pb]   # [P, m, rows]
        # b's column j entering a where column i left: threshold after_a if i was kept, else kth_a.
        enter_a_hi = torch.relu(vb - after[pa].unsqueeze(1))               # [P, j, rows]
        enter_a_lo = torch.relu(vb - kth[pa].unsqueeze(1))
        into_a = enter_a_lo.sum(-1).unsqueeze(1) + top_a @ (enter_a_hi - enter_a_lo).transpose(1, 2)   # [P, i, j]
        enter_b_hi = torch.relu(va - after[pb].unsqueeze(1))               # [P, i, rows]
        enter_b_lo = torch.relu(va - kth[pb].unsqueeze(1))
        into_b = enter_b_lo.sum(-1).unsqueeze(2) + (enter_b_hi - enter_b_lo) @ top_b.transpose(1, 2)   # [P, i, j]
        gain = into_a + into_b + loss[pa].unsqueeze(2) + loss[pb].unsqueeze(1)                          # [P, m, m]
        best_gain, best = gain.reshape(gain.shape[0], -1).max(1)
        scale = (va.abs().sum((1, 2)) + vb.abs().sum((1, 2))).clamp_min(1e-30)
        ok = best_gain > 1e-6 * scale                                      # ignore float noise
        i, j = best // m, best % m
        pos_a, pos_b = (pa * m + i)[ok], (pb * m + j)[ok]
        new_perm[pos_a], new_perm[pos_b] = perm[pos_b], perm[pos_a]
    return new_perm


def nm_channel_permutation(score: torch.Tensor, n: int, m: int, *, blocks: int | Sequence[int] | None = None,
                           iters: int = 100, patience: int = 10, seed: int = 0) -> torch.Tensor:
    """perm [in] (long) such that N:M selection on score[:, perm] retains as much score as we can find.

    score `[out, in]`, larger = more important (e.g. Wanda's |W|·‖x‖ of the consumer matrix). `blocks`:
    None, a block size, or a list of block sizes (multiples of M, summing to `in`); channels never
    leave their block. `iters` swap rounds at most, stopping after `patience` rounds without gain.
    """
    rows, cols = score.shape
    if not (0 < n < m) or cols % m:
        raise UserError(f"permutation: {cols} channels cannot be grouped {n}:{m}")
    if iters < 0 or patience < 1:
        raise UserError("permutation: iters must be >= 0 and patience >= 1")
    sizes = _block_sizes(cols, m, blocks)
    score = score.to(torch.float32)
    identity = torch.arange(cols, device=score.device)
    heuristic = ria_reallocation(score, m, sizes)
    best_perm, best = identity, nm_retained(score, n, m)
    heuristic_total = nm_retained(score[:, heuristic], n, m)
    if heuristic_total > best:
        best_perm, best = heuristic, heuristic_total

    group_block = torch.repeat_interleave(torch.arange(len(sizes), device=score.device),
                                          torch.tensor(sizes, device=score.device) // m)    # [G]
    generator = torch.Generator().manual_seed(seed)
    stale = 0
    for _ in range(iters):
        a, b = _random_pairs(group_block, generator)
        if a.numel() == 0:
            break
        candidate = _swap_round(score, best_perm, n, m, a, b)
        total = nm_retained(score[:, candidate], n, m)
        if total > best:
            best_perm, best, stale = candidate, total, 0
        else:
            stale += 1
            if stale >= patience:
                break
    return best_perm


def invert_permutation(perm: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return inverse


def permute_channels(perm: torch.Tensor, producers: Sequence[torch.Tensor], consumers: Sequence[torch.Tensor]
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Apply `perm` to coupled channels without changing the function.

    producers: tensors whose dim 0 indexes the channels (weights `[channels, in]`, biases `[channels]`,
    e.g. gate_proj and up_proj rows); consumers: weights `[out, channels]` whose input columns are the
    same channels (e.g. down_proj). New channel c is old channel perm[c] on both sides, so
    consumer(act(producer(x))) is unchanged for any elementwise `act` between them.
    """
    perm = perm.to(torch.long)
    for t in producers:
        if t.shape[0] != perm.numel():
            raise ValueError(f"producer with {t.shape[0]} channels for a permutation of {perm.numel()}")
    for t in consumers:
        if t.dim() != 2 or t.shape[1] != perm.numel():
            raise ValueError(f"consumer of shape {tuple(t.shape)} for a permutation of {perm.numel()}")
    return ([t.index_select(0, perm.to(t.device)) for t in producers],
            [t.index_select(1, perm.to(t.device)) for t in consumers])


def permute_stats(stats: LinearStats, perm: torch.Tensor) -> LinearStats:
    """The consumer's input statistics after its input channels are permuted by `perm` (no recollection:
    every statistic is per channel or per channel pair). The memo of derived values is not carried over."""
    perm = perm.to(torch.long)

    def take(t: torch.Tensor | None, dims: int) -> torch.Tensor | None:
        if t is None:
            return None
        p = perm.to(t.device)
        return t[p] if dims == 1 else t[p][:, p]

    return LinearStats(n_tokens=stats.n_tokens, input_sq_norm=take(stats.input_sq_norm, 1),
                       input_sum=take(stats.input_sum, 1), hessian=take(stats.hessian, 2))
