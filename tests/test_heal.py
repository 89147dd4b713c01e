"""heal: masks kept exactly (unstructured, 2:4, GPT-2 Conv1D), each mode lowers held-out loss on a pruned
trained model, structured (narrower) outputs merge and reload, determinism, disjoint heal windows, CLI."""
import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import llmprune
from llmprune.arch import prunable_linears, weight_2d
from llmprune.calibration.data import calibration_windows, disjoint_windows
from llmprune.cli import main
from llmprune.errors import UserError
from llmprune.heal import MaskedLoRA, heal_model, mean_nll, perp_parameters
from llmprune.io.sidecar import describe
from tiny_models import sample_text, save_tiny, text_windows, tiny_model, tiny_tokenizer, train_tiny_llama

SEQLEN = 64


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny training/expert loops: see conftest


@pytest.fixture(scope="module")
def data():
    """The tiny tokenizer's stdlib text as [n, 64] windows: training windows and held-out windows."""
    tok = tiny_tokenizer()
    windows = text_windows(SEQLEN)
    return {"tokenizer": tok, "train": windows[:-24], "eval": windows[-24:]}


@pytest.fixture(scope="module")
def trained(data):
    """A tiny Llama trained for a few seconds on stdlib text (the dense teacher)."""
    return train_tiny_llama(data["train"])


def pruned_copy(model, sparsity, tokenizer=None):
    pruned = copy.deepcopy(model)
    llmprune.compress(pruned, tokenizer, {"stages": [{"method": "magnitude", "sparsity": sparsity}]},
                      progress=False, device="cpu")
    return pruned


def keep_masks(model) -> dict[str, torch.Tensor]:
    return {name: weight_2d(m) != 0 for name, m in prunable_linears(model).items()}


def assert_masks_kept(model, masks, nm: tuple[int, int] | None = None):
    for name, module in prunable_linears(model).items():
        weight = weight_2d(module)
        assert torch.all(weight[~masks[name]] == 0), name
        if nm is not None:
            n, m = nm
            zeros = (weight == 0).view(weight.shape[0], -1, m).sum(-1)     # [out, in/m] zeros per group
            assert torch.all(zeros >= n), name


def assert_plain(model):
    assert not any(isinstance(m, MaskedLoRA) for m in model.modules())
    assert not any(n.endswith(("lora_A", "lora_B")) for n, _ in model.named_parameters())


# --------------------------------------------------------------------------------------------
# masks are kept exactly


@pytest.mark.parametrize("sparsity,nm", [(0.5, None), ("2:4", (2, 4))])
@pytest.mark.parametrize("mode", ["lora", "perp"])
def test_masks_kept_exactly(trained, data, sparsity, nm, mode):
    pruned = pruned_copy(trained, sparsity)
    masks = keep_masks(pruned)
    before = {n: p.detach().clone() for n, p in pruned.named_parameters()}
    result = heal_model(pruned, mode=mode, train_ids=data["train"][:64], eval_ids=data["eval"][:4], steps=6,
                        lr=3e-3, batch_size=4, progress=False)
    assert_plain(pruned)
    assert_masks_kept(pruned, masks, nm)
    changed = {n for n, p in pruned.named_parameters() if not torch.equal(p, before[n])}
    if mode == "lora":   # every decoder linear got an update, exactly inside its mask
        assert {f"{n}.weight" for n in masks} <= changed
        for name, module in prunable_linears(pruned).items():
            assert torch.all((weight_2d(module) != before[f"{name}.weight"])[~masks[name]] == False)  # noqa: E712
        assert result.masked_modules == len(masks) and result.rank == 8
        linears = prunable_linears(pruned).values()
        assert result.trainable_parameters == sum(8 * sum(weight_2d(m).shape) for m in linears)
    else:                # only norm weights (Llama has no biases)
        assert changed and changed == {n for n in changed if "norm" in n}
        assert result.trainable_parameters == sum(p.numel() for p in perp_parameters(pruned).values())


def test_given_masks_and_distill_all_keep_zeros(trained, data):
    """Explicit masks (stricter than the zeros: one kept weight forced to stay pruned is refused) and
    distill train=all, which trains every weight but holds the pruned ones at zero."""
    pruned = pruned_copy(trained, "2:4")
    masks = keep_masks(pruned)
    heal_model(pruned, mode="distill", train="all", teacher=trained, train_ids=data["train"][:32],
               eval_ids=data["eval"][:4], steps=4, lr=1e-3, batch_size=4, masks=masks, progress=False)
    assert_masks_kept(pruned, masks, (2, 4))
    wrong = {name: torch.zeros_like(m) for name, m in masks.items()}
    with pytest.raises(UserError, match="marks non-zero weights as pruned"):
        heal_model(pruned, mode="lora", train_ids=data["train"][:8], eval_ids=data["eval"][:2], steps=1, lr=1e-3,
                   batch_size=2, masks=wrong, progress=False)
    assert_plain(pruned)                      # the failed call left no adapters behind


