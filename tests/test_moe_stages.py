"""MoE models through the stages: expert-drop, pruning inside experts (per-expert 2-D slices of the fused
3-D parameters), layer-drop / width on MoE families, the STUN recipe and the CLI; tiny configs of every
MoE family (CPU)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import llmprune
from llmprune.api import check_recipe
from llmprune.arch import TargetSelector, decoder_matrices, prunable_matrices, spec_for
from llmprune.cli import main
from llmprune.edits import linear_zeros
from llmprune.errors import UserError
from llmprune.masks import nm_violations, parse_pattern
from llmprune.methods import LinearStats
from llmprune.methods.magnitude import magnitude
from llmprune.methods.wanda import wanda
from llmprune.recipe import Recipe
from llmprune.moe import families, observe, routing
from llmprune.moe.criteria import moe_output_error
from cli_helpers import cli_workspace
from tiny_models import MOE_CONFIGS, VOCAB, tiny_model

FAMILIES = sorted(MOE_CONFIGS)


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny training/expert loops: see conftest


def calib(n: int = 8, seq: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


def decisive_model(model_type: str, seed: int = 0):
    """Routers with scaled-up rows (expert choice matters) and experts of different output scales."""
    model = tiny_model(model_type, seed)
    family = families.family_for(model)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for block in families.moe_blocks(model).values():
            families.router_tensors(block, family)[0].mul_(40)
            down = getattr(families.experts_of(block, family), family["down_proj"])
            down.mul_(torch.exp(1.5 * torch.randn(down.shape[0], generator=generator))[:, None, None])
    return model


def run(model, *stages, ids=None, batch_size: int = 4):
    return llmprune.compress(model, None, {"stages": list(stages), "calibration": {"batch_size": batch_size}},
                             calib=calib() if ids is None else ids, device="cpu", progress=False)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def assert_reload_and_generate(model, tmp_path):
    ids = calib(2, 12, seed=5)
    model.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info                  # no missing / unexpected / mismatched keys
    assert torch.equal(logits(reloaded.eval(), ids), logits(model, ids))
    for m in (model, reloaded):
        with torch.no_grad():
            cached = m.generate(ids[:, :5], max_new_tokens=6, do_sample=False, use_cache=True)
            uncached = m.generate(ids[:, :5], max_new_tokens=6, do_sample=False, use_cache=False)
        assert torch.equal(cached, uncached)
    return reloaded


def block_inputs(model, ids) -> dict[int, torch.Tensor]:
    return observe.capture_moe_inputs(model, list(ids.split(4)))


# --------------------------------------------------------------------------------------------
# registry and targets


@pytest.mark.parametrize("model_type", FAMILIES)
def test_moe_families_are_supported_and_expose_expert_matrices(model_type):
    model = tiny_model(model_type)
    fam = spec_for(model)                                 # no "not supported yet"
    assert fam.moe is not None and fam.mlp.refuse
    matrices = prunable_matrices(model)
    blocks = families.moe_blocks(model)
    family = families.family_for(model)
    for layer, block in blocks.items():
        experts = families.experts_of(block, family)
        for e in range(8):
            gate_up = matrices[f"{fam.layers}.{layer}.mlp.experts.gate_up_proj[{e}]"]
            down = matrices[f"{fam.layers}.{layer}.mlp.experts.down_proj[{e}]"]
            assert gate_up.weight.data_ptr() == experts.gate_up_proj[e].data_ptr()      # views, [out, in]
            assert down.weight.shape == experts.down_proj.shape[1:]
        assert f"{fam.layers}.{layer}.mlp.gate" not in matrices                           # routers not by default
    routers = prunable_matrices(model, TargetSelector(targets=r"mlp\.gate$"))
    assert set(routers) == {f"{fam.layers}.{layer}.mlp.gate" for layer in blocks}
    # Accounting counts every matrix, routers and every expert slice included.
    zeros, elements = linear_zeros(model)
    assert elements == sum(m.weight.numel() for m in decoder_matrices(model).values())
    assert elements > sum(m.weight.numel() for m in matrices.values())


# --------------------------------------------------------------------------------------------
# expert-drop


@pytest.mark.parametrize("model_type", FAMILIES)
def test_expert_drop_stage_reloads_routes_to_kept_experts_and_reports(model_type, tmp_path):
    model = decisive_model(model_type)
    original = copy.deepcopy(model)
    ids = calib()
    inputs = block_inputs(original, ids)
    model, report = run(model, {"method": "expert-drop", "experts_keep": 4, "criterion": "reap",
                                "progressive": False})
    record = report.stages[0]
    family, rcfg = families.family_for(original), families.router_config(original)
    assert families.num_experts(model) == 4 and record.removed == {"experts": {"before": 8, "after": 4}}
    kept = {int(k): v for k, v in record.scores["kept"].items()}
    assert set(kept) == set(families.moe_blocks(original))
    per_expert = 3 * family_inter(original) * original.config.hidden_size + original.config.hidden_size
    assert record.parameters_before - record.parameters_after == len(kept) * 4 * per_expert
    for layer, block in families.moe_blocks(model).items():
        # The edited block is exactly the original routed to its kept experts only.
        old = families.moe_blocks(original)[layer]
        with torch.no_grad():
            expected = routing.block_output(old, family, rcfg, inputs[layer], kept[layer])
            torch.testing.assert_close(block(inputs[layer][None])[0], expected, rtol=1e-5, atol=1e-6)
        share_before, share_after = record.scores["routed_share_before"][str(layer)], \
            record.scores["routed_share_after"][str(layer)]
        assert len(share_before) == 8 and len(share_after) == 4
        assert sum(share_after) == pytest.approx(1.0, abs=1e-5)          # rounded to 6 digits
        assert record.scores["routed_share_removed"][str(layer)] == pytest.approx(
            sum(s for e, s in enumerate(share_before) if e not in kept[layer]), abs=1e-5)
    assert "per MoE layer" in report.summary_table()
    assert_reload_and_generate(model, tmp_path)


def family_inter(model) -> int:
    block = next(iter(families.moe_blocks(model).values()))
    return families.experts_of(block, families.family_for(model)).down_proj.shape[-1]


def test_expert_counts_are_checked_before_any_work():
    for model_type, stage, text in [
        ("mixtral", {"experts_keep": 1}, "top_k=2"),
        ("mixtral", {"experts_keep": 8}, "removes none"),
        ("mixtral", {"expert_ratio": 0.6}, "not a whole number"),
        ("deepseek_v3", {"experts_keep": 2}, "groups would keep 1"),      # a group is scored by its 2 best
        ("deepseek_v3", {"experts_keep": 3}, "multiple of 2"),
        ("llama", {"experts_keep": 4}, "mixture-of-experts"),
    ]:
        model = tiny_model(model_type)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.device("meta"):     # the CLI's check: the config alone, before loading weights
            meta = AutoModelForCausalLM.from_config(model.config)
        recipe = Recipe.from_dict({"stages": [{"method": "expert-drop", **stage}]})
        with pytest.raises(UserError, match=text):
            check_recipe(meta, recipe)
        with pytest.raises(UserError, match=text):
            run(model, {"method": "expert-drop", **stage})
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(UserError, match="exactly one"):
        Recipe.from_dict({"stages": [{"method": "expert-drop"}]})
    with pytest.raises(UserError, match="criterion merge only"):
        Recipe.from_dict({"stages": [{"method": "expert-drop", "experts_keep": 4,
                                                      "criterion": "reap", "merge_mode": "average"}]})


def test_reconstruction_and_reap_beat_random_through_the_stage():
    """On the calibration tokens, the MoE layers' output error after the stage's drop (each layer on the
    unpruned model's inputs: progressive off) ranks reconstruction <= reap < random."""
    base = decisive_model("mixtral")
    ids = calib(8, 32)
    inputs = block_inputs(base, ids)
    family, rcfg = families.family_for(base), families.router_config(base)
    blocks = families.moe_blocks(base)

    def error(criterion: str, seed: int = 0) -> float:
        _, report = run(copy.deepcopy(base), {"method": "expert-drop", "experts_keep": 4, "criterion": criterion,
                                              "progressive": False, **({"seed": seed} if criterion == "random" else {})},
                        ids=ids)
        kept = report.stages[0].scores["kept"]
        return sum(moe_output_error(blocks[layer], family, rcfg, inputs[layer], kept[str(layer)]) for layer in blocks)

    recon, reap = error("reconstruction"), error("reap")
    random_mean = sum(error("random", seed) for seed in range(6)) / 6
    assert recon <= reap + 1e-9 and recon < random_mean and reap < random_mean


def test_default_merge_reduces_layer_error_below_plain_reap():
    """The default criterion keeps REAP's experts and refits them: its edited blocks are closer to the
    unpruned ones on the calibration tokens than REAP's plain drop, at half the experts."""
    base = decisive_model("qwen3_moe")
    ids = calib(8, 32)
    inputs = block_inputs(base, ids)
    results = {}
    for criterion in ("reap", "merge"):
        model, report = run(copy.deepcopy(base), {"method": "expert-drop", "experts_keep": 4, "criterion": criterion,
                                                  "progressive": False}, ids=ids)
        assert report.stages[0].params["criterion"] == criterion
        with torch.no_grad():
            results[criterion] = sum(
                (families.moe_blocks(base)[layer](x[None])[0] - block(x[None])[0]).norm().item()
                for (layer, block), x in zip(families.moe_blocks(model).items(), inputs.values()))
        results[criterion + "_kept"] = report.stages[0].scores["kept"]
    assert results["merge_kept"] == results["reap_kept"]
    assert results["merge"] < 0.9 * results["reap"]


def test_expert_drop_after_pruning_keeps_the_zeros_and_renumbers_masks(tmp_path):
    model = decisive_model("olmoe")
    model, report = run(model, {"method": "wanda", "sparsity": 0.5}, {"method": "expert-drop", "experts_keep": 6})
    for name, result in report.final_modules.items():
        if "experts" in name:             # merged (refitted) down slices still have the wanda zeros
            assert result.target == 0.5 and result.achieved == pytest.approx(0.5), name
    assert sum("experts" in n for n in report.final_modules) == 2 * 6 * len(families.moe_blocks(model))
    assert_reload_and_generate(model, tmp_path)


# --------------------------------------------------------------------------------------------
# pruning inside experts


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("method,sparsity,true_sequential", [("wanda", 0.5, False), ("sparsegpt", "2:4", True)])
def test_per_expert_sparsity_is_exact_and_the_router_untouched(model_type, method, sparsity, true_sequential):
    model = decisive_model(model_type)
    family = families.family_for(model)
    routers = {layer: families.router_tensors(block, family)[0].clone()
               for layer, block in families.moe_blocks(model).items()}
    shared_before = {n: p.clone() for n, p in model.named_parameters() if "shared_expert" in n}
    model, report = run(model, {"method": method, "sparsity": sparsity, "true_sequential": true_sequential})
    pattern = parse_pattern(sparsity)
    record = report.stages[0]
    expert_names = [n for n in record.modules if ".experts." in n]
    assert len(expert_names) == 2 * 8 * len(routers)
    for name in expert_names:
        weight = prunable_matrices(model)[name].weight
        assert (weight == 0).sum().item() == round(weight.numel() * pattern.sparsity), name
        if pattern.is_nm:
            assert nm_violations(weight, pattern.n, pattern.m) == 0
    for layer, block in families.moe_blocks(model).items():
        assert torch.equal(families.router_tensors(block, family)[0], routers[layer])
    for name, before in shared_before.items():      # the shared expert is pruned (its gate is a router)
        after = dict(model.named_parameters())[name]
        assert torch.equal(after, before) == name.endswith("shared_expert_gate.weight"), name
    # The accounting counts the 3-D experts: final modules, sidecar, summary per module type.
    finals = report.final_modules
    assert all(finals[n].target is not None for n in expert_names)
    table = report.summary_table()
    assert "gate_up_proj" in table and "down_proj" in table


def test_expert_statistics_come_from_the_tokens_routed_to_each_expert():
    """Two-pass Wanda inside experts == Wanda on each expert slice with the input norms of the tokens the
    model routed to it (gate_up: x; down: act(gate x)·up x of the unpruned gate_up)."""
    model = decisive_model("mixtral")
    original = copy.deepcopy(model)
    ids = calib()
    family = families.family_for(model)
    layer = min(families.moe_blocks(model))
    with observe.observing(original, needs={"input_sq_norm"}, layers=[layer]) as stats:
        with torch.no_grad():
            for batch in ids.split(4):
                original(batch)
    # attention of the first layer is left dense so the experts see the unpruned model's inputs
    model, _ = run(model, {"method": "wanda", "sparsity": 0.5, "targets": "experts", "true_sequential": False})
    pattern = parse_pattern(0.5)
    old, new = families.moe_blocks(original)[layer], families.moe_blocks(model)[layer]
    for e in range(8):
        gate_up_ref = wanda(families.experts_of(old, family).gate_up_proj[e].clone(), stats[layer].gate_up_inputs[e],
                            pattern)
        down_ref = wanda(families.experts_of(old, family).down_proj[e].clone(), stats[layer].down_inputs[e], pattern)
        assert torch.equal((families.experts_of(new, family).gate_up_proj[e] != 0), gate_up_ref != 0)
        assert torch.equal((families.experts_of(new, family).down_proj[e] != 0), down_ref != 0)


def test_true_sequential_calibrates_down_slices_on_pruned_gate_up():
    """ExpertsPoint with kept inputs: the down statistics are computed only after the caller pruned the
    gate_up slices, from the pruned ones; two-pass from the unpruned ones."""
    model = decisive_model("qwen3_moe")
    family = families.family_for(model)
    layer, block = next(iter(families.moe_blocks(model).items()))
    experts = families.experts_of(block, family)
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(1))
    indices = routing.route_block(block, family, families.router_config(model), x).indices
    matrices = {n: m for n, m in prunable_matrices(model).items() if f"layers.{layer}.mlp.experts" in n}
    for keep_inputs in (False, True):
        trial = copy.deepcopy(experts)
        slices = {n: type(m)(m.name, trial, m.param, m.expert, m.role) for n, m in matrices.items()}
        point = observe.ExpertsPoint("p", trial, family, slices, {"hessian"}, keep_inputs)
        dense_gate_up = trial.gate_up_proj.detach().clone()
        point.record_routing(trial, (x, indices), {})
        point.observe(x)
        stream = point.matrix_stats()
        for name, stats in stream:
            if "down_proj" in name:
                break
            slices[name].weight.mul_(0.5)                   # "prune" every gate_up slice before resuming
        e = slices[name].expert
        token = (indices == e).any(-1)
        assert stats is not None and token.sum() == stats.n_tokens > 0
        gate_up = dense_gate_up[e] if not keep_inputs else trial.gate_up_proj[e]
        gate, up = torch.nn.functional.linear(x[token], gate_up).chunk(2, -1)
        h = trial.act_fn(gate) * up
        torch.testing.assert_close(stats.hessian, h.t() @ h, rtol=1e-4, atol=1e-5)


