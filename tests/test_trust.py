"""Never lose a user's data; one clear line for every bad input (issue #15).

Every command that writes refuses an output that is, contains or lies inside an input; SIGTERM and
kill -9 leave nothing (or a leftover the next run removes); damaged files, a full disk, a refused
pickle, a missing package and a missing network are each one line naming the file and the fix.
"""
import errno
import gzip
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from llmprune.cli import main
from llmprune.errors import UserError
from tiny_models import sample_text, save_tiny

CALIB = ["--calib-samples", "4", "--calib-seqlen", "16", "--quiet"]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    save_tiny(root / "model", "llama")
    (root / "calib.txt").write_text(sample_text()[:40_000])
    (root / "recipe.yaml").write_text("stages:\n  - method: magnitude\n    sparsity: 0.5\n")
    _write_results(root / "results")
    return root


def _write_results(path: Path) -> None:
    """A minimal results directory as `llmprune eval` writes it (enough for report/--baseline)."""
    path.mkdir(parents=True)
    res = {"format_version": 1, "model": {"name": "m"}, "perplexity": {"x": 10.0},
           "sparsity": {"achieved": 0.0, "target": 0.0, "method": "dense", "pattern": "dense"},
           "tasks": {"a": {"suite": "s", "kind": "lm_eval", "metric": "acc,none", "value": 0.5, "stderr": None,
                           "n": 4, "chance": 0.25, "higher_is_better": True, "num_fewshot": 0}}, "suites": {}}
    (path / "results.json").write_text(json.dumps(res))
    with gzip.open(path / "items.json.gz", "wt") as fh:
        json.dump({}, fh)


def tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("llmprune: error: ") and "Traceback" not in err, err
    return err


