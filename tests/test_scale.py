"""Models bigger than memory, resume after a crash, several processes (issue #14).

`llmprune compress` streams decoder layers from the input's safetensors and writes finished layers
straight into the output shards; these tests check that this gives exactly the tensors the in-memory
path gives (every stage kind, several stages, activations spilled to disk), that a run killed after
any layer resumes to the same bytes, that a resume with other settings is refused in one line, and
that two processes under torchrun (gloo) write the single-process checkpoint bit for bit.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmprune.cli import main
from tiny_models import sample_text, tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parent.parent

CALIB = "calibration:\n  data: {data}\n  samples: 4\n  seqlen: 16\n  batch_size: 1\n"
RECIPES = {
    "magnitude": "stages:\n  - method: magnitude\n    sparsity: 0.5\n",
    "wanda": "stages:\n  - method: wanda\n    sparsity: 0.5\n",
    "sparsegpt-2:4": "stages:\n  - method: sparsegpt\n    sparsity: '2:4'\n",
    "width": "stages:\n  - method: width\n    mlp_keep: 0.5\n",
    "layer-drop": "stages:\n  - method: layer-drop\n    num_layers: 1\n",
    # three stages: the first two write their layers to the work folder, the last to the output
    "drop-width-sparsegpt": ("stages:\n  - method: layer-drop\n    num_layers: 1\n  - method: width\n    mlp_keep: 0.5\n"
                             "  - method: sparsegpt\n    sparsity: 0.5\n"),
}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    tiny_model("llama", num_hidden_layers=4).save_pretrained(root / "model")   # 4 layers: kills land mid-stage
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "calib.txt").write_text(sample_text()[:40_000])
    for name, body in RECIPES.items():
        (root / f"{name}.yaml").write_text(CALIB.format(data=root / "calib.txt") + body)
    return root


def compress(ws: Path, recipe: str, out: Path, *extra: str) -> int:
    return main(["compress", str(ws / "model"), "--recipe", str(ws / f"{recipe}.yaml"), "--quiet",
                 "--output", str(out), *extra])


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(directory.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def assert_same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name   # -0.0 vs 0.0 counts


def shard_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if "safetensors" in p.name}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_streamed_run_writes_the_in_memory_tensors(ws, tmp_path, recipe, monkeypatch):
    assert compress(ws, recipe, tmp_path / "mem", "--in-memory") == 0
    if recipe == "drop-width-sparsegpt":          # activations on disk, a layer at a time
        monkeypatch.setenv("LLMPRUNE_SPILL", "always")
    assert compress(ws, recipe, tmp_path / "stream") == 0
    streamed = tensors(tmp_path / "stream")
    assert_same_bits(tensors(tmp_path / "mem"), streamed)
    assert not (tmp_path / ".stream.partial").exists()          # a finished run leaves no work folder
    config = json.loads((tmp_path / "stream" / "config.json").read_text())
    assert len({k.split(".")[2] for k in streamed if k.startswith("model.layers.")}) == config["num_hidden_layers"]
    w = streamed[f"model.layers.{config['num_hidden_layers'] - 1}.mlp.down_proj.weight"]   # pruned for real
    if recipe == "magnitude":                                   # exactly half of each matrix
        assert int((w == 0).sum()) == w.numel() // 2
    if recipe == "wanda":                                       # exactly half of each output row
        assert ((w == 0).sum(dim=1) == w.shape[1] // 2).all()


def test_max_memory_shards_and_limits(ws, tmp_path):
    # small shards: layers go into numbered shards plus an index, as save_pretrained would split them
    assert compress(ws, "wanda", tmp_path / "mem", "--in-memory", "--max-shard-size", "100KB") == 0
    assert compress(ws, "wanda", tmp_path / "stream", "--max-memory", "4GiB", "--max-shard-size", "100KB") == 0
    streamed_files = sorted(p.name for p in (tmp_path / "stream").glob("model*"))
    assert "model.safetensors.index.json" in streamed_files and len(streamed_files) > 3
    index = json.loads((tmp_path / "stream" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors(tmp_path / "stream"))
    assert_same_bits(tensors(tmp_path / "mem"), tensors(tmp_path / "stream"))


@pytest.mark.parametrize("argv,message", [
    (["--max-memory", "1MiB"], "--max-memory 1.0 MiB is too small for this model"),
    (["--max-memory", "lots"], "--max-memory"),
    (["--in-memory", "--resume"], "--in-memory cannot be combined with --resume"),
    (["--max-memory", "4GiB", "--save-format", "sparse24"], "--max-memory needs the run to stream"),
])
def test_bad_streaming_flags_are_one_line(ws, tmp_path, capsys, argv, message):
    recipe = "sparsegpt-2:4" if "sparse24" in argv else "magnitude"
    assert compress(ws, recipe, tmp_path / "out", *argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []      # no output, no empty .out.partial either


def _killed_run(ws: Path, recipe: str, out: Path, stop: str, env: dict | None = None) -> None:
    """Run compress in a subprocess that SIGKILLs itself right after stage:layer is journalled."""
    proc = subprocess.run([sys.executable, "-m", "llmprune", "compress", str(ws / "model"), "--recipe",
                           str(ws / f"{recipe}.yaml"), "--quiet", "--output", str(out)], cwd=REPO,
                          env={**os.environ, **(env or {}), "LLMPRUNE_TEST_STOP_AFTER": stop},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("stop,spill", [("1:1", "never"), ("2:0", "always")])
def test_kill_9_then_resume_is_bit_identical(ws, tmp_path, capsys, monkeypatch, stop, spill):
    recipe = "drop-width-sparsegpt"
    monkeypatch.setenv("LLMPRUNE_SPILL", spill)
    assert compress(ws, recipe, tmp_path / "whole") == 0
    out = tmp_path / "out"
    _killed_run(ws, recipe, out, stop, {"LLMPRUNE_SPILL": spill})
    work = tmp_path / ".out.partial"
    journal = json.loads((work / "journal.json").read_text())
    stage, layer = map(int, stop.split(":"))
    assert journal["current"]["index"] == stage and journal["current"]["done"] == layer + 1
    capsys.readouterr()

    # without --resume: refused, naming the folder and the progress
    assert compress(ws, recipe, out) == 2
    err = capsys.readouterr().err.strip()
    assert "add --resume" in err and str(work) in err and f"{layer + 1} of" in err and "\n" not in err
    # another recipe: refused in one line, the folder kept
    assert compress(ws, "wanda", out, "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert "cannot resume" in err and "recipe" in err and "\n" not in err
    assert (work / "journal.json").is_file()

    assert compress(ws, recipe, out, "--resume") == 0
    err = capsys.readouterr().err
    assert f"resuming {out} from {work} (stage {stage} " in err and f"{layer + 1} of" in err
    assert shard_bytes(out) == shard_bytes(tmp_path / "whole")
    assert not work.exists()


def test_ctrl_c_keeps_the_journal_and_resumes(ws, tmp_path, capsys, monkeypatch):
    assert compress(ws, "wanda", tmp_path / "whole") == 0
    out = tmp_path / "out"
    monkeypatch.setenv("LLMPRUNE_TEST_STOP_AFTER", "0:2:interrupt")
    assert compress(ws, "wanda", out) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" in err and not out.exists()
    monkeypatch.delenv("LLMPRUNE_TEST_STOP_AFTER")
    assert compress(ws, "wanda", out, "--resume") == 0            # the same process: the lock was let go
    assert "3 of 4 layers done" in capsys.readouterr().err
    assert shard_bytes(out) == shard_bytes(tmp_path / "whole")


def test_torchrun_two_processes_write_the_single_process_checkpoint(ws, tmp_path):
    recipe = "drop-width-sparsegpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}     # the same per-process threads: matmuls round the same
    single = subprocess.run([sys.executable, "-m", "llmprune", "compress", str(ws / "model"), "--recipe",
                             str(ws / f"{recipe}.yaml"), "--quiet", "--output", str(tmp_path / "one")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                          "2", "-m", "llmprune", "compress", str(ws / "model"), "--recipe",
                          str(ws / f"{recipe}.yaml"), "--quiet", "--output", str(tmp_path / "two")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert shard_bytes(tmp_path / "two") == shard_bytes(tmp_path / "one")
    assert two.stdout.count("wrote ") == 1                       # rank 0 writes and reports
    assert not (tmp_path / ".two.partial").exists()


def test_bf16_checkpoint_streams_to_the_in_memory_bits_and_stays_bf16(ws, tmp_path):
    """A bf16 checkpoint is read and written a layer at a time (never upcast as a whole model) and gives
    the bytes of the in-memory run, still in bf16."""
    model_dir = tmp_path / "bf16"
    tiny_model("llama", num_hidden_layers=3).to(torch.bfloat16).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    args = ["--recipe", str(ws / "wanda.yaml"), "--quiet"]
    assert main(["compress", str(model_dir), *args, "--output", str(tmp_path / "mem"), "--in-memory"]) == 0
    assert main(["compress", str(model_dir), *args, "--output", str(tmp_path / "stream")]) == 0
    streamed = tensors(tmp_path / "stream")
    assert_same_bits(tensors(tmp_path / "mem"), streamed)
    assert {t.dtype for t in streamed.values()} == {torch.bfloat16}
    w = streamed["model.layers.2.mlp.down_proj.weight"]
    assert ((w == 0).sum(dim=1) == w.shape[1] // 2).all()