def test_an_expert_without_calibration_tokens_is_pruned_by_magnitude_with_a_note():
    model = decisive_model("deepseek_v3")
    family = families.family_for(model)
    for block in families.moe_blocks(model).values():     # expert 3 is never chosen
        families.router_tensors(block, family)[2].data[3] = -1e3
    original = copy.deepcopy(model)
    model, report = run(model, {"method": "sparsegpt", "sparsity": 0.5})
    notes = " ".join(report.notes)
    assert "received no calibration token" in notes and "experts.gate_up_proj[3]" in notes
    pattern = parse_pattern(0.5)
    for layer, block in families.moe_blocks(model).items():
        old = families.experts_of(families.moe_blocks(original)[layer], family)
        new = families.experts_of(block, family)
        for param in ("gate_up_proj", "down_proj"):
            expected = magnitude(getattr(old, param)[3].clone(), LinearStats(), pattern)
            assert torch.equal(getattr(new, param)[3], expected)
            assert (getattr(new, param)[0] == 0).float().mean() == 0.5


def test_router_pruned_only_when_targeted_and_owl_refused():
    model = tiny_model("qwen3_moe")
    model, report = run(model, {"method": "magnitude", "sparsity": 0.5, "targets": r"mlp\.gate$"})
    assert set(report.stages[0].modules) == {f"model.layers.{i}.mlp.gate" for i in families.moe_blocks(model)}
    for block in families.moe_blocks(model).values():
        assert (block.gate.weight == 0).float().mean() == 0.5
    with pytest.raises(UserError, match="allocation owl"):
        run(tiny_model("qwen3_moe"), {"method": "wanda", "sparsity": 0.5, "allocation": "owl"})


