"""Evaluate an already-loaded model: paper-protocol perplexity, lm-eval tasks, probes.

`results.json` (written by `write_results`, read by `llmprune report`, the Hub card writer and
`--baseline`) has these top-level keys; everything else is optional extra detail:

    format_version  1
    model           {name, path, model_type, revision, dtype, parameters}
    sparsity        {achieved, zeros, total, modules,          # counted from the weights (exact zeros)
                     target, method, pattern}                   # from llmprune.json / the sweep, may be null
    perplexity      {dataset: token_ppl}                        # e.g. {"wikitext2": 5.68}; lower is better
    tasks           {task: {suite, kind, metric, value, stderr, n, chance, higher_is_better,
                            num_fewshot}}                       # kind: lm_eval | probe | perplexity
                                                                # (perplexities appear here too, as
                                                                #  ppl_<dataset>, metric token_perplexity)
    suites          {suite: {score, chance, tasks: [...], description}}
                    # score = macro mean of the primary metric over the suite's higher-is-better tasks
                    #         (null when it has none, e.g. perplexity only); chance = mean of their chances
    settings        {seqlen, max_length, batch_size, limit, ppl_data, data_dir, include_path,
                     softmax_dtype, apply_chat_template, num_fewshot, gen_kwargs, model_args, device}
    seed            {random, numpy, torch, fewshot}
    versions        {python, torch, transformers, lm_eval, llmprune, ...}
    command         the command line
    baseline        (only with --baseline) {path, model, sparsity,
                     tasks: {task: {value, dense_value, retained, retained_adj, floor, ci95}},
                     suites: {suite: {retained, retained_adj, worst_task, worst_retained}},
                     perplexity: {dataset: {value, dense_value, retained, ratio}}}
                    # retained = 100*pruned/dense (100*dense/pruned when lower is better);
                    # retained_adj = 100*(pruned-chance)/(dense-chance); ci95 = paired bootstrap of retained

Beside it: `lm_eval_results.json` (lm-eval's own output, samples removed), `samples/<task>.jsonl.gz`
(lm-eval per-sample logs, probe generations, perplexity windows) and `items.json.gz` (per-item primary
scores keyed by a stable id, used for the paired bootstrap in the report).

lm-eval facts this relies on (see the reference notes): the model is wrapped in `HFLM` with the
tokenizer, an explicit `max_length`, `batch_size` set on the wrapper (simple_evaluate ignores it for
LM objects) and float32 log-softmax; the request cache (`use_cache`) is never used because it keys on
the request, not the weights. One `HFLM` and one `TaskManager` serve a whole sweep: pruning in place
changes the module the wrapper holds.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmprune.errors import UserError
from llmprune.eval.suites import Suite, TaskSpec, known_spec, ppl_task_name

FORMAT_VERSION = 1
GENERATED_PREFIX = "llmprune_local__"
DATA_SUFFIXES = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


@dataclass
class Settings:
    seqlen: int = 2048
    max_length: int = 2048
    batch_size: int | str = 8
    limit: float | None = None
    ppl_data: list[str] | None = None          # None = each suite's own `perplexity` list
    data_dir: str | None = None
    include_path: list[str] = field(default_factory=list)
    seed: int = 0
    softmax_dtype: str = "float32"
    apply_chat_template: bool = False
    progress: bool = True
    num_fewshot: int | None = None             # lm-eval's --num_fewshot: overrides the suites' shots
    gen_kwargs: dict[str, Any] | None = None   # lm-eval's --gen_kwargs, for generate_until tasks
    model_args: dict[str, Any] = field(default_factory=dict)  # lm-eval's --model_args, given to HFLM

    def seeds(self) -> dict[str, int]:
        # lm-eval's defaults at seed 0 (python 0; numpy/torch/fewshot 1234), shifted together otherwise.
        return {"random": self.seed, "numpy": 1234 + self.seed, "torch": 1234 + self.seed,
                "fewshot": 1234 + self.seed}


@dataclass
class Context:
    """What a run needs besides the model: built once, reused across sparsity levels."""
    lm: Any                                    # lm_eval HFLM wrapping the model object
    task_manager: Any | None
    specs: list[TaskSpec]
    suites: list[Suite]
    settings: Settings
    lm_eval_names: dict[str, str] = field(default_factory=dict)   # spec name -> name to load/read
    generated_dir: str | None = None

    def close(self) -> None:
        if self.generated_dir:
            shutil.rmtree(self.generated_dir, ignore_errors=True)
            self.generated_dir = None


@dataclass
class EvalRun:
    results: dict[str, Any]                    # the results.json content
    lm_eval_raw: dict[str, Any] | None          # lm-eval output without samples
    samples: dict[str, list[dict]]             # task -> per-sample records (written gzipped)
    items: dict[str, dict]                     # task -> per-item scores for the paired bootstrap


# ----------------------------------------------------------------------------- task selection

def select_specs(suites: list[Suite], tasks: list[str], ppl_data: list[str] | None) -> list[TaskSpec]:
    """Flatten suites (+ ad-hoc --tasks) into task specs; perplexity datasets become specs too."""
    specs: list[TaskSpec] = []
    seen: set[str] = set()
    ppl_sets: list[str] = list(ppl_data) if ppl_data is not None else []
    for suite in suites:
        if ppl_data is None:
            ppl_sets += [p for p in suite.perplexity if p not in ppl_sets]
        for spec in suite.tasks:
            if spec.name in seen:
                continue
            seen.add(spec.name)
            specs.append(spec)
    for t in tasks:
        if t in seen:
            continue
        seen.add(t)
        known = known_spec(t)
        if known is not None:
            specs.append(TaskSpec(**{**known.__dict__, "suite": "custom"}))
        else:
            specs.append(TaskSpec(name=t, suite="custom"))
    ppl_suite = next((s.name for s in suites if s.perplexity), "lm")
    for p in ppl_sets:
        specs.insert(0, TaskSpec(name=ppl_task_name(p), suite=ppl_suite, kind="perplexity",
                                 metric="token_perplexity,none", higher_is_better=False, params={"data": p}))
    if not specs:
        raise UserError("nothing to evaluate; give --suite, --tasks or --ppl-data")
    return specs


def check_requirements(specs: list[TaskSpec]) -> None:
    missing = sorted({(r, s.name) for s in specs for r in s.requires if importlib.util.find_spec(r) is None})
    if missing:
        pkgs = sorted({r for r, _ in missing})
        tasks = sorted({t for _, t in missing})
        raise UserError(f"task(s) {', '.join(tasks)} need the package(s) {', '.join(pkgs)}; "
                        f"`pip install {' '.join(pkgs)}` or leave those tasks out")


# ----------------------------------------------------------------------------- lm-eval plumbing

def resolve_batch_size(batch_size: str | int, device) -> int | str:
    if isinstance(batch_size, int) or str(batch_size).isdigit():
        value = int(batch_size)
        if value < 1:
            raise UserError("--batch-size must be a positive integer or auto")
        return value
    if batch_size != "auto":
        raise UserError(f"--batch-size must be a positive integer or auto (got {batch_size})")
    # lm-eval's auto detection probes batch sizes until CUDA runs out of memory; a CPU has no such
    # signal (it would swap or get killed), so on CPU auto means a fixed modest batch.
    return "auto" if str(device).startswith("cuda") else 8


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


# lm-eval --model_args keys that llmprune sets itself, and the flag to use instead.
_OWN_MODEL_ARGS = {"pretrained": "MODEL", "tokenizer": "MODEL's tokenizer", "device": "--device", "dtype": "--dtype",
                   "revision": "--revision", "trust_remote_code": "--trust-remote-code",
                   "batch_size": "--batch-size", "max_batch_size": "--batch-size", "max_length": "--seqlen",
                   "softmax_dtype": "(always float32)"}


def parse_model_args(text: str | None) -> dict[str, Any]:
    """lm-eval's `--model_args k=v,k2=v2` (its own parser), checked against HFLM's parameters."""
    if not text:
        return {}
    import inspect

    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import simple_parse_args_string

    if any("=" not in part for part in text.split(",") if part.strip()):
        raise UserError(f"--model-args {text!r}: write key=value pairs separated by commas, e.g. add_bos_token=True")
    args = simple_parse_args_string(text)
    known = [n for n, p in inspect.signature(HFLM.__init__).parameters.items()
             if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    for key in args:
        if key in _OWN_MODEL_ARGS:
            raise UserError(f"--model-args {key}: llmprune sets it itself; use {_OWN_MODEL_ARGS[key]}")
        if key not in known:
            raise UserError(f"--model-args {key}: not a parameter of lm-eval's HF model; choose from "
                            f"{', '.join(k for k in known if k not in _OWN_MODEL_ARGS)}")
    return args


def parse_gen_kwargs(text: str | None) -> dict[str, Any] | None:
    """lm-eval's `--gen_kwargs k=v,...` (its own parser)."""
    if not text:
        return None
    from lm_eval.utils import simple_parse_args_string

    if any("=" not in part for part in text.split(",") if part.strip()):
        raise UserError(f"--gen-kwargs {text!r}: write key=value pairs separated by commas, e.g. temperature=0,max_gen_toks=256")
    return simple_parse_args_string(text) or None


