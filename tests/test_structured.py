"""Structured pruning (width, layer-drop) on tiny models of every supported family: smaller plain
checkpoints that `from_pretrained` loads, with the function the edit promised."""
import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import llmprune
from llmprune.arch import channel_map, decoder_layers, dims_of, spec_for, weight_2d
from llmprune.calibration.engine import capture_layer_inputs, run_layer
from llmprune.calibration.observers import LayerObserver
from llmprune.edits import mask_units, rewrite_group_config, slice_units, verify_config
from llmprune.errors import UserError
from llmprune.stages.width import obs_keep, refit_output, unit_scores
from cli_helpers import cli, cli_workspace
from tiny_models import ARCH_CONFIGS, VOCAB, tiny_model

ARCHS = list(ARCH_CONFIGS)
HEAD_ARCHS = [a for a in ARCHS if spec_for(tiny_model(a).config).head_dim_configurable]


def ids(n=8, seqlen=24, seed=0):
    return torch.randint(3, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def run(model, *stages, calib=None):
    return llmprune.compress(model, None, {"stages": list(stages), "calibration": {"batch_size": 4}},
                             calib=ids() if calib is None else calib, device="cpu", progress=False)


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def assert_generate_cache_agrees(model):
    prompt = ids(2, 5, seed=7)
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def assert_reload_equal(model, tmp_path):
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    x = ids(2, 16, seed=3)
    assert torch.allclose(logits(model, x), logits(reloaded, x), atol=1e-5, rtol=1e-5)
    return reloaded


# ---- slicing a unit == masking it ------------------------------------------------------------------

def _groups(arch):
    return ["mlp", "attention"] if arch in HEAD_ARCHS else ["mlp"]


@pytest.mark.parametrize("arch", ARCHS)
def test_slicing_units_equals_masking_them(arch):
    """Zeroing a unit's output columns (mask_units) and removing it (slice_units + config) compute
    the same function, for MLP neurons and attention KV groups, in every family's layout."""
    masked, sliced = tiny_model(arch), tiny_model(arch)
    fam, dims = spec_for(masked), dims_of(masked)
    gen = torch.Generator().manual_seed(1)
    for group in _groups(arch):
        units = dims.kv_heads if group == "attention" else dims.intermediate
        keep_count = units // 2
        for layer_m, layer_s in zip(decoder_layers(masked), decoder_layers(sliced)):
            keep = torch.randperm(units, generator=gen)[:keep_count].sort().values
            mask_units(layer_m, fam, dims, group, keep)
            slice_units(layer_s, fam, dims, group, keep)
        rewrite_group_config(sliced, group, keep_count)
    verify_config(sliced)
    x = ids(2, 12)
    assert torch.allclose(logits(masked, x), logits(sliced, x), atol=1e-5, rtol=1e-4)
    assert sum(p.numel() for p in sliced.parameters()) < sum(p.numel() for p in masked.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_width_every_family_saves_reloads_and_generates(arch, tmp_path):
    stage = {"method": "width", "mlp_keep": 0.5, "round_to": 8}
    if arch in HEAD_ARCHS:
        stage["heads_keep"] = 0.5
    model, report = run(tiny_model(arch), stage)
    dims = dims_of(model)
    assert dims.intermediate == dims_of(tiny_model(arch)).intermediate // 2
    if arch in HEAD_ARCHS:
        assert dims.kv_heads * 2 == dims_of(tiny_model(arch)).kv_heads
        assert model.config.head_dim == dims_of(tiny_model(arch)).head_dim      # written explicitly
    assert report.parameters_after < report.parameters_before
    assert_generate_cache_agrees(model)
    assert_reload_equal(model, tmp_path)


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_drop_every_family_saves_reloads_and_generates(arch, tmp_path):
    overrides = {"n_layer" if arch == "gpt2" else "num_hidden_layers": 3}
    if "layer_types" in ARCH_CONFIGS[arch]:
        overrides["layer_types"] = ["sliding_attention", "full_attention", "sliding_attention"]
    model, report = run(tiny_model(arch, **overrides), {"method": "layer-drop", "num_layers": 1})
    assert len(decoder_layers(model)) == 2 and dims_of(model).num_layers == 2
    assert 0 not in report.stages[0].removed["layers"]
    idx = [m.layer_idx for layer in decoder_layers(model) for m in layer.modules()
           if isinstance(getattr(m, "layer_idx", None), int)]
    assert sorted(set(idx)) == [0, 1]
    assert_generate_cache_agrees(model)
    assert_reload_equal(model, tmp_path)


def test_layer_drop_keeps_gemma_layer_types_and_qwen2_window_layers(tmp_path):
    types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    gemma = tiny_model("gemma3_text", num_hidden_layers=4, layer_types=types)
    reference = copy.deepcopy(gemma)
    gemma, report = run(gemma, {"method": "layer-drop", "num_layers": 1, "criterion": "angular"})
    dropped = report.stages[0].removed["layers"]
    kept = [i for i in range(4) if i not in dropped]
    assert gemma.config.layer_types == [types[i] for i in kept]
    # each kept layer still computes with its own attention type: run the reference model with the
    # dropped layer skipped and compare
    x = ids(2, 20)
    skipped = copy.deepcopy(reference)
    skipped.model.layers = torch.nn.ModuleList([reference.model.layers[i] for i in kept])
    for new_i, layer in enumerate(skipped.model.layers):
        layer.self_attn.layer_idx = new_i
    skipped.config.layer_types = [types[i] for i in kept]
    skipped.config.num_hidden_layers = 3
    assert torch.allclose(logits(gemma, x), logits(skipped, x), atol=1e-5)
    assert_reload_equal(gemma, tmp_path / "gemma")

    qwen = tiny_model("qwen2", num_hidden_layers=4, use_sliding_window=True, sliding_window=8, max_window_layers=2)
    before = list(qwen.config.layer_types)
    qwen, report = run(qwen, {"method": "layer-drop", "num_layers": 1, "keep_first": False, "criterion": "bi"})
    dropped = report.stages[0].removed["layers"][0]
    kept = [i for i in range(4) if i != dropped]
    assert qwen.config.layer_types == [before[i] for i in kept]
    assert qwen.config.max_window_layers == sum(1 for i in kept if i < 2)
    reloaded = assert_reload_equal(qwen, tmp_path / "qwen")
    assert reloaded.config.layer_types == qwen.config.layer_types


# ---- criteria ------------------------------------------------------------------------------------

def test_maw_is_the_peak_to_peak_rule():
    model = tiny_model("llama")
    layer = decoder_layers(model)[0]
    scores = unit_scores(layer, spec_for(model), dims_of(model), "mlp", "maw", None, 0)
    g, u = layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight
    expected = (g.max(1).values + g.min(1).values.abs()) + (u.max(1).values + u.min(1).values.abs())
    assert torch.allclose(scores, expected.detach(), atol=1e-6)


def test_magnitude_scores_are_the_norm_of_each_units_weights():
    model = tiny_model("phi3")                      # fused gate_up_proj and qkv_proj layouts
    layer, fam, dims = decoder_layers(model)[0], spec_for(model), dims_of(model)
    scores = unit_scores(layer, fam, dims, "attention", "magnitude", None, 0)
    d, per = dims.head_dim, dims.heads_per_kv_head
    for g in range(dims.kv_heads):
        q = slice(g * per * d, (g + 1) * per * d)
        k = slice(dims.heads * d + g * d, dims.heads * d + (g + 1) * d)
        v = slice(dims.heads * d + dims.kv_heads * d + g * d, dims.heads * d + dims.kv_heads * d + (g + 1) * d)
        w = layer.self_attn.qkv_proj.weight
        total = (w[q] ** 2).sum() + (w[k] ** 2).sum() + (w[v] ** 2).sum() + (layer.self_attn.o_proj.weight[:, q] ** 2).sum()
        assert scores[g] == pytest.approx(total.sqrt().item(), rel=1e-5)


def _layer_output_error(criterion: str, reconstruct: bool) -> float:
    """Relative error of layer 0's output after removing half the MLP neurons."""
    model = tiny_model("qwen2", hidden_size=64, intermediate_size=256)
    fam, dims = spec_for(model), dims_of(model)
    x = ids(8, 32)
    captured = capture_layer_inputs(model, x, 4)
    layer = decoder_layers(model)[0]
    with torch.no_grad():
        dense = [run_layer(layer, h, c[0], "cpu") for h, c in zip(captured.hidden, captured.calls)]
        obs = LayerObserver({"down": layer.mlp.down_proj}, {"hessian", "input_sum", "input_sq_norm"})
        with obs.hooked():
            for b, (h, c) in enumerate(zip(captured.hidden, captured.calls)):
                obs.start_batch(b)
                run_layer(layer, h, c[0], "cpu")
                obs.end_batch(b)
        obs.seal_all()
        stats = obs.stats["down"]
        if criterion == "obs":
            keep, _ = obs_keep(layer.mlp.down_proj, fam, dims, "mlp", stats, 128)
        else:
            keep = torch.topk(unit_scores(layer, fam, dims, "mlp", criterion, stats, 0), 128).indices.sort().values
        if reconstruct:
            refit_output(layer.mlp.down_proj, fam, dims, "mlp", keep, stats, None)
        mask_units(layer, fam, dims, "mlp", keep)
        out = [run_layer(layer, h, c[0], "cpu") for h, c in zip(captured.hidden, captured.calls)]
    err = sum(((a - b) ** 2).sum() for a, b in zip(out, dense)) / sum((a ** 2).sum() for a in dense)
    return float(err)


def test_reconstruction_lowers_layer_output_error():
    assert _layer_output_error("activation", True) < 0.9 * _layer_output_error("activation", False)


def test_activation_criterion_beats_random_on_layer_output_error():
    assert _layer_output_error("activation", False) < _layer_output_error("random", False)
    assert _layer_output_error("activation", True) < _layer_output_error("random", True)


def test_obs_criterion_gives_the_least_reconstructed_error():
    """Structured OBS picks the units the refit can replace best: lower error than activation after refit."""
    assert _layer_output_error("obs", True) < _layer_output_error("activation", True)


def test_default_criterion_is_obs_with_reconstruction_and_activation_without():
    _, refit = run(tiny_model("llama"), {"method": "width", "mlp_keep": 0.5})
    _, plain = run(tiny_model("llama"), {"method": "width", "mlp_keep": 0.5, "reconstruct": False})
    _, asked = run(tiny_model("llama"), {"method": "width", "mlp_keep": 0.5, "criterion": "random"})
    assert refit.stages[0].params["criterion"] == "obs"
    assert plain.stages[0].params["criterion"] == "activation"
    assert asked.stages[0].params["criterion"] == "random"


def test_obs_with_one_round_matches_a_direct_group_obs_score():
    """One round removes the units with the least tr(W_u [H⁻¹]_uu⁻¹ W_uᵀ), here computed by brute force as
    the least-squares residual of removing each KV group alone."""
    model = tiny_model("llama", num_key_value_heads=4)
    fam, dims = spec_for(model), dims_of(model)
    layer = decoder_layers(model)[0]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, dims.heads * dims.head_dim, generator=gen) @ torch.randn(64, 64, generator=gen)
    stats = llmprune.methods.LinearStats(n_tokens=400, hessian=x.t() @ x)
    keep, _ = obs_keep(layer.self_attn.o_proj, fam, dims, "attention", stats, 3, rounds=1, dampening=0.0)
    w = layer.self_attn.o_proj.weight.detach().double()
    xd = x.double()
    errors = []
    for g in range(4):
        kept_cols = torch.tensor([c for c in range(64) if c // 16 != g])
        fit = torch.linalg.lstsq(xd[:, kept_cols], xd @ w.t()).solution          # [k, out]
        errors.append(((xd @ w.t() - xd[:, kept_cols] @ fit) ** 2).sum().item())
    assert sorted(set(range(4)) - set(keep.tolist())) == [min(range(4), key=lambda g: errors[g])]


def test_reconstruction_with_bias_fits_the_mean():
    """OPT's fc2 has a bias: the refit includes the constant channel, so even removing all but one
    neuron keeps the mean output (the least-squares fit with an intercept)."""
    model = tiny_model("opt")
    fam, dims = spec_for(model), dims_of(model)
    layer = decoder_layers(model)[0]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, dims.intermediate, generator=gen).relu() + 0.5       # fc2 inputs, non-zero mean
    stats = llmprune.methods.LinearStats(n_tokens=512, hessian=x.t() @ x, input_sum=x.sum(0))
    before = layer.fc2(x)
    keep = torch.tensor([3])
    refit_output(layer.fc2, fam, dims, "mlp", keep, stats, None)
    mask_units(layer, fam, dims, "mlp", keep)
    after = layer.fc2(x)
    assert torch.allclose(after.mean(0), before.mean(0), atol=1e-3)


def test_layer_drop_ppl_is_never_worse_than_bi():
    model = tiny_model("llama", num_hidden_layers=5)
    calib = ids(8, 24)
    bi_model, bi_report = run(copy.deepcopy(model), {"method": "layer-drop", "num_layers": 2}, calib=calib)
    ppl_model, ppl_report = run(copy.deepcopy(model), {"method": "layer-drop", "num_layers": 2, "criterion": "ppl"},
                                calib=calib)

    def loss(m):
        with torch.no_grad():
            return m(calib, labels=calib).loss.item()

    assert loss(ppl_model) <= loss(bi_model) + 1e-6
    scores = ppl_report.stages[0].scores
    assert scores["loss_chosen"] <= scores["loss_bi"]
    assert loss(ppl_model) == pytest.approx(scores["loss_chosen"], rel=1e-4)


def test_bi_is_one_minus_cosine_of_layer_input_and_output():
    model = tiny_model("llama", num_hidden_layers=3)
    calib = ids(4, 16)
    _, report = run(copy.deepcopy(model), {"method": "layer-drop", "num_layers": 1}, calib=calib)
    with torch.no_grad():
        states = model(calib, output_hidden_states=True).hidden_states     # [emb, l0 out, l1 out, final-normed]
    for i in range(2):
        cos = torch.nn.functional.cosine_similarity(states[i], states[i + 1], dim=-1).double().mean()
        assert report.stages[0].scores["block_influence"][i] == pytest.approx(1 - cos.item(), abs=1e-5)


def test_angular_drops_a_contiguous_block():
    _, report = run(tiny_model("llama", num_hidden_layers=6), {"method": "layer-drop", "num_layers": 3,
                                                               "criterion": "angular"})
    dropped = report.stages[0].removed["layers"]
    assert dropped == list(range(dropped[0], dropped[0] + 3)) and dropped[0] >= 1


# ---- composition ------------------------------------------------------------------------------------

def test_drop_width_then_wanda_2of4_in_one_recipe(tmp_path):
    from llmprune.masks import nm_violations
    from llmprune.arch import prunable_linears
    from llmprune.io.sidecar import compress_sidecar, describe

    model, report = run(tiny_model("llama", num_hidden_layers=4, intermediate_size=256),
                        {"method": "layer-drop", "num_layers": 1},
                        {"method": "width", "mlp_keep": 0.75, "heads_keep": 0.5},
                        {"method": "wanda", "sparsity": "2:4"})
    assert len(decoder_layers(model)) == 3 and model.config.intermediate_size == 192
    for name, module in prunable_linears(model).items():
        assert nm_violations(weight_2d(module), 2, 4) == 0, name
    params = [(r.parameters_before, r.parameters_after) for r in report.stages]
    assert params[0][1] == params[1][0] and params[1][1] == params[2][0] == params[2][1]
    assert params[0][1] < params[0][0] and params[1][1] < params[1][0]
    sidecar = compress_sidecar(report, {"id": "tiny"})
    assert describe(sidecar) == "layer-drop 1 (bi) → width mlp 0.75 heads 0.5 → wanda 2:4"
    assert sidecar["parameters"]["after"] == sum(p.numel() for p in model.parameters())
    assert sidecar["sparsity"]["pattern"] == "2:4"
    json.dumps(sidecar)
    assert_generate_cache_agrees(model)
    assert_reload_equal(model, tmp_path)


def test_unstructured_masks_survive_a_later_width_stage():
    model, report = run(tiny_model("llama"), {"method": "magnitude", "sparsity": 0.5},
                        {"method": "width", "mlp_keep": 0.5})
    for layer in decoder_layers(model):
        w = layer.mlp.down_proj.weight
        assert w.shape[1] == 64
        assert (w == 0).float().mean() >= 0.45       # the refit kept the earlier zeros


# ---- bad input: one line, before any work ---------------------------------------------------------

@pytest.mark.parametrize("stage,match", [
    ({"method": "width"}, "give mlp_keep"),
    ({"method": "width", "heads_keep": 0.3}, r"heads_keep 0.3 keeps 0.6 of 2 KV groups.*nearest valid value: heads_keep 0.5"),
    ({"method": "width", "mlp_keep": 0.01}, "rounds to 0"),
    ({"method": "width", "mlp_keep": 1.5}, "mlp_keep"),
    ({"method": "width", "mlp_keep": 0.5, "criterion": "bogus"}, "criterion"),
    ({"method": "width", "heads_keep": 0.5, "criterion": "maw"}, "maw scores MLP neurons only"),
    ({"method": "layer-drop"}, "exactly one of num_layers"),
    ({"method": "layer-drop", "num_layers": 2, "layer_fraction": 0.5}, "exactly one of num_layers"),
    ({"method": "layer-drop", "num_layers": 2}, r"cannot remove 2 of 2 layers"),
    ({"method": "layer-drop", "num_layers": 1.5}, "must be an integer"),
])
def test_bad_structured_stages_fail_before_work(stage, match):
    with pytest.raises(UserError, match=match):
        run(tiny_model("llama"), stage)


def test_head_pruning_refused_where_head_size_is_fixed():
    with pytest.raises(UserError, match="gpt2 computes its head size as hidden/heads"):
        run(tiny_model("gpt2"), {"method": "width", "heads_keep": 0.5})


def test_gpt2_with_inverse_layer_scaling_refuses_layer_drop():
    with pytest.raises(UserError, match="scale_attn_by_inverse_layer_idx"):
        run(tiny_model("gpt2", n_layer=3, scale_attn_by_inverse_layer_idx=True),
            {"method": "layer-drop", "num_layers": 1})


# ---- the CLI, the sidecar and the card, from real outputs -------------------------------------------

@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("structured")
    cli_workspace(root, "llama")
    return root


CALIB = ["--calib-data", "calib.txt", "--calib-samples", "6", "--calib-seqlen", "32", "--quiet"]


def test_cli_recipe_layer_drop_width_wanda_writes_a_smaller_checkpoint_and_card(saved_model, capsys):
    from llmprune.io.card import render_card
    from llmprune.recipe import load_recipe

    (saved_model / "recipe.yaml").write_text(
        "stages:\n  - method: layer-drop\n    num_layers: 1\n  - method: width\n    mlp_keep: 0.5\n"
        "    heads_keep: 0.5\n  - method: wanda\n    sparsity: '2:4'\n")
    assert cli(saved_model, "compress", "model", "--recipe", "recipe.yaml", *CALIB, "--output", "out") == 0
    summary = capsys.readouterr().out
    assert "layer-drop" in summary and "mlp_neurons 128 -> 64 per layer" in summary
    out = saved_model / "out"
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["intermediate_size"] == 64
    assert config["num_key_value_heads"] == 1 and config["num_attention_heads"] == 2 and config["head_dim"] == 16
    assert "quantization_config" not in config
    sidecar = json.loads((out / "llmprune.json").read_text())
    assert [s["method"] for s in sidecar["stages"]] == ["layer-drop", "width", "wanda"]
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert sidecar["parameters"]["after"] == sum(p.numel() for p in reloaded.parameters())
    assert sidecar["parameters"]["before"] > sidecar["parameters"]["after"]
    again = load_recipe(str(out / "recipe.yaml"))               # the recipe as run is a valid recipe
    assert [s.method for s in again.stages] == ["layer-drop", "width", "wanda"]
    card = render_card(out)
    assert "## Stages" in card and "layer-drop 1 (bi) → width mlp 0.5 heads 0.5 → wanda 2:4" in card
    assert "smaller plain checkpoint" in card and "structured-pruning" in card
    assert "mixed" not in card


def test_cli_owl_card_shows_numeric_targets(saved_model):
    from llmprune.io.card import render_card

    assert cli(saved_model, "compress", "model", "--method", "wanda", "--sparsity", "0.6", "--allocation", "owl",
               *CALIB, "--output", "owl") == 0
    card = render_card(saved_model / "owl")
    sparsity = card[card.index("## Sparsity"):]
    assert "mixed" not in sparsity and "60.00%" in sparsity


@pytest.mark.parametrize("args,match", [
    (["--method", "width", "--sparsity", "0.5"], "--sparsity is for pruning methods"),
    (["--method", "wanda", "--sparsity", "0.5", "--mlp-keep", "0.5"], "--mlp-keep does not apply to --method wanda"),
    (["--method", "width", "--heads-keep", "0.3"], "nearest valid value: heads_keep 0.5"),
    (["--method", "layer-drop", "--num-layers", "5"], "cannot remove 5 of 2 layers"),
    (["--method", "wanda"], "needs --sparsity"),
])
def test_cli_bad_structured_input_is_one_line_and_writes_nothing(saved_model, capsys, args, match):
    assert cli(saved_model, "compress", "model", *args, *CALIB, "--output", "bad") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err
    assert not (saved_model / "bad").exists()


@pytest.mark.parametrize("arch", ARCHS)
def test_registry_paths_exist_in_every_family(arch):
    """Every path the registry names is a module of the model transformers builds (heads, norms, groups)."""
    from llmprune.arch import TargetSelector, get_module, head_targets

    model = tiny_model(arch)
    fam = spec_for(model)
    for path in (fam.layers, fam.final_norm, fam.lm_head, *fam.embeddings):
        get_module(model, path)
    assert get_module(model, fam.lm_head) is model.get_output_embeddings()
    layer = decoder_layers(model)[0]
    for group in ("attention", "mlp"):
        for path in fam.group(group).linear_paths:
            layer.get_submodule(path)
    assert fam.lm_head in head_targets(model, TargetSelector(targets=fam.lm_head))
