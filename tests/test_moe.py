"""MoE experts: family data, routing reproduction, per-expert statistics, selection criteria, merging, and
the expert-drop edit, on tiny configs of every MoE family (CPU, seconds)."""
from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from llmprune.errors import UserError
from llmprune.moe import criteria, edit, families, observe, routing
from tiny_models import MOE_CONFIGS, VOCAB, tiny_model

FAMILIES = sorted(MOE_CONFIGS)


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny training/expert loops: see conftest


def decisive_model(model_type: str, seed: int = 0):
    """A tiny MoE whose router is decisive (scaled-up rows) and whose experts differ in output scale, so
    that expert choice matters; DeepSeek gets a non-zero correction bias."""
    model = tiny_model(model_type, seed)
    family = families.family_for(model)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for block in families.moe_blocks(model).values():
            weight, _, correction = families.router_tensors(block, family)
            weight.mul_(40)
            if correction is not None:
                correction.copy_(0.05 * torch.randn(correction.shape, generator=generator))
            down = getattr(families.experts_of(block, family), family["down_proj"])
            scale = torch.exp(1.5 * torch.randn(down.shape[0], generator=generator))
            down.mul_(scale[:, None, None])
    return model


def token_batches(n: int = 2, seq: int = 32, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (2, seq), generator=generator) for _ in range(n)]


def assert_generate_agrees(model, ids):
    with_cache = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
    without = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without)


def assert_reload_equal(model, ids, tmp_path):
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info          # no missing / unexpected / mismatched keys
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(ids).logits, logits)
    return reloaded


# --------------------------------------------------------------------------------------------
# family data and tiny configs


def test_moe_families_live_in_the_one_registry_and_cover_tiny_configs():
    from llmprune.arch import ARCHITECTURES, REGISTRY_FILE

    raw = json.loads(REGISTRY_FILE.read_text())
    assert set(families.moe_model_types()) == set(MOE_CONFIGS)
    for model_type in MOE_CONFIGS:
        assert ARCHITECTURES[model_type].moe == raw[model_type]["moe"]           # read as data, unchanged
        assert families.family_for(tiny_model(model_type))["layers"] == ARCHITECTURES[model_type].layers
    assert not families.is_moe(tiny_model("llama"))
    with pytest.raises(UserError):
        families.family_for(tiny_model("llama"))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_tiny_moe_builds_generates_and_reloads(model_type, tmp_path):
    model = tiny_model(model_type)
    ids = token_batches(1, 12)[0]
    assert_generate_agrees(model, ids)
    assert_reload_equal(model, ids, tmp_path)
    # The config-only layer rule agrees with the modules the model built.
    family = families.family_for(model)
    layers = model.get_submodule(family["layers"])
    built = [i for i, layer in enumerate(layers) if hasattr(getattr(layer, family["moe_block"]), family["router"])]
    assert families.moe_layer_indices(model.config) == built
    assert len(built) >= 2 and (model_type not in ("qwen2_moe", "deepseek_v3") or len(built) < len(layers))


def test_expert_weight_views_are_2d_views_of_the_fused_parameters():
    model = tiny_model("qwen3_moe")
    family = families.family_for(model)
    block = families.moe_blocks(model)[0]
    views = families.expert_weight_views(block, family, 3)
    assert views["gate_up_proj"].shape == (64, 64) and views["down_proj"].shape == (64, 32)   # [out, in]
    views["down_proj"][0, 0] = 7.0
    assert block.experts.down_proj[3, 0, 0] == 7.0
    gate, up, down = families.expert_matrices(block, family, 3)
    assert torch.equal(torch.cat([gate, up]), block.experts.gate_up_proj[3]) and down[0, 0] == 7.0


# --------------------------------------------------------------------------------------------
# routing


