"""True-sequential calibration (one lockstep pass per layer) against the slow reference schedule.

The reference (SparseGPT's `llama_sequential` with `--true-sequential`) re-runs the whole layer over
all batches for each group [q,k,v] -> [o] -> [gate,up] -> [down], prunes the group, and finally
runs the layer once more to propagate. The engine gets the same result from one pass in which every
batch waits at each linear until all batches have contributed to its statistics.
"""
import gc

import greenlet
import pytest
import torch

import llmprune
from llmprune.arch import decoder_layers, layer_linears, prunable_linears, set_weight_2d, spec_for, weight_2d
from llmprune.calibration.engine import capture_layer_inputs, run_layer
from llmprune.calibration import observers
from llmprune.calibration.observers import LayerObserver
from llmprune.errors import UserError
from llmprune.masks import nm_violations, parse_pattern
from llmprune.methods import get_method
from tiny_models import ARCH_CONFIGS, tiny_model
from test_compress import calib_ids

LLAMA_GROUPS = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


@torch.no_grad()
def reference_true_sequential(model, ids, method_name, sparsity, batch_size=4):
    """Group by group, one full forward of the layer per group, then one more to propagate."""
    method, pattern = get_method(method_name), parse_pattern(sparsity)
    captured = capture_layer_inputs(model, ids, batch_size)
    for i, layer in enumerate(decoder_layers(model)):
        prefix = f"{spec_for(model).layers}.{i}"
        linears = layer_linears(layer, prefix)
        for group in LLAMA_GROUPS:
            members = {f"{prefix}.{n}": linears[f"{prefix}.{n}"] for n in group}
            obs = LayerObserver(members, method.needs)
            with obs.hooked():
                for b, hidden in enumerate(captured.hidden):
                    obs.start_batch(b)
                    run_layer(layer, hidden, captured.calls[b][i], "cpu")
                    obs.end_batch(b)
            obs.seal_all()
            for name, module in members.items():
                set_weight_2d(module, method.fn(weight_2d(module).float().clone(), obs.stats[name], pattern))
        for b, hidden in enumerate(captured.hidden):
            captured.hidden[b] = run_layer(layer, hidden, captured.calls[b][i], "cpu")
    return model


@pytest.mark.parametrize("method,sparsity", [("sparsegpt", "0.5"), ("sparsegpt", "2:4"), ("wanda", "0.6")])
def test_lockstep_equals_reference_true_sequential(method, sparsity):
    ids = calib_ids(12, 32)
    expected = reference_true_sequential(tiny_model("llama", num_hidden_layers=3), ids, method, sparsity)
    model, report = llmprune.compress(tiny_model("llama", num_hidden_layers=3), None,
                                      {"stages": [{"method": method, "sparsity": sparsity, "true_sequential": True}],
                                       "calibration": {"batch_size": 4}}, calib=ids, device="cpu", progress=False)
    got_linears, ref_linears = prunable_linears(model), prunable_linears(expected)
    for name, module in got_linears.items():
        got, ref = weight_2d(module), weight_2d(ref_linears[name])
        assert torch.equal(got == 0, ref == 0), name
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    # and it is a genuinely different schedule from the default two-pass one
    two_pass, _ = llmprune.compress(tiny_model("llama", num_hidden_layers=3), None,
                                    {"stages": [{"method": method, "sparsity": sparsity, "true_sequential": False}],
                                     "calibration": {"batch_size": 4}}, calib=ids, device="cpu", progress=False)
    down = f"{spec_for(model).layers}.2.mlp.down_proj"
    assert not torch.equal(weight_2d(got_linears[down]), weight_2d(prunable_linears(two_pass)[down]))


@pytest.mark.parametrize("arch", list(ARCH_CONFIGS))
def test_every_family_true_sequential_prunes_exactly_and_generates(arch):
    model, report = llmprune.compress(tiny_model(arch), None,
                                      {"stages": [{"method": "sparsegpt", "sparsity": "2:4", "true_sequential": True}],
                                       "calibration": {"batch_size": 3}}, calib=calib_ids(8, 24), device="cpu",
                                      progress=False)
    linears = prunable_linears(model)
    assert set(report.modules) == set(linears)
    for name, module in linears.items():
        w = weight_2d(module)
        assert nm_violations(w, 2, 4) == 0 and (w == 0).sum().item() == w.numel() // 2, name
    out = model.generate(calib_ids(1, 4), max_new_tokens=5, do_sample=False, use_cache=True)
    assert out.shape == (1, 9)


