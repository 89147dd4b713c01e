"""`llmprune compress` end to end: output layout, sidecar, reload, determinism, bad inputs."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmprune.cli import main
from cli_helpers import cli_workspace
from tiny_models import ARCH_CONFIGS, sample_text

CALIB = ["--calib-samples", "6", "--calib-seqlen", "32", "--quiet"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    cli_workspace(root, "llama")
    (root / "short.txt").write_text("too short")
    (root / "calib.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in sample_text()[:60_000].split("\n\n")))
    return root


def digest(directory: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def compress(workspace, out, *extra):
    return main(["compress", str(workspace / "model"), "--calib-data", str(workspace / "calib.txt"),
                 *CALIB, "--output", str(out), *extra])


def test_output_layout_sidecar_and_reload(workspace, tmp_path):
    before = digest(workspace / "model")
    out = tmp_path / "wanda"
    assert compress(workspace, out, "--method", "wanda", "--sparsity", "0.5") == 0
    assert digest(workspace / "model") == before                         # input never modified
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "llmprune.json", "recipe.yaml", "tokenizer.json"} <= names
    assert not list(tmp_path.glob(".wanda.tmp-*"))                         # temp dir renamed away
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    sidecar = json.loads((out / "llmprune.json").read_text())
    assert sidecar["kind"] == "compress" and sidecar["sparsity"]["target"] == 0.5
    assert sidecar["calibration"]["samples"] == 6 and sidecar["calibration"]["seqlen"] == 32
    assert sidecar["sparsity"]["achieved"] == pytest.approx(0.5)
    assert all(m["achieved"] == pytest.approx(0.5) for m in sidecar["sparsity"]["modules"].values())
    assert "lm_head" not in sidecar["sparsity"]["modules"]
    for key in ("versions", "wall_time_s", "peak_memory", "command", "base_model", "recipe"):
        assert key in sidecar
    with safe_open(str(out / "model.safetensors"), "pt") as f:           # exact zeros, no -0.0
        for key in f.keys():
            t = f.get_tensor(key)
            assert not torch.signbit(t[t == 0]).any(), key
    # saved -> reloaded logits are identical to the in-memory pruned model's
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("def main(argv):\n    return 0", return_tensors="pt").input_ids
    generated = reloaded.generate(ids, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 8


@pytest.mark.parametrize("arch", list(ARCH_CONFIGS))
def test_save_reload_identical_logits_every_family(arch, tmp_path):
    import llmprune
    from llmprune.io.save import save_model
    from tiny_models import tiny_model, tiny_tokenizer

    model = tiny_model(arch)
    ids = torch.randint(0, 300, (4, 24), generator=torch.Generator().manual_seed(0))
    model, _ = llmprune.compress(model, None, "wanda-2of4", calib=ids, device="cpu", progress=False)
    save_model(model, tiny_tokenizer(), tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    out = reloaded.generate(ids[:1, :5], max_new_tokens=5, do_sample=False, use_cache=True)
    assert out.shape == (1, 10)


def test_same_seed_gives_identical_files(workspace, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert compress(workspace, out, "--method", "sparsegpt", "--sparsity", "2:4", "--seed", "3") == 0
    da, db = digest(a), digest(b)
    assert da.pop("llmprune.json") and db.pop("llmprune.json")             # timings differ by design
    assert da == db
    sa, sb = (json.loads((d / "llmprune.json").read_text()) for d in (a, b))
    assert sa["sparsity"] == sb["sparsity"] and sa["calibration"] == sb["calibration"]


def test_named_recipe_and_jsonl_and_owl(workspace, tmp_path):
    out = tmp_path / "owl"
    assert main(["compress", str(workspace / "model"), "--recipe", "owl-wanda-70", "--calib-data",
                 str(workspace / "calib.jsonl"), *CALIB, "--output", str(out)]) == 0
    sidecar = json.loads((out / "llmprune.json").read_text())
    assert sidecar["recipe"]["name"] == "owl-wanda-70"
    layers = sidecar["sparsity"]["layers"]
    assert sum(layers.values()) / len(layers) == pytest.approx(0.7, abs=1e-5)
    assert (out / "recipe.yaml").read_text().startswith("name: owl-wanda-70")


def test_overwrite_replaces_existing(workspace, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert compress(workspace, out, "--method", "magnitude", "--sparsity", "0.5") == 2   # refused
    assert (out / "keep.txt").read_text() == "x"
    assert compress(workspace, out, "--method", "magnitude", "--sparsity", "0.5", "--overwrite") == 0
    assert not (out / "keep.txt").exists() and (out / "llmprune.json").exists()


BAD_INPUTS = {
    "missing model": (["compress", "{ws}/nope", "--method", "wanda", "--sparsity", "0.5"], "does not exist"),
    "model dir without config": (["compress", "{ws}", "--method", "wanda", "--sparsity", "0.5"], "config.json"),
    "sparsity zero": (["compress", "{model}", "--method", "wanda", "--sparsity", "0"], "between 0 and 1"),
    "sparsity one": (["compress", "{model}", "--method", "wanda", "--sparsity", "1"], "between 0 and 1"),
    "sparsity 3:2": (["compress", "{model}", "--method", "wanda", "--sparsity", "3:2"], "N:M"),
    "sparsity text": (["compress", "{model}", "--method", "wanda", "--sparsity", "half"], "neither"),
    "unknown method": (["compress", "{model}", "--method", "obs", "--sparsity", "0.5"], "unknown method"),
    "no method": (["compress", "{model}", "--sparsity", "0.5"], "--method"),
    "calib missing": (["compress", "{model}", "--method", "wanda", "--sparsity", "0.5", "--calib-data", "{ws}/x.txt"],
                      "does not exist"),
    "calib wrong type": (["compress", "{model}", "--method", "wanda", "--sparsity", "0.5", "--calib-data",
                          "{model}/config.json"], ".txt"),
    "calib too short": (["compress", "{model}", "--method", "wanda", "--sparsity", "0.5", "--calib-data",
                         "{ws}/short.txt"], "tokens"),
    "bad samples": (["compress", "{model}", "--method", "wanda", "--sparsity", "0.5", "--calib-samples", "0"],
                    "positive"),
    "unknown recipe": (["compress", "{model}", "--recipe", "wanda-99"], "named recipe"),
    "recipe and method": (["compress", "{model}", "--recipe", "wanda-50", "--method", "wanda"], "either"),
    "malformed recipe": (["compress", "{model}", "--recipe", "{ws}/bad.yaml"], "unknown key 'sparsty'"),
    "recipe not yaml": (["compress", "{model}", "--recipe", "{ws}/broken.yaml"], "not valid YAML"),
    "bad regex": (["compress", "{model}", "--method", "wanda", "--sparsity", "0.5", "--targets", "("],
                  "regular expression"),
    "no target matches": (["compress", "{model}", "--method", "magnitude", "--sparsity", "0.5", "--targets", "zzz"],
                          "no linear"),
    "owl with N:M": (["compress", "{model}", "--method", "wanda", "--sparsity", "2:4", "--allocation", "owl"],
                     "unstructured"),
    "global with wanda": (["compress", "{model}", "--method", "wanda", "--sparsity", "0.5", "--allocation", "global"],
                          "magnitude"),
    "N:M not dividing": (["compress", "{model}", "--method", "magnitude", "--sparsity", "3:7"], "multiple of 7"),
    "bad dtype": (["compress", "{model}", "--method", "wanda", "--sparsity", "0.5", "--dtype", "int8"], "--dtype"),
    "cuda missing": (["compress", "{model}", "--method", "wanda", "--sparsity", "0.5", "--device", "cuda"], "CUDA"),
    "sparse24 needs 2:4": (["compress", "{model}", "--method", "wanda", "--sparsity", "0.5", "--save-format",
                            "sparse24"], "2:4"),
    "embeddings with wanda": (["compress", "{model}", "--method", "wanda", "--sparsity", "0.5", "--targets",
                               "embed_tokens"], "magnitude"),
    "unsupported arch": (["compress", "{ws}/bert", "--method", "wanda", "--sparsity", "0.5"], "not supported"),
    "true-sequential without data": (["compress", "{model}", "--method", "magnitude", "--sparsity", "0.5",
                                      "--true-sequential"], "no calibration data"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_clear_line(case, workspace, tmp_path, capsys):
    (workspace / "bad.yaml").write_text("stages:\n  - method: wanda\n    sparsty: 0.5\n    sparsity: 0.5\n")
    (workspace / "broken.yaml").write_text("stages: [\n  - method: wanda\n")
    if not (workspace / "bert").exists():
        from transformers import BertConfig
        BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=64).save_pretrained(workspace / "bert")
    argv, expected = BAD_INPUTS[case]
    argv = [a.format(ws=workspace, model=workspace / "model") for a in argv]
    existing = tmp_path / "existing"
    out = tmp_path / "out"
    code = main(argv + ["--calib-samples", "4", "--calib-seqlen", "16", "--quiet", "--output", str(out)]
                if "--calib-samples" not in argv else argv + ["--quiet", "--output", str(out)])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and expected in err, err
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_existing_output_untouched_and_subprocess_has_no_traceback(workspace, tmp_path):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "mine.txt").write_text("precious")
    proc = subprocess.run([sys.executable, "-m", "llmprune", "compress", str(workspace / "model"), "--method",
                           "wanda", "--sparsity", "0.5", "--output", str(out)], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"llmprune: error: output directory {out.resolve()} already exists; "
                                                "pass --overwrite to replace it"]
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "precious"


def test_embedded_model_to_packed_sparse24(tmp_path):
    """The README quick-start model, pruned 2:4 and saved packed, reloads onto the kernels."""
    import llmprune
    from llmprune.io.load import EMBEDDED_MODELS

    out = tmp_path / "packed"
    assert main(["compress", "llmprune-tiny", "--method", "wanda", "--sparsity", "2:4", "--calib-data", "stdlib",
                 *CALIB, "--save-format", "sparse24", "--output", str(out)]) == 0
    sidecar = json.loads((out / "llmprune.json").read_text())
    assert sidecar["pack"]["bytes_packed"] < 0.6 * sidecar["pack"]["bytes_dense"]
    model = llmprune.load_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("import os\n", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4
    assert (EMBEDDED_MODELS["llmprune-tiny"] / "model.safetensors").is_file()


def test_missing_parent_directories_are_created_and_removed_on_failure(workspace, tmp_path):
    out = tmp_path / "a" / "b" / "out"
    assert compress(workspace, out, "--method", "magnitude", "--sparsity", "0.5") == 0
    assert (out / "llmprune.json").is_file()
    bad = tmp_path / "c" / "d" / "out"
    assert compress(workspace, bad, "--method", "magnitude", "--sparsity", "0.5", "--targets", "zzz") == 2
    assert not (tmp_path / "c").exists()


def test_output_dir_failure_leaves_nothing(tmp_path):
    from llmprune.io.save import output_dir

    with pytest.raises(RuntimeError):
        with output_dir(tmp_path / "x" / "y" / "out") as tmp:
            (tmp / "half-written.safetensors").write_bytes(b"0" * 10)
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_recipe_as_run_records_the_resolved_schedule(workspace, tmp_path):
    import yaml

    for flags, expected in ((["--method", "sparsegpt", "--sparsity", "2:4"], True),
                            (["--method", "sparsegpt", "--sparsity", "2:4", "--no-true-sequential"], False),
                            (["--method", "wanda", "--sparsity", "0.5"], False),
                            (["--method", "wanda", "--sparsity", "0.5", "--true-sequential"], True)):
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        assert compress(workspace, out, *flags) == 0
        stage = yaml.safe_load((out / "recipe.yaml").read_text())["stages"][0]
        assert stage["true_sequential"] is expected, flags
