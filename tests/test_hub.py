"""Model cards of the OLD sidecar format and Hub push, with no network: output dirs are built by hand
(tiny random model saved with `save_model` + a format-1 sidecar: no per-stage records, no `copied` /
`merged_dense` in delta outputs, eval results without a weights fingerprint) and the Hub is a small
HTTP server on 127.0.0.1. Cards of what llmprune writes today are rendered from real outputs in
tests/test_card_outputs.py."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import tempfile
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import pytest
import yaml

from llmprune.errors import UserError
from llmprune.io.card import CARD_MARKER, parse_front_matter, render_card
from llmprune.io.sidecar import write_sidecar

from cli_helpers import table_rows

TOKEN = "hf_SECRETtokenVALUE1234567890abcdef"
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------------------------
# output directories, built by hand


def _tiny_model(seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


def make_compress_output(directory: Path, pattern: str = "0.5", allocation: str = "uniform") -> Path:
    """Magnitude-prune a tiny Llama for real and record what was achieved, as the core does."""
    import torch

    from llmprune.io.save import save_model

    model = _tiny_model()
    modules = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if not name.split(".")[-1] in LINEARS:
                continue
            w = module.weight
            if ":" in pattern:  # N zeros per M consecutive input columns
                n, m = (int(x) for x in pattern.split(":"))
                groups = w.abs().reshape(w.shape[0], -1, m)
                drop = groups.topk(n, dim=-1, largest=False).indices
                mask = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False).reshape(w.shape)
                target = n / m
            else:
                target = float(pattern)
                k = int(w.shape[1] * target)
                drop = w.abs().topk(k, dim=1, largest=False).indices
                mask = torch.ones_like(w, dtype=torch.bool).scatter_(1, drop, False)
            w.mul_(mask)
            modules[name] = {"shape": list(w.shape), "target": target,
                             "achieved": float((w == 0).float().mean())}
    numel = {k: v["shape"][0] * v["shape"][1] for k, v in modules.items()}
    achieved = sum(modules[k]["achieved"] * numel[k] for k in modules) / sum(numel.values())
    directory.mkdir(parents=True)
    save_model(model, None, directory)
    method = "wanda" if ":" in pattern else "sparsegpt"
    recipe = {"stages": [{"method": method, "sparsity": pattern, "allocation": allocation}]}
    (directory / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    write_sidecar(directory, {
        "format_version": 1, "kind": "compress", "llmprune_version": "0.1.0",
        "base_model": {"id": "meta-llama/Llama-3.2-1B", "revision": "4e20de362430cd3b72f300e6b0f18e50e7166e08",
                       "model_type": "llama"},
        "recipe": recipe, "wall_time_s": 12.5, "peak_memory": {"cpu_rss_bytes": 3 * 2**30, "cuda_bytes": 0},
        "calibration": {"source": "c4", "split": "train", "samples": 128, "seqlen": 2048, "seed": 0,
                        "tokens": 262144},
        "sparsity": {"target": pattern if ":" in pattern else float(pattern),
                     "pattern": pattern if ":" in pattern else "unstructured",
                     "allocation": allocation, "achieved": achieved, "modules": modules},
        "versions": {"python": "3.11.9", "llmprune": "0.1.0", "torch": "2.13.0", "transformers": "5.23.0"},
        "command": f"llmprune compress meta-llama/Llama-3.2-1B --method {method} --sparsity {pattern} "
                   f"--calib-data c4 --output {directory.name}",
    })
    return directory


def make_delta_output(directory: Path, n_finetunes: int = 1) -> Path:
    from llmprune.io.save import save_model

    model = _tiny_model(seed=1)
    directory.mkdir(parents=True)
    save_model(model, None, directory)
    tensors = {}
    for i, (name, param) in enumerate(model.named_parameters()):
        if name.split(".")[-2] in LINEARS:
            tensors[name] = {"shape": list(param.shape), "density": 0.09 + 0.001 * i}
    fts = [{"id": f"acme/llama-ft-{k}", "revision": None, "weight": 1.0 / n_finetunes} for k in range(n_finetunes)]
    excluded = [n for n, _ in model.named_parameters() if n.split(".")[-2] not in LINEARS]
    write_sidecar(directory, {
        "format_version": 1, "kind": "delta", "llmprune_version": "0.1.0",
        "base_model": {"id": "meta-llama/Llama-3.2-1B", "revision": None, "model_type": "llama"},
        "finetuned": fts,
        "recipe": {"method": "dare" if n_finetunes == 1 else "dare-ties", "drop_rate": 0.9},
        "delta": {"method": "dare" if n_finetunes == 1 else "dare-ties", "drop_rate": 0.9, "rescale": "inverse",
                  "q": None, "lambda": 1.0, "seed": 0, "achieved_density": 0.1003, "tensors": tensors,
                  "excluded": excluded},
        "wall_time_s": 3.2, "peak_memory": {"cpu_rss_bytes": 2**30, "cuda_bytes": 0},
        "versions": {"python": "3.11.9", "llmprune": "0.1.0"},
        "command": "llmprune delta meta-llama/Llama-3.2-1B " + " ".join(f["id"] for f in fts)
                   + " --method dare --drop-rate 0.9 --output out",
    })
    return directory


def make_pack_output(directory: Path) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                       "model_type": "llama"}))
    (directory / "model.safetensors").write_bytes(b"\0" * 64)
    write_sidecar(directory, {
        "format_version": 1, "kind": "pack", "llmprune_version": "0.1.0",
        "base_model": {"id": "meta-llama/Llama-3.2-1B", "revision": None, "model_type": "llama"},
        "pack": {"format": "sparse24", "modules": ["model.layers.0.self_attn.q_proj"],
                 "bytes_dense": 1_000_000, "bytes_packed": 562_500},
        "command": "llmprune pack c --output p",
    })
    return directory


# `eval/results.json` in the format `llmprune eval` writes (llmprune/eval/results.py docstring), with the
# `baseline` block that `--baseline` adds (retained = 100*pruned/dense, dense/pruned for perplexity).
def _task(suite, kind, metric, value, stderr, n, chance, higher=True):
    return {"suite": suite, "kind": kind, "metric": metric, "value": value, "stderr": stderr, "n": n,
            "chance": chance, "higher_is_better": higher, "num_fewshot": 0}


EVAL = {
    "format_version": 1,
    "model": {"name": "two-four", "model_type": "llama", "revision": None, "dtype": "float32", "parameters": 8000},
    "sparsity": {"achieved": 0.5, "zeros": 2304, "total": 4608, "modules": 14, "target": None, "method": None,
                 "pattern": None},
    "perplexity": {"wikitext2": 14.5},
    "perplexity_details": {"wikitext2": {"source": "wikitext2", "seqlen": 2048, "windows": 40, "tokens": 81880}},
    "settings": {"seqlen": 2048, "max_length": 2048, "limit": None},
    "tasks": {
        "ppl_wikitext2": _task("lm", "perplexity", "token_perplexity", 14.5, None, 40, None, higher=False),
        "arc_easy": _task("reasoning_mc", "lm_eval", "acc_norm", 0.61, 0.01, 2376, 0.25),
        "rte": _task("reasoning_mc", "lm_eval", "acc", 0.52, 0.03, 277, 0.5),
        "triviaqa": _task("knowledge", "lm_eval", "exact_match", 0.2, 0.004, 17944, 0.0),
    },
    "suites": {"lm": {"score": None, "chance": None, "tasks": ["ppl_wikitext2"], "description": ""},
               "reasoning_mc": {"score": 0.565, "chance": 0.375, "tasks": ["arc_easy", "rte"], "description": ""},
               "knowledge": {"score": 0.2, "chance": 0.0, "tasks": ["triviaqa"], "description": ""}},
    "command": "llmprune eval two-four --suite lm,knowledge,reasoning_mc --output two-four/eval",
    "baseline": {
        "path": "/data/dense-eval", "model": "meta-llama/Llama-3.2-1B", "sparsity": 0.0,
        "tasks": {
            "ppl_wikitext2": {"value": 14.5, "dense_value": 10.0, "retained": 68.9655, "retained_adj": None,
                              "floor": False, "ci95": [66.0, 71.5]},
            "arc_easy": {"value": 0.61, "dense_value": 0.7, "retained": 87.142857, "retained_adj": 80.0,
                         "floor": False, "ci95": [84.04, 90.31]},
            "rte": {"value": 0.52, "dense_value": 0.53, "retained": 98.113, "retained_adj": None, "floor": True,
                    "ci95": None},
            "triviaqa": {"value": 0.2, "dense_value": 0.4, "retained": 50.0, "retained_adj": 50.0, "floor": False,
                         "ci95": [46.1, 53.9]},
        },
        "suites": {"lm": {"retained": 68.9655, "retained_adj": None, "worst_task": "ppl_wikitext2",
                          "worst_retained": 68.9655, "n_tasks": 1, "floor_tasks": []},
                   "reasoning_mc": {"retained": 92.628, "retained_adj": 80.0, "worst_task": "arc_easy",
                                    "worst_retained": 87.142857, "n_tasks": 2, "floor_tasks": ["rte"]},
                   "knowledge": {"retained": 50.0, "retained_adj": 50.0, "worst_task": "triviaqa",
                                 "worst_retained": 50.0, "n_tasks": 1, "floor_tasks": []}},
        "perplexity": {"wikitext2": {"value": 14.5, "dense_value": 10.0, "retained": 68.9655, "ratio": 1.45}},
    },
}


def make_eval_results(directory: Path, results: dict = EVAL) -> Path:
    (directory / "eval" / "report").mkdir(parents=True)
    (directory / "eval" / "results.json").write_text(json.dumps(results))
    (directory / "eval" / "report" / "report.md").write_text("# report\n")
    (directory / "eval" / "report" / "suites.png").write_bytes(b"\x89PNG fake")
    return directory


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    return {
        "unstructured": make_compress_output(root / "unstructured", "0.5", allocation="owl"),
        "2:4": make_compress_output(root / "two-four", "2:4"),
        "delta1": make_delta_output(root / "delta1", 1),
        "delta2": make_delta_output(root / "delta2", 2),
        "pack": make_pack_output(root / "pack"),
    }


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# cards


def test_compress_card_metadata_and_numbers_match_sidecar(outputs):
    directory = outputs["2:4"]
    sidecar = json.loads((directory / "llmprune.json").read_text())
    card = render_card(directory, repo_id="alice/llama-2of4")
    meta = parse_front_matter(card)
    assert meta["base_model"] == "meta-llama/Llama-3.2-1B"
    assert "base_model_relation" not in meta  # the Hub has no "pruned" relation; never claim finetune/quantized
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"llmprune", "pruned", "sparse", "2of4-sparse", "wanda"} <= set(meta["tags"])
    assert CARD_MARKER in card
    # per module type: parameter-weighted mean of the modules of that type, as in llmprune.json
    modules = sidecar["sparsity"]["modules"]
    for mtype in LINEARS:
        infos = [v for k, v in modules.items() if k.endswith("." + mtype)]
        sizes = [v["shape"][0] * v["shape"][1] for v in infos]
        expected = sum(v["achieved"] * s for v, s in zip(infos, sizes)) / sum(sizes)
        (row,) = table_rows(card, f"`{mtype}`")
        assert row[1] == str(len(infos)) and row[2] == f"{sum(sizes):,}"
        assert row[3] == "50.00%" and row[4] == f"{100 * expected:.2f}%"
    assert f"achieved (pruned layers): {100 * sidecar['sparsity']['achieved']:.2f}%" in card
    assert "```bash\n" + sidecar["command"] + "\n```" in card
    assert "| samples | 128 |" in card and "| source | c4 |" in card and "| tokens | 262,144 |" in card
    assert "A speed-up needs llmprune's kernels: `llmprune pack`" in card  # 2:4 limitation names the way out
    assert "from_pretrained('alice/llama-2of4')" in card
    assert "## Evaluation" not in card  # no eval results in DIR: no eval section, no placeholder
    assert "No evaluation results were published" in card
    assert "n/a" not in card.split("## Limitations")[0].split("## Sparsity")[1]


def test_module_types_are_parameter_weighted_with_target_range(tmp_path):
    directory = make_pack_output(tmp_path / "p")
    sidecar = json.loads((directory / "llmprune.json").read_text())
    sidecar["sparsity"] = {"target": 0.6, "pattern": "unstructured", "allocation": "owl", "achieved": 0.62,
                           "modules": {
                               "model.layers.0.self_attn.q_proj": {"shape": [8, 8], "target": 0.5, "achieved": 0.5},
                               "model.layers.1.self_attn.q_proj": {"shape": [8, 24], "target": 0.7, "achieved": 0.7},
                               "model.layers.0.mlp.experts.3.up_proj": {"shape": [4, 4], "target": 0.6,
                                                                        "achieved": 0.625}}}
    (directory / "llmprune.json").write_text(json.dumps(sidecar))
    card = render_card(directory)
    (q,) = table_rows(card, "`q_proj`")
    # (64 * 0.5 + 192 * 0.7) / 256 = 0.65 (an unweighted mean would say 0.60)
    assert q[1:] == ["2", "256", "65.00% (50.00%–70.00%)", "65.00%", "50.00%–70.00%"]
    (up,) = table_rows(card, "`up_proj`")
    assert up[1:] == ["1", "16", "60.00%", "62.50%", "62.50%–62.50%"]
    assert "- target: 60.00%" in card and "- achieved (pruned layers): 62.00%" in card


def test_metadata_uses_only_documented_hub_values(outputs):
    for directory in outputs.values():
        meta = parse_front_matter(render_card(directory))
        assert meta.get("base_model_relation", "merge") in ("adapter", "merge", "quantized", "finetune")
        assert not any(":" in tag for tag in meta["tags"])  # `prefix:value` tags mean something else on the Hub
        assert set(meta) <= {"base_model", "base_model_relation", "library_name", "pipeline_tag", "tags"}


def test_unstructured_card_says_no_speedup_and_owl_tag(outputs):
    card = render_card(outputs["unstructured"])
    meta = parse_front_matter(card)
    assert {"owl", "sparsegpt", "unstructured-sparsity"} <= set(meta["tags"])
    assert "no speed-up" in card and "2:4" not in card.split("## Limitations")[1]
    # a directory name, not a repo id, when rendered without one
    assert "from_pretrained('unstructured')" in card


def test_card_with_eval_results_shows_retained_against_dense(outputs, tmp_path):
    directory = make_eval_results(_copy(outputs["unstructured"], tmp_path / "withevals"))
    card = render_card(directory)
    assert yaml.safe_load(card.split("---\n")[1])  # front matter still parses
    (ppl,) = table_rows(card, "wikitext2")
    assert ppl[1:] == ["wikitext2 (test split)", "2048 tokens × 40", "10", "14.500", "+45.0%"]
    # hand-made results of the old format record no weights fingerprint: shown, but labelled
    assert "## Evaluation (unverified)" in card and "could not be checked against this model" in card
    (arc,) = table_rows(card, "arc_easy")
    assert arc[1:] == ["reasoning_mc", "acc_norm", "0.7000", "0.6100 ± 0.0100", "87.1% [84.0, 90.3]", "80.0%",
                       "0.2500", "2376"]
    (rte,) = table_rows(card, "rte")
    assert rte[5:7] == ["98.1%", "floor"] and "*floor*" in card
    (trivia,) = table_rows(card, "triviaqa")
    assert trivia[5:7] == ["50.0% [46.1, 53.9]", "50.0%"]
    (suite,) = table_rows(card, "knowledge")
    assert suite[1:] == ["0.2000", "50.0%", "50.0%", "triviaqa (50.0%)"]
    (suite,) = table_rows(card, "reasoning_mc")
    assert suite[1:] == ["0.5650", "92.6%", "80.0%", "arc_easy (87.1%)"]
    assert not table_rows(card, "lm") and not table_rows(card, "ppl_wikitext2")  # perplexity has its own table
    assert "exact zeros in the prunable linear layers): 50.00%" in card
    assert "`Llama-3.2-1B`" in card and "/data/dense-eval" not in card
    assert "[eval/report/report.md](eval/report/report.md)" in card and "![suites](eval/report/suites.png)" in card
    assert "look at the knowledge and reasoning rows" in card


def test_eval_without_baseline_has_no_retained_column(outputs, tmp_path):
    results = {k: v for k, v in EVAL.items() if k != "baseline"}
    results["tasks"] = {k: v for k, v in EVAL["tasks"].items() if k in ("ppl_wikitext2", "arc_easy")}
    results["suites"] = {"lm": EVAL["suites"]["lm"], "reasoning_mc": {"score": 0.61, "chance": 0.25}}
    directory = make_eval_results(_copy(outputs["2:4"], tmp_path / "nobase"), results)
    card = render_card(directory)
    section = card.split("## Evaluation")[1].split("## Limitations")[0]
    assert "retained" not in section and "dense" not in section.lower()
    assert "this card has no knowledge or reasoning evaluation" not in card  # arc_easy is reasoning
    (ppl,) = table_rows(card, "wikitext2")
    assert ppl[1:] == ["wikitext2 (test split)", "2048 tokens × 40", "14.500"]
    (arc,) = table_rows(card, "arc_easy")
    assert arc[1:] == ["reasoning_mc", "acc_norm", "0.6100 ± 0.0100", "0.2500", "2376"]


def test_perplexity_only_eval_warns_about_hidden_knowledge_loss(outputs, tmp_path):
    results = {"perplexity": {"wikitext2": 14.5}, "tasks": {"ppl_wikitext2": EVAL["tasks"]["ppl_wikitext2"]},
               "suites": {"lm": EVAL["suites"]["lm"]}, "sparsity": EVAL["sparsity"]}
    card = render_card(make_eval_results(_copy(outputs["2:4"], tmp_path / "ppl"), results))
    assert "this card has no knowledge or reasoning evaluation" in card
    assert "Suites" not in card and "Tasks" not in card


def test_delta_cards_single_finetune_and_merge(outputs):
    single = render_card(outputs["delta1"])
    meta = parse_front_matter(single)
    assert meta["base_model"] == "acme/llama-ft-0" and "base_model_relation" not in meta
    assert "pruned" not in meta["tags"] and {"dare", "delta-sparsification"} <= set(meta["tags"])
    assert "sparsified by `dare`" in single and "Achieved delta density: 10.03%" in single
    sidecar = json.loads((outputs["delta1"] / "llmprune.json").read_text())
    q = [v for k, v in sidecar["delta"]["tensors"].items() if ".q_proj." in k]
    (row,) = table_rows(single, "`q_proj`")
    assert row[2] == f"{100 * sum(v['density'] for v in q) / len(q):.2f}%"  # same shapes: plain mean
    assert "The weights are dense" in single

    merged = render_card(outputs["delta2"])
    meta = parse_front_matter(merged)
    assert meta["base_model"] == ["meta-llama/Llama-3.2-1B", "acme/llama-ft-0", "acme/llama-ft-1"]
    assert meta["base_model_relation"] == "merge" and "merge" in meta["tags"]
    assert "A merge of 2 fine-tunes" in merged
    # a format-1 merge does not say which unsparsified tensors were merged and which copied: say both
    assert "merged densely with the same weights, `dare-ties` consensus and λ, or copied from the first" in merged
    assert "Copied from the fine-tune without sparsification (" in single


def test_pack_card_points_to_load_pretrained(outputs):
    card = render_card(outputs["pack"], repo_id="alice/packed")
    meta = parse_front_matter(card)
    assert "library_name" not in meta  # transformers cannot load it; do not claim it
    assert {"pruned", "sparse", "sparse24"} <= set(meta["tags"])
    assert "llmprune.load_pretrained(path)" in card and "snapshot_download('alice/packed')" in card
    assert "562.5 KB" not in card and "(56.2%)" in card


def test_local_base_model_is_not_hub_metadata(tmp_path):
    directory = make_pack_output(tmp_path / "p")
    sidecar = json.loads((directory / "llmprune.json").read_text())
    sidecar["base_model"]["id"] = "/home/someone/models/my-llama"
    (directory / "llmprune.json").write_text(json.dumps(sidecar))
    card = render_card(directory)
    assert "base_model" not in parse_front_matter(card)
    assert "/home/someone" not in card and "`my-llama` (a local model directory)" in card


def test_card_command_writes_only_readme_and_keeps_handwritten(outputs, tmp_path, capsys):
    from llmprune.cli import main

    directory = _copy(outputs["2:4"], tmp_path / "c")
    before = _snapshot(directory)
    assert main(["card", str(directory)]) == 0
    after = _snapshot(directory)
    assert set(after) - set(before) == {"README.md"}
    assert all(after[k] == v for k, v in before.items())
    assert after["README.md"].decode() == render_card(directory)
    (directory / "README.md").write_text("my own card\n")
    assert main(["card", str(directory)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (directory / "README.md").read_text() == "my own card\n"
    assert main(["card", str(directory), "--force"]) == 0
    assert CARD_MARKER in (directory / "README.md").read_text()


def test_not_an_output_and_bad_repo_id_are_one_line_errors(tmp_path, capsys):
    from llmprune.cli import main
    from llmprune.io.hub import check_repo_id

    assert main(["card", str(tmp_path)]) == 2
    assert "not an llmprune output" in capsys.readouterr().err
    for bad in ("a/b/c", "https://huggingface.co/a/b", "bad--name/x", "", "x/.y", "name.git"):
        with pytest.raises(UserError):
            check_repo_id(bad)
    assert check_repo_id(" alice/llama-3.2-1b_wanda.2of4 ") == "alice/llama-3.2-1b_wanda.2of4"
    assert main(["push", str(tmp_path), "not/a/repo", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a valid Hub repository id" in err


# ----------------------------------------------------------------------------------------------
# a stand-in for the Hub API


class FakeHub:
    """Just the endpoints huggingface_hub 2.4 calls for whoami/create_repo/branch/tree/preupload/commit.

    Repos: `alice/*` belong to the token's user; `bob/public-model` exists and is bob's (public).
    Every request is recorded, so tests can check what was sent.
    """

    def __init__(self):
        self.requests: list[dict] = []
        self.repos: dict[str, dict[str, bytes]] = {"bob/public-model": {".gitattributes": b""}}
        self.commits: list[dict] = []
        self.fail_commit_with: int | None = None
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _reply(self, status: int, body=None, headers=None):
                data = json.dumps(body if body is not None else {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str):
                url = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                auth = self.headers.get("Authorization") or ""
                hub.requests.append({"method": method, "path": unquote(url.path), "query": parse_qs(url.query),
                                     "auth": auth, "body": body})
                if auth != f"Bearer {TOKEN}":
                    return self._reply(401, {"error": "Invalid credentials in Authorization header"})
                status, payload = hub.route(method, unquote(url.path), body)
                self._reply(status, payload, {"X-Error-Message": payload.get("error", "")}
                            if isinstance(payload, dict) and "error" in payload else None)

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.timeout = 1
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        # Bounded: whatever happens to the test, the server stops by itself.
        self.watchdog = threading.Timer(120, self.server.shutdown)
        self.watchdog.daemon = True

    def __enter__(self):
        self.thread.start()
        self.watchdog.start()
        return self

    def __exit__(self, *exc):
        self.watchdog.cancel()
        self.server.shutdown()
        self.server.server_close()

    def route(self, method: str, path: str, body: bytes):
        parts = path.strip("/").split("/")
        if path == "/api/whoami-v2":
            return 200, {"type": "user", "name": "alice", "orgs": []}
        if path == "/api/repos/create":
            req = json.loads(body)
            repo = f"{req.get('organization') or 'alice'}/{req['name']}"
            if not repo.startswith("alice/"):
                return 403, {"error": "You don't have the rights to create a model under this namespace"}
            if repo in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo}"}
            self.repos[repo] = {".gitattributes": b"*.safetensors filter=lfs\n"}
            return 200, {"url": f"{self.url}/{repo}"}
        if path == "/api/validate-yaml":
            content = json.loads(body)["content"]
            try:
                parse_front_matter(content)
            except Exception as exc:  # the real Hub answers 400 with errors
                return 400, {"errors": [{"message": str(exc)}]}
            return 200, {"errors": [], "warnings": []}
        if parts[:2] == ["api", "models"] and len(parts) >= 5:
            repo = f"{parts[2]}/{parts[3]}"
            action = parts[4]
            if repo not in self.repos:
                return 404, {"error": "Repository not found"}
            if action == "revision":  # repo_info (after a 403 on create)
                return 200, {"id": repo, "sha": "0" * 40, "siblings": []}
            if action == "tree":
                return 200, [{"type": "file", "path": p, "size": len(b), "oid": "1" * 40}
                             for p, b in self.repos[repo].items()]
            if action == "branch":
                return 200, {}
            if not repo.startswith("alice/"):
                return 403, {"error": "You don't have the rights to write to this repo"}
            if action == "preupload":
                files = json.loads(body)["files"]
                return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                       for f in files]}
            if action == "commit":
                if self.fail_commit_with:
                    return self.fail_commit_with, {"error": "Internal Error"}
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                commit = {"repo": repo, "revision": "/".join(parts[5:]), "header": lines[0]["value"],
                          "files": {}, "deleted": []}
                for item in lines[1:]:
                    if item["key"] == "file":
                        commit["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    elif item["key"] == "deletedFile":
                        commit["deleted"].append(item["value"]["path"])
                    else:
                        return 400, {"error": f"unexpected commit item {item['key']}"}
                self.commits.append(commit)
                self.repos[repo].update(commit["files"])
                for p in commit["deleted"]:
                    self.repos[repo].pop(p, None)
                return 200, {"commitUrl": f"{self.url}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40}
        return 404, {"error": f"no such endpoint {method} {path}"}


def _run_cli(args: list[str], endpoint: str, token: str | None = TOKEN, tmp_home: Path | None = None,
             extra_env: dict | None = None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update({"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_home), "HF_HUB_DISABLE_TELEMETRY": "1",
                "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "5", "PYTHONUNBUFFERED": "1",
                "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"})
    if token:
        env["HF_TOKEN"] = token
    env.update(extra_env or {})
    proc = subprocess.run([sys.executable, "-m", "llmprune", *args], capture_output=True, text=True, env=env,
                          timeout=120, cwd=tempfile.gettempdir())
    return proc.returncode, proc.stdout, proc.stderr


def test_push_sends_one_commit_with_dry_run_files_and_never_the_token(outputs, tmp_path):
    directory = make_eval_results(_copy(outputs["2:4"], tmp_path / "model"))
    (directory / ".cache").mkdir()
    (directory / ".cache" / "junk").write_text("not uploaded")
    before = _snapshot(directory)
    with FakeHub() as hub:
        rc, dry_out, dry_err = _run_cli(["push", str(directory), "alice/tiny-2of4", "--dry-run"], "http://127.0.0.1:9",
                                        tmp_home=tmp_path / "home")
        assert rc == 0, dry_err
        assert _snapshot(directory) == before  # a dry run writes nothing
        # debug logging on: the library logs every request, and still never the token
        rc, out, err = _run_cli(["push", str(directory), "alice/tiny-2of4", "--commit-message", "first push"],
                                hub.url, tmp_home=tmp_path / "home",
                                extra_env={"HF_HUB_VERBOSITY": "debug", "HF_DEBUG": "1"})
        assert rc == 0, err
    assert len(hub.commits) == 1
    commit = hub.commits[0]
    assert commit["repo"] == "alice/tiny-2of4" and commit["revision"] == "main"
    assert commit["header"]["summary"] == "first push"
    expected = {p for p in before if not p.startswith(".cache")} | {"README.md"}
    assert set(commit["files"]) == expected
    for p in expected - {"README.md"}:
        assert commit["files"][p] == before[p]
    # the dry run listed exactly these files with their sizes
    listed = {line.split()[0]: line.split()[1:3] for line in dry_out.split("----- README.md")[0].splitlines()
              if line.startswith("  ") and not line.strip().startswith("total")}
    assert set(listed) == expected
    from llmprune.io.hub import format_size

    for path, content in commit["files"].items():
        assert " ".join(listed[path]) == format_size(len(content))
    # the card sent is the card the dry run showed, and the card now in DIR
    card = commit["files"]["README.md"].decode()
    assert card in dry_out and (directory / "README.md").read_text() == card
    assert parse_front_matter(card)["base_model"] == "meta-llama/Llama-3.2-1B"
    after = _snapshot(directory)
    assert {k: v for k, v in after.items() if k != "README.md"} == before
    # every request carried the token, and no output ever shows it
    assert hub.requests and all(r["auth"] == f"Bearer {TOKEN}" for r in hub.requests)
    assert "/api/whoami-v2" in err  # the debug log really was on
    for text in (out, err, dry_out, dry_err):
        assert TOKEN not in text
    assert "Pushed" in out and "alice/tiny-2of4" in out


def test_push_failures_are_one_line_and_leave_dir_unchanged(outputs, tmp_path):
    directory = _copy(outputs["unstructured"], tmp_path / "model")
    before = _snapshot(directory)
    home = tmp_path / "home"
    with FakeHub() as hub:
        # no token anywhere (HF_TOKEN unset, empty HF_HOME)
        rc, out, err = _run_cli(["push", str(directory), "alice/x"], hub.url, token=None, tmp_home=home)
        assert rc == 2 and "no Hugging Face token" in err and err.count("\n") == 1
        # a token the Hub rejects
        rc, out, err = _run_cli(["push", str(directory), "alice/x"], hub.url, token="hf_wrongTOKEN123",
                                tmp_home=home)
        assert rc == 2 and "rejected" in err and "hf_wrongTOKEN123" not in out + err
        # someone else's repo
        rc, out, err = _run_cli(["push", str(directory), "bob/public-model"], hub.url, tmp_home=home)
        assert rc == 2 and "no write access to bob/public-model" in err and "alice/public-model" in err
        assert err.count("\n") == 1
        # the Hub fails while committing
        hub.fail_commit_with = 500
        rc, out, err = _run_cli(["push", str(directory), "alice/x"], hub.url, tmp_home=home)
        assert rc == 2 and "HTTP 500" in err
        assert not hub.commits
    # network down: nothing listens there any more
    rc, out, err = _run_cli(["push", str(directory), "alice/x"], hub.url, tmp_home=home)
    assert rc == 2 and "Hugging Face Hub is unreachable" in err and err.count("\n") == 1  # found in ~2 s, no retries
    # offline mode
    rc, out, err = _run_cli(["push", str(directory), "alice/x"], hub.url, tmp_home=home, extra_env={"HF_HUB_OFFLINE": "1"})
    assert rc == 2 and "HF_HUB_OFFLINE is set" in err
    # not an llmprune output
    (tmp_path / "empty").mkdir()
    rc, out, err = _run_cli(["push", str(tmp_path / "empty"), "alice/x"], hub.url, tmp_home=home)
    assert rc == 2 and "not an llmprune output" in err
    for text in (out, err):
        assert TOKEN not in text
    assert _snapshot(directory) == before


def test_push_bare_name_branch_and_stale_weights(outputs, tmp_path):
    directory = _copy(outputs["delta1"], tmp_path / "model")
    with FakeHub() as hub:
        hub.repos["alice/delta"] = {".gitattributes": b"", "pytorch_model.bin": b"old", "notes.txt": b"keep"}
        rc, out, err = _run_cli(["push", str(directory), "delta", "--revision", "v1", "--private"], hub.url,
                                tmp_home=tmp_path / "home")
        assert rc == 0, err
    (commit,) = hub.commits
    assert commit["repo"] == "alice/delta" and commit["revision"] == "v1"
    assert commit["deleted"] == ["pytorch_model.bin"]  # stale weights go, other files stay
    assert any(r["path"] == "/api/models/alice/delta/branch/v1" for r in hub.requests)
    (create,) = [json.loads(r["body"]) for r in hub.requests if r["path"] == "/api/repos/create"]
    assert create["name"] == "delta" and create["visibility"] == "private"
    assert "from_pretrained('alice/delta')" in commit["files"]["README.md"].decode()
    assert commit["header"]["summary"].startswith("Upload delta-sparsified model from meta-llama/Llama-3.2-1B")


def test_push_output_dry_run_api(outputs):
    from llmprune.io.hub import push_output

    result = push_output(outputs["pack"], "alice/packed", dry_run=True)
    assert result.dry_run and result.commit_url is None
    assert [f.path_in_repo for f in result.files] == ["README.md", "config.json", "llmprune.json",
                                                      "model.safetensors"]
    assert result.files[0].content == result.card.encode() and not (outputs["pack"] / "README.md").exists()
    assert result.files[3].size == 64


def test_handwritten_readme_is_pushed_as_is(outputs, tmp_path):
    directory = _copy(outputs["unstructured"], tmp_path / "model")
    (directory / "README.md").write_text("---\nlicense: mit\n---\n# my own words\n")
    before = _snapshot(directory)
    with FakeHub() as hub:
        rc, out, err = _run_cli(["push", str(directory), "alice/own"], hub.url, tmp_home=tmp_path / "home")
        assert rc == 0, err
    (commit,) = hub.commits
    assert commit["files"]["README.md"] == before["README.md"]
    assert _snapshot(directory) == before and "hand-written" in out


def test_hub_errors_never_carry_the_token():
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    from llmprune.io.hub import _hub_error

    request = httpx2.Request("POST", "https://hub.example/api/models/bob/x/commit/main")
    for status in (400, 403, 418, 500):
        response = httpx2.Response(status, request=request, headers={"X-Error-Message": f"bad token {TOKEN}"})
        exc = HfHubHTTPError(f"{status} error for {TOKEN}", response=response, server_message=f"echo {TOKEN}")
        message = str(_hub_error(exc, "bob/x", "alice", TOKEN))
        assert TOKEN not in message and message.count("\n") == 0
    message = str(_hub_error(ConnectionError(f"proxy said {TOKEN}"), "bob/x", None, TOKEN))
    assert TOKEN not in message and "could not reach" in message
