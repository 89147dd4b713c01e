"""Running lm-eval on an in-memory model and reading its output: the `HFLM` wrapper, one
`simple_evaluate` call over every lm-eval task of a run, and per-task entries (primary metric, stderr,
n, per-item scores for the paired bootstrap) from its raw output.

lm-eval facts this relies on (see the reference notes): the model is wrapped in `HFLM` with the
tokenizer, an explicit `max_length`, `batch_size` set on the wrapper (simple_evaluate ignores it for
LM objects) and float32 log-softmax; the request cache (`use_cache`) is never used because it keys on
the request, not the weights.
"""
from __future__ import annotations

import math
from typing import Any

from llmprune.errors import UserError
from llmprune.eval.settings import Context, resolve_batch_size
from llmprune.eval.suites import TaskSpec
from llmprune.eval.tasks import export_command


def make_lm(model, tokenizer, batch_size: int | str, max_length: int, softmax_dtype: str = "float32",
            model_args: dict[str, Any] | None = None):
    """lm-eval's HFLM around an in-memory model (no reload, no Hub access); `model_args` as lm-eval's
    --model_args (checked by `parse_model_args`)."""
    import logging

    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)  # "passed an instantiated model" warning
    device = next(model.parameters()).device
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=resolve_batch_size(batch_size, device),
                max_batch_size=64, max_length=max_length, softmax_dtype=softmax_dtype, **(model_args or {}))


def _load_error(spec: TaskSpec, exc: Exception) -> UserError:
    text = f"{type(exc).__name__}: {exc}"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if any(k in text for k in ("Offline", "offline", "ConnectionError", "Couldn't reach", "resolve", "LocalEntryNotFound")):
        from llmprune.io.network import hub_reachable, why_offline

        why = "its data is not in the datasets cache and " + why_offline() if not hub_reachable() else \
            f"its data is not available offline ({type(exc).__name__})"
        return UserError(f"task {spec.name}: {why}; export it on a connected machine with `{export_command(spec)}` "
                         "and pass --data-dir DIR")
    if isinstance(exc, FileNotFoundError):
        return UserError(f"task {spec.name}: data file missing ({first}); re-export with `{export_command(spec)}`")
    return UserError(f"task {spec.name} could not be loaded: {type(exc).__name__}: {first}")


def _load_task_objects(ctx: Context, spec: TaskSpec) -> tuple[list, dict]:
    """The Task/Group objects for one spec, with the suite's few-shot count set on every leaf."""
    name = ctx.lm_eval_names[spec.name]
    try:
        loaded = ctx.task_manager.load([name])
    except UserError:
        raise
    except KeyError as exc:
        raise UserError(f"unknown lm-eval task {name} ({exc})") from None
    except Exception as exc:  # data loading raises many types (ConnectionError, FileNotFoundError, ValueError...)
        raise _load_error(spec, exc) from None
    leaves = loaded["tasks"]
    if spec.num_fewshot is not None and ctx.settings.num_fewshot is None:  # --num-fewshot: lm-eval decides
        for task in leaves.values():
            task.set_config(key="num_fewshot", value=int(spec.num_fewshot))
    if name in loaded.get("groups", {}):
        return [loaded["groups"][name]], leaves
    return list(leaves.values()), leaves


def run_lm_eval(ctx: Context) -> tuple[dict | None, dict[str, list[str]]]:
    """One simple_evaluate call over every lm-eval spec. Returns (raw output, spec -> leaf names)."""
    import lm_eval

    specs = [s for s in ctx.specs if s.kind == "lm_eval"]
    if not specs:
        return None, {}
    objects, leaves_of = [], {}
    for spec in specs:
        objs, leaves = _load_task_objects(ctx, spec)
        objects += objs
        leaves_of[spec.name] = sorted(leaves)
    seeds = ctx.settings.seeds()
    try:
        raw = lm_eval.simple_evaluate(
            model=ctx.lm, tasks=objects, task_manager=ctx.task_manager, num_fewshot=ctx.settings.num_fewshot,
            gen_kwargs=ctx.settings.gen_kwargs,
            limit=ctx.settings.limit, bootstrap_iters=0, log_samples=True, use_cache=None,
            apply_chat_template=ctx.settings.apply_chat_template, random_seed=seeds["random"],
            numpy_random_seed=seeds["numpy"], torch_random_seed=seeds["torch"],
            fewshot_random_seed=seeds["fewshot"], verbosity="ERROR")
    except ValueError as exc:
        if "Duplicate task" in str(exc):
            raise UserError(f"{exc}; the chosen suites/tasks overlap, drop one of them") from None
        raise
    return raw, leaves_of


