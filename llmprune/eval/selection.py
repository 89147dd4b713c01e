"""Which tasks a run evaluates: suites and ad-hoc `--tasks` flattened into task specs (perplexity
datasets included), and the packages those tasks need."""
from __future__ import annotations

import importlib.util

from llmprune.errors import UserError
from llmprune.eval.suites import Suite, TaskSpec, known_spec, ppl_task_name


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
