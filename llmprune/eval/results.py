"""`results.json` and its companions: the format, writing and reading.

`results.json` (written by `write_results`, read by `llmprune report`, the Hub card writer and
`--baseline`) has these top-level keys; everything else is optional extra detail:

    format_version  1
    model           {name, path, model_type, revision, dtype, parameters,
                     fingerprint}                               # of the weights measured (llmprune.io.identity;
                                                                # absent when they are not in a local folder)
    sparsity        {achieved, zeros, total, modules,          # counted from the weights (exact zeros)
                     target, method, pattern, recipe, allocation, targets}
                                                                # from llmprune.json / the sweep, may be null
    perplexity      {dataset: token_ppl}                        # e.g. {"wikitext2": 5.68}; lower is better
    perplexity_details {dataset: {source, text_sha256, seqlen, windows, tokens, nll_sum}}
    tasks           {task: {suite, kind, metric, value, stderr, n, chance, higher_is_better,
                            num_fewshot, version}}              # kind: lm_eval | probe | perplexity
                                                                # (perplexities appear here too, as
                                                                #  ppl_<dataset>, metric token_perplexity);
                                                                # version: lm-eval's task version(s)
    suites          {suite: {score, chance, tasks: [...], description}}
                    # score = macro mean of the primary metric over the suite's higher-is-better tasks
                    #         (null when it has none, e.g. perplexity only); chance = mean of their chances
    settings        {seqlen, max_length, batch_size, limit, ppl_data, data_dir, include_path,
                     softmax_dtype, apply_chat_template, num_fewshot, gen_kwargs, model_args, device}
    seed            {random, numpy, torch, fewshot}
    versions        {python, torch, transformers, lm_eval, llmprune, ...}
    command         the command line
    baseline        (only with --baseline) {path, model, sparsity, warnings,
                     tasks: {task: {value, dense_value, retained, retained_adj, floor, ci95, incomparable}},
                     suites: {suite: {retained, retained_adj, worst_task, worst_retained}},
                     perplexity: {dataset: {value, dense_value, retained, ratio, incomparable}}}
                    # retained = 100*pruned/dense (100*dense/pruned when lower is better);
                    # retained_adj = 100*(pruned-chance)/(dense-chance); ci95 = paired bootstrap of retained;
                    # incomparable = why the dense run's number cannot be paired with this one (then no retained)

Beside it: `lm_eval_results.json` (lm-eval's own output, samples removed), `samples/<task>.jsonl.gz`
(lm-eval per-sample logs, probe generations, perplexity windows) and `items.json.gz` (per-item primary
scores keyed by a stable id, used for the paired bootstrap in the report).
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmprune.errors import UserError

FORMAT_VERSION = 1


@dataclass
class EvalRun:
    results: dict[str, Any]                    # the results.json content
    lm_eval_raw: dict[str, Any] | None          # lm-eval output without samples
    samples: dict[str, list[dict]]             # task -> per-sample records (written gzipped)
    items: dict[str, dict]                     # task -> per-item scores for the paired bootstrap


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
