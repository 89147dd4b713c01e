"""Packed 2:4 checkpoints end to end: every family (GPT-2's Conv1D included) packs, loads onto
SparseLinear24 and unpacks to exactly the dense checkpoint; plain transformers refuses a packed
dir loudly; every llmprune command loads it correctly (eval) or refuses it with one line."""
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from llmprune.arch import prunable_linears, weight_2d
from llmprune.cli import main
from llmprune.errors import UserError
from llmprune.io.checkpoint import PACKED_CONFIG_KEY, CheckpointReader, packed_checkpoint_info
from llmprune.io.save import save_model
from llmprune.kernels import (SparseLinear24, check_sparse24_possible, load_pretrained, save_sparse24,
                              sparsify_model, unpack_sparse24)
from llmprune.recipe import Recipe
from llmprune.triton_kernels import ops
from tiny_models import ARCH_CONFIGS, sample_text, tiny_config, tiny_model, tiny_tokenizer


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(ops, "POISON_OUTPUTS", True)


@pytest.fixture
def torch_path(monkeypatch):
    """CPU tensors take the torch reference path (F.linear on the unpacked weight) instead of the
    Triton interpreter, which is slow for whole-model forwards; the kernels have their own tests."""
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def prune_24_(model) -> list[str]:
    """2:4 magnitude pruning of every decoder linear along in_features of its [out, in] view."""
    names = []
    with torch.no_grad():
        for name, module in prunable_linears(model).items():
            w = weight_2d(module)                              # a view: Conv1D's [in, out] storage transposed
            groups = w.reshape(w.shape[0], -1, 4)
            keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.abs().topk(2, -1).indices, True)
            w.copy_(torch.where(keep.view_as(w), w, torch.zeros_like(w)))
            names.append(name)
    return sorted(names)


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_conv1d_packs_along_in_features_and_computes_the_same_function():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(nf=24, nx=64)                                # weight [in=64, out=24]
    conv.bias.data.normal_()
    w = weight_2d(conv)
    groups = w.reshape(24, 16, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.abs().topk(2, -1).indices, True)
    w.copy_(torch.where(keep.view_as(w), w, torch.zeros_like(w)))
    packed = SparseLinear24.from_linear(conv)
    assert (packed.in_features, packed.out_features) == (64, 24) and packed.values.shape == (24, 32)
    assert torch.equal(packed.dense_weight(), conv.weight.t())
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        assert rel_err(packed(x), conv(x)) < 1e-6
    # a Conv1D that is 2:4 only along its *storage* rows (out) is not 2:4 along in_features
    bad = Conv1D(nf=64, nx=64)
    bad.weight.data.view(64, 16, 4)[..., :2] = 0              # groups along out in [in, out]
    from llmprune.kernels import Not24Error

    with pytest.raises(Not24Error):
        SparseLinear24.from_linear(bad)


def test_sparsify_model_swaps_gpt2_conv1d(torch_path):
    model = tiny_model("gpt2", seed=1)
    names = prune_24_(model)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits
    report = sparsify_model(model)
    assert sorted(report.swapped) == names and len(names) == 8
    assert isinstance(model.transformer.h[0].attn.c_attn, SparseLinear24)
    with torch.no_grad():
        assert rel_err(model(ids).logits, ref) < 1e-5


