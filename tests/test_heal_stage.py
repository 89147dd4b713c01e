"""The `heal` recipe stage: masks kept exactly (unstructured, 2:4), each mode lowers the held-out loss of a
pruned trained model, structured outputs reload, sidecar / card / summary record it, same seed -> the same
checkpoint bytes, validation before any model is loaded."""
import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import llmprune
from llmprune.arch import prunable_linears, weight_2d
from llmprune.cli import main
from llmprune.edits import MaskState
from llmprune.errors import UserError
from llmprune.heal import MaskedLoRA, heal_windows, mean_nll
from llmprune.io.card import render_card
from llmprune.recipe import Recipe
from llmprune.stages.heal import check_nm_kept
from tiny_models import sample_text, save_tiny, text_windows, tiny_model, tiny_tokenizer, train_tiny_llama

SEQLEN = 64


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny training/expert loops: see conftest


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("heal_text") / "text.txt"
    path.write_text(sample_text())
    return path


@pytest.fixture(scope="module")
def trained():
    """A tiny Llama trained for a few seconds on the stdlib text (the dense model)."""
    return train_tiny_llama(text_windows(SEQLEN))


def recipe(text_file, *stages, samples=8) -> dict:
    return {"calibration": {"data": str(text_file), "samples": samples, "seqlen": SEQLEN}, "stages": list(stages)}


def run(model, text_file, *stages, **kw):
    """compress a copy of `model`; returns (model, report)."""
    return llmprune.compress(copy.deepcopy(model), tiny_tokenizer(), recipe(text_file, *stages), progress=False,
                             device="cpu", **kw)


def zero_masks(model) -> dict[str, torch.Tensor]:
    return {name: weight_2d(m) != 0 for name, m in prunable_linears(model).items()}


def heal_of(report):
    (record,) = [r for r in report.stages if r.kind == "heal"]
    return record


# --------------------------------------------------------------------------------------------
# masks are kept exactly


@pytest.mark.parametrize("sparsity", [0.6, "2:4"])
@pytest.mark.parametrize("mode", ["lora", "perp"])
def test_stage_keeps_masks_exactly(trained, text_file, sparsity, mode):
    prune = {"method": "wanda", "sparsity": sparsity}
    pruned, _ = run(trained, text_file, prune)
    masks = zero_masks(pruned)
    healed, report = run(trained, text_file, prune, {"method": "heal", "mode": mode, "steps": 6, "lr": 3e-3,
                                                     "batch_size": 4, "eval_samples": 4})
    assert not any(isinstance(m, MaskedLoRA) for m in healed.modules())
    for name, module in prunable_linears(healed).items():
        weight, before = weight_2d(module), weight_2d(pruned.get_submodule(name))
        assert torch.all(weight[~masks[name]] == 0), name
        if sparsity == "2:4":
            assert torch.all((weight == 0).view(weight.shape[0], -1, 4).sum(-1) >= 2), name
        if mode == "lora":       # every linear trained, inside its mask
            assert not torch.equal(weight, before), name
        else:                    # perp: linears untouched, norms trained
            assert torch.equal(weight, before), name
    if mode == "perp":
        assert not torch.equal(healed.model.norm.weight, pruned.model.norm.weight)
    record = heal_of(report)
    assert record.zeros_after == record.zeros_before == report.stages[0].zeros_after
    assert record.measured["masked_modules"] == (14 if mode == "lora" else 0)


