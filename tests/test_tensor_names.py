"""Embeddings and output heads are found through the architecture registry (llmprune.arch), by delta
pruning and by the 2:4 packer, with a regex fallback only for families the registry does not know."""
from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmprune.arch import ARCHITECTURES
from llmprune.delta.pipeline import DeltaSpec, default_exclude, plan_jobs
from llmprune.io.checkpoint import CheckpointReader
from llmprune.io.tensor_names import family, head_patterns, role
from tiny_models import tiny_model, tiny_tokenizer


@pytest.mark.parametrize("model_type,name,expected", [
    ("llama", "model.embed_tokens.weight", "token_embedding"),
    ("llama", "embed_tokens.weight", "token_embedding"),           # saved without the base-model prefix
    ("llama", "lm_head.weight", "lm_head"),
    ("llama", "model.layers.0.mlp.down_proj.weight", None),
    ("gpt2", "transformer.wte.weight", "token_embedding"),
    ("gpt2", "wpe.weight", "embedding"),
    ("gpt_neox", "gpt_neox.embed_in.weight", "token_embedding"),
    ("gpt_neox", "embed_out.weight", "lm_head"),
    ("gpt_neox", "lm_head.weight", "lm_head"),                      # its module name in transformers 5
    ("opt", "model.decoder.embed_positions.weight", "embedding"),
])
def test_roles_come_from_the_registry(model_type, name, expected):
    assert role(name, family(model_type)) == expected


def test_a_head_only_the_registry_knows_is_excluded_from_delta_pruning(tmp_path):
    """A family whose head is named `score_head`: no fallback regex matches it, the registry's entry does."""
    fam = dataclasses.replace(ARCHITECTURES["llama"], lm_head="score_head")
    assert role("score_head.weight", fam) == "lm_head" and role("score_head.weight", None) is None
    assert not any(re.search(p, "score_head.weight") for p in head_patterns(None))
    torch.manual_seed(0)
    names = {"model.embed_tokens.weight": (32, 8), "score_head.weight": (32, 8),
             "model.layers.0.mlp.down_proj.weight": (8, 16), "model.norm.weight": (8,)}
    for d, shift in (("base", 0.0), ("ft", 0.1)):
        (tmp_path / d).mkdir()
        save_file({n: torch.randn(s) + shift for n, s in names.items()}, str(tmp_path / d / "model.safetensors"))
    jobs, _ = plan_jobs(CheckpointReader(tmp_path / "base"), [CheckpointReader(tmp_path / "ft")], ["ft"],
                        DeltaSpec(family=fam))
    pruned = {j.name for j in jobs if j.prune}
    assert pruned == {"model.layers.0.mlp.down_proj.weight"}
    assert any(re.search(p, "score_head.weight") for p in default_exclude(fam))


def _save(model, path):
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_gpt_neox_embed_out_is_not_pruned_by_delta(tmp_path):
    from llmprune.cli import main

    base = tiny_model("gpt_neox", seed=0)
    _save(base, tmp_path / "base")
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.05 * torch.randn_like(p))
    _save(base, tmp_path / "ft")
    assert main(["delta", str(tmp_path / "base"), str(tmp_path / "ft"), "--method", "dare", "--drop-rate", "0.9",
                 "--quiet", "--output", str(tmp_path / "out")]) == 0
    side = json.loads((tmp_path / "out" / "llmprune.json").read_text())
    assert {"embed_out.weight", "gpt_neox.embed_in.weight"} <= set(side["delta"]["excluded"])
    assert r"^embed_out\.(weight|bias)$" in side["recipe"]["delta"]["exclude"]     # the registry's name
    out, ft = load_file(tmp_path / "out" / "model.safetensors"), load_file(tmp_path / "ft" / "model.safetensors")
    assert torch.equal(out["embed_out.weight"], ft["embed_out.weight"])               # copied verbatim
    q = "gpt_neox.layers.0.attention.query_key_value.weight"
    assert not torch.equal(out[q], ft[q])                                              # pruned delta
    from llmprune.io.card import render_card

    assert "`embed_out` (output head)" in render_card(tmp_path / "out")


def _make_24(model) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight.view(module.weight.shape[0], -1, 4)
                drop = w.abs().topk(2, dim=-1, largest=False).indices
                w.scatter_(-1, drop, 0.0)


def test_sparsify_model_keeps_the_head_dense_without_the_output_embedding_hint():
    """GPT-NeoX (checkpoint name `embed_out`, module `lm_head` in transformers 5) keeps its head dense even
    where the model does not report it as its output embedding."""
    from llmprune.kernels import SparseLinear24, sparsify_model

    model = tiny_model("gpt_neox", seed=0)
    _make_24(model)
    model.get_output_embeddings = lambda: None
    report = sparsify_model(model)
    assert report.skipped == {"lm_head": "output head"} and isinstance(model.lm_head, torch.nn.Linear)
    assert len(report.swapped) == 8 and all(isinstance(model.get_submodule(n), SparseLinear24) for n in report.swapped)


def test_sparsify_model_reads_the_head_from_the_registry(monkeypatch):
    """A family whose registry entry names another module as the head: that module stays dense."""
    from llmprune.kernels import sparsify_model

    head = "model.layers.1.mlp.down_proj"
    monkeypatch.setitem(ARCHITECTURES, "llama", dataclasses.replace(ARCHITECTURES["llama"], lm_head=head))
    model = tiny_model("llama", seed=0)
    _make_24(model)
    report = sparsify_model(model)
    assert report.skipped == {head: "output head", "lm_head": "output head"}
    assert isinstance(model.get_submodule(head), torch.nn.Linear) and len(report.swapped) == 13
