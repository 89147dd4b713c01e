"""Quality methods (issue 13): ALPS, PCG refit, DSnoT, N:M channel permutation, allocation search."""
import itertools

import pytest
import torch
from torch import nn

import llmprune
from llmprune.allocation_search import LevelGrid, allocate_from_curves, evolutionary_search, weighted_mean
from llmprune.arch import prunable_linears, weight_2d
from llmprune.calibration.observers import LayerObserver
from llmprune.errors import UserError
from llmprune.masks import nm_keep_mask, nm_violations, num_to_prune, parse_pattern
from llmprune.methods import METHODS, LinearStats
from llmprune.methods.dsnot import dsnot_refine, refine_and_refit
from llmprune.methods.permute import nm_channel_permutation, nm_retained, permute_channels, permute_stats
from llmprune.methods.refit import refit_on_mask
from tiny_models import VOCAB, outlier_model, tiny_model


def _stats(x: torch.Tensor) -> LinearStats:
    x = x.reshape(-1, x.shape[-1]).float()
    return LinearStats(n_tokens=x.shape[0], input_sq_norm=(x * x).sum(0), input_sum=x.sum(0), hessian=x.t() @ x)


def _error(dense: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    d = (dense - pruned).double()
    return float(((d @ hessian.double()) * d).sum())


def _random_case(rows=24, cols=64, tokens=400, seed=1):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g)
    x = (torch.randn(tokens, cols, generator=g) + 0.3) * torch.rand(cols, generator=g) * 3
    return weight, x


# ---- exact patterns -----------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["0.5", "0.7", "2:4", "4:8"])
def test_alps_hits_exact_sparsity_and_valid_nm(spec):
    weight, x = _random_case()
    pattern = parse_pattern(spec)
    out = METHODS["alps"].fn(weight.clone(), _stats(x), pattern)
    assert out.shape == weight.shape and out.dtype == torch.float32
    assert (out == 0).sum().item() == num_to_prune(out.numel(), pattern.sparsity)
    if pattern.is_nm:
        assert nm_violations(out, pattern.n, pattern.m) == 0