@pytest.mark.parametrize("train", ["lora", "all"])
def test_gpt2_conv1d_masks_kept(data, train):
    """GPT-2 stores weights [in, out] (Conv1D); attn.c_proj is square, so a layout slip would not crash."""
    model = pruned_copy(tiny_model("gpt2"), "2:4")
    masks = keep_masks(model)
    before = {n: weight_2d(m).clone() for n, m in prunable_linears(model).items()}
    teacher = tiny_model("gpt2")
    heal_model(model, mode="distill", train=train, teacher=teacher, train_ids=data["train"][:16],
               eval_ids=data["eval"][:2], steps=3, lr=1e-3, batch_size=4, progress=False)
    assert_plain(model)
    assert_masks_kept(model, masks, (2, 4))
    assert all(type(m).__name__ == "Conv1D" for m in prunable_linears(model).values())
    for name, module in prunable_linears(model).items():   # every kept weight trained (a transposed mask would
        changed = (weight_2d(module) != before[name])[masks[name]]   # block about half of them in c_proj)
        assert changed.float().mean() > 0.99, name


def test_lora_forward_is_what_merge_writes(trained, data):
    """The wrapped (training) forward equals the merged model's forward: the mask applies to both."""
    from llmprune.heal import attach_lora, merge_lora

    model = pruned_copy(trained, "2:4")
    masks = keep_masks(model)
    wrappers = attach_lora(model, prunable_linears(model), rank=4, alpha=8.0, masks=None,
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for w in wrappers.values():
            w.lora_B.normal_(std=0.05)      # B = 0 at init would make any forward trivially equal
        ids = data["eval"][:2]
        wrapped = model(input_ids=ids).logits
        merge_lora(model, wrappers)
        merged = model(input_ids=ids).logits
    assert_plain(model)
    assert_masks_kept(model, masks, (2, 4))
    assert torch.allclose(wrapped, merged, atol=1e-4)
    assert not torch.allclose(merged, pruned_copy(trained, "2:4")(input_ids=ids).logits, atol=1e-2)


# --------------------------------------------------------------------------------------------
# each mode lowers the held-out loss of a pruned trained model


@pytest.mark.parametrize("mode,extra", [
    ("perp", {}),
    ("lora", {}),
    ("distill", {}),                                  # KL to the teacher on text windows
    ("distill", {"self_generated": True}),            # CE on the teacher's sampled responses
])
def test_each_mode_lowers_heldout_loss(trained, data, mode, extra):
    pruned = pruned_copy(trained, 0.7)
    dense_loss = mean_nll(trained, data["eval"], 8)
    kwargs = {}
    train_ids = data["train"][:400]
    if mode == "distill":
        kwargs["teacher"] = trained
        if extra.get("self_generated"):
            kwargs.update(prompts_ids=data["train"][:96, :32], response_tokens=32)
            train_ids = None
    result = heal_model(pruned, mode=mode, train_ids=train_ids, eval_ids=data["eval"], steps=40,
                        lr=1e-2 if mode == "perp" else 3e-3, batch_size=8, progress=False, **kwargs)
    assert result.loss_before == pytest.approx(mean_nll(pruned_copy(trained, 0.7), data["eval"], 8))
    assert result.loss_after == pytest.approx(mean_nll(pruned, data["eval"], 8))   # what was returned
    assert result.loss_after < result.loss_before - 0.01
    assert not pruned.training and all(p.requires_grad for p in pruned.parameters())
    if mode == "distill":
        assert result.teacher_loss == pytest.approx(dense_loss)
        assert result.distill["loss"] == ("ce" if extra else "kl")
        if extra:
            assert 0 < result.distill["response_tokens_total"] <= 96 * 32


def test_self_generated_data_is_the_teachers_continuation(trained, data):
    from llmprune.heal import generate_responses

    prompts = data["train"][:4, :16]
    seqs, mask = generate_responses(trained, prompts, 8, generation="greedy", batch_size=2, progress=False)
    assert seqs.shape == (4, 24) and torch.equal(seqs[:, :16], prompts)
    assert not mask[:, :16].any() and mask[:, 16].all()
    with torch.no_grad():     # greedy: every response token is the teacher's argmax given what came before
        logits = trained(input_ids=seqs).logits
    for row in range(4):
        for t in range(16, 24):
            if mask[row, t]:
                assert seqs[row, t] == logits[row, t - 1].argmax()


# --------------------------------------------------------------------------------------------
# structured outputs, dtype, determinism


@pytest.mark.parametrize("mode", ["perp", "lora"])
def test_optimizer_holds_only_what_is_trained(trained, data, monkeypatch, mode):
    """AdamW gets exactly the trained tensors, and nothing else in the model requires grad meanwhile."""
    import llmprune.heal.core as core

    seen = {}
    real_adamw = torch.optim.AdamW

    def spy(params, **kwargs):
        params = list(params)
        seen["optimized"] = {id(p) for p in params}
        seen["requires_grad"] = {id(p) for p in model.parameters() if p.requires_grad}
        seen["numel"] = sum(p.numel() for p in params)
        return real_adamw(params, **kwargs)

    monkeypatch.setattr(core.torch.optim, "AdamW", spy)
    model = pruned_copy(trained, 0.5)
    result = heal_model(model, mode=mode, train_ids=data["train"][:8], eval_ids=data["eval"][:2], steps=1, lr=1e-3,
                        batch_size=4, progress=False)
    assert seen["optimized"] == seen["requires_grad"]
    assert seen["numel"] == result.trainable_parameters < result.total_parameters / 5
    assert all(p.requires_grad for p in model.parameters())      # restored afterwards


def test_structured_narrow_mlp_merges_and_reloads(data, tmp_path):
    """A width-pruned output: MLP narrower than the config it came from. Dense linears just merge."""
    model = tiny_model("llama")
    keep = torch.arange(0, 128, 2)                                   # keep 64 of 128 neurons
    for layer in model.model.layers:
        mlp = layer.mlp
        for proj in (mlp.gate_proj, mlp.up_proj):
            proj.weight = torch.nn.Parameter(proj.weight.data[keep].clone())
            proj.out_features = 64
        mlp.down_proj.weight = torch.nn.Parameter(mlp.down_proj.weight.data[:, keep].clone())
        mlp.down_proj.in_features = 64
    model.config.intermediate_size = 64
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = heal_model(model, mode="lora", train_ids=data["train"][:32], eval_ids=data["eval"][:4], steps=5,
                        lr=3e-3, batch_size=4, progress=False)
    assert result.masked_modules == 0 and result.dense_modules == 14
    assert_plain(model)
    assert model.model.layers[0].mlp.up_proj.weight.shape == (64, 64)
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, before["model.layers.0.mlp.down_proj.weight"])
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = data["eval"][:2]
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_same_seed_identical_weights(trained, data):
    def run(seed, mode="lora", **kw):
        model = pruned_copy(trained, 0.5)
        heal_model(model, mode=mode, train_ids=data["train"][:64], eval_ids=data["eval"][:2], steps=4, lr=3e-3,
                   batch_size=4, seed=seed, progress=False, **kw)
        return model.state_dict()

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    assert same(run(0), run(0))
    assert not same(run(0), run(1))
    generated = dict(mode="distill", teacher=trained, prompts_ids=data["train"][:8, :16], response_tokens=8)
    a = run(3, **generated)
    assert same(a, run(3, **generated))       # sampled responses are seeded too
    assert not same(a, run(4, **generated))


