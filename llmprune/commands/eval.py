"""`llmprune eval MODEL [--suite ...] [--tasks ...] [--ppl-data ...] --output RESULTS_DIR`
(and `llmprune eval --export-data DIR --suite ...` on a connected machine)."""
from __future__ import annotations

import argparse

from llmprune.commands import add_model_args

DEFAULT_SUITES = "lm,probes"


def add_eval_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by `eval` and `sweep`."""
    p.add_argument("--suite", default=None,
                   help=f"comma-separated suites: lm, knowledge, reasoning (= reasoning_mc + reasoning_gen), "
                        f"instruction, probes, or a path to a suite .yaml (default: {DEFAULT_SUITES} "
                        "unless --tasks/--ppl-data is given)")
    p.add_argument("--tasks", default=None, help="extra lm-eval task names, comma-separated")
    p.add_argument("--ppl-data", default=None,
                   help="comma-separated perplexity datasets: wikitext2 | c4 | stdlib | PATH (.txt/.jsonl/.parquet); "
                        "replaces the suites' own list; 'none' for no perplexity")
    p.add_argument("--seqlen", type=int, default=None,
                   help="perplexity window and lm-eval max_length (default 2048, or the model's maximum if smaller)")
    p.add_argument("--limit", type=float, default=None,
                   help="at most N items per task and probe (the first N, so runs stay paired); <1 means a "
                        "fraction; perplexity always uses the whole text")
    p.add_argument("--batch-size", default="auto", help="auto | N (auto = detected on CUDA, 8 on CPU)")
    p.add_argument("--data-dir", default=None,
                   help="offline: read lm-eval task data from this directory (written by --export-data)")
    p.add_argument("--include-path", action="append", default=[],
                   help="directory of extra lm-eval task YAMLs (repeatable)")
    p.add_argument("--apply-chat-template", action="store_true", help="format prompts with the model's chat template")
    p.add_argument("--eval-seed", type=int, default=0, help="lm-eval seeds (few-shot sampling); default 0")
    p.add_argument("--num-fewshot", type=int, default=None, metavar="N",
                   help="lm-eval's --num_fewshot: few-shot examples for every lm-eval task, replacing the suites' "
                        "own counts (tasks whose YAML fixes 0 shots stay zero-shot, as in lm-eval)")
    p.add_argument("--gen-kwargs", default=None, metavar="K=V,...",
                   help="lm-eval's --gen_kwargs for generation tasks, e.g. temperature=0,max_gen_toks=256")
    p.add_argument("--model-args", default=None, metavar="K=V,...",
                   help="lm-eval's --model_args for its HF model wrapper, e.g. add_bos_token=True "
                        "(MODEL, --dtype, --device, --batch-size and --seqlen are set by their own flags)")
    add_model_args(p)


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model: perplexity, lm-eval suites, probes",
                       description="Evaluate MODEL on paper-protocol perplexity, lm-eval task suites and "
                                   "built-in probes; write RESULTS_DIR/results.json (+ lm-eval output and "
                                   "per-sample logs). With --export-data DIR, download the suites' task "
                                   "data instead (run it where the Hub is reachable; use --data-dir offline).")
    p.add_argument("model", nargs="?", help="Hub id, local directory, or 'llmprune-tiny'")
    add_eval_args(p)
    p.add_argument("--baseline", default=None, help="a dense RESULTS_DIR: add retained %% per task/suite")
    p.add_argument("--export-data", metavar="DIR", default=None,
                   help="write the lm-eval task data of the chosen suites/tasks to DIR and exit (no model)")
    p.add_argument("--output", "-o", default=None, help="results directory (must not exist unless --overwrite)")
    p.set_defaults(func=run)


def _csv(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def parse_eval_args(args: argparse.Namespace):
    """Suites, specs and settings from the flags; everything checked before a model is loaded."""
    from llmprune.calibration.data import check_source
    from llmprune.errors import UserError
    from llmprune.eval.selection import select_specs
    from llmprune.eval.settings import Settings
    from llmprune.eval.suites import load_suites

    tasks = _csv(args.tasks)
    ppl = None
    if args.ppl_data is not None:
        ppl = [] if args.ppl_data.strip().lower() == "none" else _csv(args.ppl_data)
        for p in ppl:
            check_source(p, "--ppl-data")
    suite_names = _csv(args.suite) if args.suite else ([] if (tasks or ppl) else _csv(DEFAULT_SUITES))
    suites = load_suites(suite_names)
    specs = select_specs(suites, tasks, ppl)
    if args.limit is not None and args.limit <= 0:
        raise UserError("--limit must be positive")
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    bs = str(args.batch_size)
    if bs != "auto" and not (bs.isdigit() and int(bs) > 0):
        raise UserError(f"--batch-size must be auto or a positive integer (got {args.batch_size})")
    if args.seqlen is not None and args.seqlen < 16:
        raise UserError("--seqlen must be at least 16")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UserError("--num-fewshot must be 0 or more")
    if args.data_dir is not None:
        from pathlib import Path

        if not Path(args.data_dir).expanduser().is_dir():
            raise UserError(f"--data-dir {args.data_dir} does not exist; create it with "
                            f"`llmprune eval --export-data {args.data_dir} --suite ...` on a connected machine")
    from llmprune.eval.settings import parse_gen_kwargs, parse_model_args

    settings = Settings(seqlen=args.seqlen or 2048, max_length=args.seqlen or 2048, batch_size=args.batch_size,
                        limit=limit, ppl_data=ppl, data_dir=args.data_dir, include_path=list(args.include_path),
                        seed=args.eval_seed, apply_chat_template=args.apply_chat_template,
                        progress=not args.quiet, num_fewshot=args.num_fewshot,
                        gen_kwargs=parse_gen_kwargs(args.gen_kwargs), model_args=parse_model_args(args.model_args))
    return suites, specs, settings


def check_model_and_hub_data(args: argparse.Namespace, specs) -> None:
    """MODEL exists (locally, in the Hub cache or on a reachable Hub), then the data of the specs: with
    the Hub unreachable, switch to the cache now, quietly (cached data still works; what is missing then
    fails at once with one line, not after minutes of retries)."""
    from llmprune.calibration.data import check_source
    from llmprune.io.load import resolve_model_path

    resolve_model_path(args.model, args.revision)
    if args.data_dir:
        return
    for spec in specs:
        if spec.kind == "perplexity":
            check_source(spec.params["data"], "--ppl-data")
    if any(s.kind == "lm_eval" for s in specs):
        from llmprune.eval.tasks import check_task_data_offline
        from llmprune.io.network import hub_or_cache

        if not hub_or_cache():
            check_task_data_offline(specs, list(args.include_path))


def load_for_eval(args: argparse.Namespace, settings, allow_packed: bool = False):
    """Load model + tokenizer, place the model, and fix seqlen / max_length against the model.
    allow_packed: load a packed 2:4 checkpoint with llmprune.load_pretrained (else it is refused)."""
    from llmprune.errors import UserError
    from llmprune.io.checkpoint import packed_checkpoint_info
    from llmprune.io.load import load_model, load_tokenizer, resolve_device, resolve_model_path, torch_dtype

    torch_dtype(args.dtype, "--dtype")
    device = resolve_device(args.device, "--device")
    path = resolve_model_path(args.model, args.revision)
    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code, revision=args.revision)
    if settings.apply_chat_template and not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{args.model} has no chat template (its tokenizer_config.json / chat_template.jinja define "
                        "none), so --apply-chat-template cannot format prompts; drop the flag")
    if allow_packed and packed_checkpoint_info(path) is not None:
        from llmprune.kernels import load_pretrained

        dtype = None if args.dtype == "auto" else torch_dtype(args.dtype)
        model = load_pretrained(path, device=device, dtype=dtype, trust_remote_code=args.trust_remote_code)
    else:
        model = load_model(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                           revision=args.revision)
        model.to(device)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if args.seqlen is None and max_pos:
        settings.seqlen = settings.max_length = min(2048, int(max_pos))
    elif args.seqlen is not None and max_pos and args.seqlen > max_pos:
        raise UserError(f"--seqlen {args.seqlen} exceeds the model's max_position_embeddings ({max_pos}); "
                        f"use --seqlen {max_pos} or less")
    return model, tokenizer, path


def sidecar_sparsity(path: str) -> dict:
    """How an llmprune output was made (recipe label, target, pattern, parameters removed), from its
    llmprune.json; empty for a model that is not an llmprune output, or whose sidecar is damaged (that
    only costs the labels of the results)."""
    from llmprune.errors import UserError
    from llmprune.io.sidecar import eval_summary

    try:
        return eval_summary(path)
    except UserError:
        return {}


def weights_fingerprint(path: str, revision: str | None = None) -> str | None:
    """The fingerprint of the weights being evaluated (llmprune.io.identity), recorded in results.json
    so that `card` and `push` can tell results of these weights from results of others. None when the
    weights are not in a local folder (a Hub model that is not in the cache)."""
    from pathlib import Path

    from llmprune.io.identity import hub_cache_dir, model_fingerprint

    folder = Path(path) if Path(path).is_dir() else hub_cache_dir(path, revision)
    return model_fingerprint(folder) if folder is not None else None


def task_table(results: dict) -> str:
    base = (results.get("baseline") or {}).get("tasks", {})
    lines = [f"{'suite':<14} {'task':<26} {'metric':<30} {'value':>10}" + (f" {'retained%':>10}" if base else "")]
    for name, t in results["tasks"].items():
        v = t["value"]
        vs = "n/a" if v is None else (f"{v:.4g}" if abs(v) >= 10 else f"{v:.4f}")
        row = f"{t['suite']:<14} {name:<26} {str(t['metric']):<30} {vs:>10}"
        if base:
            r = (base.get(name) or {}).get("retained")
            row += f" {'n/a' if r is None else f'{r:.1f}':>10}"
        lines.append(row)
    sp = results["sparsity"]
    lines.append(f"achieved sparsity {sp['achieved']:.2%} over {sp['modules']} matrices")
    if sp.get("parameters"):
        lines.append(f"parameters {sp['parameters']['after']:,} of {sp['parameters']['before']:,} "
                     f"({sp['removed']:.2%} removed or zero) · {sp.get('recipe')}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from llmprune.errors import UserError
    from llmprune.io.save import check_output_dir, output_dir

    suites, specs, settings = parse_eval_args(args)
    if args.export_data:
        from llmprune.eval.export import export_data

        if args.model:
            raise UserError("--export-data downloads task data only; drop MODEL (or drop --export-data to evaluate)")
        from llmprune.io.network import hub_reachable, why_offline

        check_output_dir(args.export_data, args.overwrite, inputs=list(args.include_path))
        if not hub_reachable():
            raise UserError(f"--export-data downloads task data from the Hugging Face Hub, but {why_offline()}; "
                            "run it on a connected machine and copy DIR here")
        with output_dir(args.export_data, args.overwrite, inputs=list(args.include_path)) as tmp:
            manifest = export_data(specs, tmp, args.include_path, progress=not args.quiet)
        print(f"exported {len(manifest['tasks'])} task(s) and {len(manifest['perplexity'])} perplexity text(s) "
              f"to {args.export_data}; "
              f"offline, pass --data-dir {args.export_data}")
        return 0
    if not args.model:
        raise UserError("give MODEL (a Hub id, a local directory or llmprune-tiny), or --export-data DIR")
    if not args.output:
        raise UserError("give --output RESULTS_DIR")
    from llmprune.io.load import model_input_path

    # --overwrite must never delete an input; MODEL/eval is the documented place for results, so inside is fine.
    inputs = [args.baseline, args.data_dir, *args.include_path, *(_csv(args.ppl_data) if args.ppl_data else [])]
    model_dir = [model_input_path(args.model)]
    check_output_dir(args.output, args.overwrite, inputs=inputs, inside_ok=model_dir)
    check_model_and_hub_data(args, specs)
    dense = dense_items = None
    if args.baseline:
        from llmprune.eval.results import read_items, read_results

        dense = read_results(args.baseline)
        dense_items = read_items(args.baseline)

    from llmprune.eval import harness
    from llmprune.eval.results import write_results

    model, tokenizer, path = load_for_eval(args, settings, allow_packed=True)
    if dense is not None:   # seqlen is known now: refuse an incomparable baseline before the evaluation
        from llmprune.eval.comparable import check_run_wide
        from llmprune.eval.settings import settings_record

        planned = {"settings": settings_record(settings, [s.params["data"] for s in specs if s.kind == "perplexity"],
                                               str(next(model.parameters()).device)), "seed": settings.seeds()}
        check_run_wide(dense, planned, run_name=args.model, dense_name=args.baseline)
    ctx = harness.prepare(model, tokenizer, suites, specs, settings)
    try:
        run_ = harness.evaluate(ctx, model, tokenizer, model_name=args.model,
                                extra={"sparsity": sidecar_sparsity(path),
                                       "model": {"path": path, "fingerprint": weights_fingerprint(path, args.revision)}})
    finally:
        ctx.close()
    if dense is not None:
        from llmprune.eval.report import baseline_block

        run_.results["baseline"] = baseline_block(dense, run_.results, dense_items, run_.items)
        for warning in run_.results["baseline"]["warnings"]:
            print(f"llmprune: warning: {warning}", file=sys.stderr)
    with output_dir(args.output, args.overwrite, inputs=inputs, inside_ok=model_dir) as tmp:
        write_results(tmp, run_)
    print(task_table(run_.results))
    print(f"wrote {Path(args.output) / 'results.json'}")
    return 0
