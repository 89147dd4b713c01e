"""lm-eval's task index: the cached `TaskManager`, group/tag expansion into leaf tasks, and pointing
tasks at local data (`--data-dir`, written by `--export-data`) instead of the Hub, with the offline
check that runs before a model is loaded."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from llmprune.errors import UserError
from llmprune.eval.suites import TaskSpec

GENERATED_PREFIX = "llmprune_local__"
DATA_SUFFIXES = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


_TASK_MANAGERS: dict[tuple, Any] = {}


def task_manager(include_path: list[str], include_defaults: bool):
    """A cached TaskManager (indexing the ~15k built-in YAMLs takes ~15 s; do it once per process)."""
    from lm_eval.tasks import TaskManager

    key = (tuple(include_path), include_defaults)
    if key not in _TASK_MANAGERS:
        _TASK_MANAGERS[key] = TaskManager(include_path=list(include_path) or None,
                                          include_defaults=include_defaults)
    return _TASK_MANAGERS[key]


def index_for(names: list[str], include_path: list[str]):
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
    index = index_for([s.name for s in lm_specs], include).task_index
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