def test_mask_state_is_held_not_just_the_zeros(trained, text_file):
    """A kept weight that is exactly zero may train (the recorded mask says kept); a pruned one may not."""
    from llmprune.stages.heal import keep_masks

    model = copy.deepcopy(trained)
    state = MaskState()
    q = model.model.layers[0].self_attn.q_proj
    keep = torch.rand(q.weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    state.apply(q, q.weight.detach().clone(), keep)
    with torch.no_grad():
        q.weight[0, keep[0]] = 0.0                       # kept, but zero
        model.model.layers[1].mlp.up_proj.weight[:, :3] = 0.0   # zeros no stage recorded (a pruned input)
    masks = keep_masks(model, state.by_name(model))
    assert torch.equal(masks["model.layers.0.self_attn.q_proj"], keep)
    up = masks["model.layers.1.mlp.up_proj"]
    assert not up[:, :3].any() and up[:, 3:].all()
    assert "model.layers.0.mlp.up_proj" not in masks      # no zeros: dense


def test_nm_check_refuses_a_broken_pattern(trained, text_file):
    model, _ = run(trained, text_file, {"method": "magnitude", "sparsity": "2:4"})
    state = MaskState()
    for module in prunable_linears(model).values():
        state.targets[module] = "2:4"
    check_nm_kept(model, state)
    with torch.no_grad():
        weight_2d(model.model.layers[1].mlp.down_proj)[3, :4] = 1.0
    with pytest.raises(RuntimeError, match="2:4 pattern of model.layers.1.mlp.down_proj"):
        check_nm_kept(model, state)


# --------------------------------------------------------------------------------------------
# each mode lowers the held-out loss


@pytest.mark.parametrize("mode,extra", [
    ("perp", {"lr": 1e-2}),
    ("lora", {"lr": 3e-3}),
    ("distill", {"lr": 3e-3}),                         # KL to the default teacher: the input, copied
    ("distill", {"lr": 3e-3, "self_generate": True}),  # the teacher's own continuations
])
def test_each_mode_lowers_heldout_loss(trained, text_file, mode, extra):
    prune = {"method": "magnitude", "sparsity": 0.9}     # at 0.7 the tiny model's loss barely moves
    stage = {"method": "heal", "mode": mode, "steps": 40, "batch_size": 8, "eval_samples": 16, **extra}
    pruned, _ = run(trained, text_file, prune)
    healed, report = run(trained, text_file, prune, stage)
    record = heal_of(report)
    # The held-out windows, drawn again independently: the recorded losses are those of the two models.
    windows = heal_windows(tiny_tokenizer(), str(text_file), seqlen=SEQLEN, train_samples=None, eval_samples=16,
                           seed=0, calibration=None, default_train_samples=40 * 8)
    assert record.measured["data"] == windows.spec
    assert record.measured["loss_before"] == pytest.approx(mean_nll(pruned, windows.eval_ids, 8), abs=1e-5)
    assert record.measured["loss_after"] == pytest.approx(mean_nll(healed, windows.eval_ids, 8), abs=1e-5)
    assert record.measured["loss_after"] < record.measured["loss_before"] - 0.05
    if mode == "distill":     # the default teacher is the model as it was before the prune stage
        teacher_loss = record.measured["teacher_loss"]
        assert teacher_loss == pytest.approx(mean_nll(trained, windows.eval_ids, 8), abs=1e-5)
        gap = record.measured["loss_before"] - teacher_loss
        assert record.measured["loss_after"] < record.measured["loss_before"] - gap / 4   # a real share of the gap
        assert record.measured["distill"]["self_generated"] == bool(extra.get("self_generate"))


def test_distill_teacher_given_to_compress_is_loaded_once(trained, text_file):
    calls = []

    def load():
        calls.append(1)
        return copy.deepcopy(trained)

    stage = {"method": "heal", "mode": "distill", "steps": 2, "batch_size": 2, "eval_samples": 2}
    _, report = run(trained, text_file, {"method": "magnitude", "sparsity": 0.5}, stage, stage, teacher=load)
    assert len(calls) == 1 and len([r for r in report.stages if r.kind == "heal"]) == 2


# --------------------------------------------------------------------------------------------
# structured outputs


@pytest.mark.parametrize("structured", [{"method": "width", "mlp_keep": 0.5},
                                        {"method": "layer-drop", "num_layers": 1}])
def test_structured_output_merges_and_reloads(trained, text_file, tmp_path, structured):
    narrow, _ = run(trained, text_file, structured)
    healed, report = run(trained, text_file, structured,
                         {"method": "heal", "mode": "lora", "steps": 4, "batch_size": 4, "eval_samples": 2})
    assert heal_of(report).measured["dense_modules"] == len(prunable_linears(healed))
    assert all(not torch.equal(weight_2d(m), weight_2d(narrow.get_submodule(n)))
               for n, m in prunable_linears(healed).items())
    healed.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, trained.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, healed(input_ids=ids).logits)


