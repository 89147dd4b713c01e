"""Evaluate an already-loaded model: paper-protocol perplexity, lm-eval tasks, probes.

`prepare` builds what a run needs besides the model once (the lm-eval wrapper, the task index, local
task data); `evaluate` measures the model as it is now and returns the content of results.json
(format: llmprune/eval/results.py). One `HFLM` and one `TaskManager` serve a whole sweep: pruning in
place changes the module the wrapper holds.

The other jobs live beside this module: settings.py (flags and lm-eval argument strings),
selection.py (suites -> task specs), tasks.py (lm-eval task index and local-data redirects),
lm_eval_run.py (running lm-eval and reading its output), export.py (data for offline machines),
results.py (the files).
"""
from __future__ import annotations

import hashlib
import math
import tempfile
from pathlib import Path
from typing import Any

from llmprune.errors import UserError
from llmprune.eval.lm_eval_run import lm_eval_entries, make_lm, run_lm_eval
from llmprune.eval.export import ppl_texts
from llmprune.eval.results import FORMAT_VERSION, EvalRun
from llmprune.eval.selection import check_requirements
from llmprune.eval.settings import Context, Settings, settings_record
from llmprune.eval.suites import Suite, TaskSpec
from llmprune.eval.tasks import index_for, write_redirect_groups


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
    tm = index_for([s.name for s in lm_specs], include)
    ctx.task_manager = tm
    ctx.lm_eval_names = {s.name: s.name for s in lm_specs}
    if settings.data_dir:
        from lm_eval.tasks._index import TaskIndex

        ctx.generated_dir = tempfile.mkdtemp(prefix="llmprune-tasks-")
        ctx.lm_eval_names = write_redirect_groups(lm_specs, tm.task_index, settings.data_dir, Path(ctx.generated_dir))
        # Add the generated groups to the cached index in place (rebuilding it costs ~15 s).
        tm.task_index.update(TaskIndex.build([Path(ctx.generated_dir)]))
    return ctx


def count_sparsity(model) -> dict[str, Any]:
    """Achieved sparsity over the decoder layers' matrices (nn.Linear weights and, in MoE models, routers
    and every expert's slices of the fused 3-D parameters: `arch.decoder_matrices`, what `llmprune compress`
    reports; for a family the registry does not know, every nn.Linear but the output head), counted as
    exact zeros in the weights."""
    import torch

    from llmprune.io.tensor_names import head_module_names

    heads = head_module_names(model)
    try:
        from llmprune.arch import decoder_matrices

        linears = decoder_matrices(model)
    except (ImportError, AttributeError, UserError, KeyError, NotImplementedError):
        linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in heads}
    zeros = total = 0
    for mod in linears.values():
        w = mod.weight
        zeros += int((w == 0).sum().item())
        total += w.numel()
    # packed 2:4 linears (llmprune.load_pretrained): every entry outside `values` is a zero
    packed = [m for n, m in model.named_modules() if hasattr(m, "bitmask") and hasattr(m, "values")
              and n not in heads]
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
            # an explicit --batch-size batches the windows too; auto sizes batches by their logits
            ppl_batch = (int(settings.batch_size) if str(settings.batch_size).isdigit() else
                         ppl_mod.auto_batch_size(settings.seqlen, model.config.get_text_config().vocab_size))
            res = ppl_mod.perplexity(model, tokenizer, texts, seqlen=settings.seqlen, name=data,
                                     batch_size=ppl_batch, progress=settings.progress)
            perplexity[key] = res.ppl
            # the text's hash tells `report` whether two runs measured the same text (a file may change)
            text_sha256 = hashlib.sha256("\0".join(texts).encode("utf-8", "surrogatepass")).hexdigest()
            details[key] = {"source": describe_source(data), "text_sha256": text_sha256, "seqlen": res.seqlen,
                            "windows": res.windows, "tokens": res.tokens, "nll_sum": res.nll_sum}
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
        for name, entry, recs, its in lm_eval_entries(ctx, raw, leaves_of):
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
        "settings": settings_record(settings, [s.params["data"] for s in ctx.specs if s.kind == "perplexity"],
                                    str(next(model.parameters()).device)),
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