# --------------------------------------------------------------------------------------------
# layer-drop and width on MoE families


@pytest.mark.parametrize("model_type", FAMILIES)
def test_layer_drop_keeps_each_layer_dense_or_moe(model_type, tmp_path):
    model = tiny_model(model_type)
    moe_before = families.moe_layer_indices(model.config)
    layers_before = model.config.num_hidden_layers
    model, report = run(model, {"method": "layer-drop", "num_layers": 1})
    dropped = report.stages[0].removed["layers"]
    kept = [i for i in range(layers_before) if i not in dropped]
    assert families.moe_layer_indices(model.config) == [new for new, old in enumerate(kept) if old in moe_before]
    assert sorted(families.moe_blocks(model)) == families.moe_layer_indices(model.config)
    assert_reload_and_generate(model, tmp_path)


def test_width_heads_on_moe_where_the_registry_allows_and_one_line_refusals(tmp_path):
    model, report = run(tiny_model("qwen2_moe"), {"method": "width", "heads_keep": 0.5})
    assert model.config.num_key_value_heads == 1
    assert_reload_and_generate(model, tmp_path)
    for model_type, stage, text in [("mixtral", {"mlp_keep": 0.5}, "expert-drop"),
                                    ("olmoe", {"heads_keep": 0.5}, "q_norm"),
                                    ("deepseek_v3", {"heads_keep": 0.5}, "latent attention")]:
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(tiny_model(model_type).config)
        recipe = Recipe.from_dict({"stages": [{"method": "width", **stage}]})
        with pytest.raises(UserError, match=text):
            check_recipe(meta, recipe)


