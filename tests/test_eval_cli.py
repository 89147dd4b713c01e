"""`llmprune eval / report / sweep` end to end on a tiny saved model (offline, in-process)."""
import hashlib
import json

import pytest
import torch

from llmprune.cli import main
import eval_toy as toy

TEXT = "def add(a, b):\n    return a + b\n\nclass P:\n    x = 1\n\n" * 60


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    tok = toy.make_tokenizer()
    model = toy.make_model(tok, seed=2)
    model.save_pretrained(d / "dense_model")
    tok.save_pretrained(d / "dense_model")
    with torch.no_grad():  # a "pruned" copy: 50% magnitude per matrix
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and name != "lm_head":
                m.weight[m.weight.abs() <= m.weight.abs().median()] = 0
    model.save_pretrained(d / "pruned_model")
    tok.save_pretrained(d / "pruned_model")
    toy.write_tasks(d / "tasks", n=4)
    (d / "held.txt").write_text(TEXT)
    return d


def _common(d):
    return ["--suite", "probes", "--tasks", "toy_mc,toy_roll", "--include-path", str(d / "tasks"),
            "--ppl-data", str(d / "held.txt"), "--seqlen", "64", "--limit", "3", "--batch-size", "4", "--quiet"]


def test_eval_with_baseline_then_report(workdir, capsys):
    d = workdir
    assert main(["eval", str(d / "dense_model"), *_common(d), "--output", str(d / "r_dense")]) == 0
    assert main(["eval", str(d / "pruned_model"), *_common(d), "--baseline", str(d / "r_dense"),
                 "--output", str(d / "r_pruned")]) == 0
    res = json.loads((d / "r_pruned" / "results.json").read_text())
    for key in ("perplexity", "tasks", "suites", "sparsity", "model", "versions", "seed", "baseline"):
        assert key in res
    assert res["sparsity"]["achieved"] == pytest.approx(0.5, abs=0.01)
    assert res["tasks"]["toy_mc"]["suite"] == "custom" and res["tasks"]["probe_arithmetic"]["n"] == 3
    base = res["baseline"]
    dense_ppl = json.loads((d / "r_dense" / "results.json").read_text())["perplexity"]["held"]
    assert base["perplexity"]["held"]["retained"] == pytest.approx(100 * dense_ppl / res["perplexity"]["held"])
    assert base["tasks"]["ppl_held"]["ci95"] is not None
    assert "retained" in capsys.readouterr().out

    assert main(["report", str(d / "r_dense"), str(d / "r_pruned"), "--bootstrap", "100",
                 "--output", str(d / "rep")]) == 0
    md = (d / "rep" / "report.md").read_text()
    assert "ppl_held" in md and "toy_roll" in md
    assert (d / "rep" / "suites.png").is_file() and (d / "rep" / "report.csv").is_file()


def test_sweep_prunes_in_memory_and_reports(workdir):
    d = workdir
    weights = d / "dense_model" / "model.safetensors"
    before = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert main(["sweep", str(d / "dense_model"), "--method", "wanda", "--sparsities", "0,0.5,0.7",
                 "--calib-data", str(d / "held.txt"), "--calib-samples", "4", "--calib-seqlen", "32",
                 "--suite", "probes", "--ppl-data", str(d / "held.txt"), "--seqlen", "64", "--limit", "2",
                 "--batch-size", "4", "--quiet", "--bootstrap", "50", "--output", str(d / "sweep")]) == 0
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == before      # input never modified
    runs = {p.name: json.loads((p / "results.json").read_text()) for p in (d / "sweep" / "runs").iterdir()}
    assert set(runs) == {"dense", "wanda-0.5", "wanda-0.7"}
    assert runs["dense"]["sparsity"]["achieved"] == 0
    assert runs["wanda-0.5"]["sparsity"]["achieved"] == pytest.approx(0.5, abs=0.01)
    assert runs["wanda-0.7"]["sparsity"]["achieved"] == pytest.approx(0.7, abs=0.01)
    # each level is pruned from the dense weights, and the numbers move with sparsity
    ppls = [runs[k]["perplexity"]["held"] for k in ("dense", "wanda-0.5", "wanda-0.7")]
    assert len(set(round(p, 6) for p in ppls)) == 3
    rep = json.loads((d / "sweep" / "report" / "report.json").read_text())
    assert sorted({s["sparsity"] for s in rep["suites"]}) == [0.0, 0.5, 0.7]
    assert (d / "sweep" / "report" / "suite_probes.png").is_file()
    assert ".tmp-" not in (d / "sweep" / "report" / "report.md").read_text()   # no temp paths leak


@pytest.mark.parametrize("argv,message", [
    (["eval", "{d}/dense_model", "--suite", "nope", "--output", "{d}/x"], "unknown suite"),
    (["eval", "{d}/dense_model", "--ppl-data", "{d}/missing.txt", "--output", "{d}/x"], "does not exist"),
    (["eval", "{d}/dense_model", "--suite", "probes"], "--output"),
    (["eval", "{d}/dense_model", "--suite", "probes", "--output", "{d}/tasks"], "already exists"),
    (["eval", "{d}/dense_model", "--suite", "probes", "--data-dir", "{d}/nodata", "--output", "{d}/x"], "--data-dir"),
    (["eval", "{d}/dense_model", "--suite", "probes", "--baseline", "{d}/tasks", "--output", "{d}/x"], "no results.json"),
    (["report", "{d}/tasks", "--output", "{d}/x"], "no results.json"),
    (["sweep", "{d}/dense_model", "--method", "wanda", "--sparsities", "0,1.5", "--output", "{d}/x"], "must be in"),
    (["sweep", "{d}/dense_model", "--method", "nosuch", "--sparsities", "0.5", "--output", "{d}/x"], "nosuch"),
])
def test_bad_input_is_one_line_exit_2(workdir, capsys, argv, message):
    argv = [a.format(d=workdir) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmprune: error:") and message in err and "\n" not in err
    assert not (workdir / "x").exists()