def test_lockstep_error_in_a_batch_surfaces_and_leaves_nothing_behind(monkeypatch):
    """A method failing inside a waiting batch's forward reaches the caller; no batch greenlet is left
    suspended (holding its frame and activations) and no hook is left on any module."""
    from llmprune.methods.wanda import wanda as original

    calls = {"n": 0}

    def failing(weight, stats, pattern):
        calls["n"] += 1
        if calls["n"] == 3:     # v_proj: pruned inside batch 0's forward, not by the coordinator
            raise UserError("boom from the method")
        return original(weight, stats, pattern)

    spec = llmprune.methods.METHODS["wanda"]
    monkeypatch.setitem(llmprune.methods.METHODS, "wanda", type(spec)(name=spec.name, fn=failing, needs=spec.needs,
                                                                        params=spec.params, summary=spec.summary))
    created = []    # every batch greenlet the engine makes, kept alive here so a suspended one stays visible
    real_greenlet = greenlet.greenlet

    class Recorded(real_greenlet):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(self)

    monkeypatch.setattr(greenlet, "greenlet", Recorded)
    model = tiny_model("llama")
    with pytest.raises(UserError, match="boom"):
        llmprune.compress(model, None, {"stages": [{"method": "wanda", "sparsity": 0.5, "true_sequential": True}],
                                        "calibration": {"batch_size": 2}},
                          calib=calib_ids(8, 16), device="cpu", progress=False)
    assert len(created) == 4 and any(g.dead for g in created)       # the lockstep really ran batches
    assert not [g for g in created if g]                              # none started and left waiting
    gc.collect()
    # nor any other greenlet still active (type(), not isinstance: no attribute lookups on lazy torch objects)
    assert not [g for g in gc.get_objects() if issubclass(type(g), real_greenlet) and g and g.parent is not None]
    for name, module in model.named_modules():
        assert not module._forward_pre_hooks and not module._forward_hooks, name


def test_default_schedule_falls_back_to_two_passes_when_memory_is_short(monkeypatch):
    from llmprune.calibration import engine

    run = lambda: llmprune.compress(tiny_model("llama"), None, {"stages": [{"method": "sparsegpt", "sparsity": 0.5}]},
                                    calib=calib_ids(8, 16), device="cpu", progress=False)[1]
    report = run()
    assert report.recipe.stages[0].true_sequential is True and not report.notes
    monkeypatch.setattr(engine, "free_memory_bytes", lambda device: 1000)
    report = run()
    assert report.recipe.stages[0].true_sequential is False
    assert any("two-pass calibration" in note for note in report.notes)


def test_two_pass_stop_early_keeps_statistics_exact():
    """Batches after the first stop at the last hooked linear; the statistics must not change."""
    model = tiny_model("llama")
    ids = calib_ids(8, 16)
    captured = capture_layer_inputs(model, ids, batch_size=2)
    layer = decoder_layers(model)[0]
    results = []
    for stop_early in (False, True):
        obs = LayerObserver(layer_linears(layer, "l0"), {"hessian", "input_sq_norm"})
        with obs.hooked(stop_early=stop_early):
            for b, hidden in enumerate(captured.hidden):
                obs.start_batch(b)
                try:
                    run_layer(layer, hidden, captured.calls[b][0], "cpu")
                except observers.StopForward:
                    assert stop_early and b > 0
                obs.end_batch(b)
        obs.seal_all()
        results.append(obs)
    full, early = results
    assert full.groups() == early.groups() == 4          # [q,k,v] [o] [gate,up] [down]
    for name, stats in full.stats.items():
        assert torch.equal(stats.hessian, early.stats[name].hessian), name
        assert stats.n_tokens == early.stats[name].n_tokens == ids.numel()
    down = full.stats["l0.mlp.down_proj"].hessian
    torch.testing.assert_close(down, down.t())           # sealed: the mirrored half is filled


def test_triangular_gram_and_inverse_helpers():
    from llmprune.methods.sparsegpt import lower_triangular_inverse

    x = torch.randn(300, 1100, dtype=torch.float64)
    hessian = torch.zeros(1100, 1100, dtype=torch.float64)
    observers.accumulate_gram_upper(hessian, x[:150])
    observers.accumulate_gram_upper(hessian, x[150:])
    observers.mirror_upper(hessian)
    torch.testing.assert_close(hessian, x.t() @ x)
    lower = torch.linalg.cholesky(hessian + 1100 * torch.eye(1100, dtype=torch.float64))
    torch.testing.assert_close(lower_triangular_inverse(lower) @ lower, torch.eye(1100, dtype=torch.float64))


def test_shared_input_linears_share_one_inverse_factor(monkeypatch):
    from llmprune.methods import sparsegpt as sparsegpt_module

    calls = []
    original = sparsegpt_module.inverse_cholesky_upper
    monkeypatch.setattr(sparsegpt_module, "inverse_cholesky_upper", lambda h, d: calls.append(h.shape) or original(h, d))
    llmprune.compress(tiny_model("llama", num_hidden_layers=1), None,
                      {"stages": [{"method": "sparsegpt", "sparsity": 0.5}]}, calib=calib_ids(4, 16), device="cpu",
                      progress=False)
    assert len(calls) == 4      # one per distinct input: [q,k,v] [o] [gate,up] [down], not one per linear