# --------------------------------------------------------------------------------------------
# CLI end to end


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_cli")
    cli_workspace(root, "mixtral")
    return root


def test_cli_expert_drop_then_stun_recipe(mixtral_dir, tmp_path):
    common = ["--calib-data", str(mixtral_dir / "calib.txt"), "--calib-samples", "6", "--calib-seqlen", "32",
              "--quiet"]
    out = tmp_path / "drop"
    assert main(["compress", str(mixtral_dir / "model"), "--method", "expert-drop", "--experts-keep", "4",
                 "--criterion", "reap", *common, "--output", str(out)]) == 0
    sidecar = json.loads((out / "llmprune.json").read_text())
    stage = sidecar["stages"][0]
    assert stage["kind"] == "expert-drop" and stage["removed"] == {"experts": {"before": 8, "after": 4}}
    assert stage["parameters"]["after"] < stage["parameters"]["before"] == sidecar["parameters"]["before"]
    assert set(stage["scores"]["kept"]) == {"0", "1"} and all(len(v) == 4 for v in stage["scores"]["kept"].values())
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 4
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 4
    assert main(["card", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert "experts 8 → 4 per layer" in card and "expert-drop 4 (reap)" in card

    stun = tmp_path / "stun"
    assert main(["compress", str(mixtral_dir / "model"), "--recipe", "stun-wanda-50", *common,
                 "--output", str(stun)]) == 0
    sidecar = json.loads((stun / "llmprune.json").read_text())
    assert [s["kind"] for s in sidecar["stages"]] == ["expert-drop", "prune"]
    assert sidecar["stages"][0]["removed"]["experts"] == {"before": 8, "after": 6}
    modules = sidecar["sparsity"]["modules"]
    experts = {n: m for n, m in modules.items() if ".experts." in n}
    assert len(experts) == 2 * 6 * 2 and all(m["target"] == 0.5 and m["achieved"] == 0.5 for m in experts.values())
    assert all(m["target"] is None for n, m in modules.items() if n.endswith("mlp.gate"))
    assert sidecar["parameters"]["after"] < sidecar["parameters"]["before"]
    assert main(["card", str(stun)]) == 0
    card = (stun / "README.md").read_text()
    assert "`gate_up_proj`" in card and "experts 8 → 6 per layer" in card
    reloaded = AutoModelForCausalLM.from_pretrained(stun)
    assert (reloaded.model.layers[1].mlp.experts.down_proj == 0).float().mean() == 0.5
