"""`llmprune sweep MODEL --method wanda --sparsities 0,0.3,0.5,0.7 [--suite ...] --output DIR`.

Prunes in memory at each level (from the dense weights each time, not cumulatively), evaluates it
with one lm-eval wrapper and task index, and writes

    DIR/runs/dense/                 results of the unpruned model (sparsity 0)
    DIR/runs/<method>-<level>/      results (+ compress.json: the compression report)
    DIR/report/                     report.md, report.csv, report.json, PNG curves
"""
from __future__ import annotations

import argparse


def register(sub) -> None:
    from llmprune.commands.eval import add_eval_args

    p = sub.add_parser("sweep", help="prune at several sparsities and evaluate each (report + curves)",
                       description="Prune MODEL in memory at each sparsity with --method, evaluate each level "
                                   "with the chosen suites, and write per-level results plus a report.")
    p.add_argument("model", help="Hub id, local directory, or 'llmprune-tiny'")
    p.add_argument("--method", required=True, help="magnitude | wanda | sparsegpt")
    p.add_argument("--sparsities", default="0,0.3,0.5,0.7",
                   help="comma-separated levels: fractions (0.5) or N:M patterns (2:4); 0 = dense")
    p.add_argument("--allocation", choices=("uniform", "owl", "global"), default=None,
                   help="how sparsity is spread over layers (default uniform)")
    p.add_argument("--calib-data", default=None, help="c4 | wikitext2 | stdlib | PATH; default c4")
    p.add_argument("--calib-samples", type=int, default=None, help="calibration windows (default 128)")
    p.add_argument("--calib-seqlen", type=int, default=None, help="tokens per calibration window (default 2048)")
    p.add_argument("--seed", type=int, default=None, help="calibration sampling seed (default 0)")
    add_eval_args(p)
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the report CIs")
    p.add_argument("--output", "-o", required=True, help="output directory (must not exist unless --overwrite)")
    p.set_defaults(func=run)


def parse_levels(text: str) -> list:
    from llmprune.errors import UserError

    levels: list = []
    for part in (t.strip() for t in text.split(",") if t.strip()):
        if ":" in part:
            n, _, m = part.partition(":")
            if not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
                raise UserError(f"--sparsities: {part} is not an N:M pattern like 2:4")
            levels.append(part)
            continue
        try:
            value = float(part)
        except ValueError:
            raise UserError(f"--sparsities: {part} is neither a fraction nor N:M") from None
        if not 0 <= value < 1:
            raise UserError(f"--sparsities: {part} must be in [0, 1)")
        levels.append(value)
    if not levels:
        raise UserError("--sparsities is empty")
    if len({str(l) for l in levels}) != len(levels):
        raise UserError("--sparsities has duplicates")
    return levels


def level_name(method: str, level) -> str:
    if level == 0:
        return "dense"
    return f"{method}-{str(level).replace(':', 'of')}"


def snapshot(model) -> dict:
    """CPU copies of every weight the compressor may change (the prunable linears), to restore the
    dense model between levels without reloading it."""
    from llmprune.arch import prunable_linears

    return {name: (mod.weight.detach().to("cpu", copy=True),
                   None if getattr(mod, "bias", None) is None else mod.bias.detach().to("cpu", copy=True))
            for name, mod in prunable_linears(model).items()}


