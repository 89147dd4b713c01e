"""Whether two eval runs can be compared (retained %, paired CIs), from their results.json.

Retention pairs a pruned run's score with the dense run's, item by item. That only means something
when both measured the same thing the same way. Two kinds of difference:

- run-wide settings (`RUN_WIDE`: perplexity window / lm-eval max length, --limit, few-shot count,
  chat template, generation and model arguments, softmax dtype, lm-eval seeds): every number of the
  run changes with them, so the runs are refused (`check_run_wide`, one line naming the settings);
- per task: the perplexity text (source, its hash, its token count), an lm-eval task's version,
  its few-shot count or metric, a probe's parameters, the number of items scored. Those tasks are
  not compared (`task_differences`: the report and the card say why); the rest of the run is.

Results written before a setting was recorded are not checked on it (nothing to compare).
"""
from __future__ import annotations

from typing import Any

from llmprune.errors import UserError

# results.json `settings` key -> the eval flag that sets it (None: no flag).
RUN_WIDE = {"seqlen": "--seqlen", "max_length": "--seqlen", "limit": "--limit", "num_fewshot": "--num-fewshot",
            "apply_chat_template": "--apply-chat-template", "gen_kwargs": "--gen-kwargs",
            "model_args": "--model-args", "softmax_dtype": None}


def _name(results: dict[str, Any], fallback: str) -> str:
    return str(results.get("_dir") or (results.get("model") or {}).get("name") or fallback)


def run_wide_differences(dense: dict[str, Any], run: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(setting, run's value, dense value) for every run-wide setting the two runs disagree on."""
    ds = dense.get("settings") if isinstance(dense.get("settings"), dict) else {}
    rs = run.get("settings") if isinstance(run.get("settings"), dict) else {}
    out = []
    for key in RUN_WIDE:
        if key in ds and key in rs and ds[key] != rs[key]:
            if key == "max_length" and any(k == "seqlen" for k, _, _ in out):
                continue    # both come from --seqlen: say it once
            out.append((key, rs[key], ds[key]))
    dseed, rseed = dense.get("seed"), run.get("seed")
    if isinstance(dseed, dict) and isinstance(rseed, dict) and dseed and rseed and dseed != rseed:
        out.append(("eval seed", rseed.get("random"), dseed.get("random")))
    return out


def check_run_wide(dense: dict[str, Any], run: dict[str, Any], run_name: str | None = None,
                   dense_name: str | None = None) -> None:
    """Raise a one-line UserError when the runs differ in a setting that changes every number."""
    found = run_wide_differences(dense, run)
    if not found:
        return
    what = "; ".join(f"{key} {r!r} vs {d!r}" for key, r, d in found)
    flags = sorted({RUN_WIDE[key] for key, _, _ in found if RUN_WIDE.get(key)} |
                   {"--eval-seed" for key, _, _ in found if key == "eval seed"})
    same = f" (same {', '.join(flags)})" if flags else ""
    raise UserError(f"{run_name or _name(run, 'the run')} and the dense baseline {dense_name or _name(dense, '')} "
                    f"were evaluated with different settings ({what}, this run vs the baseline), so no retained % "
                    f"can be computed; re-run `llmprune eval` on one of them with the other's settings{same}")


def _ppl_difference(key: str, dense: dict[str, Any], run: dict[str, Any]) -> str | None:
    dd = (dense.get("perplexity_details") or {}).get(key)
    rd = (run.get("perplexity_details") or {}).get(key)
    if not isinstance(dd, dict) or not isinstance(rd, dict):
        return None
    if dd.get("source") and rd.get("source") and dd["source"] != rd["source"]:
        return f"perplexity text {rd['source']} vs {dd['source']}"
    if dd.get("text_sha256") and rd.get("text_sha256") and dd["text_sha256"] != rd["text_sha256"]:
        return "perplexity text differs (same name, other content)"
    if dd.get("seqlen") and rd.get("seqlen") and dd["seqlen"] != rd["seqlen"]:
        return f"perplexity window {rd['seqlen']} vs {dd['seqlen']} tokens"
    if isinstance(dd.get("tokens"), int) and isinstance(rd.get("tokens"), int) and dd["tokens"] != rd["tokens"]:
        return f"perplexity over {rd['tokens']:,} vs {dd['tokens']:,} tokens (other text or tokenizer)"
    return None


def task_differences(dense: dict[str, Any], run: dict[str, Any]) -> dict[str, str]:
    """{task: why it cannot be compared} for the tasks both runs have."""
    out: dict[str, str] = {}
    dtasks = dense.get("tasks") if isinstance(dense.get("tasks"), dict) else {}
    for task, t in (run.get("tasks") or {}).items():
        d = dtasks.get(task)
        if not isinstance(t, dict) or not isinstance(d, dict):
            continue
        reason = None
        if t.get("kind") == "perplexity" and task.startswith("ppl_"):
            reason = _ppl_difference(task[len("ppl_"):], dense, run)
        for key, label in (("version", "task version"), ("num_fewshot", "few-shot count"), ("metric", "metric"),
                           ("params", "probe settings")):
            if reason is None and key in t and key in d and t[key] is not None and d[key] is not None \
                    and t[key] != d[key]:
                reason = f"{label} {t[key]!r} vs {d[key]!r}" if key != "params" else label + " differ"
        if reason is None and isinstance(t.get("n"), int) and isinstance(d.get("n"), int) and t["n"] != d["n"]:
            reason = f"{t['n']} vs {d['n']} items scored (other task data)"
        if reason:
            out[task] = reason
    return out