@pytest.mark.parametrize("arch", list(ARCH_CONFIGS))
def test_pack_load_unpack_every_family(arch, tmp_path, torch_path):
    model = tiny_model(arch, seed=3, tie_word_embeddings=arch in ("llama", "gpt2", "gpt_neox"))
    names = prune_24_(model)
    packed, unpacked, dense = tmp_path / "packed", tmp_path / "unpacked", tmp_path / "dense"
    info = save_sparse24(model, tiny_tokenizer(), packed, max_shard_size="30KB")
    assert info["modules"] == names and info["dense_linears"] == {"lm_head": "output head"}
    reader = CheckpointReader(packed)
    for name in names:
        out_f, in_f = weight_2d(model.get_submodule(name)).shape
        assert reader.info(f"{name}.compressed").shape == (out_f, in_f // 2)
        assert reader.info(f"{name}.bitmask").shape == (out_f, in_f // 8)
        assert reader.get(f"{name}.shape").tolist() == [out_f, in_f]
        assert f"{name}.weight" not in reader

    loaded = load_pretrained(packed)
    assert all(isinstance(loaded.get_submodule(n), SparseLinear24) for n in names)
    assert not any(t.is_meta for t in loaded.parameters())
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert rel_err(loaded(ids).logits, model(ids).logits) < 1e-5

    # unpacking gives byte for byte the checkpoint save_model writes for the dense model
    result = unpack_sparse24(packed, unpacked, max_shard_size="30KB")
    files = save_model(model, tiny_tokenizer(), dense, max_shard_size="30KB")
    assert result["files"] == files and result["modules"] == len(names)
    for f in files:
        assert (unpacked / f).read_bytes() == (dense / f).read_bytes(), f
    if len(files) > 1:
        assert json.loads((unpacked / "model.safetensors.index.json").read_text()) == \
            json.loads((dense / "model.safetensors.index.json").read_text())
    assert json.loads((unpacked / "config.json").read_text()) == json.loads((dense / "config.json").read_text())
    assert (unpacked / "tokenizer.json").is_file() and packed_checkpoint_info(unpacked) is None

    # plain transformers refuses the packed directory instead of running random linears
    with pytest.raises(ValueError, match="llmprune_sparse24"):
        AutoModelForCausalLM.from_pretrained(packed)
    with pytest.raises(ValueError, match="llmprune_sparse24"):
        AutoConfig.from_pretrained(packed)


def test_packed_config_holds_no_nested_model_type(tmp_path):
    """A model class's from_pretrained adopts any nested config dict whose model_type is its own;
    the packed config must not offer one (that built a default 7B Llama)."""
    from transformers import LlamaConfig

    model = tiny_model("llama")
    prune_24_(model)
    save_sparse24(model, None, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "llmprune_sparse24"
    assert config[PACKED_CONFIG_KEY]["original_model_type"] == "llama"
    assert not any(isinstance(v, dict) and "model_type" in v for v in config.values())
    assert LlamaConfig.from_pretrained(tmp_path).hidden_size == 64


def test_unmarked_packed_checkpoint_is_still_recognised(tmp_path, torch_path):
    """Packed dirs written before the config marker (plain model_type) load and are refused alike."""
    from llmprune.io.checkpoint import unmarked_config_dict

    model = tiny_model("qwen2")
    prune_24_(model)
    save_sparse24(model, tiny_tokenizer(), tmp_path / "p")
    (tmp_path / "p" / "config.json").write_text(json.dumps(unmarked_config_dict(tmp_path / "p")))
    assert packed_checkpoint_info(tmp_path / "p")["unmarked"] is True
    assert isinstance(load_pretrained(tmp_path / "p").model.layers[0].mlp.up_proj, SparseLinear24)
    with pytest.raises(UserError, match="packed 2:4 checkpoint"):
        from llmprune.io.load import load_model

        load_model(str(tmp_path / "p"))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """The embedded (trained) tiny Llama, 2:4-pruned, saved dense with a sidecar, and packed by
    `llmprune pack` into several shards."""
    from transformers import AutoTokenizer

    from llmprune.io.load import EMBEDDED_MODELS

    root = tmp_path_factory.mktemp("packed")
    model = AutoModelForCausalLM.from_pretrained(EMBEDDED_MODELS["llmprune-tiny"], dtype=torch.float32)
    prune_24_(model)
    save_model(model, AutoTokenizer.from_pretrained(EMBEDDED_MODELS["llmprune-tiny"]), root / "dense")
    (root / "dense" / "llmprune.json").write_text(json.dumps({
        "format_version": 1, "kind": "compress", "command": "llmprune compress x",
        "base_model": {"id": "tiny", "revision": None, "model_type": "llama"},
        "sparsity": {"target": 0.5, "pattern": "2:4"}}))
    assert main(["pack", str(root / "dense"), "--output", str(root / "packed"), "--max-shard-size", "1M"]) == 0
    from llmprune.calibration.data import stdlib_files

    (root / "text.txt").write_text(stdlib_files("test")[0].read_text()[:12_000])
    return root


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


def test_commands_refuse_packed_input_with_one_line(dirs, tmp_path, capsys):
    packed = str(dirs / "packed")
    capsys.readouterr()
    for argv in (["compress", packed, "--method", "magnitude", "--sparsity", "2:4", "--output", str(tmp_path / "c")],
                 ["delta", str(dirs / "dense"), packed, "--output", str(tmp_path / "d"), "--no-progress"],
                 ["sweep", packed, "--method", "magnitude", "--sparsities", "0,0.5", "--ppl-data",
                  str(dirs / "text.txt"), "--seqlen", "32", "--quiet", "--output", str(tmp_path / "s")]):
        assert main(argv) == 2, argv[0]
        line = one_error_line(capsys)
        assert "packed 2:4 checkpoint" in line and f"llmprune pack --unpack {packed}" in line, line
        assert not (tmp_path / argv[-1]).exists()
    assert main(["pack", packed, "--output", str(tmp_path / "again")]) == 2
    assert "already packed" in one_error_line(capsys)
    assert main(["pack", "--unpack", str(dirs / "dense"), "--output", str(tmp_path / "u")]) == 2
    assert "nothing to unpack" in one_error_line(capsys)
    assert main(["pack", str(dirs / "dense"), "--output", str(tmp_path / "x"), "--max-shard-size", "5 bananas"]) == 2
    assert "--max-shard-size" in one_error_line(capsys)


def test_pack_unpack_cli_round_trip(dirs, tmp_path):
    sidecar = json.loads((dirs / "packed" / "llmprune.json").read_text())
    assert sidecar["kind"] == "pack" and len(sidecar["pack"]["modules"]) == 28
    assert len(list((dirs / "packed").glob("model-*.safetensors"))) > 1      # --max-shard-size 40K
    out = tmp_path / "unpacked"
    assert main(["pack", "--unpack", str(dirs / "packed"), "--output", str(out)]) == 0
    side = json.loads((out / "llmprune.json").read_text())
    assert side["kind"] == "compress" and side["save_format"] == "dense" and "pack" not in side
    assert side["sparsity"]["pattern"] == "2:4"
    assert (out / "model.safetensors").read_bytes() == (dirs / "dense" / "model.safetensors").read_bytes()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    dense = AutoModelForCausalLM.from_pretrained(dirs / "dense")
    ids = torch.randint(0, 2000, (1, 10))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, dense(ids).logits)


def test_eval_of_packed_dir_matches_dense_perplexity(dirs, tmp_path, torch_path):
    common = ["--ppl-data", str(dirs / "text.txt"), "--seqlen", "128", "--batch-size", "4", "--quiet",
              "--device", "cpu", "--dtype", "float32"]   # (bf16 is broken in the Triton interpreter)
    assert main(["eval", str(dirs / "dense"), *common, "--output", str(tmp_path / "d")]) == 0
    assert main(["eval", str(dirs / "packed"), *common, "--output", str(tmp_path / "p")]) == 0
    dense, packed = (json.loads((tmp_path / r / "results.json").read_text()) for r in ("d", "p"))
    ppl_dense, ppl_packed = dense["perplexity"]["text"], packed["perplexity"]["text"]
    assert ppl_packed == pytest.approx(ppl_dense, rel=1e-4)
    counted = ("achieved", "zeros", "total", "modules")
    assert [packed["sparsity"][k] for k in counted] == [dense["sparsity"][k] for k in counted]
    assert dense["sparsity"]["modules"] == 28
    assert dense["sparsity"]["achieved"] >= 0.5
    # random linears (what plain from_pretrained made of a packed dir) give ~vocabulary-size perplexity
    assert ppl_dense < 300


def test_compress_gpt2_save_format_sparse24(tmp_path, torch_path):
    """GPT-2 (Conv1D) prunes and packs; the packed model computes what the dense output computes."""
    src = tmp_path / "gpt2"
    tiny_model("gpt2", seed=6).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    flags = ["--method", "magnitude", "--sparsity", "2:4", "--quiet"]
    assert main(["compress", str(src), *flags, "--output", str(tmp_path / "dense")]) == 0
    assert main(["compress", str(src), *flags, "--save-format", "sparse24", "--max-shard-size", "50KB",
                 "--output", str(tmp_path / "packed")]) == 0
    sidecar = json.loads((tmp_path / "packed" / "llmprune.json").read_text())
    assert len(sidecar["pack"]["modules"]) == 8 and sidecar["save_format"] == "sparse24"
    packed = load_pretrained(tmp_path / "packed")
    assert isinstance(packed.transformer.h[1].mlp.c_proj, SparseLinear24)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        assert rel_err(packed(ids).logits, dense(ids).logits) < 1e-5


def test_check_sparse24_possible_before_any_work(capsys, tmp_path):
    with torch.device("meta"):
        gpt2 = AutoModelForCausalLM.from_config(tiny_config("gpt2"))
        odd = AutoModelForCausalLM.from_config(tiny_config("llama", hidden_size=48, intermediate_size=100))
    assert check_sparse24_possible(gpt2, Recipe.from_cli("magnitude", "2:4")) == {}
    assert check_sparse24_possible(gpt2, Recipe.from_cli("magnitude", "3:4")) == {}   # even sparser
    with pytest.raises(UserError, match="2:4"):
        check_sparse24_possible(gpt2, Recipe.from_cli("magnitude", "0.5"))
    with pytest.raises(UserError, match="none of the 1 targeted linears"):
        check_sparse24_possible(gpt2, Recipe.from_cli("magnitude", "2:4", targets=r"^lm_head$"))
    # down_proj has in_features 100 (not a multiple of 8): written dense, the rest packed
    dense = check_sparse24_possible(odd, Recipe.from_cli("magnitude", "2:4"))
    assert dense == {f"model.layers.{i}.mlp.down_proj": "in_features not a multiple of 8" for i in range(2)}
    with pytest.raises(UserError, match="in_features not a multiple of 8"):
        check_sparse24_possible(odd, Recipe.from_cli("magnitude", "2:4", targets="down_proj"))
    # compress checks it before loading any weight: nothing is pruned, nothing written
    src = tmp_path / "odd"
    tiny_model("llama", hidden_size=48, intermediate_size=100).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    capsys.readouterr()
    assert main(["compress", str(src), "--method", "magnitude", "--sparsity", "2:4", "--targets", "down_proj",
                 "--save-format", "sparse24", "--output", str(tmp_path / "out")]) == 2
    assert "none of the 2 targeted linears" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_load_pretrained_device_errors(dirs):
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU is visible"):
            load_pretrained(dirs / "packed", device="cuda")
    with pytest.raises(UserError, match="unknown device"):
        load_pretrained(dirs / "packed", device="gpu0")
    assert next(load_pretrained(dirs / "packed", device="auto").parameters()).device.type == (
        "cuda" if torch.cuda.is_available() else "cpu")
