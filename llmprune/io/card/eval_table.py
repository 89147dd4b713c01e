"""The card's evaluation section, from `DIR/eval/results.json` as `llmprune eval` writes it (see
llmprune/eval/results.py), and the check that those results were measured on the weights in DIR.

Results carry the fingerprint of the weights they measured (`model.fingerprint`, see
llmprune/io/identity.py). A fingerprint that differs from the directory's is refused (one line: re-run
eval on this directory). Results written before fingerprints existed, or a directory whose weights
cannot be fingerprinted, are published labelled *unverified* (and `card` / `push` warn): refusing them
would force a re-run of evaluations that may have taken hours, while the label keeps the card honest.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from llmprune.errors import UserError
from llmprune.io.card.files import EVAL_REPORT_DIR, EVAL_RESULTS
from llmprune.io.card.format import is_num, num, pct, ret, table

VERIFIED, UNVERIFIED = "verified", "unverified"


def verify_eval_results(directory: str | Path, results: dict[str, Any] | None) -> str | None:
    """VERIFIED when `results` carry the fingerprint of the weights in `directory`, UNVERIFIED when they
    carry none (or the weights cannot be fingerprinted), None without results. Raises UserError when
    they were measured on other weights."""
    if not results:
        return None
    from llmprune.io.identity import FINGERPRINT_SCHEME, model_fingerprint, short_fingerprint

    model = results.get("model") if isinstance(results.get("model"), dict) else {}
    recorded = model.get("fingerprint")
    if not isinstance(recorded, str) or not recorded.startswith(FINGERPRINT_SCHEME + ":"):
        return UNVERIFIED
    current = model_fingerprint(directory)
    if current is None:
        return UNVERIFIED
    if current != recorded:
        path = Path(directory) / EVAL_RESULTS
        raise UserError(f"{path} was measured on other weights (fingerprint {short_fingerprint(recorded)}, this "
                        f"directory's is {short_fingerprint(current)}); re-run `llmprune eval {directory} --output "
                        f"{Path(directory) / 'eval'} --overwrite` on this directory, or remove {path}")
    return VERIFIED


def unverified_warning(directory: str | Path) -> str:
    return (f"{Path(directory) / EVAL_RESULTS} does not say which weights it measured (written before llmprune "
            "recorded model fingerprints); the card labels its numbers unverified. Re-run `llmprune eval` on this "
            "directory to verify them")


def _achieved_sparsity(results: dict[str, Any]) -> Any:
    sparsity = results.get("sparsity")
    return sparsity.get("achieved") if isinstance(sparsity, dict) else sparsity


def _ppl_data(dataset: str, results: dict[str, Any]) -> tuple[str, str]:
    """(what the text is, the window) of one perplexity row."""
    details = (results.get("perplexity_details") or {}).get(dataset)
    details = details if isinstance(details, dict) else {}
    settings = results.get("settings") if isinstance(results.get("settings"), dict) else {}
    source = details.get("source")
    if isinstance(source, str) and ("/" in source or "\\" in source):
        text = f"{Path(source).name} (a local file)"
    elif isinstance(source, str) and source:
        text = f"{source} (test split)" if source in ("wikitext2", "c4") else source
    else:
        text = dataset
    seqlen = details.get("seqlen", settings.get("seqlen"))
    window = f"{int(seqlen)} tokens" if is_num(seqlen) else "n/a"
    if is_num(details.get("windows")):
        window += f" × {int(details['windows'])}"
    return text, window


def eval_section(results: dict[str, Any] | None, status: str | None = None) -> str | None:
    """Tables from `eval/results.json`: retained % and chance-adjusted retained % are the ones
    `--baseline` computed, not recomputed here. `status`: VERIFIED / UNVERIFIED (`verify_eval_results`)."""
    if not results:
        return None
    baseline = results.get("baseline") if isinstance(results.get("baseline"), dict) else None
    b_tasks = (baseline or {}).get("tasks") or {}
    b_suites = (baseline or {}).get("suites") or {}
    b_ppl = (baseline or {}).get("perplexity") or {}
    title = "## Evaluation" + (" (unverified)" if status == UNVERIFIED else "")
    out = [title, "", "Measured with `llmprune eval` (all numbers from `eval/results.json`)."]
    if status == VERIFIED:
        out[-1] += " The results record the fingerprint of the weights they measured, and it matches this model's."
    elif status == UNVERIFIED:
        out[-1] += (" **Unverified:** these results do not record which weights they measured (they were written "
                    "by an older llmprune), so they could not be checked against this model.")
    if baseline:
        who = f" (`{Path(str(baseline['model'])).name}`)" if baseline.get("model") else ""
        out[-1] += (f" *Dense* is the unpruned model{who} evaluated the same way; *retained* is this model's score "
                    "as a % of the dense score (dense/pruned for perplexity), *above chance* the same after "
                    "subtracting the chance level.")
    achieved = _achieved_sparsity(results)
    if is_num(achieved):
        out += ["", f"Sparsity counted from the evaluated weights (exact zeros in the prunable linear layers): "
                    f"{pct(achieved)}."]
    tables = 0

    ppl = results.get("perplexity")
    if isinstance(ppl, dict) and ppl:
        rows = []
        for dataset, value in ppl.items():
            info = b_ppl.get(dataset) if isinstance(b_ppl.get(dataset), dict) else {}
            text, window = _ppl_data(dataset, results)
            dense = info.get("dense_value")
            if baseline:
                if info.get("incomparable"):
                    change = f"not comparable ({info['incomparable']})"
                else:
                    change = f"{100 * (value / dense - 1):+.1f}%" if is_num(value) and is_num(dense) and dense else "n/a"
                rows.append([dataset, text, window, num(dense), num(value), change])
            else:
                rows.append([dataset, text, window, num(value)])
        header = ["dataset", "text", "window", "dense", "this model", "change"] if baseline else \
            ["dataset", "text", "window", "perplexity"]
        out += ["", "Perplexity (lower is better): token-level, over non-overlapping windows of the length shown "
                "(the SparseGPT / Wanda protocol; not comparable with lm-eval's word perplexity):", "",
                table(header, rows)]
        tables += 1

    suites = results.get("suites")
    if isinstance(suites, dict):
        rows = []
        for suite, info in suites.items():
            score = info.get("score") if isinstance(info, dict) else info
            if not is_num(score):  # e.g. a perplexity-only suite: nothing to average
                continue
            if baseline:
                b = b_suites.get(suite) if isinstance(b_suites.get(suite), dict) else {}
                worst = f"{b['worst_task']} ({ret(b.get('worst_retained'))})" if b.get("worst_task") else "n/a"
                rows.append([suite, num(score), ret(b.get("retained")), ret(b.get("retained_adj")), worst])
            else:
                rows.append([suite, num(score)])
        if rows:
            header = (["suite", "score", "retained", "above chance", "worst task (retained)"] if baseline
                      else ["suite", "score"])
            out += ["", "Suites (score: mean of the tasks' primary metrics):", "", table(header, rows)]
            tables += 1

    tasks = results.get("tasks")
    if isinstance(tasks, dict):
        rows = []
        floors = incomparable = False
        for task, info in tasks.items():
            if not isinstance(info, dict) or info.get("kind") == "perplexity":
                continue  # perplexities are in their own table
            value, stderr, chance = info.get("value"), info.get("stderr"), info.get("chance")
            shown = num(value) + (f" ± {num(stderr)}" if is_num(stderr) else "")
            row = [task, info.get("suite", ""), info.get("metric", "")]
            if baseline:
                b = b_tasks.get(task) if isinstance(b_tasks.get(task), dict) else {}
                retained = ret(b.get("retained"))
                ci = b.get("ci95")
                if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(is_num(c) for c in ci):
                    retained += f" [{ci[0]:.1f}, {ci[1]:.1f}]"
                adjusted = ret(b.get("retained_adj"))
                if b.get("floor"):
                    adjusted, floors = "floor", True
                if b.get("incomparable"):
                    retained, adjusted, incomparable = f"not comparable ({b['incomparable']})", "", True
                row += [num(b.get("dense_value")), shown, retained, adjusted]
            else:
                row += [shown]
            row += [num(chance) if is_num(chance) else "", num(info.get("n")) if info.get("n") is not None else ""]
            rows.append(row)
        if rows:
            header = ["task", "suite", "metric"]
            header += (["dense", "this model", "retained [95% CI]", "above chance"] if baseline else ["value"])
            header += ["chance", "n"]
            note = "Tasks (± is the standard error"
            note += "; the CI is a paired bootstrap over items" if baseline else ""
            note += "; *floor*: the dense model is within 5 points of chance, so the task cannot show a loss" \
                if floors else ""
            note += "; *not comparable*: the dense run measured it differently" if incomparable else ""
            out += ["", note + "):", "", table(header, rows)]
            tables += 1
    return "\n".join(out) if tables or is_num(achieved) else None


def report_links(directory: Path) -> str | None:
    report = directory / EVAL_REPORT_DIR
    if not report.is_dir():
        return None
    lines = []
    if (report / "report.md").is_file():
        lines.append(f"Full comparison report: [{EVAL_REPORT_DIR.as_posix()}/report.md]"
                     f"({EVAL_REPORT_DIR.as_posix()}/report.md).")
    for png in sorted(report.glob("*.png")):
        rel = png.relative_to(directory).as_posix()
        lines.append(f"![{png.stem}]({rel})")
    return "\n\n".join(lines) if lines else None
