"""Report maths on synthetic numbers: retention, chance adjustment, floors, paired bootstrap, files."""
import csv
import gzip
import json
import math

import numpy as np
import pytest

from llmprune.eval import report


def test_retention_and_chance_adjustment():
    assert report.retention(0.6, 0.8) == pytest.approx(75.0)
    assert report.retention(12.0, 10.0, higher_is_better=False) == pytest.approx(100 * 10 / 12)
    assert report.retention(0.5, 0.0) is None and report.retention(None, 0.5) is None
    # 4-way MC: dense 0.65, pruned 0.45 -> raw 69.2%, chance-adjusted (0.45-.25)/(0.65-.25) = 50%
    assert report.chance_adjusted(0.45, 0.65, 0.25) == pytest.approx(50.0)
    assert report.chance_adjusted(0.25, 0.65, 0.25) == pytest.approx(0.0)
    assert report.chance_adjusted(0.45, 0.65, None) is None
    # floor: dense within 5 points of chance -> no chance-adjusted number
    assert report.is_floor(0.28, 0.25) and not report.is_floor(0.31, 0.25)
    assert report.chance_adjusted(0.27, 0.28, 0.25) is None


def _mean_items(xs, prefix="t"):
    return {"kind": "mean", "ids": [f"{prefix}:{i}" for i in range(len(xs))], "x": list(map(float, xs))}


def test_paired_bootstrap_covers_the_true_retention():
    """Dense items ~ Bernoulli(0.7); the pruned model loses each right answer with p=0.3 (and never
    gains): true retention = 70%. The 95% CI must contain 70 in about 95% of repetitions."""
    rng = np.random.default_rng(0)
    covered = 0
    trials = 60
    for t in range(trials):
        d = rng.random(400) < 0.7
        p = d & (rng.random(400) > 0.3)
        ci = report.paired_bootstrap(_mean_items(d), _mean_items(p), iters=400, seed=t)
        covered += ci[0] <= 70.0 <= ci[1]
    assert 0.85 <= covered / trials <= 1.0
    # pairing matters: resampling the two runs independently gives a wider interval
    d = rng.random(400) < 0.7
    p = d & (rng.random(400) > 0.3)
    i, j = rng.integers(0, 400, (2, 400, 400))
    unpaired = 100 * p[j].mean(1) / d[i].mean(1)
    unpaired_width = np.quantile(unpaired, 0.975) - np.quantile(unpaired, 0.025)
    paired = report.paired_bootstrap(_mean_items(d), _mean_items(p), iters=400)
    assert paired[1] - paired[0] < 0.8 * unpaired_width


def test_bootstrap_aligns_items_by_id_and_handles_ratio_metrics():
    d = {"kind": "ratio", "transform": "exp", "ids": ["a", "b", "c", "d"], "num": [4.0, 4.4, 3.6, 4.2],
         "den": [2.0, 2.0, 2.0, 2.0]}
    p = {"kind": "ratio", "transform": "exp", "ids": ["d", "c", "b", "a", "zz"], "num": [4.6, 4.0, 4.8, 4.4, 99.0],
         "den": [2.0, 2.0, 2.0, 2.0, 2.0]}
    lo, hi = report.paired_bootstrap(d, p, higher_is_better=False, iters=500)
    point = 100 * math.exp(16.2 / 8) / math.exp(17.8 / 8)   # the extra item "zz" is ignored
    assert lo <= point <= hi and hi < 100


def _write_run(path, method, sparsity, values, items, chance=0.25, ppl=10.0):
    path.mkdir(parents=True)
    tasks = {name: {"suite": "s1" if name != "ppl_x" else "lm", "kind": "lm_eval", "metric": "acc,none", "value": v,
                    "stderr": None, "n": 100, "chance": chance if name != "ppl_x" else None,
                    "higher_is_better": name != "ppl_x", "num_fewshot": 0} for name, v in values.items()}
    res = {"format_version": 1, "model": {"name": "m"}, "perplexity": {"x": values.get("ppl_x", ppl)},
           "sparsity": {"achieved": sparsity, "target": sparsity, "method": method, "pattern": "unstructured"},
           "tasks": tasks, "suites": {}}
    (path / "results.json").write_text(json.dumps(res))
    with gzip.open(path / "items.json.gz", "wt") as fh:
        json.dump(items, fh)