def restore(model, saved: dict) -> None:
    import torch

    from llmprune.arch import prunable_linears

    mods = prunable_linears(model)
    with torch.no_grad():
        for name, (w, b) in saved.items():
            mods[name].weight.copy_(w)
            if b is not None:
                mods[name].bias.copy_(b)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from llmprune.calibration.data import check_source
    from llmprune.commands.eval import check_model_and_hub_data, load_for_eval, parse_eval_args
    from llmprune.errors import UserError
    from llmprune.eval import harness
    from llmprune.eval.report import build_report, summary_table
    from llmprune.io.save import check_output_dir, output_dir
    from llmprune.recipe import Recipe

    levels = parse_levels(args.sparsities)
    suites, specs, settings = parse_eval_args(args)
    # Validate every recipe (method name, N:M, calibration flags) before loading anything.
    recipes = {str(l): Recipe.from_cli(args.method, l, allocation=args.allocation or "uniform",
                                       data=args.calib_data, samples=args.calib_samples,
                                       seqlen=args.calib_seqlen, seed=args.seed)
               for l in levels if l != 0}
    from llmprune.methods import get_method

    needs_data = any(get_method(st.method).needs or st.allocation == "owl"
                     for r in recipes.values() for st in r.stages)
    calib_cfg = next(iter(recipes.values())).calibration if recipes and needs_data else None
    if calib_cfg is not None:
        check_source(calib_cfg.data, check_hub=False)
    if args.bootstrap < 0:
        raise UserError("--bootstrap must be >= 0")
    from llmprune.io.load import model_input_path

    inputs = [model_input_path(args.model), args.calib_data, args.data_dir, *args.include_path,
              *(t.strip() for t in (args.ppl_data or "").split(","))]    # --overwrite never deletes them
    check_output_dir(args.output, args.overwrite, inputs=inputs)
    check_model_and_hub_data(args, specs)
    if calib_cfg is not None:
        check_source(calib_cfg.data)             # c4 / wikitext2 with the Hub unreachable: say so now

    import llmprune

    model, tokenizer, path = load_for_eval(args, settings)
    calib = None
    if calib_cfg is not None:
        # One set of calibration windows for every level, so levels differ only in sparsity.
        from llmprune.api import calibration_set

        calib = calibration_set(model.config, tokenizer, next(iter(recipes.values())))
    dense = snapshot(model)
    ctx = harness.prepare(model, tokenizer, suites, specs, settings)
    try:
        with output_dir(args.output, args.overwrite, inputs=inputs) as tmp:
            run_dirs = []
            for level in levels:
                name = level_name(args.method, level)
                restore(model, dense)
                extra = {"model": {"path": path}}
                comp = None
                if level != 0:
                    print(f"== {name}: pruning with {args.method} at {level}", flush=True)
                    _, comp = llmprune.compress(model, tokenizer, recipes[str(level)], calib=calib,
                                                device=args.device, progress=not args.quiet)
                    side = comp.sidecar()
                    extra["sparsity"] = {"target": level, "method": args.method,
                                         "pattern": side["sparsity"]["pattern"]}
                else:
                    print("== dense", flush=True)
                    extra["sparsity"] = {"target": 0.0, "method": "dense", "pattern": "dense"}
                result = harness.evaluate(ctx, model, tokenizer, model_name=args.model, extra=extra)
                if comp is not None:
                    counted = result.results["sparsity"]["achieved"]
                    if abs(counted - comp.sparsity) > 1e-3:
                        raise UserError(f"internal check failed: compressor reports {comp.sparsity:.4f} sparsity "
                                        f"but the weights have {counted:.4f}")
                d = tmp / "runs" / name
                d.mkdir(parents=True)
                harness.write_results(d, result)
                if comp is not None:
                    (d / "compress.json").write_text(json.dumps(side, indent=2, default=str) + "\n")
                run_dirs.append(d)
                print(f"   achieved sparsity {result.results['sparsity']['achieved']:.2%}; " + ", ".join(
                    f"{t}={v['value']:.4g}" for t, v in result.results["tasks"].items() if v["value"] is not None),
                    flush=True)
            (tmp / "report").mkdir()
            data = build_report([str(d) for d in run_dirs], tmp / "report", iters=args.bootstrap)
            # report.json points at the temporary directory; make paths relative to the output.
            for key in ("baseline",):
                data[key] = str(Path(data[key]).relative_to(tmp))
            data["runs"] = [str(Path(r).relative_to(tmp)) for r in data["runs"]]
            data["plots"] = [str(Path(p).relative_to(tmp)) for p in data["plots"]]
            (tmp / "report" / "report.json").write_text(json.dumps(data, indent=2) + "\n")
            md = (tmp / "report" / "report.md").read_text().replace(str(tmp) + "/", "")
            (tmp / "report" / "report.md").write_text(md)
    finally:
        ctx.close()
        restore(model, dense)
    print(summary_table(data))
    print(f"wrote {Path(args.output) / 'report' / 'report.md'}")
    return 0
