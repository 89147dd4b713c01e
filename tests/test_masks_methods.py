"""Mask primitives and per-matrix method properties (no model needed)."""
import pytest
import torch

from llmprune.errors import UserError
from llmprune.masks import nm_keep_mask, nm_violations, num_to_prune, parse_pattern, rowwise_keep_mask
from llmprune.methods import METHODS, LinearStats


@pytest.mark.parametrize("bad", ["0", "1", "1.5", "-0.1", "nan", "abc", "3:2", "4:4", "0:4", "2:4:8", "a:b", ""])
def test_bad_patterns_are_user_errors(bad):
    with pytest.raises(UserError):
        parse_pattern(bad)


def test_pattern_parsing():
    assert parse_pattern("2:4").sparsity == 0.5 and parse_pattern("2:4").is_nm
    assert parse_pattern(0.7).sparsity == pytest.approx(0.7) and not parse_pattern(0.7).is_nm


def test_nm_mask_drops_exactly_n_lowest_per_group():
    torch.manual_seed(0)
    score = torch.rand(7, 24)
    keep = nm_keep_mask(score, 2, 4)
    groups = keep.reshape(7, 6, 4)
    assert (groups.sum(-1) == 2).all()
    # the dropped ones are the two smallest of each group
    s = score.reshape(7, 6, 4)
    kept_min = torch.where(groups, s, torch.inf).amin(-1)
    dropped_max = torch.where(~groups, s, -torch.inf).amax(-1)
    assert (dropped_max < kept_min).all()


def test_rowwise_mask_is_exact_for_the_matrix_and_per_row():
    torch.manual_seed(0)
    score = torch.rand(9, 13)
    keep = rowwise_keep_mask(score, 0.7)
    assert (~keep).sum().item() == num_to_prune(9 * 13, 0.7)
    per_row = (~keep).sum(1)
    assert per_row.max() - per_row.min() <= 1
    # within each row, every pruned score is below every kept score
    for r in range(9):
        assert score[r][~keep[r]].max() < score[r][keep[r]].min()


def _stats(x):
    return LinearStats(n_tokens=x.shape[0], input_sq_norm=(x * x).sum(0), hessian=x.t() @ x)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("spec", ["0.5", "0.63", "2:4", "4:8", "1:4"])
def test_each_method_hits_exact_sparsity_and_valid_nm(method, spec):
    torch.manual_seed(1)
    weight = torch.randn(24, 64)
    x = torch.randn(300, 64) * torch.rand(64)
    pattern = parse_pattern(spec)
    out = METHODS[method].fn(weight.clone(), _stats(x), pattern)
    assert out.shape == weight.shape
    zeros = (out == 0).sum().item()
    assert zeros == num_to_prune(out.numel(), pattern.sparsity)
    if pattern.is_nm:
        assert nm_violations(out, pattern.n, pattern.m) == 0
    if method != "sparsegpt":  # mask-only methods keep surviving weights bit-identical
        kept = out != 0
        assert torch.equal(out[kept], weight[kept])


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("n,m", [(1, 4), (3, 8), (5, 8)])
def test_nm_with_n_not_half_of_m_has_exactly_n_zeros_per_group(method, n, m):
    """N:M = N zeros in every group of M consecutive inputs of a row (not N kept): N != M/2 tells them apart."""
    torch.manual_seed(2)
    weight = torch.randn(16, 64)
    x = torch.randn(300, 64) * torch.rand(64)
    out = METHODS[method].fn(weight.clone(), _stats(x), parse_pattern(f"{n}:{m}"))
    zeros_per_group = (out == 0).reshape(16, 64 // m, m).sum(-1)           # [rows, groups]
    assert torch.equal(zeros_per_group, torch.full_like(zeros_per_group, n))


def test_wanda_uses_input_norms():
    """A column with huge activations must survive even if its weights are small."""
    weight = torch.ones(4, 8)
    weight[:, 3] = 0.01
    x = torch.ones(100, 8)
    x[:, 3] = 1000.0
    out = METHODS["wanda"].fn(weight.clone(), _stats(x), parse_pattern("0.5"))
    assert (out[:, 3] != 0).all()
    out_mag = METHODS["magnitude"].fn(weight.clone(), _stats(x), parse_pattern("0.5"))
    assert (out_mag[:, 3] == 0).all()


def test_sparsegpt_dead_inputs_are_zeroed():
    torch.manual_seed(0)
    weight = torch.randn(8, 16)
    x = torch.randn(200, 16)
    x[:, 5] = 0.0
    out = METHODS["sparsegpt"].fn(weight.clone(), _stats(x), parse_pattern("0.5"))
    assert (out[:, 5] == 0).all()


def _reference_sparsegpt(W, H, sparsity, prunen=0, prunem=0, blocksize=128, percdamp=0.01):
    """Column-by-column port of IST-DASLab/sparsegpt `fasterprune` (the published algorithm)."""
    W = W.clone(); H = H.clone(); rows, columns = W.shape
    dead = torch.diag(H) == 0; H[dead, dead] = 1; W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(columns)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone(); Q1 = torch.zeros_like(W1); Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1 ** 2 / torch.diag(Hinv1).reshape(1, -1) ** 2
            mask1 = tmp <= torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            w = W1[:, i]; d = Hinv1[i, i]
            if prunen and i % prunem == 0:
                tmp = W1[:, i:i + prunem] ** 2 / torch.diag(Hinv1)[i:i + prunem].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone(); q[mask1[:, i]] = 0; Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


def test_sparsegpt_matches_reference_column_sweep():
    """Our two-level lazy sweep equals the reference column-by-column sweep for N:M (float64)."""
    torch.manual_seed(0)
    weight = torch.randn(40, 320, dtype=torch.float64)
    x = torch.randn(1000, 320, dtype=torch.float64) * torch.rand(320, dtype=torch.float64) * 3
    hessian = x.t() @ x
    ours = METHODS["sparsegpt"].fn(weight.clone(), LinearStats(n_tokens=1000, hessian=hessian), parse_pattern("2:4"))
    ref = _reference_sparsegpt(weight, 2 * hessian / 1000, 0, 2, 4)
    assert torch.allclose(ours, ref, atol=1e-8, rtol=1e-8)