def test_build_report_files_and_numbers(tmp_path):
    rng = np.random.default_rng(1)
    d_a = (rng.random(200) < 0.8).astype(float)
    p_a = d_a * (rng.random(200) > 0.5)
    d_b = (rng.random(200) < 0.27).astype(float)  # near chance: floor
    p_b = (rng.random(200) < 0.26).astype(float)
    _write_run(tmp_path / "dense", "dense", 0.0, {"a": d_a.mean(), "b": d_b.mean(), "ppl_x": 10.0},
               {"a": _mean_items(d_a, "a"), "b": _mean_items(d_b, "b")})
    _write_run(tmp_path / "p50", "wanda", 0.5, {"a": p_a.mean(), "b": p_b.mean(), "ppl_x": 20.0},
               {"a": _mean_items(p_a, "a"), "b": _mean_items(p_b, "b")})
    out = tmp_path / "rep"
    out.mkdir()
    data = report.build_report([str(tmp_path / "p50"), str(tmp_path / "dense")], out, iters=200)
    rows = {(r["task"], r["sparsity"]): r for r in data["rows"]}
    a = rows[("a", 0.5)]
    assert a["retention"] == pytest.approx(100 * p_a.mean() / d_a.mean())
    assert a["ci_lo"] < a["retention"] < a["ci_hi"]
    assert a["adj_retention"] == pytest.approx(100 * (p_a.mean() - 0.25) / (d_a.mean() - 0.25))
    assert rows[("b", 0.5)]["floor"] and rows[("b", 0.5)]["adj_retention"] is None
    assert rows[("ppl_x", 0.5)]["retention"] == pytest.approx(50.0)
    s1 = next(s for s in data["suites"] if s["suite"] == "s1" and s["sparsity"] == 0.5)
    assert s1["retained"] == pytest.approx(a["retention"])               # floor task left out
    assert s1["retained_adj"] == pytest.approx(a["adj_retention"])
    assert s1["floor_tasks"] == ["b"]
    assert s1["worst_task"] == "a"
    assert {"method": "wanda", "suite": "s1", "sparsity": 0.5} in data["onset"]
    with open(out / "report.csv") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert {"model", "method", "sparsity", "task", "retention", "adj_retention", "ci_lo", "ci_hi", "n"} <= set(csv_rows[0])
    assert len(csv_rows) == 6
    md = (out / "report.md").read_text()
    assert "| s1 | wanda | 50% |" in md and "floor" in md
    for png in ("suites.png", "suite_s1.png", "suite_lm.png"):
        assert (out / png).stat().st_size > 5000


def test_report_needs_a_dense_run(tmp_path):
    from llmprune.errors import UserError

    _write_run(tmp_path / "p50", "wanda", 0.5, {"a": 0.5}, {})
    (tmp_path / "o").mkdir()
    with pytest.raises(UserError, match="no dense run"):
        report.build_report([str(tmp_path / "p50")], tmp_path / "o", plots=False)


@pytest.mark.parametrize("pattern,sparsity", [("1:4", 0.25), ("2:4", 0.5), ("3:8", 0.375), ("6:8", 0.75)])
def test_nm_runs_are_plotted_at_n_zeros_per_m(tmp_path, pattern, sparsity):
    """N:M means N zeros in every M weights (the pruner's meaning): 1:4 is 25% sparse, not 75%."""
    assert report.run_sparsity({"sparsity": {"target": pattern, "achieved": sparsity}}) == sparsity
    _write_run(tmp_path / "dense", "dense", 0.0, {"a": 0.8}, {})
    _write_run(tmp_path / "nm", "wanda", sparsity, {"a": 0.6}, {})
    res = json.loads((tmp_path / "nm" / "results.json").read_text())
    res["sparsity"].update(target=pattern, pattern=pattern)
    (tmp_path / "nm" / "results.json").write_text(json.dumps(res))
    (tmp_path / "o").mkdir()
    data = report.build_report([str(tmp_path / "dense"), str(tmp_path / "nm")], tmp_path / "o", iters=0, plots=False)
    pruned = [r for r in data["rows"] if r["method"] != "dense"]
    assert pruned and {r["sparsity"] for r in pruned} == {sparsity}
    assert {r["method"] for r in pruned} == {f"wanda {pattern}"}


def _relabel(path, **sparsity):
    res = json.loads((path / "results.json").read_text())
    res["sparsity"].update(sparsity)
    (path / "results.json").write_text(json.dumps(res))


