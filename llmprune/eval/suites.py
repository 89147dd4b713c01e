"""Eval suites: YAML files in `evals/` (installed as `llmprune.evals`) naming what to measure.

A suite file:

    name: knowledge
    description: closed-book parametric knowledge
    perplexity: [wikitext2]           # optional: paper-protocol PPL datasets (--ppl-data overrides)
    include: [reasoning_mc, ...]      # optional: a composite suite made of other suites
    tasks:
      - task: mmlu                    # exact lm-eval 0.4.x task / group / tag name
        metric: acc,none              # primary metric key "<metric>,<filter>" as lm-eval reports it
        num_fewshot: 5
        chance: 0.25                  # score of random guessing (0 for generative exact match)
        higher_is_better: true        # optional; default true
        requires: [langdetect]        # optional: extra pip packages, checked before running
      - probe: arithmetic             # a built-in probe (llmprune.eval.probes), no data download
        name: probe_arith_2digit      # optional; default probe_<kind>
        params: {n: 100, digits: 2}

Adding a suite is adding a YAML file (or passing a path to one). Task names must be unique across
the suites of one run (lm-eval refuses to run a task twice in one call).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from llmprune.errors import UserError

KINDS = ("lm_eval", "probe", "perplexity")


@dataclass
class TaskSpec:
    name: str                        # task name as reported (lm-eval name, probe_<kind>, ppl_<dataset>)
    suite: str
    kind: str = "lm_eval"            # lm_eval | probe | perplexity
    metric: str | None = None        # "<metric>,<filter>"; None = first metric lm-eval reports
    num_fewshot: int | None = None   # None = the task's own default
    chance: float | None = None
    higher_is_better: bool | None = None
    params: dict[str, Any] = field(default_factory=dict)
    requires: list[str] = field(default_factory=list)

    @property
    def metric_name(self) -> str:
        return (self.metric or "").split(",")[0]

    @property
    def metric_filter(self) -> str:
        parts = (self.metric or "").split(",", 1)
        return parts[1] if len(parts) == 2 else "none"


@dataclass
class Suite:
    name: str
    description: str = ""
    tasks: list[TaskSpec] = field(default_factory=list)
    perplexity: list[str] = field(default_factory=list)
    path: str = ""


def available_suites() -> list[str]:
    root = resources.files("llmprune.evals")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(name_or_path: str) -> tuple[dict, str]:
    import yaml

    path = Path(name_or_path).expanduser()
    if name_or_path.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise UserError(f"suite file {name_or_path} does not exist")
        text, where = path.read_text(), str(path.resolve())
    else:
        res = resources.files("llmprune.evals") / f"{name_or_path}.yaml"
        if not res.is_file():
            raise UserError(f"unknown suite {name_or_path!r}; choose from {', '.join(available_suites())} "
                            "or give a path to a suite .yaml")
        text, where = res.read_text(), f"llmprune.evals/{name_or_path}.yaml"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"suite {where} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"suite {where} must be a mapping with 'name' and 'tasks'")
    return data, where


def _task_spec(entry: Any, suite: str, where: str) -> TaskSpec:
    if isinstance(entry, str):
        entry = {"task": entry}
    if not isinstance(entry, dict) or not (("task" in entry) ^ ("probe" in entry)):
        raise UserError(f"{where}: each task entry needs exactly one of 'task' or 'probe' (got {entry!r})")
    known = {"task", "probe", "name", "metric", "num_fewshot", "chance", "higher_is_better", "params", "requires"}
    unknown = set(entry) - known
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} in task entry {entry!r}")
    chance = entry.get("chance")
    if chance is not None and not isinstance(chance, (int, float)):
        raise UserError(f"{where}: chance must be a number (task {entry})")
    if "probe" in entry:
        from llmprune.eval.probes import PROBES

        kind = entry["probe"]
        if kind not in PROBES:
            raise UserError(f"{where}: unknown probe {kind!r}; choose from {', '.join(PROBES)}")
        return TaskSpec(name=str(entry.get("name") or f"probe_{kind}"), suite=suite, kind="probe",
                        metric="exact_match,none",
                        num_fewshot=None, chance=float(chance or 0.0), higher_is_better=True,
                        params={"probe": kind, **(entry.get("params") or {})})
    metric = entry.get("metric")
    if metric is not None and "," not in str(metric):
        metric = f"{metric},none"
    return TaskSpec(name=str(entry["task"]), suite=suite, kind="lm_eval", metric=metric,
                    num_fewshot=entry.get("num_fewshot"), chance=None if chance is None else float(chance),
                    higher_is_better=entry.get("higher_is_better"), params=dict(entry.get("params") or {}),
                    requires=list(entry.get("requires") or []))


def load_suite(name_or_path: str, _seen: tuple[str, ...] = ()) -> list[Suite]:
    """One suite, or the suites a composite suite includes (in order)."""
    if name_or_path in _seen:
        raise UserError(f"suite {name_or_path} includes itself")
    data, where = _read_yaml(name_or_path)
    name = str(data.get("name") or Path(name_or_path).stem)
    if "include" in data:
        out: list[Suite] = []
        for sub in data["include"] or []:
            out.extend(load_suite(str(sub), _seen + (name_or_path,)))
        return out
    tasks = data.get("tasks") or []
    if not isinstance(tasks, list):
        raise UserError(f"{where}: 'tasks' must be a list")
    ppl = data.get("perplexity") or []
    if isinstance(ppl, str):
        ppl = [ppl]
    if not tasks and not ppl:
        raise UserError(f"{where}: a suite needs 'tasks', 'perplexity' or 'include'")
    return [Suite(name=name, description=str(data.get("description", "")).strip(),
                  tasks=[_task_spec(t, name, where) for t in tasks], perplexity=[str(p) for p in ppl],
                  path=where)]


def load_suites(names: list[str]) -> list[Suite]:
    out: list[Suite] = []
    for n in names:
        for s in load_suite(n):
            if all(s.name != o.name for o in out):
                out.append(s)
    return out


def ppl_task_name(dataset: str) -> str:
    """`wikitext2` -> `ppl_wikitext2`; a file path -> `ppl_<file stem>`."""
    from llmprune.calibration.data import NAMED_SOURCES

    return f"ppl_{dataset if dataset in NAMED_SOURCES else Path(dataset).stem}"


def known_spec(task: str) -> TaskSpec | None:
    """The spec of `task` in any installed suite (used to fill metric/chance for --tasks)."""
    for name in available_suites():
        try:
            suites = load_suite(name)
        except UserError:
            continue
        for s in suites:
            for t in s.tasks:
                if t.name == task:
                    return t
    return None