# --------------------------------------------------------------------------------------------
# CLI: summary, sidecar, card, determinism


@pytest.fixture(scope="module")
def cli_root(tmp_path_factory, text_file):
    root = tmp_path_factory.mktemp("heal_stage_cli")
    save_tiny(root / "model", "llama")
    (root / "r.yaml").write_text(
        f"calibration: {{data: {text_file}, samples: 4, seqlen: 32}}\n"
        "stages:\n  - {method: sparsegpt, sparsity: 0.7}\n"
        "  - {method: heal, mode: lora, steps: 3, batch_size: 2, eval_samples: 2}\n")
    return root


def compress_cli(root, out, recipe_path=None, *extra):
    return main(["compress", str(root / "model"), "--recipe", str(recipe_path or root / "r.yaml"), "--device", "cpu",
                 "--quiet", "--output", str(out), *extra])


def test_cli_recipe_records_heal_in_summary_sidecar_and_card(cli_root, tmp_path, capsys):
    out = tmp_path / "out"
    assert compress_cli(cli_root, out) == 0
    printed = capsys.readouterr().out
    assert "stage 1 (heal):" in printed and "held-out loss:" in printed and "trainable parameters:" in printed
    sidecar = json.loads((out / "llmprune.json").read_text())
    stage = sidecar["stages"][1]
    assert stage["kind"] == "heal" and stage["params"]["mode"] == "lora" and stage["params"]["steps"] == 3
    assert stage["mode"] == "lora" and stage["steps"] == 3 and stage["rank"] == 8
    assert stage["data"]["disjoint_from_calibration"] == {"samples": 4, "seqlen": 32, "seed": 0}
    assert stage["data"]["source"] == sidecar["calibration"]["source"] and stage["data"]["seqlen"] == 32
    assert stage["zeros"]["after"] == stage["zeros"]["before"] == sidecar["stages"][0]["zeros"]["after"]
    for key in ("loss_before", "loss_after", "trainable_parameters", "train_seconds", "seconds"):
        assert isinstance(stage[key], (int, float)) and stage[key] > 0, key
    assert sidecar["recipe"]["stages"][1]["lr"] == 1e-3            # the default, resolved
    card = render_card(out)
    assert "## Recovery (heal)" in card and "`heal lora 3 steps`" in card
    assert f"{stage['loss_before']:.4f} → {stage['loss_after']:.4f}" in card
    assert "disjoint from the calibration windows" in card
    assert "no weights were retrained" not in card
    # the recipe as run validates and runs again
    again = tmp_path / "again"
    assert compress_cli(cli_root, again, out / "recipe.yaml") == 0
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_cli_same_seed_same_checkpoint(cli_root, tmp_path):
    outs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        path = cli_root / f"r{seed}.yaml"
        text = (cli_root / "r.yaml").read_text()
        path.write_text(text.replace("eval_samples: 2}", f"eval_samples: 2, seed: {seed}}}"))
        assert compress_cli(cli_root, tmp_path / name, path) == 0
        outs.append((tmp_path / name / "model.safetensors").read_bytes())
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]