def test_bf16_model_trains_with_fp32_masters_and_keeps_dtype(trained, data):
    pruned = pruned_copy(trained, 0.5).to(torch.bfloat16)
    masks = keep_masks(pruned)
    result = heal_model(pruned, mode="lora", train_ids=data["train"][:32], eval_ids=data["eval"][:2], steps=3,
                        lr=3e-3, batch_size=4, dtype="bfloat16", progress=False)
    assert result.dtype == "bfloat16"
    assert all(p.dtype == torch.bfloat16 for p in pruned.parameters())
    assert_masks_kept(pruned, masks)
    perp = pruned_copy(trained, 0.5).to(torch.bfloat16)
    norm_before = perp.model.norm.weight.detach().clone()
    heal_model(perp, mode="perp", train_ids=data["train"][:32], eval_ids=data["eval"][:2], steps=3, lr=3e-3,
               batch_size=4, dtype=torch.float32, progress=False)     # a bf16 checkpoint trained in fp32
    assert perp.model.norm.weight.dtype == torch.bfloat16
    assert not torch.equal(perp.model.norm.weight, norm_before)


def test_gradient_checkpointing_same_result_and_switched_off(trained, data):
    def run(checkpointing):
        model = pruned_copy(trained, 0.5)
        heal_model(model, mode="lora", train_ids=data["train"][:16], eval_ids=data["eval"][:2], steps=2,
                   lr=3e-3, batch_size=4, gradient_checkpointing=checkpointing, micro_batch_size=2, progress=False)
        assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        return model.state_dict()

    plain, checkpointed = run(False), run(True)
    assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-6) for k in plain)


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="prune"), "mode must be one of"),
    (dict(steps=0), "steps must be a positive integer"),
    (dict(lr=0.0), "lr must be"),
    (dict(mode="distill"), "needs a teacher"),
    (dict(train="all"), "only for mode distill"),
    (dict(dtype="float16"), "float32 or bfloat16"),
    (dict(micro_batch_size=3), "divisor"),
])
def test_bad_arguments(trained, data, kwargs, match):
    args = dict(mode="lora", train_ids=data["train"][:8], eval_ids=data["eval"][:2], steps=1, lr=1e-3,
                batch_size=4, progress=False)
    with pytest.raises(UserError, match=match):
        heal_model(copy.deepcopy(trained), **{**args, **kwargs})


