"""Compression core on tiny random models of every supported family (CPU, no downloads)."""
import logging

import pytest
import torch

import llmprune
from llmprune.arch import decoder_layers, get_module, prunable_linears, spec_for, weight_2d
from llmprune.calibration.engine import capture_layer_inputs, layerwise
from llmprune.masks import nm_violations, num_to_prune, parse_pattern
from tiny_models import ARCH_CONFIGS, VOCAB, outlier_model, tiny_model

ARCHS = list(ARCH_CONFIGS)


def calib_ids(n=8, seqlen=32, seed=0):
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def run(model, stage, ids=None):
    return llmprune.compress(model, None, {"stages": [stage], "calibration": {"batch_size": 4}},
                             calib=calib_ids() if ids is None else ids, device="cpu", progress=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_capture_and_layerwise_reproduce_the_model(arch):
    """Replaying captured layer calls layer by layer gives the model's own logits (every family)."""
    model = tiny_model(arch)
    ids = calib_ids(4, 24)
    with torch.no_grad():
        expected = model(ids).logits
        captured = capture_layer_inputs(model, ids, batch_size=2)
        layerwise(model, captured, "cpu", spec_for(model).layers, lambda step: None)
        final_norm = get_module(model, spec_for(model).final_norm)
        got = torch.cat([model.get_output_embeddings()(final_norm(h)) for h in captured.hidden])
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_family_prunes_exactly_and_generates(arch):
    model = tiny_model(arch)
    head_before = model.get_output_embeddings().weight.detach().clone()
    embed_before = model.get_input_embeddings().weight.detach().clone()
    model, report = run(model, {"method": "sparsegpt", "sparsity": "2:4", "true_sequential": False})
    linears = prunable_linears(model)
    assert set(report.modules) == set(linears) and linears
    for name, module in linears.items():
        w = weight_2d(module)
        assert nm_violations(w, 2, 4) == 0, name
        assert (w == 0).sum().item() == w.numel() // 2, name
    assert torch.equal(model.get_output_embeddings().weight, head_before)
    assert torch.equal(model.get_input_embeddings().weight, embed_before)
    out = model.generate(calib_ids(1, 4), max_new_tokens=6, do_sample=False, use_cache=True)
    assert out.shape == (1, 10)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity", ["0.5", "0.37", "4:8"])
def test_exact_sparsity_per_matrix(method, sparsity):
    model, report = run(tiny_model("llama"), {"method": method, "sparsity": sparsity})
    for name, module in prunable_linears(model).items():
        w = weight_2d(module)
        if ":" in sparsity:
            assert nm_violations(w, 4, 8) == 0
        assert (w == 0).sum().item() == num_to_prune(w.numel(), parse_pattern(sparsity).sparsity), name
        assert report.modules[name].achieved == pytest.approx((w == 0).float().mean().item())


def test_reconstruction_error_sparsegpt_below_wanda_below_magnitude():
    """On the same captured inputs, ‖WX − ŴX‖ ranks SparseGPT < Wanda < magnitude for every linear."""
    ids = calib_ids(16, 64)
    errors = {}
    inputs = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = outlier_model()
        linears = prunable_linears(model)
        dense = {n: weight_2d(m).clone() for n, m in linears.items()}
        if not inputs:  # capture each linear's dense-model inputs once
            hooks = [m.register_forward_hook(lambda mod, a, o, n=n: inputs.setdefault(n, []).append(a[0].detach()))
                     for n, m in linears.items()]
            with torch.no_grad():
                model(ids)
            for h in hooks:
                h.remove()
        model, _ = run(model, {"method": method, "sparsity": "0.5"}, ids)
        for n, m in linears.items():
            x = torch.cat(inputs[n]).reshape(-1, dense[n].shape[1])
            errors.setdefault(n, {})[method] = torch.linalg.norm(x @ (dense[n] - weight_2d(m)).t()).item()
    for n, e in errors.items():
        assert e["sparsegpt"] < e["wanda"] < e["magnitude"], (n, e)


def test_owl_layer_sparsities_differ_and_average_to_target():
    model = tiny_model("llama", num_hidden_layers=4)
    with torch.no_grad():   # make the layers' outlier ratios genuinely different
        for i, layer in enumerate(decoder_layers(model)):
            layer.input_layernorm.weight.mul_(torch.linspace(0.2, 1 + 4 * i, layer.input_layernorm.weight.numel()))
    model, report = run(model, {"method": "wanda", "sparsity": 0.7, "allocation": "owl"})
    per_layer = list(report.layer_sparsity.values())
    assert len(per_layer) == 4 and len({round(s, 6) for s in per_layer}) > 1
    assert sum(per_layer) / 4 == pytest.approx(0.7, abs=1e-6)
    assert max(per_layer) - min(per_layer) <= 2 * 0.08 + 1e-6
    for name, module in prunable_linears(model).items():     # each matrix hits its layer's ratio
        layer = name.split(".mlp")[0].split(".self_attn")[0]
        w = weight_2d(module)
        assert (w == 0).sum().item() == num_to_prune(w.numel(), report.layer_sparsity[layer])


def test_global_magnitude_respects_total_and_min_density():
    model = tiny_model("llama")
    model, report = run(model, {"method": "magnitude", "sparsity": 0.7, "allocation": "global", "min_density": 0.2})
    linears = prunable_linears(model)
    total = sum(weight_2d(m).numel() for m in linears.values())
    zeros = sum((weight_2d(m) == 0).sum().item() for m in linears.values())
    assert zeros == num_to_prune(total, 0.7)
    assert all((weight_2d(m) != 0).float().mean() >= 0.2 - 1e-9 for m in linears.values())
    assert len({r.target for r in report.modules.values()}) > 1   # genuinely non-uniform


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def test_lm_head_only_when_targeted_explicitly():
    model = tiny_model("llama")
    before = _weights(model)
    model, report = run(model, {"method": "wanda", "sparsity": 0.5, "targets": r"lm_head"})
    assert list(report.modules) == ["lm_head"]
    head, dense_head = model.lm_head.weight, before["lm_head.weight"]
    assert (head == 0).float().mean().item() == pytest.approx(0.5)
    assert torch.equal(head[head != 0], dense_head[head != 0])          # survivors bit-identical (Wanda masks)
    for name, tensor in model.state_dict().items():                      # everything else untouched
        if name != "lm_head.weight":
            assert torch.equal(tensor, before[name]), name


def test_targets_and_ignore_select_modules():
    model = tiny_model("llama")
    before = _weights(model)
    model, report = run(model, {"method": "magnitude", "sparsity": 0.5, "targets": r"mlp\.", "ignore": "down_proj"})
    expected = {n for n in prunable_linears(model) if ("gate_proj" in n or "up_proj" in n)}
    assert set(report.modules) == expected
    for name, tensor in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if module in expected and name.endswith("weight"):
            assert (tensor == 0).float().mean().item() == pytest.approx(0.5), name
        else:                                                            # non-targets bit-identical
            assert torch.equal(tensor, before[name]), name


def _compress_recording(model, stages, linear="layers.1.mlp.gate_proj"):
    """compress(model, stages), returning the input Hessian the run collected for `linear`."""
    from llmprune.calibration import observers

    seen = {}
    orig = observers.LayerObserver.seal

    def spy(self, stats):            # the batches are summed when sealed: read it afterwards
        out = orig(self, stats)
        if stats.hessian is not None and any(s is stats and n.endswith(linear) for n, s in self.stats.items()):
            seen.setdefault("hessian", stats.hessian.clone())
        return out

    observers.LayerObserver.seal = spy
    try:
        model, report = llmprune.compress(model, None, {"stages": stages}, calib=calib_ids(), device="cpu",
                                          progress=False)
    finally:
        observers.LayerObserver.seal = orig
    return model, report, seen["hessian"]


def test_multi_stage_recipe():
    """Each stage is recorded as itself (not as the last one), in the report, the summary and the sidecar;
    stage 2 calibrates on the model stage 1 left."""
    from llmprune.io.sidecar import compress_sidecar, describe

    stages = [{"method": "wanda", "sparsity": 0.3, "targets": "self_attn"},
              {"method": "sparsegpt", "sparsity": "2:4", "targets": "mlp"}]
    model, report, hessian = _compress_recording(tiny_model("llama"), stages)
    assert {r.target for n, r in report.modules.items() if "self_attn" in n} == {0.3}
    assert {r.target for n, r in report.modules.items() if "mlp" in n} == {"2:4"}
    assert [r.method for r in report.stages] == ["wanda", "sparsegpt"]
    assert report.stages[0].target == 0.3 and report.stages[1].target == "2:4"
    table = report.summary_table()
    assert "0.3 on 8 matrices" in table and "2:4 on 6 matrices" in table
    sidecar = compress_sidecar(report, {"id": "tiny"})
    assert describe(sidecar) == "wanda 0.3 (self_attn) → sparsegpt 2:4 (mlp)"
    assert [s["target"] for s in sidecar["stages"]] == [0.3, "2:4"]
    assert sidecar["sparsity"]["pattern"] == "mixed"
    assert sidecar["stages"][1]["zeros"]["before"] == sidecar["stages"][0]["zeros"]["after"] > 0

    # Stage 2 saw the stage-1 model: the same Hessian as stage 2 run alone on a stage-1-only model,
    # and not the one stage 2 sees on the dense model.
    stage1_model, _ = llmprune.compress(tiny_model("llama"), None, {"stages": stages[:1]}, calib=calib_ids(),
                                        device="cpu", progress=False)
    _, _, after_stage1 = _compress_recording(stage1_model, stages[1:])
    _, _, on_dense = _compress_recording(tiny_model("llama"), stages[1:])
    assert torch.allclose(hessian, after_stage1, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(hessian, on_dense, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("true_sequential", [False, True])
def test_calibration_uses_pruned_outputs_of_earlier_layers(true_sequential):
    """Layer 1 must see layer 0's *pruned* outputs: its statistics differ from a dense-model one."""
    seen = []
    from llmprune.calibration import observers

    orig = observers.LayerObserver.seal

    def spy(self, stats):            # the batches are summed when sealed: read it afterwards
        first = not self.is_sealed(stats)
        out = orig(self, stats)
        if first and any("layers.1.self_attn.q_proj" in name and s is stats for name, s in self.stats.items()):
            seen.append(stats.input_sq_norm.clone())
        return out

    observers.LayerObserver.seal = spy
    try:
        stage = {"method": "wanda", "sparsity": 0.9, "true_sequential": true_sequential}
        run(tiny_model("llama"), stage)
        run(tiny_model("llama"), {**stage, "targets": "layers\\.1\\."})
    finally:
        observers.LayerObserver.seal = orig
    pruned_upstream, dense_upstream = seen
    assert not torch.allclose(pruned_upstream, dense_upstream)


def test_no_missing_key_warnings_on_reload(tmp_path, caplog):
    from transformers import AutoModelForCausalLM

    from llmprune.io.save import save_model

    model, _ = run(tiny_model("gpt2"), {"method": "wanda", "sparsity": 0.5})
    save_model(model, None, tmp_path)
    with caplog.at_level(logging.WARNING):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not [r for r in caplog.records if "missing" in r.getMessage().lower() or "unexpected" in r.getMessage().lower()]