def test_cli_distill_teacher_is_model_read_again(cli_root, tmp_path):
    """`llmprune compress` gives a distilling heal stage MODEL, loaded from disk when the stage runs."""
    from llmprune.io.load import load_tokenizer

    recipe_path = tmp_path / "distill.yaml"
    recipe_path.write_text((cli_root / "r.yaml").read_text().replace("mode: lora", "mode: distill"))
    out = tmp_path / "out"
    assert compress_cli(cli_root, out, recipe_path) == 0
    sidecar = json.loads((out / "llmprune.json").read_text())
    stage = sidecar["stages"][1]
    assert stage["mode"] == "distill" and stage["train"] == "lora" and stage["teacher"] == {"device": "cpu"}
    windows = heal_windows(load_tokenizer(str(cli_root / "model")), stage["data"]["source"], seqlen=32,
                           train_samples=None, eval_samples=2, seed=0, calibration=sidecar["calibration"],
                           default_train_samples=3 * 2)
    assert windows.spec == stage["data"]
    dense = AutoModelForCausalLM.from_pretrained(cli_root / "model")
    assert stage["teacher_loss"] == pytest.approx(mean_nll(dense, windows.eval_ids, 2), abs=1e-5)
    assert stage["teacher_loss"] != pytest.approx(stage["loss_before"], abs=1e-3)   # not the pruned model

@pytest.mark.parametrize("stage,match", [
    ({"method": "heal"}, "missing 'mode'"),
    ({"method": "heal", "mode": "perp", "rank": 4}, "rank only apply to LoRA"),
    ({"method": "heal", "mode": "lora", "temperature": 2.0}, "temperature only apply to mode distill"),
    ({"method": "heal", "mode": "distill", "distill_loss": "ce"}, "add self_generate"),
    ({"method": "heal", "mode": "lora", "batch_size": 4, "micro_batch_size": 3}, "must divide batch_size"),
    ({"method": "heal", "mode": "lora", "data": "/nonexistent.txt"}, "does not exist"),
    ({"method": "heal", "mode": "lora", "steps": 0}, "'steps' must satisfy"),
    ({"method": "heal", "mode": "sft"}, "'mode' must be one of perp, lora, distill"),
])
def test_stage_validation(stage, match):
    with pytest.raises(UserError, match=match):
        Recipe.from_dict({"stages": [{"method": "wanda", "sparsity": 0.5}, stage]})


def test_refusals_at_run_time(trained, text_file):
    stage = {"method": "heal", "mode": "lora", "steps": 1, "batch_size": 2, "eval_samples": 2}
    with pytest.raises(UserError, match="exceeds the model's"):
        run(trained, text_file, {**stage, "seqlen": 100_000})
    ids = torch.randint(0, trained.config.vocab_size, (4, 32))
    with pytest.raises(UserError, match="token tensor"):
        run(trained, text_file, {"method": "wanda", "sparsity": 0.5}, stage, calib=ids)
    with pytest.raises(UserError, match="needs the tokenizer"):
        llmprune.compress(copy.deepcopy(trained), None, recipe(text_file, stage), progress=False, device="cpu")


# --------------------------------------------------------------------------------------------
# MoE: experts' slices of fused 3-D parameters and routers keep their zeros


@pytest.mark.parametrize("heal", [{"mode": "lora"}, {"mode": "distill", "train": "all"}])
def test_moe_expert_slices_and_router_keep_their_zeros(text_file, heal):
    from llmprune.arch import decoder_matrices

    model = tiny_model("mixtral")
    prune = [{"method": "magnitude", "sparsity": "2:4"},
             {"method": "magnitude", "sparsity": 0.5, "targets": r"mlp\.gate$"}]     # the routers too
    pruned, _ = run(model, text_file, *prune)
    before = {name: weight_2d(m).clone() for name, m in decoder_matrices(pruned).items()}
    assert any("experts.gate_up_proj[" in n for n in before) and any(n.endswith("mlp.gate") for n in before)
    healed, report = run(model, text_file, *prune, {"method": "heal", "steps": 3, "batch_size": 2,
                                                    "eval_samples": 2, "lr": 1e-3, **heal})
    for name, matrix in decoder_matrices(healed).items():
        weight, old = weight_2d(matrix), before[name]
        assert torch.all(weight[old == 0] == 0), name
        if "experts." in name:
            assert torch.all((weight == 0).view(weight.shape[0], -1, 4).sum(-1) >= 2), name
            # lora trains the linears only (fused experts stay frozen); train=all trains the kept entries
            assert torch.equal(weight, old) == (heal["mode"] == "lora"), name
    assert heal_of(report).zeros_after == heal_of(report).zeros_before