_TASK_MANAGERS: dict[tuple, Any] = {}


def task_manager(include_path: list[str], include_defaults: bool):
    """A cached TaskManager (indexing the ~15k built-in YAMLs takes ~15 s; do it once per process)."""
    from lm_eval.tasks import TaskManager

    key = (tuple(include_path), include_defaults)
    if key not in _TASK_MANAGERS:
        _TASK_MANAGERS[key] = TaskManager(include_path=list(include_path) or None,
                                          include_defaults=include_defaults)
    return _TASK_MANAGERS[key]


def _index_for(names: list[str], include_path: list[str]):
    """The smallest TaskManager that knows every name (built-ins only when needed)."""
    if include_path:
        tm = task_manager(include_path, include_defaults=False)
        if all(n in tm.task_index for n in names):
            return tm
    tm = task_manager(include_path, include_defaults=True)
    unknown = [n for n in names if n not in tm.task_index]
    if unknown:
        raise UserError(f"unknown lm-eval task(s) {', '.join(unknown)}; check the name (`lm-eval ls tasks`) "
                        "or give the directory of your task YAMLs with --include-path")
    return tm


def leaf_tasks(index: dict, name: str, overrides: dict | None = None, _depth: int = 0) -> list[tuple[str, dict]]:
    """Leaf tasks of a task/group/tag name with the member overrides their groups apply."""
    from lm_eval.tasks._factory import GROUP_FIELD_NAMES
    from lm_eval.tasks._index import Kind

    overrides = dict(overrides or {})
    if _depth > 10:
        raise UserError(f"lm-eval group {name} nests too deeply")
    entry = index.get(name)
    if entry is None:
        raise UserError(f"unknown lm-eval task {name}")
    if entry.kind == Kind.TAG:
        return [(t, overrides) for t in sorted(entry.tags)]
    if entry.kind != Kind.GROUP:
        return [(name, overrides)]
    cfg = entry.cfg or {}
    group_overrides = {k: v for k, v in cfg.items() if k not in GROUP_FIELD_NAMES}
    out: list[tuple[str, dict]] = []
    for item in cfg.get("task") or []:
        merged = {**group_overrides, **overrides}
        if isinstance(item, str):
            out += leaf_tasks(index, item, merged, _depth + 1)
        elif isinstance(item, dict) and "task" in item and isinstance(item["task"], str):
            out += leaf_tasks(index, item["task"], {**merged, **{k: v for k, v in item.items() if k != "task"}},
                              _depth + 1)
        elif isinstance(item, dict) and "group" in item and item["group"] in index:
            out += leaf_tasks(index, item["group"], {**merged, **{k: v for k, v in item.items() if k != "group"}},
                              _depth + 1)
        else:
            raise UserError(f"lm-eval group {name} has an inline member llmprune cannot redirect to local data; "
                            "run without --data-dir")
    return out