@pytest.mark.parametrize("start", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("spec", ["0.5", "0.7", "2:4", "4:8"])
def test_dsnot_keeps_the_count_per_row_and_the_nm_pattern(spec, start):
    weight, x = _random_case()
    stats, pattern = _stats(x), parse_pattern(spec)
    keep = METHODS[start].fn(weight.clone(), _stats(x), pattern) != 0
    refined = dsnot_refine(weight, keep, stats, pattern, guard=False)
    assert not torch.equal(refined, keep)                       # it did swap something
    assert torch.equal(refined.sum(1), keep.sum(1))             # same count in every row
    if pattern.is_nm:
        assert nm_violations(weight * refined, pattern.n, pattern.m) == 0
        assert torch.equal(refined.reshape(24, -1, pattern.m).sum(-1), keep.reshape(24, -1, pattern.m).sum(-1))
    guarded = dsnot_refine(weight, keep, stats, pattern)
    assert torch.equal(guarded.sum(1), keep.sum(1))


def test_dsnot_moves_the_expected_error_towards_zero():
    """The published rule, on a case where it must act: rows whose pruned weights all have the same
    sign of w·E[x] have a large ε; swaps shrink |ε| (the quantity DSnoT targets)."""
    weight, x = _random_case(rows=16, cols=64, tokens=600, seed=4)
    x = x.abs() + 0.5                                            # positive means
    stats, pattern = _stats(x), parse_pattern("0.5")
    keep = METHODS["wanda"].fn(weight.clone(), stats, pattern) != 0
    mean = stats.input_sum / stats.n_tokens
    refined = dsnot_refine(weight, keep, stats, pattern, guard=False, same_sign=True)
    eps_before = ((weight * mean) * ~keep).sum(1).abs()
    eps_after = ((weight * mean) * ~refined).sum(1).abs()
    changed = (refined != keep).any(1)
    assert changed.any()
    assert (eps_after[changed] < eps_before[changed]).all()


def test_dsnot_needs_the_input_sums():
    weight, x = _random_case()
    stats = _stats(x)
    stats.input_sum = None
    with pytest.raises(UserError):
        dsnot_refine(weight, torch.ones_like(weight, dtype=torch.bool), stats, parse_pattern("0.5"))


@pytest.mark.parametrize("bad", [{"max_iter": 0}, {"rho": 0.0}, {"refit_iters": -1}])
def test_alps_rejects_bad_parameters(bad):
    weight, x = _random_case()
    with pytest.raises(UserError):
        METHODS["alps"].fn(weight.clone(), _stats(x), parse_pattern("0.5"), **bad)


# ---- refit ---------------------------------------------------------------------------------------

def test_refit_is_the_least_squares_solution_on_the_mask():
    weight, x = _random_case(rows=6, cols=20, tokens=200, seed=2)
    stats = _stats(x)
    keep = torch.rand(6, 20, generator=torch.Generator().manual_seed(3)) > 0.5
    out = refit_on_mask(weight, keep, stats.hessian, iters=200, dampening=0.0, n_tokens=stats.n_tokens)
    assert torch.equal(out != 0, keep)
    h = stats.hessian.double() / stats.n_tokens
    gradient = ((out.double() - weight.double()) @ h) * keep                      # zero on the support
    assert gradient.abs().max() < 1e-6 * h.abs().max() * weight.abs().max()
    for r in range(6):                                                             # = a direct solve per row
        s = keep[r]
        direct = torch.linalg.solve(h[s][:, s], (h @ weight[r].double())[s])
        assert torch.allclose(out[r][s].double(), direct, rtol=1e-4, atol=1e-5)


def test_refit_never_worse_than_the_masked_weights_it_starts_from():
    weight, x = _random_case()
    stats = _stats(x)
    pruned = METHODS["sparsegpt"].fn(weight.clone(), _stats(x), parse_pattern("0.7"))
    refit = refit_on_mask(weight, pruned != 0, stats.hessian, n_tokens=stats.n_tokens, init=pruned)
    assert _error(weight, refit, stats.hessian) < _error(weight, pruned, stats.hessian)
    assert torch.equal(refit != 0, pruned != 0)


# ---- reconstruction error on a tiny model's layer ------------------------------------------------

@pytest.fixture(scope="module")
def captured_layer():
    """Dense weights and the inputs each linear of a tiny model's layer saw (outlier-scaled norms)."""
    model = outlier_model()
    linears = prunable_linears(model)
    inputs = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: inputs.setdefault(n, []).append(a[0].detach()))
             for n, m in linears.items()]
    ids = torch.randint(0, VOCAB, (16, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return {n: (weight_2d(m).detach().clone(), _stats(torch.cat(inputs[n]))) for n, m in linears.items()}


@pytest.mark.parametrize("spec", ["0.7", "2:4"])
def test_alps_reconstructs_better_than_sparsegpt_on_every_linear(captured_layer, spec):
    pattern = parse_pattern(spec)
    for name, (weight, stats) in captured_layer.items():
        fresh = lambda: LinearStats(n_tokens=stats.n_tokens, hessian=stats.hessian)   # noqa: E731
        sgpt = METHODS["sparsegpt"].fn(weight.clone(), fresh(), pattern)
        alps = METHODS["alps"].fn(weight.clone(), fresh(), pattern)
        assert (alps == 0).sum() == (sgpt == 0).sum()
        assert _error(weight, alps, stats.hessian) < _error(weight, sgpt, stats.hessian), name


@pytest.mark.parametrize("spec", ["0.5", "0.7", "2:4"])
def test_dsnot_never_increases_the_reconstruction_error(captured_layer, spec):
    pattern = parse_pattern(spec)
    improved = 0
    for name, (weight, stats) in captured_layer.items():
        for start in ("wanda", "sparsegpt"):
            keep = METHODS[start].fn(weight.clone(), LinearStats(**{k: getattr(stats, k) for k in
                                     ("n_tokens", "input_sq_norm", "hessian")}), pattern) != 0
            refined = dsnot_refine(weight, keep, stats, pattern)
            before, after = _error(weight, weight * keep, stats.hessian), _error(weight, weight * refined, stats.hessian)
            assert after <= before * (1 + 1e-6), (name, start)
            improved += after < before
            # with SparseGPT's updated weights: refine the mask, then refit on it
            pruned = METHODS["sparsegpt"].fn(weight.clone(), LinearStats(n_tokens=stats.n_tokens, hessian=stats.hessian), pattern)
            out = refine_and_refit(weight, pruned, stats, pattern)
            assert (out == 0).sum() == (pruned == 0).sum()
    assert improved > 0


# ---- channel permutation -------------------------------------------------------------------------

def _glu(hidden=32, inter=64, seed=0):
    torch.manual_seed(seed)
    gate, up, down = nn.Linear(hidden, inter, bias=False), nn.Linear(hidden, inter, bias=False), nn.Linear(inter, hidden)
    return gate, up, down


def _glu_forward(x, gate_w, up_w, down_w, down_b):
    return nn.functional.linear(nn.functional.silu(x @ gate_w.t()) * (x @ up_w.t()), down_w, down_b)


def test_permutation_leaves_the_glu_function_unchanged():
    gate, up, down = _glu()
    x = torch.randn(50, 32)
    with torch.no_grad():
        hidden = nn.functional.silu(gate(x)) * up(x)
        score = down.weight.abs() * hidden.norm(dim=0)
        perm = nm_channel_permutation(score, 2, 4, iters=20)
        assert sorted(perm.tolist()) == list(range(64))
        (g, u), (d,) = permute_channels(perm, [gate.weight, up.weight], [down.weight])
        assert torch.allclose(_glu_forward(x, g, u, d, down.bias), down(hidden), atol=1e-5)
        assert nm_retained(score[:, perm], 2, 4) >= nm_retained(score, 2, 4)


def test_permutation_lowers_nm_error_when_important_channels_are_clustered():
    """Inputs 0..15 of down_proj carry 10x larger activations: unpermuted, each of their 2:4 groups must
    drop two of them; the permutation spreads them and 2:4 Wanda loses less of the output."""
    gate, up, down = _glu()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        up.weight[:16] *= 10.0
        x = torch.randn(400, 32, generator=g)
        hidden = nn.functional.silu(gate(x)) * up(x)                       # [tokens, 64]
        stats = _stats(hidden)
        score = down.weight.abs() * stats.input_sq_norm.sqrt()
        perm = nm_channel_permutation(score, 2, 4)
        assert nm_retained(score[:, perm], 2, 4) > nm_retained(score, 2, 4)
        (g_w, u_w), (d_w,) = permute_channels(perm, [gate.weight, up.weight], [down.weight])
        plain = METHODS["wanda"].fn(down.weight.clone(), stats, parse_pattern("2:4"))
        permuted_stats = permute_stats(stats, perm)
        direct = _stats(hidden[:, perm])
        assert torch.allclose(permuted_stats.hessian, direct.hessian, rtol=1e-4, atol=1e-3)
        assert torch.allclose(permuted_stats.input_sum, direct.input_sum, rtol=1e-4, atol=1e-3)
        permuted = METHODS["wanda"].fn(d_w.clone(), permuted_stats, parse_pattern("2:4"))
        assert nm_violations(permuted, 2, 4) == 0
        dense_out = down(hidden)
        err_plain = (nn.functional.linear(hidden, plain, down.bias) - dense_out).norm()
        err_perm = (_glu_forward(x, g_w, u_w, permuted, down.bias) - dense_out).norm()
    assert err_perm < 0.8 * err_plain


def test_permutation_stays_within_blocks():
    score = torch.rand(8, 64, generator=torch.Generator().manual_seed(0))
    score[:, 16:32] *= 20
    perm = nm_channel_permutation(score, 2, 4, blocks=16)
    for b in range(4):
        assert sorted(perm[b * 16:(b + 1) * 16].tolist()) == list(range(b * 16, (b + 1) * 16))
    assert nm_retained(score[:, perm], 2, 4) >= nm_retained(score, 2, 4)
    assert torch.equal(nm_channel_permutation(score, 2, 4, blocks=[16, 16, 32]).sort().values, torch.arange(64))
    with pytest.raises(UserError):
        nm_channel_permutation(score, 2, 4, blocks=[10, 54])


# ---- allocation search ---------------------------------------------------------------------------

def test_curve_allocation_keeps_the_mean_and_is_the_exact_optimum():
    grid = LevelGrid(target=0.6, step=0.05, max_offset=2)
    offsets = grid.offsets()
    g = torch.Generator().manual_seed(0)
    sensitivity = torch.rand(5, generator=g) * 10
    costs = [[float(s * grid.level(k) ** 3 + 0.01 * k) for k in offsets] for s in sensitivity]
    for weights in ([1, 1, 1, 1, 1], [4, 1, 1, 4, 14]):
        chosen = allocate_from_curves(costs, grid, weights)
        assert sum(w * k for w, k in zip(weights, chosen)) == 0
        assert weighted_mean(grid, chosen, weights) == pytest.approx(0.6, abs=1e-12)
        cost = sum(costs[u][offsets.index(k)] for u, k in enumerate(chosen))
        uniform = sum(c[offsets.index(0)] for c in costs)
        assert cost <= uniform
        best = min(sum(costs[u][offsets.index(k)] for u, k in enumerate(ks))
                   for ks in itertools.product(offsets, repeat=5) if sum(w * k for w, k in zip(weights, ks)) == 0)
        assert cost == pytest.approx(best)
    # the least sensitive unit takes the most sparsity
    chosen = allocate_from_curves(costs, grid, [1] * 5)
    assert chosen[int(sensitivity.argmin())] == max(chosen) > 0


def test_evolutionary_search_keeps_the_mean_and_never_loses_to_uniform():
    grid = LevelGrid(target=0.7, step=0.05, max_offset=3)
    weights = [2, 1, 1, 2, 2, 1]
    sensitivity = [5.0, 1.0, 0.2, 3.0, 0.5, 2.0]
    seen = []

    def loss(offsets):
        assert sum(w * k for w, k in zip(weights, offsets)) == 0         # every candidate keeps the mean
        seen.append(list(offsets))
        return sum(s * grid.level(k) ** 4 for s, k in zip(sensitivity, offsets))

    result = evolutionary_search(loss, grid, weights, generations=40, offspring=8, seed=1)
    assert weighted_mean(grid, result.offsets, weights) == pytest.approx(0.7, abs=1e-12)
    assert result.loss < result.uniform_loss == loss([0] * 6)
    assert result.history == sorted(result.history, reverse=True)          # the parent never gets worse
    assert len(seen) > 1


def test_evolutionary_search_returns_uniform_when_nothing_beats_it():
    grid = LevelGrid(target=0.5, step=0.1, max_offset=2)
    result = evolutionary_search(lambda ks: sum(k * k for k in ks), grid, [1, 1, 1], generations=10,
                                 starts=[[1, -1, 0]])
    assert result.offsets == [0, 0, 0] and result.loss == result.uniform_loss == 0
    with pytest.raises(UserError):
        evolutionary_search(lambda ks: 0.0, grid, [1, 1, 1], starts=[[1, 1, 0]])   # breaks the mean


# ---- statistics and engine -----------------------------------------------------------------------

def test_observer_accumulates_input_sums_only_when_needed():
    lin = nn.Linear(6, 3)
    x1, x2 = torch.randn(2, 5, 6), torch.randn(4, 6)
    obs = LayerObserver({"lin": lin}, {"input_sum", "input_sq_norm"})
    for b, x in enumerate((x1, x2)):
        obs.start_batch(b)
        obs.observe("lin", x)
        obs.end_batch(b)
    obs.seal_all()                      # batch sums are totalled (in a fixed order) when sealed
    stats = obs.stats["lin"]
    flat = torch.cat([x1.reshape(-1, 6), x2])
    assert stats.n_tokens == 14
    assert torch.allclose(stats.input_sum, flat.sum(0), atol=1e-5)
    assert torch.allclose(stats.input_sq_norm, (flat * flat).sum(0), atol=1e-5)
    plain = LayerObserver({"lin": lin}, {"input_sq_norm"})
    plain.start_batch(0)
    plain.observe("lin", x2)
    plain.end_batch(0)
    plain.seal_all()
    assert plain.stats["lin"].input_sum is None and plain.stats["lin"].input_sq_norm is not None


def test_alps_through_the_engine_prunes_every_matrix_exactly():
    ids = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
    model, report = llmprune.compress(tiny_model("llama"), None,
                                      {"stages": [{"method": "alps", "sparsity": "2:4", "max_iter": 6}],
                                       "calibration": {"batch_size": 4}}, calib=ids, device="cpu", progress=False)
    for name, module in prunable_linears(model).items():
        w = weight_2d(module)
        assert nm_violations(w, 2, 4) == 0 and (w == 0).sum().item() == w.numel() // 2, name


def test_nm_keep_mask_helper_matches_alps_projection():
    from llmprune.methods.alps import magnitude_keep_mask
    values = torch.randn(6, 16)
    assert torch.equal(magnitude_keep_mask(values, parse_pattern("2:4")), nm_keep_mask(values.abs(), 2, 4))
    keep = magnitude_keep_mask(torch.ones(4, 10), parse_pattern("0.35"))          # all tied: still exact
    assert (~keep).sum().item() == num_to_prune(40, 0.35)


@pytest.mark.parametrize("k", [1, 1000, 150_000, 299_999, 300_000])
def test_kth_smallest_is_exact(k):
    from llmprune.methods.alps import kth_smallest
    values = torch.randn(300_000, generator=torch.Generator().manual_seed(0)).abs()
    values[:5000] = 0.5                                                            # many ties
    assert kth_smallest(values, k) == torch.kthvalue(values, k).values


# ---- stage options: refine, permute, allocation search, the quality recipes -------------------------

def _calib(n=8, seqlen=32, seed=0):
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _compress(model, stage, ids=None):
    return llmprune.compress(model, None, {"stages": [stage], "calibration": {"batch_size": 4}},
                             calib=_calib() if ids is None else ids, device="cpu", progress=False)


def _loss(model, ids) -> float:
    with torch.no_grad():
        return sum(float(model(input_ids=ids[i:i + 1], labels=ids[i:i + 1]).loss) for i in range(len(ids))) / len(ids)


@pytest.mark.parametrize("method,spec", [("sparsegpt", "0.6"), ("wanda", "0.7"), ("alps", "2:4"), ("sparsegpt", "2:4")])
def test_refine_dsnot_in_the_stage_keeps_every_row_count_and_pattern(method, spec):
    pattern = parse_pattern(spec)
    extra = {"max_iter": 6} if method == "alps" else {}
    plain, _ = _compress(tiny_model("llama"), {"method": method, "sparsity": spec, **extra})
    refined, report = _compress(tiny_model("llama"), {"method": method, "sparsity": spec, "refine": "dsnot", **extra})
    changed = 0
    for (name, module), ref in zip(prunable_linears(refined).items(), prunable_linears(plain).values()):
        w, w0 = weight_2d(module), weight_2d(ref)
        # the method's own zeros per row (SparseGPT/ALPS prune row by row at N:M, per matrix otherwise)
        assert (w == 0).sum().item() == (w0 == 0).sum().item(), name
        if pattern.is_nm:
            assert nm_violations(w, pattern.n, pattern.m) == 0, name
            assert torch.equal((w == 0).sum(1), (w0 == 0).sum(1)), name
        changed += not torch.equal(w == 0, w0 == 0)
    assert changed > 0                                    # DSnoT did swap something
    assert report.stages[0].params["refine"] == "dsnot"


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3", "opt", "gpt_neox", "phi3"])
def test_channel_permutation_of_the_couplings_leaves_the_dense_model_unchanged(arch):
    from llmprune.arch import decoder_layers
    from llmprune.edits import MaskState
    from llmprune.stages.permutation import ChannelPermutation, apply_permutation, model_couplings

    model = tiny_model(arch)
    ids = _calib(2, 16)
    with torch.no_grad():
        before = model(ids).logits
    couplings = model_couplings(model, parse_pattern("2:4"))
    assert couplings, arch                                    # the MLP coupling at least
    gen = torch.Generator().manual_seed(1)
    for layer in decoder_layers(model):
        for coupling in couplings.values():
            blocks, _, channels = coupling.columns.shape
            local = torch.stack([torch.randperm(channels, generator=gen) for _ in range(blocks)])
            apply_permutation(layer, ChannelPermutation(coupling, local), MaskState())
    with torch.no_grad():
        after = model(ids).logits
    assert torch.allclose(before, after, atol=1e-4), arch
    moved = sum(not torch.equal(weight_2d(a), weight_2d(b)) for a, b in
                zip(prunable_linears(model).values(), prunable_linears(tiny_model(arch)).values()))
    assert moved > 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_permute_in_the_stage_is_nm_in_stored_columns_and_moves_the_winners(arch):
    from llmprune.arch import decoder_layers
    ids = _calib()
    plain, _ = _compress(tiny_model(arch), {"method": "sparsegpt", "sparsity": "2:4", "true_sequential": False}, ids)
    permuted, report = _compress(tiny_model(arch), {"method": "sparsegpt", "sparsity": "2:4", "permute": True,
                                                    "true_sequential": False}, ids)
    for name, module in prunable_linears(permuted).items():
        w = weight_2d(module)
        assert nm_violations(w, 2, 4) == 0 and (w == 0).sum().item() == w.numel() // 2, name
    won = report.stages[0].scores["permuted"]
    assert won and any(won.values())
    # the producers and consumers of a winning coupling moved: their weights differ from the plain run's
    layer_p, layer_0 = decoder_layers(permuted)[0], decoder_layers(plain)[0]
    consumers = [n for n, w in won.items() if w]
    assert any(not torch.equal(weight_2d(layer_p.get_submodule(n.split(".", 3)[3])),
                               weight_2d(layer_0.get_submodule(n.split(".", 3)[3]))) for n in consumers)


def test_search_allocation_mean_is_the_target_and_its_loss_is_not_above_uniform():
    ids = _calib(8, 32)
    for method in ("wanda", "sparsegpt"):
        uniform, _ = _compress(tiny_model("llama"), {"method": method, "sparsity": 0.7}, ids)
        searched, report = _compress(tiny_model("llama"), {"method": method, "sparsity": 0.7, "allocation": "search"},
                                     ids)
        record = report.stages[0]
        sizes = {n: weight_2d(m).numel() for n, m in prunable_linears(searched).items()}
        zeros = sum((weight_2d(m) == 0).sum().item() for m in prunable_linears(searched).values())
        assert abs(zeros / sum(sizes.values()) - 0.7) < 1e-3, method
        assert set(record.layers) == {"model.layers.0", "model.layers.1"}
        search = record.scores["search"]
        assert search["kept"] in ("search", "uniform")
        # independent check on the calibration windows: never worse than the uniform run
        assert _loss(searched, ids) <= _loss(uniform, ids) + 1e-6, method
        if search["kept"] == "search":
            assert len(set(record.layers.values())) > 1
            assert search["calibration_loss"]["searched"] < search["calibration_loss"]["uniform"]


def test_search_keeps_uniform_when_the_chosen_levels_are_worse(monkeypatch):
    from llmprune import allocation_search

    def bad_choice(self, hidden, calls, input_ids, device, *, generations, seed=0):
        # the first layer's unit at the lowest level, the last at the highest: a valid but bad assignment
        offsets = [0] * len(self.units)
        offsets[0], offsets[-1] = self.levels[-1], self.levels[0]
        return allocation_search.SearchOutcome(offsets=offsets, curve_offsets=offsets, uniform_loss=1.0,
                                               curve_loss=1.0, loss=0.5, evaluations=0, seconds=0.0)

    ids = _calib(8, 32)
    uniform, _ = _compress(tiny_model("llama"), {"method": "wanda", "sparsity": 0.7}, ids)
    monkeypatch.setattr(allocation_search.AllocationSearch, "choose", bad_choice)
    searched, report = _compress(tiny_model("llama"), {"method": "wanda", "sparsity": 0.7, "allocation": "search",
                                                       "search_units": "module"}, ids)
    search = report.stages[0].scores["search"]
    if search["kept"] == "uniform":
        for a, b in zip(prunable_linears(searched).values(), prunable_linears(uniform).values()):
            assert torch.equal(weight_2d(a), weight_2d(b))
    else:
        assert search["calibration_loss"]["searched"] < search["calibration_loss"]["uniform"]


@pytest.mark.parametrize("stage,match", [
    ({"method": "wanda", "sparsity": "2:4", "allocation": "search"}, "unstructured"),
    ({"method": "wanda", "sparsity": 0.5, "permute": True}, "N:M"),
    ({"method": "wanda", "sparsity": 0.5, "search_step": 0.1}, "allocation: search"),
    ({"method": "wanda", "sparsity": 0.5, "allocation": "search", "search_step": 0.5}, "search_step"),
    ({"method": "wanda", "sparsity": 0.5, "refine": "swap"}, "refine"),
])
def test_stage_options_reject_bad_combinations(stage, match):
    with pytest.raises(UserError, match=match):
        _compress(tiny_model("llama"), stage)


@pytest.mark.parametrize("name", ["quality-70", "quality-2of4"])
def test_quality_recipes_load_and_run_on_a_tiny_model(name):
    from llmprune.recipe import load_recipe
    recipe = load_recipe(name)
    stage = recipe.stages[-1]
    pattern = parse_pattern(stage.params["sparsity"])
    data = recipe.to_dict()
    data["calibration"] = {"batch_size": 4}
    model, report = llmprune.compress(tiny_model("llama"), None, data, calib=_calib(), device="cpu", progress=False)
    zeros = sum((weight_2d(m) == 0).sum().item() for m in prunable_linears(model).values())
    total = sum(weight_2d(m).numel() for m in prunable_linears(model).values())
    assert abs(zeros / total - pattern.sparsity) < 1e-3
    if pattern.is_nm:
        for n, m in prunable_linears(model).items():
            assert nm_violations(weight_2d(m), pattern.n, pattern.m) == 0, n


@pytest.mark.parametrize("stage", [{"method": "wanda", "sparsity": 0.5, "allocation": "search"},
                                   {"method": "wanda", "sparsity": "2:4", "permute": True}])
def test_search_and_permute_refuse_moe_models_before_work(stage):
    from tiny_models import MOE_CONFIGS
    with pytest.raises(UserError, match="MoE"):
        _compress(tiny_model(next(iter(MOE_CONFIGS))), stage)