# --------------------------------------------------------------------------------------------
# heal windows are disjoint from the calibration windows


class WordTokenizer:
    """'w17' -> 17: every token id says where in the corpus it came from."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(w[1:]) for w in text.split()]}


def word_docs(n_docs, words_per_doc):
    return [" ".join(f"w{d * words_per_doc + i}" for i in range(words_per_doc)) for d in range(n_docs)]


@pytest.mark.parametrize("n_docs,n_windows", [(40, 10), (200, 150)])   # 200 docs: the stream is extended
def test_disjoint_windows_avoid_calibration_windows(n_docs, n_windows):
    tok, texts = WordTokenizer(), word_docs(n_docs, 1000)
    calib = calibration_windows(tok, texts, 8, 2048, seed=5)
    heal = disjoint_windows(tok, texts, n_windows, 512, seed=1, exclude_samples=8, exclude_seqlen=2048,
                            exclude_seed=5)
    assert heal.shape == (n_windows, 512)
    heal_ids = heal.flatten().tolist()
    assert len(set(heal_ids)) == len(heal_ids)                       # no two heal windows overlap
    assert not set(heal_ids) & set(calib.flatten().tolist())         # nor any calibration window
    assert max(heal_ids) >= 65536 if n_docs == 200 else True         # read past the calibration stream
    if n_docs == 40:                                                 # same text read: same seed, same windows
        again = disjoint_windows(tok, texts, 3, 512, seed=1, exclude_samples=8, exclude_seqlen=2048, exclude_seed=5)
        assert torch.equal(again, heal[:3])


def test_disjoint_windows_too_little_text():
    tok, texts = WordTokenizer(), word_docs(3, 1000)
    with pytest.raises(UserError, match="room for"):
        disjoint_windows(tok, texts, 50, 256, exclude_samples=4, exclude_seqlen=256)
    few = disjoint_windows(tok, texts, 50, 256, exclude_samples=4, exclude_seqlen=256, allow_fewer=True)
    assert 1 <= few.shape[0] < 50


# --------------------------------------------------------------------------------------------
# CLI


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    root = tmp_path_factory.mktemp("heal_cli")
    save_tiny(root / "model", "llama")
    (root / "calib.txt").write_text(sample_text()[:120_000])
    out = root / "wanda"
    assert main(["compress", str(root / "model"), "--method", "wanda", "--sparsity", "2:4", "--calib-data",
                 str(root / "calib.txt"), "--calib-samples", "4", "--calib-seqlen", "32", "--quiet",
                 "--device", "cpu", "--output", str(out)]) == 0
    return root


def heal_cli(root, out, *extra):
    return main(["heal", str(root / "wanda"), "--steps", "3", "--batch-size", "2", "--seqlen", "32",
                 "--eval-samples", "2", "--device", "cpu", "--quiet", "--output", str(out), *extra])


def test_cli_heal_lora_end_to_end(compressed, tmp_path, capsys):
    out = tmp_path / "healed"
    assert heal_cli(compressed, out, "--mode", "lora") == 0
    printed = capsys.readouterr().out
    assert "held-out loss" in printed and "trainable parameters" in printed
    source = json.loads((compressed / "wanda" / "llmprune.json").read_text())
    sidecar = json.loads((out / "llmprune.json").read_text())
    for key in ("kind", "recipe", "calibration", "base_model"):
        assert sidecar[key] == source[key]
    assert sidecar["stages"][:-1] == source["stages"]
    stage = sidecar["stages"][-1]
    assert stage["method"] == "heal" and stage["kind"] == "heal" and stage["index"] == len(source["stages"])
    assert stage["mode"] == stage["params"]["mode"] == "lora" and stage["steps"] == stage["params"]["steps"] == 3
    assert describe(sidecar) == "wanda 2:4 → heal lora 3 steps"
    assert stage["data"]["disjoint_from_calibration"] == {"samples": 4, "seqlen": 32, "seed": 0}
    assert stage["data"]["source"] == source["calibration"]["source"] and stage["data"]["windows"] == 6
    for key in ("loss_before", "loss_after", "trainable_parameters", "seconds", "lr"):
        assert isinstance(stage[key], (int, float))
    assert stage["zeros"]["after"] >= stage["zeros"]["before"] > 0
    assert stage["zeros"]["fraction_after"] == pytest.approx(0.5, abs=1e-3)
    assert sidecar["sparsity"]["achieved"] == pytest.approx(source["sparsity"]["achieved"], abs=1e-3)
    assert (out / "recipe.yaml").read_text() == (compressed / "wanda" / "recipe.yaml").read_text()
    pruned = AutoModelForCausalLM.from_pretrained(compressed / "wanda")
    healed = AutoModelForCausalLM.from_pretrained(out)
    masks = keep_masks(pruned)
    assert_masks_kept(healed, masks, (2, 4))
    assert any(not torch.equal(weight_2d(m), weight_2d(pruned.get_submodule(n)))
               for n, m in prunable_linears(healed).items())
    # healing a healed output appends a second record
    again = tmp_path / "twice"
    assert main(["heal", str(out), "--mode", "perp", "--steps", "2", "--batch-size", "2", "--seqlen", "32",
                 "--eval-samples", "2", "--device", "cpu", "--quiet", "--output", str(again)]) == 0
    stages = json.loads((again / "llmprune.json").read_text())["stages"]
    assert [s["method"] for s in stages] == ["wanda", "heal", "heal"]
    assert [s["params"].get("mode") for s in stages[1:]] == ["lora", "perp"]


def test_cli_heal_distill_uses_base_model_as_teacher(compressed, tmp_path):
    out = tmp_path / "distilled"
    assert heal_cli(compressed, out, "--mode", "distill", "--self-generate", "--greedy") == 0
    stage = json.loads((out / "llmprune.json").read_text())["stages"][-1]
    assert stage["teacher"]["id"] == str(compressed / "model")
    assert stage["distill"]["self_generated"] and stage["distill"]["loss"] == "ce"
    assert stage["distill"]["prompt_tokens"] == 16 and stage["distill"]["generation"] == "greedy"
    assert stage["train"] == "lora"


@pytest.mark.parametrize("extra,match", [
    (["--mode", "lora", "--steps", "0"], "--steps must be at least 1"),
    (["--mode", "lora", "--teacher", "x"], "only apply to --mode distill"),
    (["--mode", "distill", "--distill-loss", "ce"], "add --self-generate"),
    (["--mode", "lora", "--data", "/nonexistent.txt"], "does not exist"),
    (["--mode", "lora", "--seqlen", "30000"], "exceeds the model"),
    (["--mode", "lora", "--samples", "100000"], "room for"),
])
def test_cli_heal_refuses_bad_input(compressed, tmp_path, capsys, extra, match):
    assert main(["heal", str(compressed / "wanda"), "--quiet", "--device", "cpu", "--output",
                 str(tmp_path / "x"), *extra]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_heal_refuses_non_llmprune_and_packed_dirs(compressed, tmp_path, capsys):
    assert main(["heal", str(compressed / "model"), "--mode", "perp", "--output", str(tmp_path / "x")]) == 2
    assert "not an llmprune output" in capsys.readouterr().err
    packed = tmp_path / "packed"
    packed.mkdir()
    for f in (compressed / "wanda").iterdir():
        (packed / f.name).write_bytes(f.read_bytes())
    sidecar = json.loads((packed / "llmprune.json").read_text())
    (packed / "llmprune.json").write_text(json.dumps({**sidecar, "kind": "pack"}))
    assert main(["heal", str(packed), "--mode", "perp", "--output", str(tmp_path / "y")]) == 2
    assert "packed 2:4" in capsys.readouterr().err