def test_uniform_and_owl_runs_are_two_labelled_curves(tmp_path):
    """The sparsity block `eval` writes from llmprune.json (io.sidecar.eval_summary): method + recipe +
    allocation. Uniform and OWL Wanda at 50% must not both read "wanda 50%"."""
    _write_run(tmp_path / "dense", "dense", 0.0, {"a": 0.8}, {})
    for name, allocation, value in (("uni", "uniform", 0.6), ("owl", "owl", 0.7)):
        _write_run(tmp_path / name, "wanda", 0.5, {"a": value}, {})
        _relabel(tmp_path / name, recipe="wanda 0.5" + (" owl" if allocation == "owl" else ""), allocation=allocation)
    (tmp_path / "o").mkdir()
    data = report.build_report([str(tmp_path / d) for d in ("dense", "uni", "owl")], tmp_path / "o", iters=0,
                               plots=False)
    suites = {(s["method"], s["label"]): s["retained"] for s in data["suites"] if s["suite"] == "s1"}
    assert suites[("wanda", "wanda 0.5")] == pytest.approx(75.0)
    assert suites[("wanda owl", "wanda 0.5 owl")] == pytest.approx(87.5)
    assert {o["method"] for o in data["onset"]} == {"wanda", "wanda owl"}
    md = (tmp_path / "o" / "report.md").read_text()
    assert "| s1 | wanda 0.5 | 50% |" in md and "| s1 | wanda 0.5 owl | 50% |" in md
    assert "| `owl` | wanda 0.5 owl | 50% |" in md                        # the Runs table


def test_runs_evaluated_differently_are_refused_or_flagged(tmp_path):
    from llmprune.errors import UserError
    from llmprune.eval.comparable import check_run_wide, task_differences

    dense = {"_dir": "/r/dense", "settings": {"seqlen": 2048, "max_length": 2048, "limit": None},
             "tasks": {"arc": {"version": 1.0, "n": 100, "num_fewshot": 0}, "mmlu": {"version": 2.0, "n": 50}}}
    same = {"_dir": "/r/p", "settings": dict(dense["settings"]), "tasks": json.loads(json.dumps(dense["tasks"]))}
    check_run_wide(dense, same)
    assert task_differences(dense, same) == {}
    short = {**same, "settings": {"seqlen": 256, "max_length": 256, "limit": 10}}
    with pytest.raises(UserError) as err:
        check_run_wide(dense, short)
    assert "seqlen 256 vs 2048" in str(err.value) and "limit 10 vs None" in str(err.value)
    assert "max_length" not in str(err.value) and "--seqlen" in str(err.value) and "\n" not in str(err.value)
    other = {**same, "tasks": {"arc": {"version": 2.0, "n": 100, "num_fewshot": 0},
                               "mmlu": {"version": 2.0, "n": 40}}}
    assert task_differences(dense, other) == {"arc": "task version 2.0 vs 1.0",
                                              "mmlu": "40 vs 50 items scored (other task data)"}


def test_perplexity_on_other_text_is_not_paired(tmp_path):
    _write_run(tmp_path / "dense", "dense", 0.0, {"a": 0.8, "ppl_x": 10.0}, {})
    _write_run(tmp_path / "p", "wanda", 0.5, {"a": 0.6, "ppl_x": 9.0}, {})
    for name, sha in (("dense", "aa"), ("p", "bb")):
        res = json.loads((tmp_path / name / "results.json").read_text())
        res["perplexity_details"] = {"x": {"source": "/data/x.txt", "text_sha256": sha, "seqlen": 2048,
                                           "windows": 10, "tokens": 20470}}
        res["tasks"]["ppl_x"]["kind"] = "perplexity"
        (tmp_path / name / "results.json").write_text(json.dumps(res))
    (tmp_path / "o").mkdir()
    data = report.build_report([str(tmp_path / "dense"), str(tmp_path / "p")], tmp_path / "o", iters=0, plots=False)
    row = next(r for r in data["rows"] if r["task"] == "ppl_x" and r["method"] == "wanda")
    assert row["retention"] is None and row["incomparable"] == "perplexity text differs (same name, other content)"
    a = next(r for r in data["rows"] if r["task"] == "a" and r["method"] == "wanda")
    assert a["retention"] == pytest.approx(75.0) and a["incomparable"] is None
    md = (tmp_path / "o" / "report.md").read_text()
    assert "## Not compared" in md and "not comparable: perplexity text differs" in md