def run_cli(args, env_extra=None, drop=("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"), cwd=None, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "llmprune", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


# ------------------------------------------------------------------------------------------------
# 1. --overwrite never deletes an input

def _overlap_cases(ws: Path) -> dict:
    m, r = ws / "model", ws / "results"
    prune = ["--method", "magnitude", "--sparsity", "0.5"]
    return {
        "compress: output is MODEL": (["compress", m, *prune, "--output", m], m, "is the input"),
        "compress: output contains MODEL": (["compress", m, *prune, "--output", ws], m, "contains the input"),
        "compress: output inside MODEL": (["compress", m, *prune, "--output", m / "pruned"], m, "lies inside"),
        "compress: output is --calib-data": (["compress", m, "--method", "wanda", "--sparsity", "0.5", "--calib-data",
                                              ws / "calib.txt", "--output", ws / "calib.txt"], ws / "calib.txt", "is the input"),
        "compress: output is --recipe": (["compress", m, "--recipe", ws / "recipe.yaml", "--output",
                                          ws / "recipe.yaml"], ws / "recipe.yaml", "is the input"),
        "eval: output is MODEL": (["eval", m, "--suite", "probes", "--output", m], m, "is the input"),
        "eval: output contains MODEL": (["eval", m, "--suite", "probes", "--output", ws], m, "contains the input"),
        "eval: output is --baseline": (["eval", m, "--suite", "probes", "--baseline", r, "--output", r], r,
                                       "is the input"),
        "eval: output is --data-dir": (["eval", m, "--tasks", "x", "--data-dir", r, "--output", r], r,
                                       "is the input"),
        "report: output is RESULTS": (["report", r, "--output", r], r, "is the input"),
        "report: output contains RESULTS": (["report", r, "--output", ws], r, "contains the input"),
        "sweep: output is MODEL": (["sweep", m, "--method", "magnitude", "--sparsities", "0,0.5", "--suite",
                                    "probes", "--output", m], m, "is the input"),
        "pack: output contains DIR": (["pack", m, "--output", ws], m, "contains the input"),
        "pack: output is DIR": (["pack", m, "--output", m], m, "is the input"),
        "delta: output is a fine-tune": (["delta", m, r, "--output", r], r, "is the input"),
        "delta apply: output is BASE": (["delta", "apply", m, r, "--output", m], m, "is the input"),
        "delta apply: output is DELTA_DIR": (["delta", "apply", m, r, "--output", r], r, "is the input"),
    }


@pytest.mark.parametrize("case", list(_overlap_cases(Path("x"))))
def test_output_overlapping_an_input_is_refused_even_with_overwrite(case, ws, capsys):
    argv, protected, needle = _overlap_cases(ws)[case]
    before = tree_digest(ws)
    code = main([str(a) for a in argv] + ["--overwrite", "--quiet"])
    err = one_error_line(capsys)
    assert code == 2 and needle in err
    output = str(argv[argv.index("--output") + 1])
    assert f"--output {output}" in err and str(protected) in err          # names both paths
    assert tree_digest(ws) == before and not (ws / "model" / "pruned").exists()


def test_output_through_a_symlink_or_dot_is_the_same_folder(ws, tmp_path, capsys, monkeypatch):
    link = tmp_path / "alias"
    link.symlink_to(ws / "model")
    before = tree_digest(ws / "model")
    assert main(["compress", str(ws / "model"), "--method", "magnitude", "--sparsity", "0.5", "--output", str(link),
                 "--overwrite", "--quiet"]) == 2
    assert "is the input" in one_error_line(capsys)
    monkeypatch.chdir(ws)                                   # `cd D; llmprune compress ./model --output .`
    assert main(["compress", "./model", "--method", "magnitude", "--sparsity", "0.5", "--output", ".",
                 "--overwrite", "--quiet"]) == 2
    assert "contains the input ./model" in one_error_line(capsys)
    assert tree_digest(ws / "model") == before


def test_eval_results_inside_the_model_folder_are_allowed(ws, tmp_path, capsys):
    """`eval MODEL --output MODEL/eval` is the documented place for a card's results."""
    model = tmp_path / "m"
    save_tiny(model, "llama")
    before = tree_digest(model)
    assert main(["eval", str(model), "--suite", "probes", "--limit", "1", "--ppl-data", "none", "--output",
                 str(model / "eval"), "--quiet"]) == 0
    assert (model / "eval" / "results.json").is_file()
    assert {k: v for k, v in tree_digest(model).items() if not k.startswith("eval/")} == before


def test_output_that_is_a_file_says_so(ws, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    for extra in ([], ["--overwrite"]):
        assert main(["compress", str(ws / "model"), "--method", "magnitude", "--sparsity", "0.5", "--output",
                     str(target), "--quiet", *extra]) == 2
        err = one_error_line(capsys)
        assert "is an existing file, not a directory" in err and "--overwrite" not in err
    assert target.read_text() == "mine"


# ------------------------------------------------------------------------------------------------
# 6 / 7. SIGTERM, kill -9 leftovers, the umask

SLOW_SAVE = textwrap.dedent("""
    import sys, time
    import llmprune.io.save as save
    original = save.save_model
    def slow(*args, **kwargs):              # the checkpoint is complete in the temp folder, then we wait
        original(*args, **kwargs)
        print("SAVED", flush=True)
        time.sleep(120)
    save.save_model = slow
    from llmprune.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _start_slow_compress(ws: Path, out: Path, tmp_path: Path) -> subprocess.Popen:
    script = tmp_path / "slow.py"
    script.write_text(SLOW_SAVE)
    # --in-memory: the whole model is saved at the end through save_model, which SLOW_SAVE holds up
    # (a streamed run, the default, is covered by tests/test_scale.py)
    proc = subprocess.Popen([sys.executable, str(script), "compress", str(ws / "model"), "--method", "magnitude",
                             "--sparsity", "0.5", "--quiet", "--in-memory", "--output", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "SAVED"       # blocks until the temp folder holds the model
    return proc


def test_sigterm_is_handled_like_ctrl_c(ws, tmp_path):
    out = tmp_path / "out"
    proc = _start_slow_compress(ws, out, tmp_path)
    (leftover,) = tmp_path.glob(".out.tmp-*")
    assert leftover.name.startswith(f".out.tmp-{proc.pid}-") and (leftover / "model.safetensors").is_file()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert err.strip().splitlines()[-1] == "llmprune: terminated (SIGTERM); nothing was written"
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_leftovers_of_a_killed_run_are_removed_by_the_next_run_but_never_a_live_one(ws, tmp_path, capsys):
    out = tmp_path / "out"
    live = _start_slow_compress(ws, out, tmp_path)          # a run still writing the same output
    try:
        (live_tmp,) = tmp_path.glob(".out.tmp-*")
        killed = _start_slow_compress(ws, out, tmp_path)
        killed.kill()                                        # kill -9: no handler runs
        killed.wait(timeout=60)
        dead_tmp = next(p for p in tmp_path.glob(".out.tmp-*") if p != live_tmp)
        assert (dead_tmp / "model.safetensors").is_file()
        assert main(["compress", str(ws / "model"), "--method", "magnitude", "--sparsity", "0.5", "--quiet",
                     "--output", str(out)]) == 0
        notes = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("llmprune: note: removed")]
        assert len(notes) == 1 and dead_tmp.name in notes[0] and "KiB" in notes[0]
        assert not dead_tmp.exists() and live_tmp.is_dir()  # the live run's folder is left alone
        assert (out / "model.safetensors").is_file()
    finally:
        live.kill()
        live.wait(timeout=60)


def test_killed_while_replacing_puts_the_old_output_back(ws, tmp_path, capsys):
    out = tmp_path / "out"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    old = tmp_path / f".out.old-{dead_pid}"            # moved aside, the new one never moved in: kill -9 there
    old.mkdir()
    (old / "config.json").write_text("{}")
    assert main(["compress", str(ws / "model"), "--method", "magnitude", "--sparsity", "0.5", "--quiet",
                 "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"restored {out}" in err and "already exists; pass --overwrite" in err
    assert (out / "config.json").read_text() == "{}" and not old.exists()


def test_output_folders_follow_the_umask(ws, tmp_path):
    previous = os.umask(0o002)
    try:
        assert main(["compress", str(ws / "model"), "--method", "magnitude", "--sparsity", "0.5", "--quiet",
                     "--output", str(tmp_path / "out")]) == 0
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o775
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert modes["model.safetensors"] == 0o664 and set(modes.values()) == {0o664}, modes


# ------------------------------------------------------------------------------------------------
# 8. damaged files, a full disk, a refused pickle, a missing package: one line naming the file

@pytest.fixture(scope="module")
def broken(ws, tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    import shutil

    for name in ("truncated", "shape", "pickle", "notok", "toksmall"):
        shutil.copytree(ws / "model", root / name)
    f = root / "truncated" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    config = json.loads((root / "shape" / "config.json").read_text())
    config["intermediate_size"] *= 2
    (root / "shape" / "config.json").write_text(json.dumps(config))
    (root / "pickle" / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, root / "pickle" / "pytorch_model.bin")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (root / "notok" / name).unlink()
    (root / "toksmall" / "tokenizer.json").unlink()            # tokenizer_config.json alone cannot build one
    return root


@pytest.mark.parametrize("command", ["compress", "eval", "pack", "delta"])
def test_truncated_safetensors_is_named(command, broken, ws, tmp_path, capsys):
    bad = broken / "truncated"
    argv = {"compress": ["compress", bad, "--method", "magnitude", "--sparsity", "0.5"],
            "eval": ["eval", bad, "--suite", "probes", "--ppl-data", "none"],
            "pack": ["pack", bad],
            "delta": ["delta", ws / "model", bad]}[command]
    assert main([str(a) for a in argv] + ["--quiet", "--output", str(tmp_path / "o")]) == 2
    err = one_error_line(capsys)
    assert f"{bad / 'model.safetensors'} is truncated or corrupt" in err and "copy or download it again" in err
    assert not (tmp_path / "o").exists()


def test_tensor_shape_that_does_not_match_the_config_is_named(broken, tmp_path, capsys):
    assert main(["compress", str(broken / "shape"), "--method", "magnitude", "--sparsity", "0.5", "--quiet",
                 "--output", str(tmp_path / "o")]) == 2
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1 and "LOAD REPORT" not in out + err
    assert "mlp." in err and "config.json implies" in err and "different models" in err


def test_pickle_the_safe_loader_refuses_is_named(broken, tmp_path, capsys):
    assert main(["compress", str(broken / "pickle"), "--method", "magnitude", "--sparsity", "0.5", "--quiet",
                 "--output", str(tmp_path / "o")]) == 2
    err = one_error_line(capsys)
    assert str(broken / "pickle" / "pytorch_model.bin") in err and "safe loader refuses" in err and "safetensors" in err


def test_disk_full_while_saving_says_how_much_and_where(ws, tmp_path, capsys, monkeypatch):
    import llmprune.io.save as save

    def fills_the_disk(model, tokenizer, directory, **kwargs):
        (Path(directory) / "model.safetensors").write_bytes(b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(directory) / "model.safetensors"))

    monkeypatch.setattr(save, "save_model", fills_the_disk)
    out = tmp_path / "out"
    assert main(["compress", str(ws / "model"), "--method", "magnitude", "--sparsity", "0.5", "--quiet",
                 "--in-memory", "--output", str(out)]) == 2
    err = one_error_line(capsys)
    assert f"disk full while writing {out}" in err and "free on that disk" in err and "needs about" in err
    assert "KiB" in err or "MiB" in err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))         # the partial output is gone


def test_disk_full_reported_by_a_library_is_recognised():
    from llmprune.io.errors import explain, is_disk_full

    rust = RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                        'message: "No space left on device" })')
    assert is_disk_full(rust) and not is_disk_full(RuntimeError("size mismatch"))
    assert "disk full" in str(explain(rust, "/tmp"))


def test_mapped_folders_import_when_run_from_the_checkout_root():
    # `python -m llmprune` in the repository root imports the checkout, not the installed copy: the
    # folders setup.py maps into the package (recipes, evals, kernels) must still be found there
    script = ("import llmprune.recipes, llmprune.evals, llmprune.triton_kernels\n"
              "from llmprune.recipe import named_recipes; from llmprune.eval.suites import available_suites\n"
              "assert named_recipes() and available_suites()")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_a_missing_llmprune_module_is_not_blamed_on_a_package_to_install():
    from llmprune.io.errors import explain

    message = str(explain(ModuleNotFoundError("No module named 'llmprune.evals'", name="llmprune.evals")))
    assert "incomplete" in message and "pip install llmprune\n" not in message + "\n"


def test_missing_optional_package_is_one_line_with_the_install_command(ws, tmp_path):
    from llmprune.io.errors import explain

    message = str(explain(ModuleNotFoundError("No module named 'triton'", name="triton")))
    assert "pip install 'llmprune[kernels]'" in message and "pip install triton" in message
    script = ("import sys; sys.modules['lm_eval'] = None\nfrom llmprune.cli import main\n"
              f"sys.exit(main(['eval', {str(ws / 'model')!r}, '--suite', 'probes', '--ppl-data', 'none', '--output', "
              f"{str(tmp_path / 'o')!r}, '--quiet']))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("llmprune: error: the Python package 'lm_eval' is needed here but not installed; "
                                   "pip install lm-eval")


@pytest.mark.parametrize("content,needle", [
    ('{"kind": "compress"', "is not valid JSON"),
    ("[]", "holds a JSON list, not an object"),
    ('{"kind": "compress", "sparsity": "half", "recipe": 5}', "does not have the layout llmprune writes"),
])
def test_malformed_sidecar_is_one_line_for_card_and_push(ws, tmp_path, capsys, content, needle):
    out = tmp_path / "out"
    assert main(["compress", str(ws / "model"), "--method", "magnitude", "--sparsity", "0.5", "--quiet",
                 "--output", str(out)]) == 0
    capsys.readouterr()
    (out / "llmprune.json").write_text(content)
    for argv in (["card", str(out)], ["push", str(out), "alice/x", "--dry-run"]):
        assert main(argv) == 2
        err = one_error_line(capsys)
        assert str(out / "llmprune.json") in err and needle in err


def test_debug_works_after_the_command_name(broken, tmp_path):
    argv = ["compress", str(broken / "truncated"), "--method", "magnitude", "--sparsity", "0.5", "--quiet",
            "--output", str(tmp_path / "o")]
    with pytest.raises(UserError, match="truncated or corrupt"):
        main(argv[:1] + ["--debug"] + argv[1:])
    with pytest.raises(UserError, match="truncated or corrupt"):
        main(["--debug"] + argv)
    assert main(argv) == 2


# ------------------------------------------------------------------------------------------------
# 9. no network: found once, fast, quietly

def test_hub_probe_connects_once_and_honours_offline_mode(monkeypatch):
    from llmprune.io import network

    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        network.hub_reachable.cache_clear()
        assert network.hub_reachable()
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")      # cached: not asked again
        assert network.hub_reachable()
        network.hub_reachable.cache_clear()
        assert not network.hub_reachable()                              # nothing listens on port 9
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        network.hub_reachable.cache_clear()
        assert not network.hub_reachable()                              # offline mode: no connection at all
    network.hub_reachable.cache_clear()


OFFLINE_CASES = {
    "mistyped local path": (["compress", "modle", "--method", "magnitude", "--sparsity", "0.5"],
                            "modle is not a local directory (no such path here), and the Hugging Face Hub is "
                            "unreachable (no network) to fetch it as a Hub id"),
    "hub id": (["compress", "acme/llama-7b", "--method", "magnitude", "--sparsity", "0.5"],
               "acme/llama-7b is not a local directory"),
    "default calibration data (c4)": (["compress", "{model}", "--method", "wanda", "--sparsity", "0.5"],
                                      "--calib-data c4 is not in the datasets cache and the Hugging Face Hub is "
                                      "unreachable (no network); use --calib-data stdlib or a local"),
    "eval perplexity (wikitext2)": (["eval", "{model}", "--suite", "lm"],
                                    "--ppl-data wikitext2 is not in the datasets cache and the Hugging Face Hub is "
                                    "unreachable (no network); use --ppl-data stdlib or a local .txt/.jsonl/.parquet "
                                    "FILE or export it on a connected machine with `llmprune eval --export-data DIR"),
    "lm-eval task": (["eval", "{model}", "--tasks", "arc_easy", "--ppl-data", "none"],
                     "task arc_easy: its data (allenai/ai2_arc) is not in the datasets cache and the Hugging Face Hub "
                     "is unreachable (no network); export it on a connected machine with `llmprune eval --export-data "
                     "DIR --tasks arc_easy` and pass --data-dir DIR"),
    "export on an offline machine": (["eval", "--export-data", "{tmp}/exported", "--tasks", "arc_easy"],
                                     "--export-data downloads task data from the Hugging Face Hub, but the Hugging "
                                     "Face Hub is unreachable"),
}


OFFLINE_RUNNER = textwrap.dedent("""
    import json, os, sys, tempfile
    from llmprune.cli import main
    results = {}
    for case, argv in json.loads(sys.argv[1]).items():
        with tempfile.TemporaryFile("w+") as err:       # fd-level: library retry lines would land here too
            saved = os.dup(2)
            os.dup2(err.fileno(), 2)
            try:
                code = main(argv)
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
            err.seek(0)
            results[case] = [code, err.read()]
    print(json.dumps(results))
""")


def test_unreachable_hub_is_one_line_without_retries(ws, tmp_path):
    """Nothing listens at HF_ENDPOINT (as on a machine without network) and the Hub cache is empty: every
    case is one line saying what is missing and what to do, with no retry lines (one process, so the Hub
    is probed once for all of them)."""
    cases = {}
    for case, (argv, _) in OFFLINE_CASES.items():
        argv = [str(a).format(model=ws / "model", tmp=tmp_path) for a in argv] + ["--quiet"]
        cases[case] = argv if "--export-data" in argv else argv + ["--output", str(tmp_path / "o")]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update({"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")})
    proc = subprocess.run([sys.executable, "-c", OFFLINE_RUNNER, json.dumps(cases)], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for case, (_, expected) in OFFLINE_CASES.items():
        code, err = results[case]
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("llmprune: error: "), (case, err)
        assert expected in err, (case, err)
        assert "retry" not in err.lower(), (case, err)
    assert not (tmp_path / "o").exists() and not (tmp_path / "exported").exists()


def test_offline_mode_set_by_the_user_is_named(ws, tmp_path):
    proc = run_cli(["compress", "acme/llama-7b", "--method", "magnitude", "--sparsity", "0.5", "--output",
                    tmp_path / "o"], {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}, drop=())
    assert proc.returncode == 2 and "offline mode is set (HF_HUB_OFFLINE" in proc.stderr


# ------------------------------------------------------------------------------------------------
# 11. tokenizer, --push-to-hub token, chat template

def test_magnitude_needs_no_tokenizer_and_calibration_says_which_files_are_missing(broken, ws, tmp_path, capsys):
    out = tmp_path / "mag"
    assert main(["compress", str(broken / "notok"), "--method", "magnitude", "--sparsity", "0.5", "--quiet",
                 "--output", str(out)]) == 0
    assert "has no tokenizer files; the output will have none either" in capsys.readouterr().err
    assert (out / "model.safetensors").is_file() and not (out / "tokenizer.json").exists()
    for model in ("notok", "toksmall"):
        assert main(["compress", str(broken / model), "--method", "wanda", "--sparsity", "0.5", *CALIB,
                     "--calib-data", str(ws / "calib.txt"), "--output", str(tmp_path / "w")]) == 2
        err = one_error_line(capsys)
        assert "tokenizer" in err and "from one of: " not in err and not err.endswith(": ")


def test_tokenizer_files_are_still_copied_when_not_needed(ws, tmp_path):
    assert main(["compress", str(ws / "model"), "--method", "magnitude", "--sparsity", "0.5", "--quiet",
                 "--output", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "tokenizer.json").is_file()


def test_push_to_hub_without_a_token_fails_before_any_work(ws, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    import llmprune.io.load as load

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setattr(load, "load_model", lambda *a, **k: pytest.fail("weights were loaded before the check"))
    assert main(["compress", str(ws / "model"), "--method", "magnitude", "--sparsity", "0.5", "--quiet",
                 "--push-to-hub", "alice/x", "--output", str(tmp_path / "o")]) == 2
    err = one_error_line(capsys)
    assert "no Hugging Face token found for --push-to-hub" in err and "llmprune push" in err
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_x")     # a token, but offline mode (conftest)
    assert main(["compress", str(ws / "model"), "--method", "magnitude", "--sparsity", "0.5", "--quiet",
                 "--push-to-hub", "alice/x", "--output", str(tmp_path / "o")]) == 2
    assert "offline mode is set (HF_HUB_OFFLINE" in one_error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_apply_chat_template_without_a_template_is_an_error(ws, tmp_path, capsys):
    assert main(["eval", str(ws / "model"), "--suite", "probes", "--ppl-data", "none", "--apply-chat-template",
                 "--quiet", "--output", str(tmp_path / "o")]) == 2
    err = one_error_line(capsys)
    assert "has no chat template" in err and "--apply-chat-template" in err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------
# 12. a plain install does the whole job

def test_plain_install_has_the_eval_harness_and_only_triton_is_optional():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = {d.split(">")[0].split("<")[0].split("=")[0].strip().lower() for d in project["dependencies"]}
    assert {"lm-eval", "matplotlib", "pandas", "langdetect", "immutabledict", "torch"} <= deps
    assert "triton" not in deps
    extras = project["optional-dependencies"]
    assert extras["kernels"] == ["triton>=3.0"] and any(d.startswith("triton") for d in extras["test"])
    torch_pins = [d for d in project["dependencies"] if d.startswith("torch")]
    assert torch_pins == ["torch>=2.4"]                 # never a pin that lets pip pick a newer torch by itself


# ------------------------------------------------------------------------------------------------
# 14. the Python API

def test_load_model_accepts_the_embedded_name_and_local_dirs(ws):
    import llmprune

    model, tokenizer = llmprune.load_model("llmprune-tiny")
    assert model.config.model_type == "llama" and tokenizer is not None and not model.training
    ids = tokenizer("def f(x):", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == model.config.vocab_size
    model, tokenizer = llmprune.load_model(str(ws / "model"), dtype="float32")
    assert next(model.parameters()).dtype == torch.float32 and tokenizer is not None


@pytest.mark.parametrize("kwargs,needle", [
    ({"device": "cuda:7"} if not torch.cuda.is_available() else {"device": "tpu"}, "device="),
    ({"dtype": "int8"}, "dtype='int8'"),
])
def test_api_errors_do_not_name_cli_flags(kwargs, needle):
    import llmprune

    with pytest.raises(UserError) as exc:
        llmprune.load_model("llmprune-tiny", **kwargs)
    assert needle in str(exc.value) and "--" not in str(exc.value)


def test_api_missing_path_names_no_flags(tmp_path):
    import llmprune

    with pytest.raises(UserError, match="does not exist") as exc:
        llmprune.load_model(str(tmp_path / "nope"))
    assert "--" not in str(exc.value)


# ------------------------------------------------------------------------------------------------
# 15. consistency

def test_help_texts(capsys):
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    out = capsys.readouterr().out
    assert "Retained % of the dense score" in out and "%%" not in out
    with pytest.raises(SystemExit):
        main(["delta", "--help"])
    delta_help = capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["delta", "apply", "--help"])
    apply_help = capsys.readouterr().out
    assert apply_help != delta_help and "llmprune delta apply" in apply_help and "--drop-rate" not in apply_help
    assert "--quiet" in delta_help and "--no-progress" not in delta_help      # the old spelling is a hidden alias
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    eval_help = capsys.readouterr().out
    assert "--num-fewshot" in eval_help and "--gen-kwargs" in eval_help and "--model-args" in eval_help


@pytest.mark.parametrize("flag,value,needle", [
    ("--model-args", "dtype=float32", "use --dtype"),
    ("--model-args", "pretrained=gpt2", "use MODEL"),
    ("--model-args", "add_bos_tokn=True", "not a parameter of lm-eval's HF model"),
    ("--model-args", "add_bos_token", "key=value"),
    ("--gen-kwargs", "temperature", "key=value"),
    ("--num-fewshot", "-1", "0 or more"),
])
def test_bad_lm_eval_flags_are_one_line(ws, tmp_path, capsys, flag, value, needle):
    assert main(["eval", str(ws / "model"), "--suite", "probes", flag, value, "--output", str(tmp_path / "o")]) == 2
    assert needle in one_error_line(capsys)


def test_eval_lm_eval_flags_are_used_and_recorded(ws, tmp_path):
    import eval_toy as toy

    toy.write_tasks(tmp_path / "tasks", n=4)
    out = tmp_path / "r"
    assert main(["eval", str(ws / "model"), "--tasks", "toy_mc,toy_gen", "--include-path", str(tmp_path / "tasks"),
                 "--ppl-data", "none", "--limit", "2", "--seqlen", "64", "--batch-size", "2", "--num-fewshot", "1",
                 "--gen-kwargs", "max_gen_toks=3", "--model-args", "add_bos_token=True", "--quiet",
                 "--output", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["num_fewshot"] == 1
    assert res["settings"]["gen_kwargs"] == {"max_gen_toks": 3}
    assert res["settings"]["model_args"] == {"add_bos_token": True}
    assert res["tasks"]["toy_mc"]["num_fewshot"] == 1 and res["tasks"]["toy_gen"]["num_fewshot"] == 1
    raw = json.loads((out / "lm_eval_results.json").read_text())
    assert raw["configs"]["toy_gen"]["generation_kwargs"]["max_gen_toks"] == 3     # lm-eval really used it
    assert raw["n-shot"]["toy_mc"] == 1


def test_eval_quiet_prints_no_progress_bar_at_all(ws, tmp_path):
    proc = run_cli(["eval", ws / "model", "--suite", "probes", "--limit", "1", "--ppl-data", "none", "--quiet",
                    "--output", tmp_path / "o"], drop=())
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""                                   # not even the weight-loading bar


def test_delta_quiet_and_apply_accepts_the_delta_output_folder(ws, tmp_path, capsys):
    from safetensors.torch import load_file

    save_tiny(tmp_path / "ft", "llama", seed=1)
    out = tmp_path / "d"
    assert main(["delta", str(ws / "model"), str(tmp_path / "ft"), "--save-delta", "--quiet",
                 "--output", str(out)]) == 0
    for flag, given in (("--quiet", out), ("--no-progress", out / "sparse_delta")):   # old spelling still works
        rebuilt = tmp_path / f"r{flag}"
        assert main(["delta", "apply", str(ws / "model"), str(given), flag, "--output", str(rebuilt)]) == 0
        expected, got = load_file(out / "model.safetensors"), load_file(rebuilt / "model.safetensors")
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert "it/s" not in capsys.readouterr().err


def test_card_replaces_a_symlinked_readme_instead_of_writing_through_it(ws, tmp_path):
    """card/push write only DIR/README.md, in place by design; a README that links elsewhere (a Hub cache
    snapshot links to its blobs) must be replaced, never written through, and follow the umask."""
    out = tmp_path / "out"
    assert main(["compress", str(ws / "model"), "--method", "magnitude", "--sparsity", "0.5", "--quiet",
                 "--output", str(out)]) == 0
    elsewhere = tmp_path / "blob.md"
    elsewhere.write_text("the base model's card")
    (out / "README.md").symlink_to(elsewhere)
    previous = os.umask(0o022)
    try:
        assert main(["card", str(out), "--force"]) == 0
    finally:
        os.umask(previous)
    assert elsewhere.read_text() == "the base model's card"
    readme = out / "README.md"
    assert not readme.is_symlink() and "llmprune" in readme.read_text() and readme.stat().st_mode & 0o777 == 0o644
