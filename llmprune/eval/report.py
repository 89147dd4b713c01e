"""Compare eval results against the dense baseline: retention, chance adjustment, paired CIs.

Definitions (per task, primary metric; s_d dense, s_p pruned, c chance):
  retained %           100 * s_p / s_d            (higher is better)
                       100 * s_d / s_p            (lower is better: perplexity, bits/byte)
  chance-adjusted %    100 * (s_p - c) / (s_d - c) (higher is better with a known chance level)
  floor                s_d - c < 5 points: the dense model is (near) chance, so the task cannot show
                       damage; it is flagged and left out of the suite means and the worst task.
  95% CI               paired bootstrap over items: dense and pruned per-item scores are joined on
                       their item id and resampled together; the statistic is the retained % of the
                       pooled items (for a tag/group averaged without size weights, e.g. `arithmetic`,
                       the pooled mean can differ slightly from the reported macro mean).
Per suite: macro mean of the task retentions, the worst task, and the onset (the smallest sparsity
at which the suite's retention drops below 95%).

Only comparable runs are paired (llmprune/eval/comparable.py): a run evaluated with other run-wide
settings than the dense one (perplexity window, --limit, few-shot count, ...) is refused; a task
measured differently (other perplexity text, another task version) gets no retained % and is named in
the report. Runs are labelled by their recipe (`wanda 0.7 owl`, not `wanda`), and a curve groups the
runs of one method, allocation, target set and N:M pattern.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmprune.errors import UserError

FLOOR_MARGIN = 0.05
ONSET_THRESHOLD = 95.0


def retention(value: float | None, dense: float | None, higher_is_better: bool = True) -> float | None:
    if value is None or dense is None:
        return None
    num, den = (value, dense) if higher_is_better else (dense, value)
    if den == 0 or not math.isfinite(num) or not math.isfinite(den):
        return None
    return 100.0 * num / den


def chance_adjusted(value: float | None, dense: float | None, chance: float | None) -> float | None:
    if value is None or dense is None or chance is None or is_floor(dense, chance):
        return None
    return 100.0 * (value - chance) / (dense - chance)


def is_floor(dense: float | None, chance: float | None, margin: float = FLOOR_MARGIN) -> bool:
    return dense is not None and chance is not None and dense - chance < margin


def _stat(items: dict, idx) -> Any:
    """The task statistic of items resampled with index array `idx` ([iters, n])."""
    import numpy as np

    if items["kind"] == "mean":
        return np.asarray(items["x"], dtype=float)[idx].mean(axis=-1)
    num = np.asarray(items["num"], dtype=float)[idx].sum(axis=-1)
    den = np.asarray(items["den"], dtype=float)[idx].sum(axis=-1)
    mean_nll = num / den
    return np.exp(mean_nll) if items.get("transform", "exp") == "exp" else mean_nll / math.log(2)


def align(dense: dict, pruned: dict) -> tuple[dict, dict]:
    """Keep only items present in both runs, in the same order."""
    pos = {i: k for k, i in enumerate(pruned["ids"])}
    keep_d = [k for k, i in enumerate(dense["ids"]) if i in pos]
    keep_p = [pos[dense["ids"][k]] for k in keep_d]

    def pick(items, keep):
        out = {"kind": items["kind"], "ids": [items["ids"][k] for k in keep]}
        if "transform" in items:
            out["transform"] = items["transform"]
        for key in ("x", "num", "den"):
            if key in items:
                out[key] = [items[key][k] for k in keep]
        return out

    return pick(dense, keep_d), pick(pruned, keep_p)


def paired_bootstrap(dense: dict, pruned: dict, higher_is_better: bool = True, iters: int = 1000,
                     seed: int = 0, level: float = 0.95) -> tuple[float, float] | None:
    """Percentile CI of the retained % by resampling items jointly in both runs."""
    import numpy as np

    d, p = align(dense, pruned)
    n = len(d["ids"])
    if n < 2 or d["kind"] != p["kind"]:
        return None
    rng = np.random.default_rng(seed)
    stats = []
    chunk = max(1, min(iters, 2_000_000 // n))   # bound memory for large tasks
    done = 0
    while done < iters:
        k = min(chunk, iters - done)
        idx = rng.integers(0, n, size=(k, n))
        sd, sp = _stat(d, idx), _stat(p, idx)
        num, den = (sp, sd) if higher_is_better else (sd, sp)
        with np.errstate(divide="ignore", invalid="ignore"):
            stats.append(np.where(den != 0, 100.0 * num / den, np.nan))
        done += k
    values = np.concatenate(stats)
    values = values[np.isfinite(values)]
    if values.size < iters // 2:
        return None
    alpha = (1 - level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))


# ----------------------------------------------------------------------------- comparisons

@dataclass
class Row:
    """One task of one run compared with dense (a row of the long-format CSV)."""
    model: str
    method: str
    pattern: str
    sparsity: float
    achieved: float
    suite: str
    task: str
    metric: str
    value: float | None
    dense_value: float | None
    retention: float | None
    adj_retention: float | None
    ci_lo: float | None
    ci_hi: float | None
    n: int | None
    floor: bool
    chance: float | None
    higher_is_better: bool
    label: str = ""                  # the run's recipe, e.g. "wanda 0.7 owl" (method is the curve it is on)
    incomparable: str | None = None  # why this task cannot be paired with the dense run's (then no retention)


def run_sparsity(results: dict) -> float:
    """The sparsity a run is plotted at: for structured runs the fraction of parameters removed or zero,
    else the target when known, else the achieved one."""
    sp = results.get("sparsity") or {}
    if isinstance(sp.get("removed"), (int, float)):
        return float(sp["removed"])
    target = sp.get("target")
    if isinstance(target, (int, float)):
        return float(target)
    if isinstance(target, str) and ":" in target:  # N:M = N zeros in every M weights: sparsity N/M
        n, m = target.split(":")
        return int(n) / int(m)
    return round(float(sp.get("achieved") or 0.0), 4)


def run_method(results: dict) -> str:
    """The curve a run is on: its method and what sets it apart at an equal sparsity (a non-uniform
    layer allocation, the targeted modules, an N:M pattern): uniform and OWL Wanda are two curves."""
    sp = results.get("sparsity") or {}
    if sp.get("method"):
        method = str(sp["method"])
        parts = [method]
        allocation = sp.get("allocation")
        if isinstance(allocation, str) and allocation not in ("uniform", "mixed") and allocation not in method:
            parts.append(allocation)
        if isinstance(sp.get("targets"), str) and sp["targets"] and sp["targets"] not in method:
            parts.append(f"({sp['targets']})")
        pattern = str(sp.get("pattern") or "")
        # N:M runs are their own curve (2:4 and 50% unstructured share a sparsity but not a method)
        if ":" in pattern and pattern not in method:
            parts.append(pattern)
        return " ".join(parts)
    return "dense" if run_sparsity(results) == 0 else "unknown"


def run_label(results: dict) -> str:
    """How a run is named in tables: its recipe as llmprune.json describes it, else its curve."""
    sp = results.get("sparsity") or {}
    recipe = sp.get("recipe")
    if isinstance(recipe, str) and recipe and run_method(results) != "dense":
        return recipe
    return run_method(results)


def compare(dense: dict, pruned: dict, dense_items: dict | None = None, pruned_items: dict | None = None,
            iters: int = 1000, seed: int = 0) -> list[Row]:
    """One row per task of `pruned` that `dense` has too. Raises UserError when the runs were evaluated
    with different run-wide settings; tasks measured differently get no retention (`incomparable`)."""
    from llmprune.eval.comparable import check_run_wide, task_differences

    check_run_wide(dense, pruned)
    differs = task_differences(dense, pruned)
    rows: list[Row] = []
    sp = pruned.get("sparsity") or {}
    for task, t in pruned["tasks"].items():
        d = dense["tasks"].get(task)
        if d is None:
            continue
        higher = bool(t.get("higher_is_better", True))
        chance = t.get("chance")
        ret = adj = ci = None
        if task not in differs:
            ret = retention(t.get("value"), d.get("value"), higher)
            adj = chance_adjusted(t.get("value"), d.get("value"), chance) if higher else None
            if dense_items and pruned_items and task in dense_items and task in pruned_items:
                ci = paired_bootstrap(dense_items[task], pruned_items[task], higher, iters=iters, seed=seed)
        rows.append(Row(model=str((pruned.get("model") or {}).get("name")), method=run_method(pruned),
                        pattern=str(sp.get("pattern") or ("dense" if run_sparsity(pruned) == 0 else "unstructured")),
                        sparsity=run_sparsity(pruned), achieved=float(sp.get("achieved") or 0.0),
                        suite=t.get("suite", ""), task=task, metric=str(t.get("metric")), value=t.get("value"),
                        dense_value=d.get("value"), retention=ret, adj_retention=adj,
                        ci_lo=ci[0] if ci else None, ci_hi=ci[1] if ci else None, n=t.get("n"),
                        floor=bool(higher and is_floor(d.get("value"), chance)), chance=chance,
                        higher_is_better=higher, label=run_label(pruned), incomparable=differs.get(task)))
    return rows


def suite_summary(rows: list[Row]) -> dict[str, dict]:
    """Per suite: macro mean retention (raw and chance-adjusted) and the worst task, over the tasks
    that are not at the floor (a task whose dense score is at chance cannot show damage; its ratio
    is noise, e.g. 0.055/0.045 = 122%)."""
    out: dict[str, dict] = {}
    for suite in dict.fromkeys(r.suite for r in rows):
        rs = [r for r in rows if r.suite == suite and r.retention is not None and not r.floor]
        adj = [r.adj_retention for r in rs if r.adj_retention is not None]
        worst = min(rs, key=lambda r: r.retention) if rs else None
        out[suite] = {"retained": sum(r.retention for r in rs) / len(rs) if rs else None,
                      "retained_adj": sum(adj) / len(adj) if adj else None,
                      "worst_task": worst.task if worst else None,
                      "worst_retained": worst.retention if worst else None,
                      "n_tasks": len(rs), "floor_tasks": [r.task for r in rows if r.suite == suite and r.floor],
                      "incomparable_tasks": [r.task for r in rows if r.suite == suite and r.incomparable]}
    return out


def baseline_block(dense: dict, pruned: dict, dense_items: dict | None, pruned_items: dict | None,
                   iters: int = 1000) -> dict[str, Any]:
    """The `baseline` block `llmprune eval --baseline` adds to results.json."""
    rows = compare(dense, pruned, dense_items, pruned_items, iters=iters)   # refuses run-wide differences
    incomparable = {r.task: r.incomparable for r in rows if r.incomparable}
    ppl = {}
    for ds, v in (pruned.get("perplexity") or {}).items():
        dv = (dense.get("perplexity") or {}).get(ds)
        if dv is not None:
            why = incomparable.get(f"ppl_{ds}")
            ppl[ds] = {"value": v, "dense_value": dv, "retained": None if why else retention(v, dv, False),
                       "ratio": None if why or not dv else v / dv, "incomparable": why}
    warnings = [f"{task} is not compared with the baseline: {why}" for task, why in incomparable.items()]
    return {"path": dense.get("_dir"), "model": (dense.get("model") or {}).get("name"), "warnings": warnings,
            "sparsity": (dense.get("sparsity") or {}).get("achieved"),
            "tasks": {r.task: {"value": r.value, "dense_value": r.dense_value, "retained": r.retention,
                               "retained_adj": r.adj_retention, "floor": r.floor,
                               "ci95": [r.ci_lo, r.ci_hi] if r.ci_lo is not None else None,
                               "incomparable": r.incomparable} for r in rows},
            "suites": suite_summary(rows), "perplexity": ppl}


def pick_baseline(runs: list[dict], baseline_dir: str | None = None) -> dict:
    if baseline_dir is not None:
        from llmprune.eval.results import read_results

        return read_results(baseline_dir)
    dense = [r for r in runs if run_sparsity(r) == 0 or run_method(r) == "dense"]
    if not dense:
        raise UserError("no dense run among the results (sparsity 0); add one or pass --baseline DIR")
    return dense[0]


# ----------------------------------------------------------------------------- report files

def _fmt(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _fmt_value(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.4g}" if abs(x) >= 10 else f"{x:.3f}"


def build_report(result_dirs: list[str], out_dir: Path, baseline_dir: str | None = None,
                 iters: int = 1000, plots: bool = True) -> dict[str, Any]:
    """Write report.md, report.csv (long format), report.json and PNG plots into `out_dir`."""
    from llmprune.eval.results import read_items, read_results

    from llmprune.eval.comparable import check_run_wide

    runs = [read_results(d) for d in result_dirs]
    dense = pick_baseline(runs, baseline_dir)
    for run in runs:                 # refuse incomparable runs before any work
        check_run_wide(dense, run)
    dense_items = read_items(dense["_dir"])
    if all(r["_dir"] != dense["_dir"] for r in runs):
        runs.insert(0, dense)
    runs.sort(key=lambda r: (run_method(r) != "dense", run_method(r), run_sparsity(r)))
    rows: list[Row] = []
    summaries: list[dict] = []
    for run in runs:
        rrows = compare(dense, run, dense_items, read_items(run["_dir"]), iters=iters)
        rows += rrows
        for suite, s in suite_summary(rrows).items():
            summaries.append({"method": run_method(run), "label": run_label(run), "sparsity": run_sparsity(run),
                              "achieved": (run.get("sparsity") or {}).get("achieved"), "suite": suite, **s})
    onset: dict[tuple[str, str], float | str | None] = {}
    for s in summaries:
        key = (s["method"], s["suite"])
        if s["method"] == "dense":
            continue
        if s["retained"] is None:
            onset.setdefault(key, "n/a")    # every task at the floor: no onset can be seen
            continue
        if onset.get(key) == "n/a":
            onset[key] = None
        onset.setdefault(key, None)
        if s["retained"] < ONSET_THRESHOLD:
            if onset[key] is None or s["sparsity"] < onset[key]:
                onset[key] = s["sparsity"]

    with open(out_dir / "report.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        cols = ["model", "label", "method", "pattern", "sparsity", "achieved", "suite", "task", "metric", "value",
                "dense_value", "retention", "adj_retention", "ci_lo", "ci_hi", "n", "floor", "chance", "incomparable"]
        w.writerow(cols)
        for r in rows:
            w.writerow([getattr(r, c) if getattr(r, c) is not None else "" for c in cols])

    lines = ["# llmprune eval report", "",
             f"Dense baseline: `{dense['_dir']}` ({(dense.get('model') or {}).get('name')}).",
             "Retained % = 100·pruned/dense (dense/pruned for perplexity-like metrics); chance-adj. = "
             "100·(pruned−chance)/(dense−chance); CI = paired per-item bootstrap 95%; "
             "floor = dense within 5 points of chance (excluded from the suite means and worst task).", ""]
    lines += _runs_section(runs)
    not_compared = [r for r in rows if r.incomparable]
    if not_compared:
        lines += ["## Not compared", "",
                  "These tasks were measured differently in the dense run, so they have no retained % and are "
                  "left out of the suite means:", "",
                  "| run | task | why |", "|---|---|---|"]
        lines += [f"| {r.label} | {r.task} | {r.incomparable} |" for r in not_compared] + [""]
    lines += ["## Suites", "",
              "| suite | method | sparsity | achieved | retained % (raw) | retained % (chance-adj.) | worst task (raw %) "
              "| floor tasks (excluded) | not compared |",
              "|---|---|---:|---:|---:|---:|---|---|---|"]
    for s in sorted(summaries, key=lambda s: (s["suite"], s["method"] != "dense", s["method"], s["sparsity"])):
        worst = f"{s['worst_task']} ({_fmt(s['worst_retained'])})" if s["worst_task"] else "n/a"
        lines.append(f"| {s['suite']} | {s['label']} | {s['sparsity']:.0%} | {_fmt((s['achieved'] or 0) * 100)}% | "
                     f"{_fmt(s['retained'])} | {_fmt(s['retained_adj'])} | {worst} | "
                     f"{', '.join(s['floor_tasks']) or '-'} | {', '.join(s['incomparable_tasks']) or '-'} |")
    if onset:
        lines += ["", "Onset (smallest sparsity with suite retention < 95%): " + "; ".join(
            f"{suite} / {method}: {'none' if v is None else v if isinstance(v, str) else f'{v:.0%}'}"
            for (method, suite), v in sorted(onset.items()))]
    lines += ["", "## Tasks", "",
              "| suite | task | metric | method | sparsity | value | dense | retained % | 95% CI | chance-adj. % | n | note |",
              "|---|---|---|---|---:|---:|---:|---:|---|---:|---:|---|"]
    for r in sorted(rows, key=lambda r: (r.suite, r.task, r.method != "dense", r.method, r.sparsity)):
        ci = f"{_fmt(r.ci_lo)}–{_fmt(r.ci_hi)}" if r.ci_lo is not None else ""
        note = f"not comparable: {r.incomparable}" if r.incomparable else "floor" if r.floor else ""
        lines.append(f"| {r.suite} | {r.task} | {r.metric} | {r.label} | {r.sparsity:.0%} | {_fmt_value(r.value)} | "
                     f"{_fmt_value(r.dense_value)} | {_fmt(r.retention)} | {ci} | {_fmt(r.adj_retention)} | "
                     f"{r.n if r.n is not None else ''} | {note} |")
    plot_files: list[str] = []
    if plots:
        from llmprune.eval.plots import plot_report

        plot_files = plot_report(rows, summaries, out_dir)
        if plot_files:
            lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plot_files]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    data = {"baseline": dense["_dir"], "runs": [r["_dir"] for r in runs], "suites": summaries,
            "onset": [{"method": m, "suite": s, "sparsity": v} for (m, s), v in sorted(onset.items())],
            "rows": [r.__dict__ for r in rows], "plots": plot_files}
    import json

    (out_dir / "report.json").write_text(json.dumps(data, indent=2) + "\n")
    return data


def _runs_section(runs: list[dict]) -> list[str]:
    """One row per run: where it is, its recipe, and the settings that decide comparability."""
    lines = ["## Runs", "", "| run | recipe | sparsity | achieved | window (seqlen) | limit | perplexity text |",
             "|---|---|---:|---:|---:|---:|---|"]
    for run in runs:
        settings = run.get("settings") if isinstance(run.get("settings"), dict) else {}
        texts = sorted({str(d.get("source")) for d in (run.get("perplexity_details") or {}).values()
                        if isinstance(d, dict) and d.get("source")})
        texts = [Path(t).name if "/" in t else t for t in texts]
        achieved = (run.get("sparsity") or {}).get("achieved")
        lines.append(f"| `{Path(str(run.get('_dir'))).name}` | {run_label(run)} | {run_sparsity(run):.0%} | "
                     f"{_fmt(100 * achieved) + '%' if isinstance(achieved, (int, float)) else 'n/a'} | "
                     f"{settings.get('seqlen', 'n/a')} | {settings.get('limit') if settings.get('limit') is not None else 'all'} | "
                     f"{', '.join(texts) or '-'} |")
    return lines + [""]


def summary_table(data: dict) -> str:
    """A short plain-text table of suite retention for the terminal."""
    suites = sorted(data["suites"], key=lambda s: (s["suite"], s["method"] != "dense", s["method"], s["sparsity"]))
    width = max([10] + [len(s.get("label") or s["method"]) for s in suites])
    out = [f"{'suite':<16} {'method':<{width}} {'sparsity':>8} {'retained%':>10} {'adj%':>8}  worst task"]
    for s in suites:
        worst = f"{s['worst_task']} ({_fmt(s['worst_retained'])})" if s["worst_task"] else ""
        if s.get("incomparable_tasks"):
            worst += f"  [not compared: {', '.join(s['incomparable_tasks'])}]"
        out.append(f"{s['suite']:<16} {s.get('label') or s['method']:<{width}} {s['sparsity']:>8.0%} "
                   f"{_fmt(s['retained']):>10} {_fmt(s['retained_adj']):>8}  {worst}")
    return "\n".join(out)