def _num(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _first_metric(block: dict) -> str | None:
    for key in block:
        if "," in key and "_stderr" not in key.split(",")[0] and key not in ("name", "alias", "sample_len"):
            return key
    return None


ROLLING_TRANSFORMS = {"word_perplexity": "exp", "byte_perplexity": "exp", "bits_per_byte": "bits"}


def item_scores(records: list[dict], metric: str, flt: str, id_prefix: str) -> dict:
    """Per-item primary scores from lm-eval sample records (one task), keyed by a stable id."""
    ids, xs, num, den = [], [], [], []
    for r in records:
        if r.get("filter", "none") != flt or metric not in r:
            continue
        v = r[metric]
        ids.append(f"{id_prefix}:{r['doc_id']}")
        if isinstance(v, (list, tuple)) and len(v) == 2:      # loglikelihood_rolling: (loglik, units)
            num.append(-float(v[0]))
            den.append(float(v[1]))
        else:
            xs.append(float(v))
    if num:
        return {"kind": "ratio", "transform": ROLLING_TRANSFORMS.get(metric, "exp"), "ids": ids, "num": num, "den": den}
    return {"kind": "mean", "ids": ids, "x": xs}


def merge_items(parts: list[dict]) -> dict:
    parts = [p for p in parts if p.get("ids")]
    if not parts:
        return {"kind": "mean", "ids": [], "x": []}
    out = {k: (list(v) if isinstance(v, list) else v) for k, v in parts[0].items()}
    for p in parts[1:]:
        for k in ("ids", "x", "num", "den"):
            if k in p:
                out[k] = out.get(k, []) + list(p[k])
    return out


def lm_eval_entries(ctx: Context, raw: dict, leaves_of: dict[str, list[str]]):
    results = raw.get("results", {})
    samples = raw.get("samples", {})
    nsamples = raw.get("n-samples", {})
    hib = raw.get("higher_is_better", {})
    for spec in (s for s in ctx.specs if s.kind == "lm_eval"):
        name = ctx.lm_eval_names[spec.name]
        leaves = leaves_of[spec.name]
        metric_key = spec.metric
        if metric_key is None:
            metric_key = _first_metric(results.get(name, {}))
            if metric_key is None and leaves:
                metric_key = _first_metric(results.get(leaves[0], {}))
            if metric_key is None:
                raise UserError(f"lm-eval reported no metric for {spec.name}")
        metric, flt = metric_key.split(",", 1)
        if name in results and _num(results[name].get(metric_key)) is not None:
            value = _num(results[name][metric_key])
            stderr = _num(results[name].get(f"{metric}_stderr,{flt}"))
        else:  # a tag (no aggregate): macro mean over its tasks
            vals = [_num(results.get(l, {}).get(metric_key)) for l in leaves]
            vals = [v for v in vals if v is not None]
            if not vals:
                raise UserError(f"lm-eval reported no {metric_key} for {spec.name}; check the suite's metric key "
                                f"(reported: {', '.join(k for k in results.get(leaves[0], {}) if ',' in k)})")
            value, stderr = sum(vals) / len(vals), None
        n = sum(int(nsamples.get(l, {}).get("effective", 0)) for l in leaves)
        higher = spec.higher_is_better
        if higher is None:
            higher = bool(next((hib[l][metric] for l in leaves if metric in hib.get(l, {})), True))
        items = merge_items([item_scores(samples.get(l, []), metric, flt, l) for l in leaves])
        if stderr is None and items["kind"] == "mean" and len(items["x"]) > 1:
            xs = items["x"]
            mean = sum(xs) / len(xs)
            stderr = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) / len(xs))
        shots = {raw.get("n-shot", {}).get(l) for l in leaves} - {None}   # what lm-eval actually used
        # the task YAML's version: a changed prompt or metric makes two runs' numbers incomparable
        versions = {l: raw.get("versions", {}).get(l) for l in leaves}
        entry = {"suite": spec.suite, "kind": "lm_eval", "metric": metric_key, "value": value, "stderr": stderr,
                 "n": n, "chance": spec.chance, "higher_is_better": higher,
                 "num_fewshot": shots.pop() if len(shots) == 1 else spec.num_fewshot,
                 "version": versions[leaves[0]] if len(leaves) == 1 else versions,
                 "lm_eval_name": name if name != spec.name else None, "subtasks": leaves if len(leaves) > 1 else None}
        recs = [dict(r, task=l) for l in leaves for r in samples.get(l, [])]
        yield spec.name, entry, recs, items