@pytest.mark.parametrize("model_type", FAMILIES)
def test_routing_reproduces_the_models_router(model_type):
    model = decisive_model(model_type)
    family, rcfg = families.family_for(model), families.router_config(model)
    x = torch.randn(300, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    for block in families.moe_blocks(model).values():
        with torch.no_grad():
            _, weights, indices = families.router_of(block, family)(x)
            ours = routing.route_block(block, family, rcfg, x)
            # Some routers return top-k unsorted (DeepSeek: sorted=False): compare per token as sets.
            order, ours_order = indices.argsort(-1), ours.indices.argsort(-1)
            assert torch.equal(indices.gather(1, order), ours.indices.gather(1, ours_order))
            torch.testing.assert_close(weights.float().gather(1, order), ours.weights.gather(1, ours_order),
                                       rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(routing.block_output(block, family, rcfg, x), block(x[None])[0],
                                       rtol=1e-5, atol=1e-6)
        assert ours.indices.unique().numel() == rcfg.num_experts       # the decisive router uses every expert
        if rcfg.grouped:   # topk_group=1: both chosen experts lie in one group of 4
            group = ours.indices // (rcfg.num_experts // rcfg.n_group)
            assert torch.equal(group[:, 0], group[:, 1])
            assert rcfg.routed_scaling_factor != 1.0
            torch.testing.assert_close(ours.weights.sum(-1), torch.full((300,), rcfg.routed_scaling_factor))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_drop_experts_edits_router_experts_config_and_reloads(model_type, tmp_path):
    model = decisive_model(model_type)
    original = copy.deepcopy(model)
    family, rcfg = families.family_for(model), families.router_config(model)
    batches = token_batches()
    inputs = observe.capture_moe_inputs(model, batches)
    with observe.observing(model) as stats:
        with torch.no_grad():
            for ids in batches:
                model(ids)
    selection = criteria.select_experts(model, "reap", 4, stats=stats)
    keep = {layer: s.keep for layer, s in selection.items()}
    report = edit.drop_experts(model, keep)
    assert (report.experts_before, report.experts_after) == (8, 4)

    count_field = family["config"]["num_experts"]
    assert getattr(model.config, count_field) == families.num_experts(model) == 4
    original_blocks = families.moe_blocks(original)
    hidden, inter = model.config.hidden_size, families.experts_of(original_blocks[min(keep)], family).down_proj.shape[-1]
    per_expert = 2 * inter * hidden + hidden * inter + hidden          # gate_up, down, router row
    assert report.parameters_before - report.parameters_after == len(keep) * 4 * per_expert
    for layer, block in families.moe_blocks(model).items():
        router, experts = families.router_of(block, family), families.experts_of(block, family)
        assert router.num_experts == experts.num_experts == 4
        old = original_blocks[layer]
        old_weight, _, old_correction = families.router_tensors(old, family)
        weight, _, correction = families.router_tensors(block, family)
        assert torch.equal(weight, old_weight[keep[layer]])
        if old_correction is not None:
            assert torch.equal(correction, old_correction[keep[layer]])
        for name in ("gate_up_proj", "down_proj"):
            assert torch.equal(getattr(experts, name), getattr(families.experts_of(old, family), name)[keep[layer]])
        if family["shared_expert"]:   # untouched
            for a, b in zip(getattr(block, family["shared_expert"]).parameters(),
                            getattr(old, family["shared_expert"]).parameters()):
                assert torch.equal(a, b)
        # The edited block routes only to kept experts, with the weights `route(keep=...)` predicts.
        x = inputs[layer]
        with torch.no_grad():
            _, new_weights, new_indices = router(x)
            predicted = routing.route_block(old, family, families.router_config(original), x, keep[layer])
            remapped = torch.tensor(keep[layer])[new_indices]
            order, p_order = remapped.argsort(-1), predicted.indices.argsort(-1)
            assert torch.equal(remapped.gather(1, order), predicted.indices.gather(1, p_order))
            torch.testing.assert_close(new_weights.float().gather(1, order), predicted.weights.gather(1, p_order))
            torch.testing.assert_close(block(x[None])[0], routing.block_output(
                old, family, families.router_config(original), x, keep[layer]), rtol=1e-5, atol=1e-6)
    if hasattr(original, "num_experts"):
        assert model.num_experts == 4
    ids = batches[0]
    reloaded = assert_reload_equal(model, ids, tmp_path)
    assert families.num_experts(reloaded) == 4
    assert_generate_agrees(model, ids)
    assert_generate_agrees(reloaded, ids)


def test_drop_with_merged_tensors_installs_them(tmp_path):
    model = decisive_model("qwen3_moe")
    blocks = families.moe_blocks(model)
    family = families.family_for(model)
    keep = {layer: [0, 2, 4, 6] for layer in blocks}
    merged = {layer: (torch.randn(4, 64, 64), torch.randn(4, 64, 32)) for layer in blocks}
    edit.drop_experts(model, keep, merged)
    for layer, block in blocks.items():
        experts = families.experts_of(block, family)
        assert torch.equal(experts.gate_up_proj, merged[layer][0]) and torch.equal(experts.down_proj, merged[layer][1])
    assert_reload_equal(model, token_batches(1, 8)[0], tmp_path)


def test_drop_validates_everything_before_editing():
    model = tiny_model("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = sorted(families.moe_blocks(model))
    bad_requests = [
        {layers[0]: [0], layers[1]: [1]},                                 # fewer than top_k=2
        {layers[0]: [0, 1, 2], layers[1]: [0, 1, 2, 3]},                  # different counts per layer
        {layers[0]: [0, 1, 2]},                                           # a layer missing
        {layers[0]: [0, 0, 1], layers[1]: [0, 1, 2]},                     # repeated index
        {layers[0]: [0, 1, 8], layers[1]: [0, 1, 2]},                     # out of range
    ]
    for request in bad_requests:
        with pytest.raises(UserError):
            edit.drop_experts(model, request)
    with pytest.raises(UserError):   # merged tensors of the wrong shape
        edit.drop_experts(model, {layers[0]: [0, 1, 2], layers[1]: [0, 1, 2]},
                          {layers[0]: (torch.zeros(2, 64, 64), torch.zeros(2, 64, 32))})
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert families.num_experts(model) == 8 and families.router_of(
        families.moe_blocks(model)[layers[0]], families.family_for(model)).num_experts == 8


def test_group_limited_router_constraints():
    model = decisive_model("deepseek_v3")
    family, rcfg = families.family_for(model), families.router_config(model)
    assert (rcfg.n_group, rcfg.topk_group, rcfg.num_experts) == (2, 1, 8)
    layers = sorted(families.moe_blocks(model))
    # 1 per group cannot score a group (top-2 of the group); 3 is not a multiple of n_group; unequal groups.
    for kept in (2, 3, 5):
        with pytest.raises(UserError):
            routing.validate_kept_count(rcfg, kept)
    with pytest.raises(UserError):
        criteria.select_experts(model, "frequency", 2, stats={})         # before any statistics are needed
    with pytest.raises(UserError):
        edit.drop_experts(model, {layer: [0, 1, 2, 4] for layer in layers})
    inputs = observe.capture_moe_inputs(model, token_batches())
    with observe.observing(model) as stats:
        with torch.no_grad():
            for ids in token_batches():
                model(ids)
    for criterion in ("frequency", "router-weight", "reap", "reconstruction", "random"):
        for kept in (4, 6):
            selection = criteria.select_experts(model, criterion, kept, inputs=inputs, stats=stats)
            for s in selection.values():
                assert sum(e < 4 for e in s.keep) == sum(e >= 4 for e in s.keep) == kept // 2
    # Kept groups stay contiguous: after the edit every token's experts still come from one group.
    selection = criteria.select_experts(model, "reap", 4, stats=stats)
    edit.drop_experts(model, {layer: s.keep for layer, s in selection.items()})
    for layer, block in families.moe_blocks(model).items():
        with torch.no_grad():
            _, _, indices = families.router_of(block, family)(inputs[layer])
        group = indices // 2
        assert torch.equal(group[:, 0], group[:, 1])


# --------------------------------------------------------------------------------------------
# per-expert statistics


def slow_expert_reference(model, x: torch.Tensor):
    """Expert by expert, token by token, through the model's own router module and explicit gate/up/down."""
    family = families.family_for(model)
    out = {}
    for layer, block in families.moe_blocks(model).items():
        router = families.router_of(block, family)
        count = router.num_experts
        ref = dict(count=torch.zeros(count, dtype=torch.long), prob=torch.zeros(count, dtype=torch.float64),
                   mass=torch.zeros(count, dtype=torch.float64), reap=torch.zeros(count, dtype=torch.float64),
                   norm=torch.zeros(count, dtype=torch.float64),
                   xs=[[] for _ in range(count)], hs=[[] for _ in range(count)])
        for token in x[layer]:
            logits, weights, indices = router(token[None])
            if family["routing"]["scoring"] == "softmax":
                ref["prob"] += torch.softmax(logits.double(), -1)[0]
            else:
                ref["prob"] += logits.double().sigmoid()[0]
            weights, indices = weights[0].double(), indices[0].tolist()
            for slot, e in enumerate(indices):
                gate, up, down = families.expert_matrices(block, family, e)
                h = families.expert_activation(block, family)(gate @ token) * (up @ token)
                y = down @ h
                ref["count"][e] += 1
                ref["mass"][e] += weights[slot]
                ref["reap"][e] += weights[slot] / weights.sum() * y.double().norm()
                ref["norm"][e] += y.double().norm()
                ref["xs"][e].append(token)
                ref["hs"][e].append(h)
        out[layer] = ref
    return out


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_per_expert_statistics_equal_slow_reference(model_type):
    model = decisive_model(model_type)
    family = families.family_for(model)
    layers = sorted(families.moe_blocks(model))
    dead = 3
    if family["router_correction_bias"]:   # an expert no token reaches
        for block in families.moe_blocks(model).values():
            families.router_tensors(block, family)[2].data[dead] = -1e3
    batches = token_batches(2, 24)
    inputs = observe.capture_moe_inputs(model, batches)
    with observe.observing(model, needs={"input_sq_norm", "hessian"}) as stats:
        with torch.no_grad():
            for ids in batches:
                model(ids)
    with torch.no_grad():
        reference = slow_expert_reference(model, inputs)
        with observe.observing(model, layers=[layers[-1]]) as one_layer:
            for ids in batches:
                model(ids)
    assert list(one_layer) == [layers[-1]]
    assert torch.equal(one_layer[layers[-1]].routed_count, stats[layers[-1]].routed_count)
    for layer in layers:
        s, ref = stats[layer], reference[layer]
        assert s.n_tokens == inputs[layer].shape[0] == 2 * 2 * 24
        assert torch.equal(s.routed_count, ref["count"])
        torch.testing.assert_close(s.router_prob_sum, ref["prob"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s.routed_weight_sum, ref["mass"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s.reap_sum, ref["reap"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(s.output_norm_sum, ref["norm"], rtol=1e-4, atol=1e-6)
        for e in range(8):
            if not ref["xs"][e]:
                assert e in s.unseen_experts()
                assert s.gate_up_inputs[e].n_tokens == 0 and s.gate_up_inputs[e].hessian is None
                assert s.down_inputs[e].input_sq_norm is None and s.reap()[e] == 0
                continue
            xe, he = torch.stack(ref["xs"][e]), torch.stack(ref["hs"][e])
            for got, inp in ((s.gate_up_inputs[e], xe), (s.down_inputs[e], he)):
                assert got.n_tokens == inp.shape[0]
                torch.testing.assert_close(got.input_sq_norm, (inp * inp).sum(0), rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(got.hessian, inp.t() @ inp, rtol=1e-4, atol=1e-5)
        if family["router_correction_bias"]:
            assert s.unseen_experts() == [dead]
        else:
            assert s.unseen_experts() == []
        torch.testing.assert_close(s.routed_share().sum(), torch.tensor(1.0, dtype=torch.float64))


def test_unseen_expert_is_visible_without_a_correction_bias():
    model = decisive_model("mixtral")
    family, rcfg = families.family_for(model), families.router_config(model)
    block = families.moe_blocks(model)[0]
    direction = F.normalize(torch.randn(64), dim=0)
    families.router_tensors(block, family)[0].data[5] = -50 * direction
    x = torch.randn(200, 64) + 5 * direction          # every token points away from expert 5's router row
    stats = observe.new_layer_stats(8, {"hessian"})
    observe.observe_block(stats, block, family, rcfg, x)
    assert stats.unseen_experts() == [5]
    assert stats.gate_up_inputs[5].hessian is None and stats.gate_up_inputs[5].n_tokens == 0
    assert stats.gate_up_inputs[5].input_sq_norm is None    # only what `needs` asked for, and nothing when unseen
    assert all(stats.gate_up_inputs[e].hessian is not None for e in range(8) if e != 5)


# --------------------------------------------------------------------------------------------
# criteria


def calibrated(model_type: str = "mixtral", seed: int = 0):
    model = decisive_model(model_type, seed)
    batches = token_batches(3, 32, seed)
    inputs = observe.capture_moe_inputs(model, batches)
    with observe.observing(model) as stats:
        with torch.no_grad():
            for ids in batches:
                model(ids)
    return model, inputs, stats


def test_keep_set_error_equals_the_edited_blocks_output_error():
    model, inputs, _ = calibrated("qwen2_moe")
    family, rcfg = families.family_for(model), families.router_config(model)
    keep = {layer: [1, 3, 4, 6] for layer in inputs}
    predicted = {layer: criteria.moe_output_error(block, family, rcfg, inputs[layer], keep[layer])
                 for layer, block in families.moe_blocks(model).items()}
    with torch.no_grad():
        before = {layer: block(inputs[layer][None])[0] for layer, block in families.moe_blocks(model).items()}
        edit.drop_experts(model, keep)
        for layer, block in families.moe_blocks(model).items():
            actual = (before[layer].double() - block(inputs[layer][None])[0].double()).norm().item()
            assert predicted[layer] == pytest.approx(actual, rel=1e-4)


@pytest.mark.parametrize("kept", [6, 4, 2])
def test_reconstruction_and_reap_beat_random_on_layer_output_error(kept):
    model, inputs, stats = calibrated("mixtral")
    family, rcfg = families.family_for(model), families.router_config(model)
    for layer, block in families.moe_blocks(model).items():
        x = inputs[layer]
        subsets = [list(c) for c in itertools.combinations(range(8), kept)]
        all_errors = criteria.keep_set_errors(block, family, rcfg, x, subsets)
        recon = criteria.select_layer("reconstruction", kept, block, family, rcfg, x, stats[layer])
        assert recon.error == pytest.approx(min(all_errors)) and recon.keep == subsets[all_errors.index(min(all_errors))]
        reap = criteria.select_layer("reap", kept, block, family, rcfg, x, stats[layer])
        reap_error = criteria.moe_output_error(block, family, rcfg, x, reap.keep)
        random_errors = [criteria.moe_output_error(block, family, rcfg, x, criteria.keep_random(rcfg, kept, seed))
                         for seed in range(12)]
        mean_random = sum(random_errors) / len(random_errors)
        assert recon.error <= reap_error + 1e-9
        assert recon.error < mean_random
        if kept > rcfg.top_k:
            # At kept == top_k every token uses both kept experts with renormalised weights; REAP's
            # high-output experts then dominate every token, and REAP is no better than chance there.
            assert reap_error < mean_random


@pytest.mark.parametrize("model_type,overrides", [("olmoe", dict(num_experts=12)),
                                                   ("deepseek_v3", dict(n_routed_experts=16))])
def test_greedy_reconstruction_above_eight_experts(model_type, overrides):
    model = tiny_model(model_type, **overrides)
    family, rcfg = families.family_for(model), families.router_config(model)
    block = next(iter(families.moe_blocks(model).values()))
    count = rcfg.num_experts
    with torch.no_grad():
        families.router_tensors(block, family)[0].mul_(40)
        block.experts.down_proj.mul_(torch.linspace(0.1, 3.0, count)[torch.randperm(count)][:, None, None])
    x = torch.randn(400, 64, generator=torch.Generator().manual_seed(0))
    kept = 8 if rcfg.grouped else 9
    keep, error = criteria.keep_reconstruction(block, family, rcfg, x, kept)
    assert len(keep) == kept and error == pytest.approx(criteria.moe_output_error(block, family, rcfg, x, keep))
    if rcfg.grouped:   # 2 groups of 8 -> 4 + 4
        assert sum(e < 8 for e in keep) == sum(e >= 8 for e in keep) == 4
    # Greedy removal is no worse than the best of a few random keep sets.
    random_best = min(criteria.moe_output_error(block, family, rcfg, x, criteria.keep_random(rcfg, kept, s))
                      for s in range(5))
    assert error <= random_best


def test_score_criteria_keep_the_top_scores_and_random_is_seeded():
    _, _, stats = calibrated("olmoe")
    rcfg = families.router_config(tiny_model("olmoe"))
    s = next(iter(stats.values()))
    for criterion, score in (("frequency", s.routed_count.double()), ("router-weight", s.router_prob_sum),
                             ("reap", s.reap_sum / s.routed_count.clamp_min(1))):
        keep = criteria.keep_top(criteria.expert_scores(s, criterion), 4, rcfg)
        assert sorted(keep) == sorted(score.argsort(descending=True)[:4].tolist())
    assert criteria.keep_random(rcfg, 4, 7) == criteria.keep_random(rcfg, 4, 7)
    assert len({tuple(criteria.keep_random(rcfg, 4, seed)) for seed in range(10)}) > 1
    with pytest.raises(UserError):
        criteria.select_layer("nope", 4, None, None, rcfg)
    with pytest.raises(UserError):
        criteria.keep_top(s.routed_count.double(), 1, rcfg)             # top_k=2 > 1


# --------------------------------------------------------------------------------------------
# merging


def test_merge_assigns_a_removed_expert_to_its_near_copy_and_averages_by_routed_mass():
    model, inputs, stats = calibrated("mixtral")
    family, rcfg = families.family_for(model), families.router_config(model)
    block = families.moe_blocks(model)[0]
    experts = families.experts_of(block, family)
    with torch.no_grad():   # expert 5 is expert 2 plus a little noise
        experts.gate_up_proj[5] = experts.gate_up_proj[2] + 1e-3 * torch.randn_like(experts.gate_up_proj[2])
        experts.down_proj[5] = experts.down_proj[2] * 1.01
    stats0 = observe.new_layer_stats(8)
    observe.observe_block(stats0, block, family, rcfg, inputs[0])
    keep = [0, 1, 2, 3, 4, 6]
    plan = criteria.merge_experts(block, family, rcfg, inputs[0], stats0, keep, mode="average")
    assert plan.assignment[5] == 2
    mass = stats0.routed_weight_sum
    group = [2] + [j for j, i in plan.assignment.items() if i == 2]
    w = (mass[group] / mass[group].sum()).float()
    expected = sum(wi * experts.down_proj[e] for wi, e in zip(w, group))
    torch.testing.assert_close(plan.down_proj[keep.index(2)], expected)
    untouched = [i for i in keep if all(t != i for t in plan.assignment.values())]
    for i in untouched:
        assert torch.equal(plan.gate_up_proj[keep.index(i)], experts.gate_up_proj[i])


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_reroute_fit_merge_reduces_layer_output_error_on_calibration_tokens(model_type):
    model, inputs, stats = calibrated(model_type)
    family, rcfg = families.family_for(model), families.router_config(model)
    kept = 4
    for layer, block in families.moe_blocks(model).items():
        x = inputs[layer]
        keep = criteria.select_layer("reap", kept, block, family, rcfg, x, stats[layer]).keep
        dropped_error = criteria.moe_output_error(block, family, rcfg, x, keep)
        plan = criteria.merge_experts(block, family, rcfg, x, stats[layer], keep, mode="reroute-fit")
        fitted = copy.deepcopy(block)
        experts = families.experts_of(fitted, family)
        with torch.no_grad():
            experts.gate_up_proj[keep] = plan.gate_up_proj
            experts.down_proj[keep] = plan.down_proj
        assert torch.equal(plan.gate_up_proj, families.experts_of(block, family).gate_up_proj[keep])
        with torch.no_grad():
            z = routing.block_output(block, family, rcfg, x)
            z_fit = routing.block_output(fitted, family, rcfg, x, keep)
        fitted_error = (z.double() - z_fit.double()).norm().item()
        assert fitted_error < 0.9 * dropped_error


def test_merge_selection_through_select_experts_and_edit(tmp_path):
    model, inputs, stats = calibrated("olmoe")
    for mode in criteria.MERGE_MODES:
        m = copy.deepcopy(model)
        selection = criteria.select_experts(m, "merge", 6, inputs=inputs, stats=stats, merge_mode=mode)
        edit.drop_experts(m, {l: s.keep for l, s in selection.items()},
                          {l: (s.merge.gate_up_proj, s.merge.down_proj) for l, s in selection.items()})
        assert families.num_experts(m) == 6
    assert_reload_equal(m, token_batches(1, 8)[0], tmp_path)
    with pytest.raises(UserError):
        criteria.select_experts(model, "merge", 6, inputs=inputs, stats=stats, merge_mode="nope")
