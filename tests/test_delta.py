"""Per-tensor delta rules: DARE drop rate and unbiasedness, magnitude, rescales, TIES, the q search.
No models here (see test_delta_cli.py for end-to-end runs; the shard reader/writer are tested in
test_checkpoint_io.py)."""
import math

import pytest
import torch

from llmprune.delta.darex import find_q, top_k_mse_sums
from llmprune.delta.merge import merge_deltas
from llmprune.delta.sparsify import (Rescale, dare_keep_mask, magnitude_keep_mask, parse_rescale, rescale_factor,
                                     sparsify, tensor_seed)
from llmprune.delta.streaming import positive_zero
from llmprune.errors import UserError


def test_dare_drop_fraction_matches_p():
    n = 200_000
    for p in (0.1, 0.5, 0.9, 0.99):
        keep = dare_keep_mask((400, 500), p, tensor_seed(0, "w"))
        dropped = 1.0 - keep.float().mean().item()
        tolerance = 5 * math.sqrt(p * (1 - p) / n)  # 5 binomial standard deviations
        assert abs(dropped - p) < tolerance, (p, dropped)


def test_masks_are_seeded_by_seed_name_and_model():
    a = dare_keep_mask((64, 64), 0.5, tensor_seed(0, "layers.0.w"))
    assert torch.equal(a, dare_keep_mask((64, 64), 0.5, tensor_seed(0, "layers.0.w")))
    assert not torch.equal(a, dare_keep_mask((64, 64), 0.5, tensor_seed(1, "layers.0.w")))
    assert not torch.equal(a, dare_keep_mask((64, 64), 0.5, tensor_seed(0, "layers.1.w")))
    assert tensor_seed(0, "x", 0) != tensor_seed(0, "x", 1)
    assert tensor_seed(0, "x") == tensor_seed(0, "x")  # stable (not Python's salted hash)


def test_dare_inverse_rescale_is_unbiased_and_none_is_not():
    torch.manual_seed(0)
    delta = torch.randn(50) * 0.01
    p, seeds = 0.5, 4000
    total_inverse = torch.zeros_like(delta)
    total_none = torch.zeros_like(delta)
    for s in range(seeds):
        keep, factor = sparsify(delta, "random", p, Rescale("inverse"), tensor_seed(s, "w"))
        assert factor == pytest.approx(1 / (1 - p))
        total_inverse += keep * delta * factor
        total_none += keep * delta
    mean_inverse = total_inverse / seeds
    # per-entry std of the mean: |Δ| sqrt(p/(1-p)/seeds)
    sd = delta.abs() * math.sqrt(p / (1 - p) / seeds)
    assert ((mean_inverse - delta).abs() < 5 * sd + 1e-9).all()
    # without rescale the mean shrinks to (1-p)·Δ: far from Δ
    assert ((total_none / seeds - (1 - p) * delta).abs() < 5 * sd * (1 - p) + 1e-9).all()
    assert (total_none / seeds - delta).abs().mean() > 10 * sd.mean() * (1 - p)


def test_magnitude_drops_exactly_the_smallest():
    torch.manual_seed(1)
    delta = torch.randn(37, 29)
    for p in (0.0, 0.3, 0.9, 0.999):
        keep = magnitude_keep_mask(delta, p)
        n_drop = int(p * delta.numel())
        assert int((~keep).sum()) == n_drop
        order = delta.abs().flatten().argsort()
        expected = torch.ones(delta.numel(), dtype=torch.bool)
        expected[order[:n_drop]] = False
        assert torch.equal(keep.flatten(), expected)


def test_magnitude_exact_count_with_ties():
    delta = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, -2.0, 0.5, 0.0])
    keep = magnitude_keep_mask(delta, 0.5)  # drop 4 of 5 zeros... exactly 4 entries
    assert int((~keep).sum()) == 4
    assert keep[4] and keep[5] and keep[6]  # every non-zero entry is among the largest 4
    assert int(keep[[0, 1, 2, 3, 7]].sum()) == 1