# dataset_path values that name a `datasets` loader reading local files, not a Hub dataset
_LOCAL_LOADERS = ("json", "parquet", "csv", "text", "arrow", "pandas", "imagefolder", "audiofolder")


def check_task_data_offline(specs: list[TaskSpec], include_path: list[str]) -> None:
    """With the Hub unreachable: refuse, before any model is loaded, an lm-eval task whose Hub dataset
    is certainly not cached (one line: what to export). Indexing is cached, so a later run pays nothing."""
    from llmprune.io.network import dataset_maybe_cached, why_offline

    lm_specs = [s for s in specs if s.kind == "lm_eval"]
    if not lm_specs:
        return
    include = [str(Path(p).expanduser().resolve()) for p in include_path if Path(p).expanduser().is_dir()]
    index = _index_for([s.name for s in lm_specs], include).task_index
    for spec in lm_specs:
        for leaf, overrides in leaf_tasks(index, spec.name):
            path = overrides.get("dataset_path", (index[leaf].cfg or {}).get("dataset_path"))
            if not isinstance(path, str) or path in _LOCAL_LOADERS or Path(path).expanduser().exists():
                continue
            if not dataset_maybe_cached(path):
                raise UserError(f"task {spec.name}: its data ({path}) is not in the datasets cache and {why_offline()}; "
                                f"export it on a connected machine with `{export_command(spec)}` and pass --data-dir DIR")


