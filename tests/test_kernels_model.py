"""SparseLinear24 / sparsify_model on a tiny 2:4-pruned Llama, packed checkpoints, `llmprune pack`."""
import copy
import json

import pytest
import torch
from torch import nn

from llmprune.cli import main
from llmprune.errors import UserError
from llmprune.kernels import SparseLinear24, load_pretrained, save_sparse24, sparsify_model
from llmprune.triton_kernels import ops


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(ops, "POISON_OUTPUTS", True)


def prune_24_(linear: nn.Linear) -> None:
    """2:4 magnitude pruning along in_features, in place."""
    w = linear.weight.data
    n, k = w.shape
    groups = w.view(n, k // 4, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.abs().topk(2, dim=-1).indices, True)
    w.copy_(torch.where(keep.view(n, k), w, 0.0))


def tiny_llama(tie: bool = False, dtype=torch.float32, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie, attention_bias=True)
    model = LlamaForCausalLM(config).eval()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            prune_24_(module)
    return model.to(dtype)


def linear_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head")


def test_sparse_linear_matches_dense_linear():
    torch.manual_seed(1)
    linear = nn.Linear(96, 40, bias=True)
    prune_24_(linear)
    packed = SparseLinear24.from_linear(linear)
    assert not hasattr(packed, "weight") and packed.values.shape == (40, 48)
    x = torch.randn(2, 3, 96)
    with torch.no_grad():
        ref = linear.double()(x.double())
        out = packed(x)
    assert out.shape == (2, 3, 40)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5
    assert torch.equal(packed.to_linear().weight, linear.weight.float())
    linear.weight.data[0, :4] = 1.0  # four non-zeros in a group
    from llmprune.kernels import Not24Error

    with pytest.raises(Not24Error):
        SparseLinear24.from_linear(linear)


def test_sparsify_model_same_logits_and_greedy_generations():
    dense = tiny_llama()
    model = copy.deepcopy(dense)
    # one linear that is not 2:4 stays dense
    model.model.layers[1].mlp.down_proj.weight.data.normal_()
    dense.model.layers[1].mlp.down_proj.weight.data.copy_(model.model.layers[1].mlp.down_proj.weight.data)
    report = sparsify_model(model)
    names = linear_names(dense)
    assert sorted(report.swapped) == [n for n in names if n != "model.layers.1.mlp.down_proj"]
    assert report.skipped == {"lm_head": "output head", "model.layers.1.mlp.down_proj": "not 2:4"}
    assert isinstance(model.model.layers[0].self_attn.q_proj, SparseLinear24)
    assert type(model.model.layers[1].mlp.down_proj) is nn.Linear and type(model.lm_head) is nn.Linear
    assert report.bytes_packed / report.bytes_dense == pytest.approx(0.5 + 1 / 32)  # fp32 values + bits

    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, out = dense(ids).logits, model(ids).logits
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
    g_dense = dense.generate(ids[:1], max_new_tokens=5, do_sample=False)
    g_sparse = model.generate(ids[:1], max_new_tokens=5, do_sample=False)
    assert torch.equal(g_dense, g_sparse)


def test_sparsify_model_bf16_logits():
    dense = tiny_llama(dtype=torch.bfloat16, seed=4)
    model = copy.deepcopy(dense)
    sparsify_model(model)
    ids = torch.randint(0, 96, (1, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref, out = dense(ids).logits.double(), model(ids).logits.double()
    assert ((out - ref).norm() / ref.norm()).item() < 2e-2


@pytest.mark.parametrize("tie", [False, True])
def test_save_and_load_pretrained_round_trip(tmp_path, tie):
    dense = tiny_llama(tie=tie, seed=6)
    info = save_sparse24(dense, None, tmp_path)
    assert info["format"] == "sparse24" and info["modules"] == linear_names(dense)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in config
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.up_proj.compressed" in keys and "model.layers.0.mlp.up_proj.bitmask" in keys
    assert "model.layers.0.mlp.up_proj.weight" not in keys and "model.layers.0.self_attn.q_proj.bias" in keys
    assert ("lm_head.weight" in keys) != tie

    model = load_pretrained(tmp_path)
    assert isinstance(model.model.layers[1].mlp.gate_proj, SparseLinear24)
    assert not any(t.is_meta for t in model.parameters())
    if tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref, out = dense(ids).logits, model(ids).logits
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
    # the model given to save_sparse24 is untouched
    assert all(type(m) is not SparseLinear24 for m in dense.modules())


def test_save_sparse24_needs_24_layers(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(UserError, match="no 2:4"):
        save_sparse24(model, None, tmp_path)


def _write_dense(directory, model, sidecar=True):
    model.save_pretrained(directory, safe_serialization=True)
    if sidecar:
        (directory / "llmprune.json").write_text(json.dumps({
            "format_version": 1, "kind": "compress", "command": "llmprune compress x",
            "base_model": {"id": "tiny", "revision": None, "model_type": "llama"},
            "sparsity": {"target": 0.5, "pattern": "2:4"}}))
        (directory / "recipe.yaml").write_text("stages: []\n")


def test_pack_command(tmp_path, capsys):
    src, dst = tmp_path / "dense", tmp_path / "packed"
    dense = tiny_llama(dtype=torch.bfloat16, seed=8)
    _write_dense(src, dense)
    assert main(["pack", str(src), "--output", str(dst)]) == 0
    out = capsys.readouterr().out
    assert "packed linears" in out and "14" in out
    sidecar = json.loads((dst / "llmprune.json").read_text())
    assert sidecar["kind"] == "pack" and sidecar["sparsity"]["pattern"] == "2:4"
    assert sidecar["packed_from"]["kind"] == "compress"
    pack = sidecar["pack"]
    assert pack["format"] == "sparse24" and len(pack["modules"]) == 14
    assert pack["bytes_packed"] / pack["bytes_dense"] == 9 / 16  # bf16: exactly 56.25%
    assert (dst / "recipe.yaml").is_file() and (dst / "config.json").is_file()
    # on disk: the packed linears take 9/16 of their dense bytes, everything else is unchanged
    dense_bytes = (src / "model.safetensors").stat().st_size
    packed_bytes = (dst / "model.safetensors").stat().st_size
    saved = pack["bytes_dense"] - pack["bytes_packed"]
    assert abs((dense_bytes - packed_bytes) - saved) < 64 * 1024
    model = load_pretrained(dst)
    assert model.dtype == torch.bfloat16 and isinstance(model.model.layers[0].mlp.up_proj, SparseLinear24)

    # errors: one line, exit 2, nothing written
    assert main(["pack", str(src), "--output", str(dst)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["pack", str(dst), "--output", str(tmp_path / "again")]) == 2
    assert "already packed" in capsys.readouterr().err
    assert main(["pack", str(tmp_path / "missing"), "--output", str(tmp_path / "x")]) == 2
    capsys.readouterr()

    from transformers import LlamaConfig, LlamaForCausalLM

    unpruned = tmp_path / "unpruned"
    _write_dense(unpruned, LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64,
                                                        num_hidden_layers=1, num_attention_heads=2)), sidecar=False)
    assert main(["pack", str(unpruned), "--output", str(tmp_path / "y")]) == 2
    assert "no 2:4" in capsys.readouterr().err
    assert not (tmp_path / "y").exists() and not list(tmp_path.glob(".y.tmp-*"))
    with pytest.raises(UserError, match="not a packed 2:4 checkpoint"):
        load_pretrained(unpruned)


def test_torch_compile_fullgraph_sees_one_custom_op():
    """torch.compile traces SparseLinear24 as the opaque op llmprune::sparse24_linear (shape-only
    fake), so the whole module compiles without graph breaks; results match eager."""
    torch.manual_seed(9)
    linear = nn.Linear(64, 32)
    prune_24_(linear)
    module = SparseLinear24.from_linear(linear)
    torch._dynamo.reset()
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    for shape in [(3, 5, 64), (1, 1, 64)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            assert torch.allclose(compiled(x), linear(x), atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_capture_of_every_path():
    """No host syncs in the forward: each dispatch path (gemv, mm, unpack+cuBLAS) can be captured
    in a CUDA graph and replayed on new inputs."""
    torch.manual_seed(10)
    linear = nn.Linear(256, 512, bias=True).cuda().half()
    prune_24_(linear)
    module = SparseLinear24.from_linear(linear)
    for m in (1, 16, 300):
        x = torch.randn(m, 256, device="cuda", dtype=torch.half)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compiles the kernels outside the capture
            module(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = module(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        with torch.no_grad():
            ref = linear(x)
        assert torch.allclose(out, ref, atol=2e-2, rtol=2e-2), m