def test_rescale_rules():
    torch.manual_seed(2)
    delta = torch.randn(1000)
    keep = magnitude_keep_mask(delta, 0.8)
    assert rescale_factor(delta, keep, Rescale("none"), 0.8) == 1.0
    assert rescale_factor(delta, keep, Rescale("inverse"), 0.8) == pytest.approx(5.0)
    assert rescale_factor(delta, keep, Rescale("q", 0.25), 0.8) == pytest.approx(4.0)
    l1 = rescale_factor(delta, keep, Rescale("l1"), 0.8)
    assert (delta * keep * l1).abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-5)
    # mergekit skips the L1 rescale for (near-)zero deltas
    assert rescale_factor(torch.zeros(10), torch.ones(10, dtype=torch.bool), Rescale("l1"), 0.5) == 1.0


def test_parse_rescale():
    assert parse_rescale("q=0.2") == Rescale("q", 0.2)
    assert parse_rescale("AUTO").kind == "auto"
    for bad in ("q=0", "q=-1", "q=abc", "half"):
        with pytest.raises(UserError):
            parse_rescale(bad)


def test_ties_sign_election_hand_made():
    # three models, five positions; weights 1 (TIES paper: elect sign of the sum, disjoint mean)
    d1 = torch.tensor([1.0, 1.0, 3.0, 0.0, -1.0])
    d2 = torch.tensor([2.0, 1.0, -1.0, 0.0, 0.0])
    d3 = torch.tensor([-4.0, -1.0, -1.0, 0.0, 2.0])
    merged = merge_deltas([d1, d2, d3], [1.0, 1.0, 1.0], "ties", normalize=True)
    # pos0: sum -1 -> "-": only -4 agrees -> -4
    # pos1: sum +1 -> "+": 1, 1 agree -> mean 1
    # pos2: sum +1 -> "+": only 3 agrees -> 3
    # pos3: all zero -> 0
    # pos4: sum +1 -> "+": only 2 agrees (the 0 never votes) -> 2
    assert torch.equal(merged, torch.tensor([-4.0, 1.0, 3.0, 0.0, 2.0]))
    # without normalize (dare-ties): the agreeing entries are summed
    summed = merge_deltas([d1, d2, d3], [1.0, 1.0, 1.0], "ties", normalize=False)
    assert torch.equal(summed, torch.tensor([-4.0, 2.0, 3.0, 0.0, 2.0]))
    # weights enter the election: doubling model 1 flips position 0 to "+"
    weighted = merge_deltas([d1, d2, d3], [3.0, 1.0, 1.0], "ties", normalize=True)
    assert weighted[0].item() == pytest.approx((3 * 1.0 + 2.0) / 4.0)


def test_linear_merge():
    d1, d2 = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 4.0])
    assert torch.equal(merge_deltas([d1, d2], [0.5, 0.25], "linear", False), torch.tensor([1.25, 0.0]))
    assert torch.allclose(merge_deltas([d1, d2], [1.0, 1.0], "linear", True), torch.tensor([2.0, 1.0]))


def test_find_q_coarse_to_fine():
    calls = []

    def objective(q):
        calls.append(q)
        return (q - 0.137) ** 2

    q, trace = find_q(objective, 0.01, 1.0)
    coarse_step = 0.099
    assert abs(q - 0.137) <= coarse_step * 0.1 / 2 + 1e-9  # within half a fine step
    assert all(0.01 - 1e-12 <= c <= 1.0 + 1e-12 for c in calls)
    assert len(calls) == len(set(calls)) == len(trace)
    assert len(calls) < 30  # early stopping kicked in on the coarse grid
    # monotone objective: the best is the boundary
    q_low, _ = find_q(lambda q: q, 0.1, 1.0)
    assert q_low == pytest.approx(0.1)


def test_top_k_mse():
    ref = torch.tensor([[[5.0, 1.0, 3.0, 0.0, 2.0, -1.0]]])
    values, indices = ref.topk(5, dim=-1)
    s, n = top_k_mse_sums(ref, values, indices)
    assert s == 0.0 and n == 5
    other = ref.clone()
    other[..., 5] = 100.0  # outside the reference top-5: ignored
    other[..., 0] = 6.0  # inside: counted
    s, n = top_k_mse_sums(other, values, indices)
    assert s == pytest.approx(1.0)


def test_positive_zero():
    assert positive_zero(torch.tensor([-0.0])).view(torch.int32).item() == 0