def export_command(spec: TaskSpec) -> str:
    flag = f"--suite {spec.suite}" if spec.suite != "custom" else f"--tasks {spec.name}"
    return f"llmprune eval --export-data DIR {flag}"


def _local_files(data_dir: Path, leaf: str) -> dict[str, Path]:
    d = data_dir / leaf
    if not d.is_dir():
        return {}
    return {p.stem: p.resolve() for p in sorted(d.iterdir()) if p.suffix in DATA_SUFFIXES}


def write_redirect_groups(specs: list[TaskSpec], index: dict, data_dir: str, out_dir: Path) -> dict[str, str]:
    """Generate one group YAML per lm-eval spec whose members are its leaf tasks re-pointed at the
    exported files in `data_dir/<leaf>/<split>.parquet|jsonl`. Prompts, filters and metrics stay the
    built-in ones; only the data source changes. Returns {spec name: generated group name}."""
    import yaml

    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise UserError(f"--data-dir {data_dir} does not exist; create it with `llmprune eval --export-data {data_dir} ...`")
    names: dict[str, str] = {}
    for spec in specs:
        if spec.kind != "lm_eval":
            continue
        members = []
        for leaf, overrides in leaf_tasks(index, spec.name):
            files = _local_files(root, leaf)
            if not files:
                raise UserError(f"task {spec.name}: no local data for {leaf} in {root / leaf}; export it on a "
                                f"connected machine with `{export_command(spec)}` and copy DIR here")
            kinds = {DATA_SUFFIXES[p.suffix] for p in files.values()}
            if len(kinds) > 1:
                raise UserError(f"{root / leaf} mixes parquet and jsonl files; keep one format per task")
            cfg = index[leaf].cfg or {}
            member: dict[str, Any] = {**overrides, "task": leaf, "dataset_path": kinds.pop(), "dataset_name": None,
                                      "dataset_kwargs": {"data_files": {s: str(p) for s, p in files.items()}}}
            if cfg.get("custom_dataset") is not None:
                member["custom_dataset"] = None
            for key in SPLIT_KEYS:
                split = overrides.get(key, cfg.get(key))
                if split is None or split in files:
                    continue
                test = overrides.get("test_split", cfg.get("test_split"))
                if key in ("training_split", "fewshot_split") and not spec.num_fewshot:
                    member[key] = None     # 0-shot: a missing train split is fine (pitfall: fewshot_docs)
                elif key == "validation_split" and test in files:
                    member[key] = None     # lm-eval scores the test split when it has one
                else:
                    raise UserError(f"task {spec.name}: split {split!r} of {leaf} is missing in {root / leaf}; "
                                    f"re-export with `{export_command(spec)}`")
            if not any((member.get(k, cfg.get(k)) in files) for k in ("test_split", "validation_split")):
                raise UserError(f"task {spec.name}: {root / leaf} has neither its test nor validation split; "
                                f"re-export with `{export_command(spec)}`")
            members.append(member)
        group = GENERATED_PREFIX + spec.name
        metric, filt = spec.metric_name, spec.metric_filter
        doc: dict[str, Any] = {"group": group, "task": members, "metadata": {"version": 1.0}}
        if metric:
            is_group = index[spec.name].kind.name == "GROUP"
            doc["aggregate_metric_list"] = [{"metric": metric, "aggregation": "mean", "filter_list": [filt],
                                             "weight_by_size": bool(is_group)}]
        (out_dir / f"{group}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
        names[spec.name] = group
    return names


def prepare(model, tokenizer, suites: list[Suite], specs: list[TaskSpec], settings: Settings, lm=None) -> Context:
    """Build the HFLM wrapper and the task index once; redirect tasks to --data-dir when given."""
    check_requirements(specs)
    lm = lm or make_lm(model, tokenizer, settings.batch_size, settings.max_length, settings.softmax_dtype,
                       settings.model_args)
    ctx = Context(lm=lm, task_manager=None, specs=specs, suites=suites, settings=settings)
    lm_specs = [s for s in specs if s.kind == "lm_eval"]
    if not lm_specs:
        return ctx
    include = [str(Path(p).expanduser().resolve()) for p in settings.include_path]
    for p in include:
        if not Path(p).is_dir():
            raise UserError(f"--include-path {p} is not a directory of lm-eval task YAMLs")
    tm = _index_for([s.name for s in lm_specs], include)
    ctx.task_manager = tm
    ctx.lm_eval_names = {s.name: s.name for s in lm_specs}
    if settings.data_dir:
        from lm_eval.tasks._index import TaskIndex

        ctx.generated_dir = tempfile.mkdtemp(prefix="llmprune-tasks-")
        ctx.lm_eval_names = write_redirect_groups(lm_specs, tm.task_index, settings.data_dir, Path(ctx.generated_dir))
        # Add the generated groups to the cached index in place (rebuilding it costs ~15 s).
        tm.task_index.update(TaskIndex.build([Path(ctx.generated_dir)]))
    return ctx


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


# ----------------------------------------------------------------------------- reading results

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


def _lm_eval_entries(ctx: Context, raw: dict, leaves_of: dict[str, list[str]]):
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
        entry = {"suite": spec.suite, "kind": "lm_eval", "metric": metric_key, "value": value, "stderr": stderr,
                 "n": n, "chance": spec.chance, "higher_is_better": higher,
                 "num_fewshot": shots.pop() if len(shots) == 1 else spec.num_fewshot,
                 "lm_eval_name": name if name != spec.name else None, "subtasks": leaves if len(leaves) > 1 else None}
        recs = [dict(r, task=l) for l in leaves for r in samples.get(l, [])]
        yield spec.name, entry, recs, items


# ----------------------------------------------------------------------------- the run

PPL_EXPORT_DIR = "_perplexity"     # --export-data writes wikitext2/c4 test text here as jsonl
HUB_PPL_SOURCES = ("wikitext2", "c4")


def ppl_texts(data: str, data_dir: str | None) -> list[str]:
    """Test documents of a perplexity source; named Hub sources come from --data-dir when exported."""
    from llmprune.calibration.data import load_texts, read_local_texts

    if data in HUB_PPL_SOURCES and data_dir:
        local = Path(data_dir).expanduser() / PPL_EXPORT_DIR / f"{data}.jsonl"
        if local.is_file():
            return read_local_texts(local)
    try:
        return load_texts(data, split="test")
    except UserError:
        if data not in HUB_PPL_SOURCES:
            raise
        from llmprune.io.network import hub_reachable, why_offline

        why = f"not in the datasets cache and {why_offline()}" if not hub_reachable() else "not available"
        raise UserError(f"perplexity data {data} is {why}; export it on a connected machine with "
                        f"`llmprune eval --export-data DIR --suite lm` and pass --data-dir DIR, or use "
                        f"--ppl-data stdlib or a local .txt/.jsonl") from None


def count_sparsity(model) -> dict[str, Any]:
    """Achieved sparsity over the prunable linears (decoder-layer nn.Linear weights, lm_head excluded),
    counted as exact zeros in the weights."""
    import torch

    try:
        from llmprune.arch import prunable_linears

        linears = prunable_linears(model)
    except (ImportError, AttributeError, UserError, KeyError, NotImplementedError):
        linears = {n: m for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and m is not model.get_output_embeddings()}
    zeros = total = 0
    for mod in linears.values():
        w = mod.weight
        zeros += int((w == 0).sum().item())
        total += w.numel()
    # packed 2:4 linears (llmprune.load_pretrained): every entry outside `values` is a zero
    packed = [m for m in model.modules() if hasattr(m, "bitmask") and hasattr(m, "values")
              and m is not model.get_output_embeddings()]
    for mod in packed:
        total += mod.out_features * mod.in_features
        zeros += mod.out_features * mod.in_features - int(torch.count_nonzero(mod.values))
    return {"achieved": zeros / total if total else 0.0, "zeros": zeros, "total": total,
            "modules": len(linears) + len(packed)}


def _model_info(model, name: str | None) -> dict[str, Any]:
    from llmprune.io.load import model_revision

    cfg = model.config
    dtype = next(model.parameters()).dtype
    return {"name": name or getattr(cfg, "_name_or_path", None) or type(model).__name__,
            "model_type": getattr(cfg, "model_type", None), "revision": model_revision(model),
            "dtype": str(dtype).replace("torch.", ""), "parameters": sum(p.numel() for p in model.parameters())}


def _suite_scores(suites: list[Suite], tasks: dict[str, dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    names = [s.name for s in suites] + sorted({t["suite"] for t in tasks.values()} - {s.name for s in suites})
    for sname in names:
        members = [n for n, t in tasks.items() if t["suite"] == sname]
        scored = [tasks[n] for n in members if tasks[n]["higher_is_better"] and tasks[n]["value"] is not None]
        chances = [t["chance"] for t in scored if t["chance"] is not None]
        desc = next((s.description for s in suites if s.name == sname), "")
        out[sname] = {"score": sum(t["value"] for t in scored) / len(scored) if scored else None,
                      "chance": sum(chances) / len(chances) if len(chances) == len(scored) and scored else None,
                      "tasks": members, "description": desc}
    return out


def evaluate(ctx: Context, model, tokenizer, model_name: str | None = None, extra: dict | None = None) -> EvalRun:
    """Evaluate the model as it is now (call again after pruning in place: nothing is cached)."""
    from llmprune.calibration.data import describe_source
    from llmprune.eval import ppl as ppl_mod
    from llmprune.eval import probes
    from llmprune.io.sidecar import command_line, versions

    settings = ctx.settings
    tasks: dict[str, dict] = {}
    perplexity: dict[str, float] = {}
    samples: dict[str, list[dict]] = {}
    items: dict[str, dict] = {}
    details: dict[str, dict] = {}

    for spec in ctx.specs:
        if spec.kind == "perplexity":
            data = spec.params["data"]
            key = spec.name[len("ppl_"):]
            texts = ppl_texts(data, settings.data_dir)
            # an explicit --batch-size batches the windows too; auto keeps 1 (fp32 logits of a
            # 2048-token window with a 128k vocabulary are already 1 GiB)
            ppl_batch = int(settings.batch_size) if str(settings.batch_size).isdigit() else 1
            res = ppl_mod.perplexity(model, tokenizer, texts, seqlen=settings.seqlen, name=data,
                                     batch_size=ppl_batch, progress=settings.progress)
            perplexity[key] = res.ppl
            details[key] = {"source": describe_source(data), "seqlen": res.seqlen, "windows": res.windows,
                            "tokens": res.tokens, "nll_sum": res.nll_sum}
            tasks[spec.name] = {"suite": spec.suite, "kind": "perplexity", "metric": spec.metric, "value": res.ppl,
                                "stderr": None, "n": res.windows, "chance": None, "higher_is_better": False,
                                "num_fewshot": None}
            ids = [f"{key}:{i}" for i in range(res.windows)]
            items[spec.name] = {"kind": "ratio", "transform": "exp", "ids": ids, "num": res.window_nll,
                                "den": [res.seqlen - 1] * res.windows}
            samples[spec.name] = [{"doc_id": i, "nll_sum": v, "tokens": res.seqlen - 1}
                                  for i, v in enumerate(res.window_nll)]
        elif spec.kind == "probe":
            value, recs = probes.run_probe(ctx.lm, spec.params, limit=settings.limit, progress=settings.progress)
            xs = [r["exact_match"] for r in recs]
            stderr = math.sqrt(value * (1 - value) / (len(xs) - 1)) if len(xs) > 1 else None
            tasks[spec.name] = {"suite": spec.suite, "kind": "probe", "metric": spec.metric, "value": value,
                                "stderr": stderr, "n": len(xs), "chance": spec.chance, "higher_is_better": True,
                                "num_fewshot": spec.params.get("shots"), "params": spec.params}
            items[spec.name] = {"kind": "mean", "ids": [f"{spec.name}:{r['doc_id']}" for r in recs], "x": xs}
            samples[spec.name] = recs

    raw, leaves_of = run_lm_eval(ctx)
    if raw is not None:
        for name, entry, recs, its in _lm_eval_entries(ctx, raw, leaves_of):
            tasks[name] = entry
            samples[name] = recs
            items[name] = its
        raw = {k: v for k, v in raw.items() if k != "samples"}

    # Keep the order of the specs (suites first-to-last) in the file.
    tasks = {s.name: tasks[s.name] for s in ctx.specs if s.name in tasks}
    results = {
        "format_version": FORMAT_VERSION,
        "model": _model_info(model, model_name),
        "sparsity": {**count_sparsity(model), "target": None, "method": None, "pattern": None},
        "perplexity": perplexity,
        "perplexity_details": details,
        "tasks": tasks,
        "suites": _suite_scores(ctx.suites, tasks),
        "settings": {"seqlen": settings.seqlen, "max_length": settings.max_length,
                     "batch_size": settings.batch_size, "limit": settings.limit,
                     "ppl_data": [s.params["data"] for s in ctx.specs if s.kind == "perplexity"],
                     "data_dir": settings.data_dir, "include_path": settings.include_path,
                     "softmax_dtype": settings.softmax_dtype, "apply_chat_template": settings.apply_chat_template,
                     "num_fewshot": settings.num_fewshot, "gen_kwargs": settings.gen_kwargs,
                     "model_args": settings.model_args,
                     "device": str(next(model.parameters()).device)},
        "seed": settings.seeds(),
        "versions": versions(),
        "command": command_line(),
    }
    if extra:
        for k, v in extra.items():
            if isinstance(v, dict) and isinstance(results.get(k), dict):
                results[k].update({kk: vv for kk, vv in v.items() if vv is not None})
            else:
                results[k] = v
    return EvalRun(results=results, lm_eval_raw=raw, samples=samples, items=items)


# ----------------------------------------------------------------------------- files

def _json_default(obj):
    try:
        from lm_eval.utils import handle_non_serializable

        return handle_non_serializable(obj)
    except ImportError:  # pragma: no cover
        return str(obj)


def write_results(directory: str | Path, run: EvalRun) -> Path:
    """Write results.json and its companions into an (already atomic, temporary) directory."""
    d = Path(directory)
    (d / "samples").mkdir(parents=True, exist_ok=True)
    (d / "results.json").write_text(json.dumps(run.results, indent=2, default=_json_default) + "\n")
    if run.lm_eval_raw is not None:
        (d / "lm_eval_results.json").write_text(json.dumps(run.lm_eval_raw, indent=2, default=_json_default) + "\n")
    for task, recs in run.samples.items():
        with gzip.open(d / "samples" / f"{task}.jsonl.gz", "wt") as fh:
            for r in recs:
                fh.write(json.dumps(r, default=_json_default) + "\n")
    with gzip.open(d / "items.json.gz", "wt") as fh:
        json.dump(run.items, fh)
    return d / "results.json"


def read_results(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / "results.json"
    if not path.is_file():
        raise UserError(f"{directory} has no results.json; run `llmprune eval ... --output {directory}` first")
    from llmprune.io.files import read_json

    data = read_json(path, "results file", "rerun `llmprune eval`")
    for key in ("tasks", "perplexity", "sparsity", "model"):
        if key not in data:
            raise UserError(f"{path} is not an llmprune results file (no '{key}')")
    data["_dir"] = str(Path(directory).resolve())
    return data


def read_items(directory: str | Path) -> dict[str, dict]:
    path = Path(directory) / "items.json.gz"
    if not path.is_file():
        return {}
    with gzip.open(path, "rt") as fh:
        return json.load(fh)


# ----------------------------------------------------------------------------- export (connected machine)

def export_data(specs: list[TaskSpec], out_dir: Path, include_path: list[str] | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Download each lm-eval task's splits (as its YAML loads them) and write
    `out_dir/<leaf task>/<split>.parquet` plus `manifest.json`. Run where the Hub is reachable."""
    import hashlib

    from tqdm.auto import tqdm

    from llmprune.io.sidecar import versions

    from llmprune.calibration.data import load_texts
    from llmprune.eval.ppl import protocol_for

    lm_specs = [s for s in specs if s.kind == "lm_eval"]
    ppl_specs = [s for s in specs if s.kind == "perplexity" and s.params["data"] in HUB_PPL_SOURCES]
    if not lm_specs and not ppl_specs:
        raise UserError("nothing to export: the chosen suites need no downloaded data (probes, local files)")
    manifest: dict[str, Any] = {"versions": versions(), "tasks": {}, "perplexity": {}}
    for spec in ppl_specs:
        name = spec.params["data"]
        texts = load_texts(name, split="test")
        max_docs = protocol_for(name)[1]
        texts = texts[:max_docs] if max_docs else texts
        (out_dir / PPL_EXPORT_DIR).mkdir(exist_ok=True)
        path = out_dir / PPL_EXPORT_DIR / f"{name}.jsonl"
        with open(path, "w") as fh:
            fh.writelines(json.dumps({"text": t}) + "\n" for t in texts)
        manifest["perplexity"][name] = {"docs": len(texts), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    include = [str(Path(p).expanduser().resolve()) for p in (include_path or [])]
    tm = _index_for([s.name for s in lm_specs], include) if lm_specs else None
    for spec in tqdm(lm_specs, desc="export", disable=not progress):
        try:
            loaded = tm.load([spec.name])
        except Exception as exc:
            raise UserError(f"could not download data for {spec.name}: {type(exc).__name__}: "
                            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from None
        for leaf, task in sorted(loaded["tasks"].items()):
            dataset = getattr(task, "dataset", None)
            if dataset is None:
                raise UserError(f"task {leaf} has no dataset object to export")
            leaf_dir = out_dir / leaf
            leaf_dir.mkdir(parents=True, exist_ok=True)
            files = {}
            for split in dataset:
                path = leaf_dir / f"{split}.parquet"
                dataset[split].to_parquet(str(path))
                files[split] = {"rows": len(dataset[split]),
                                "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
            manifest["tasks"][leaf] = {"suite_task": spec.name, "splits": files}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def offline_mode() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover
        return os.environ.get("HF_HUB_OFFLINE") == "1"
