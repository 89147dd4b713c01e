"""Model cards rendered from REAL outputs: `llmprune compress` (multi-stage, OWL, width, packed), `pack`,
`delta` (DARE, TIES merge) and `eval` run in-process on a tiny Llama with a local calibration file.
Hand-built sidecars (tests/test_hub.py) only cover the old formats."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmprune.errors import UserError
from llmprune.io.card import parse_front_matter, render_card
from llmprune.io.identity import model_fingerprint

from cli_helpers import cli, cli_workspace, table_rows

CALIB = ["--calib-data", "calib.txt", "--calib-samples", "4", "--calib-seqlen", "32", "--quiet"]
BASE_KEYS = {"id", "revision", "model_type", "path", "local"}      # base_model_entry's shape
REV = "0123456789abcdef0123456789abcdef01234567"


def sidecar(directory: Path) -> dict:
    return json.loads((directory / "llmprune.json").read_text())


def finetune(src: Path, dst: Path, seed: int, noise: float = 0.02) -> Path:
    """A 'fine-tune' of the model in `src`: every weight plus seeded noise."""
    model = AutoModelForCausalLM.from_pretrained(src)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn(p.shape, generator=gen))
    model.save_pretrained(dst)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cards")
    cli_workspace(root, "llama")
    (root / "multi.yaml").write_text("stages:\n  - method: wanda\n    sparsity: 0.3\n    targets: self_attn\n"
                                     "  - method: wanda\n    sparsity: '2:4'\n    targets: mlp\n")
    runs = {
        "multi": ["--recipe", "multi.yaml"],
        "owl": ["--method", "wanda", "--sparsity", "0.6", "--allocation", "owl"],
        "width": ["--method", "width", "--mlp-keep", "0.5"],
        "two4": ["--method", "wanda", "--sparsity", "2:4"],
    }
    for name, args in runs.items():
        assert cli(root, "compress", "model", *args, *CALIB, "--output", name) == 0
    return root


# ---- compress ------------------------------------------------------------------------------------

def test_multi_stage_card_says_both_stages(root):
    card = render_card(root / "multi")
    assert "(wanda 0.3 (self_attn) → wanda 2:4 (mlp))" in card           # the summary names both stages
    assert "`wanda 0.3 (self_attn)`" in card and "`wanda 2:4 (mlp)`" in card   # one Stages row each
    assert "(2:4 pattern)" not in card                                    # not "a 2:4 model"
    assert "- patterns: `unstructured`, `2:4`" in card
    (q,) = table_rows(card, "`q_proj`")
    (gate,) = table_rows(card, "`gate_proj`")
    assert q[3] == "30.00%" and gate[3] == "2:4" and gate[4] == "50.00%"
    tags = parse_front_matter(card)["tags"]
    assert {"unstructured-sparsity", "2of4-sparse", "wanda"} <= set(tags) and "mixed-sparsity" not in tags
    limits = card.split("## Limitations")[1]
    assert "Unstructured sparsity gives no speed-up" in limits and "The 2:4 zeros are stored densely" in limits
    assert "Only the matrices pruned 2:4 can be packed" in limits


def test_owl_card_has_numeric_targets_and_its_allocation(root):
    from llmprune.io.sidecar import eval_summary

    card = render_card(root / "owl")
    side = sidecar(root / "owl")
    section = card[card.index("## Sparsity"):card.index("## Calibration")]
    assert "mixed" not in section
    targets = [m["target"] for m in side["sparsity"]["modules"].values()]
    (q,) = table_rows(card, "`q_proj`")
    assert q[3] == f"60.00% ({100 * min(targets):.2f}%–{100 * max(targets):.2f}%)" and min(targets) < 0.6 < max(targets)
    assert "owl" in parse_front_matter(card)["tags"] and "(wanda 0.6 owl)" in card
    summary = eval_summary(root / "owl")       # what `eval` records, and `report` labels runs by
    assert summary["recipe"] == "wanda 0.6 owl" and summary["allocation"] == "owl" and summary["method"] == "wanda"


def test_width_card_states_parameters_before_and_after(root):
    card = render_card(root / "width")
    side = sidecar(root / "width")
    reloaded = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(root / "width").parameters())
    before, after = side["parameters"]["before"], side["parameters"]["after"]
    assert after == reloaded < before
    assert f"It is a smaller plain checkpoint: {after:,} parameters" in card and f"base model's {before:,}" in card
    (row,) = table_rows(card, "0")
    assert row[1] == "`width mlp 0.5`" and row[3] == f"{before:,} → {after:,}" and "mlp neurons 128 → 64" in row[2]
    assert "structured-pruning" in parse_front_matter(card)["tags"] and "## Sparsity" not in card


def test_card_names_the_wall_time_it_shows(root):
    card = render_card(root / "owl")
    assert "| wall time of the `llmprune compress` run (loading, calibration, every stage, saving; evaluation " \
           "not included) |" in card
    assert f"{sidecar(root / 'owl')['wall_time_s']:.1f} s" in card


def test_every_sidecar_records_the_fingerprint_of_its_weights(root):
    for name in ("multi", "owl", "width", "two4"):
        assert sidecar(root / name)["fingerprint"] == model_fingerprint(root / name)
    # two prunings of one model have the same headers but not the same fingerprint
    assert model_fingerprint(root / "owl") != model_fingerprint(root / "multi") != model_fingerprint(root / "model")


# ---- the base model: Hub cache snapshots, --base-model, license ---------------------------------

def test_hub_cache_snapshot_base_is_recovered_with_revision_and_license(root):
    snap = root / "hub" / "models--acme--tiny-llama" / "snapshots" / REV
    shutil.copytree(root / "model", snap)
    (snap / "README.md").write_text("---\nlicense: apache-2.0\ntags: [x]\n---\n# tiny\n")
    assert cli(root, "compress", str(snap), "--method", "magnitude", "--sparsity", "0.5", "--quiet",
               "--output", "from_snap") == 0
    base = sidecar(root / "from_snap")["base_model"]
    assert BASE_KEYS <= set(base) and base["hub_id"] == "acme/tiny-llama" and base["revision"] == REV
    assert base["license"] == "apache-2.0"
    card = render_card(root / "from_snap")
    meta = parse_front_matter(card)
    assert meta["base_model"] == "acme/tiny-llama" and meta["license"] == "apache-2.0"
    assert f"[acme/tiny-llama](https://huggingface.co/acme/tiny-llama) at revision `{REV}`" in card
    assert str(root) not in card


def test_base_model_flag_on_compress_card_and_push(root, capsys):
    assert cli(root, "compress", "model", "--method", "magnitude", "--sparsity", "0.5", "--quiet",
               "--base-model", "acme/llama-tiny", "--output", "named") == 0
    base = sidecar(root / "named")["base_model"]
    assert base["hub_id"] == "acme/llama-tiny" and base["local"] is True and base["id"] == "model"
    assert parse_front_matter(render_card(root / "named"))["base_model"] == "acme/llama-tiny"
    # a local base without --base-model: no Hub metadata; card / push name it with the flag
    assert "base_model" not in parse_front_matter(render_card(root / "owl"))
    capsys.readouterr()
    assert cli(root, "card", "owl", "--stdout", "--base-model", "acme/other") == 0
    assert parse_front_matter(capsys.readouterr().out)["base_model"] == "acme/other"
    assert cli(root, "push", "owl", "alice/owl", "--dry-run", "--base-model", "acme/other") == 0
    assert "base_model: acme/other" in capsys.readouterr().out
    # a bad id fails first, in one line, and writes nothing
    assert cli(root, "compress", "model", "--method", "magnitude", "--sparsity", "0.5", "--base-model", "a/b/c",
               "--output", "never") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--base-model" in err and not (root / "never").exists()


# ---- pack ----------------------------------------------------------------------------------------

def test_packed_outputs_carry_their_base_and_say_how_they_were_made(root):
    assert cli(root, "pack", "two4", "--output", "packed", "--quiet") == 0
    side = sidecar(root / "packed")
    assert side["base_model"] == sidecar(root / "two4")["base_model"]       # carried from the pruned model
    assert side["fingerprint"] == model_fingerprint(root / "packed") != sidecar(root / "two4")["fingerprint"]
    card = render_card(root / "packed")
    meta = parse_front_matter(card)
    assert {"pruned", "sparse", "2of4-sparse", "sparse24"} <= set(meta["tags"]) and "library_name" not in meta
    assert "written by `llmprune pack`" in card and "(wanda 2:4)" in card
    assert "wall time of `llmprune pack` (packing only; the pruning run is not included)" in card
    assert sidecar(root / "two4")["command"] in card and side["command"] in card   # both commands to reproduce

    # a plain model folder (no llmprune.json) is its own base, in base_model_entry's shape
    plain = root / "plain24"
    shutil.copytree(root / "two4", plain)
    (plain / "llmprune.json").unlink()
    assert cli(root, "pack", "plain24", "--output", "packed_plain", "--quiet") == 0
    base = sidecar(root / "packed_plain")["base_model"]
    assert BASE_KEYS <= set(base) and base["local"] is True and base["model_type"] == "llama"
    assert "`plain24` (a local model directory)" in render_card(root / "packed_plain")


# ---- delta -----------------------------------------------------------------------------------------

def test_delta_dare_card_says_what_was_copied(root):
    finetune(root / "model", root / "ft1", seed=1)
    assert cli(root, "delta", "model", "ft1", "--method", "dare", "--drop-rate", "0.5", "--quiet",
               "--output", "dare") == 0
    side = sidecar(root / "dare")
    assert BASE_KEYS <= set(side["base_model"]) and BASE_KEYS <= set(side["finetuned"][0])
    copied = side["delta"]["copied"]
    assert set(copied) == set(side["delta"]["excluded"]) and side["delta"]["merged_dense"] == []
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(copied)
    card = render_card(root / "dare")
    assert (f"Copied from the fine-tune without sparsification ({len(copied)} tensors): `embed_tokens` "
            "(input embedding), `lm_head` (output head), `input_layernorm`, `norm`, `post_attention_layernorm`") in card
    assert "Merged without dropping" not in card


def test_ties_merge_card_does_not_claim_merged_tensors_were_copied(root):
    finetune(root / "model", root / "ft2", seed=2)
    assert cli(root, "delta", "model", "ft1", "ft2", "--method", "ties", "--drop-rate", "0.5", "--quiet",
               "--output", "ties") == 0
    side = sidecar(root / "ties")
    merged = side["delta"]["merged_dense"]
    assert set(merged) == set(side["delta"]["excluded"]) and side["delta"]["copied"] == []
    # the embeddings were merged, not copied: they differ from both fine-tunes
    from safetensors.torch import load_file

    out = load_file(root / "ties" / "model.safetensors")["model.embed_tokens.weight"]
    for ft in ("ft1", "ft2"):
        assert not torch.equal(out, load_file(root / ft / "model.safetensors")["model.embed_tokens.weight"])
    card = render_card(root / "ties")
    assert "Copied from the fine-tune" not in card and "copied" not in card.split("## Delta")[1].split("##")[0]
    assert f"Merged without dropping any delta entry ({len(merged)} tensors; the same weights, `ties` consensus" in card
    assert parse_front_matter(card).get("base_model_relation") is None     # local models: no Hub ids to relate


# ---- eval results tied to the weights ---------------------------------------------------------------

def _eval(root: Path, name: str, *extra: str) -> int:
    return cli(root, "eval", name, "--ppl-data", "calib.txt", "--seqlen", "32", "--batch-size", "4", "--quiet",
               "--output", f"{name}/eval", *extra)


def test_card_publishes_eval_results_of_its_own_weights_only(root, capsys):
    assert _eval(root, "owl") == 0
    results = json.loads((root / "owl" / "eval" / "results.json").read_text())
    assert results["model"]["fingerprint"] == model_fingerprint(root / "owl")
    card = render_card(root / "owl")
    assert "it matches this model's" in card and "(unverified)" not in card
    (row,) = table_rows(card, "calib")
    windows = results["perplexity_details"]["calib"]["windows"]
    assert row[1:3] == ["calib.txt (a local file)", f"32 tokens × {windows}"]       # the text and the window

    # results of another model copied next to these weights: refused, in one line, by card and push
    shutil.copytree(root / "owl" / "eval", root / "multi" / "eval")
    with pytest.raises(UserError, match="measured on other weights"):
        render_card(root / "multi")
    capsys.readouterr()
    for argv in (["card", "multi"], ["push", "multi", "alice/multi", "--dry-run"]):
        assert cli(root, *argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "re-run `llmprune eval multi" in err
    assert not (root / "multi" / "README.md").exists()

    # results from before fingerprints: published, labelled unverified, with a warning
    del results["model"]["fingerprint"]
    (root / "multi" / "eval" / "results.json").write_text(json.dumps(results))
    assert cli(root, "card", "multi") == 0
    assert "unverified" in capsys.readouterr().err
    assert "## Evaluation (unverified)" in (root / "multi" / "README.md").read_text()
    shutil.rmtree(root / "multi" / "eval")
    (root / "multi" / "README.md").unlink()


# ---- report: comparable runs only, labelled by recipe -------------------------------------------

def test_report_refuses_other_settings_and_flags_other_text(root, capsys):
    assert _eval(root, "model") == 0                       # dense, window 32
    assert cli(root, "eval", "two4", "--ppl-data", "calib.txt", "--seqlen", "16", "--batch-size", "4", "--quiet",
               "--output", "two4/eval16") == 0
    capsys.readouterr()
    assert cli(root, "report", "model/eval", "two4/eval16", "--output", "rep_bad", "--no-plots") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "seqlen 16 vs 32" in err and not (root / "rep_bad").exists()
    # --baseline refuses before evaluating
    assert cli(root, "eval", "two4", "--ppl-data", "calib.txt", "--seqlen", "16", "--quiet", "--baseline",
               "model/eval", "--output", "two4/evalb") == 2
    assert "seqlen 16 vs 32" in capsys.readouterr().err and not (root / "two4" / "evalb").exists()

    # the same window on another text of the same name: the run is compared, that row is not
    (root / "other").mkdir()
    (root / "other" / "calib.txt").write_text((root / "calib.txt").read_text()[30_000:])
    assert cli(root, "eval", "two4", "--ppl-data", "other/calib.txt", "--seqlen", "32", "--batch-size", "4",
               "--quiet", "--output", "two4/eval_other") == 0
    assert cli(root, "report", "model/eval", "two4/eval_other", "owl/eval", "--output", "rep", "--no-plots",
               "--bootstrap", "50") == 0
    data = json.loads((root / "rep" / "report.json").read_text())
    by_run = {(r["label"], r["task"]): r for r in data["rows"]}
    other = by_run[("wanda 2:4", "ppl_calib")]
    assert other["retention"] is None and other["ci_lo"] is None and "perplexity text" in other["incomparable"]
    owl = by_run[("wanda 0.6 owl", "ppl_calib")]
    assert owl["incomparable"] is None and owl["retention"] is not None and owl["ci_lo"] is not None
    md = (root / "rep" / "report.md").read_text()
    assert "## Not compared" in md and "| wanda 2:4 | ppl_calib | perplexity text" in md
    assert "| wanda 0.6 owl |" in md                        # runs are labelled by their recipe
