"""`llmprune sweep MODEL --method wanda --sparsities 0,0.3,0.5,0.7 [--suite ...] --output DIR`.

Prunes in memory at each level (from the dense weights each time, not cumulatively), evaluates it
with one lm-eval task index, and writes

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
    p.add_argument("--method", required=True, help="magnitude | wanda | sparsegpt | width | layer-drop")
    p.add_argument("--sparsities", "--levels", dest="sparsities", default="0,0.3,0.5,0.7",
                   help="comma-separated levels; 0 = dense. Pruning methods: sparsity, a fraction (0.5) or N:M "
                        "(2:4); width: fraction of MLP neurons removed (0.25 keeps 75%%; with --heads also of "
                        "the attention heads); layer-drop: fraction of decoder layers removed")
    p.add_argument("--heads", action="store_true", help="width: remove the same fraction of attention heads too")
    p.add_argument("--allocation", choices=("uniform", "owl", "global"), default=None,
                   help="how sparsity is spread over layers (default uniform)")
    p.add_argument("--calib-data", default=None, help="c4 | wikitext2 | stdlib | PATH; default c4")
    p.add_argument("--calib-samples", type=int, default=None, help="calibration windows (default 128)")
    p.add_argument("--calib-seqlen", type=int, default=None, help="tokens per calibration window (default 2048, or the model's maximum if smaller)")
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


def level_recipe(args, level):
    """The one-stage recipe of a sweep level (validated before anything loads)."""
    from llmprune.errors import UserError
    from llmprune.recipe import Recipe
    from llmprune.stages import kind_for

    calib = dict(data=args.calib_data, samples=args.calib_samples, seqlen=args.calib_seqlen, seed=args.seed)
    kind = kind_for(args.method).name
    if kind == "prune":
        return Recipe.from_cli(args.method, level, allocation=args.allocation or "uniform", **calib)
    if args.allocation:
        raise UserError(f"--allocation is for pruning methods, not {args.method}")
    if isinstance(level, str):
        raise UserError(f"--levels: {level} is an N:M pattern; {args.method} levels are fractions removed")
    if kind == "width":
        keep = round(1 - level, 6)
        return Recipe.from_cli("width", mlp_keep=keep, heads_keep=keep if args.heads else None, **calib)
    if kind == "layer-drop":
        return Recipe.from_cli("layer-drop", layer_fraction=level, **calib)
    raise UserError(f"sweep does not support --method {args.method}")


def level_name(method: str, level) -> str:
    if level == 0:
        return "dense"
    return f"{method}-{str(level).replace(':', 'of')}"


def snapshot(model) -> dict:
    """CPU copies of every weight the compressor may change (the decoder matrices: linears, routers, each
    expert's slices of fused 3-D parameters, `arch.decoder_matrices`), to restore the dense model between
    levels without reloading it."""
    from llmprune.arch import decoder_matrices

    out = {}
    for name, matrix in decoder_matrices(model).items():
        bias = getattr(matrix.module, "bias", None) if matrix.role == "linear" else None
        out[name] = (matrix.weight.detach().to("cpu", copy=True),
                     None if bias is None else bias.detach().to("cpu", copy=True))
    return out


def restore(model, saved: dict) -> None:
    import torch

    from llmprune.arch import decoder_matrices

    matrices = decoder_matrices(model)
    with torch.no_grad():
        for name, (w, b) in saved.items():
            matrices[name].weight.copy_(w)
            if b is not None:
                matrices[name].module.bias.copy_(b)


def run(args: argparse.Namespace) -> int:
    import copy
    import json
    from pathlib import Path

    from llmprune.calibration.data import check_source
    from llmprune.commands.eval import check_model_and_hub_data, load_for_eval, parse_eval_args
    from llmprune.errors import UserError
    from llmprune.eval import harness
    from llmprune.eval.lm_eval_run import make_lm
    from llmprune.eval.results import write_results
    from llmprune.eval.report import build_report, summary_table
    from llmprune.io.save import check_output_dir, output_dir
    from llmprune.io.sidecar import base_model_entry, compress_sidecar, describe, removed_fraction

    levels = parse_levels(args.sparsities)
    suites, specs, settings = parse_eval_args(args)
    # Validate every recipe (method name, N:M, calibration flags) before loading anything.
    recipes = {str(l): level_recipe(args, l) for l in levels if l != 0}
    needs_data = any(r.needs_calibration() for r in recipes.values())
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
    from llmprune.api import check_recipe
    from llmprune.io.load import load_config

    config = load_config(args.model, args.trust_remote_code, args.revision)
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):                      # every level's counts/targets, before any weights load
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=args.trust_remote_code)
    for level, recipe in recipes.items():
        check_recipe(skeleton, recipe)
    model, tokenizer, path = load_for_eval(args, settings)
    calib = None
    if calib_cfg is not None:
        # One set of calibration windows for every level, so levels differ only in sparsity.
        from llmprune.api import calibration_set

        calib = calibration_set(model.config, tokenizer, next(iter(recipes.values())))
    dense = snapshot(model)
    ctx = harness.prepare(model, tokenizer, suites, specs, settings)
    dense_lm = ctx.lm
    structured = any(stage.kind != "prune" for r in recipes.values() for stage in r.stages)
    try:
        with output_dir(args.output, args.overwrite, inputs=inputs) as tmp:
            run_dirs = []
            for level in levels:
                name = level_name(args.method, level)
                restore(model, dense)
                extra = {"model": {"path": path}}
                comp = None
                subject = model
                if level != 0:
                    print(f"== {name}: {args.method} at {level}", flush=True)
                    recipe = recipes[str(level)]
                    if structured:    # shapes change: work on a copy, evaluate it through its own wrapper
                        subject = copy.deepcopy(model)
                        ctx.lm = make_lm(subject, tokenizer, settings.batch_size, settings.max_length,
                                                 settings.softmax_dtype)
                    _, comp = llmprune.compress(subject, tokenizer, recipe, calib=calib,
                                                device=args.device, progress=not args.quiet)
                    side = compress_sidecar(comp, base_model_entry(args.model))
                    extra["sparsity"] = {"target": level, "method": args.method,
                                         "pattern": side["sparsity"]["pattern"], "recipe": describe(side),
                                         "allocation": side["sparsity"]["allocation"]}
                    if structured:
                        extra["sparsity"].update(parameters=side["parameters"], removed=removed_fraction(side),
                                                 recipe=describe(side), target=None)
                else:
                    print("== dense", flush=True)
                    extra["sparsity"] = {"target": 0.0, "method": "dense", "pattern": "dense"}
                    ctx.lm = dense_lm
                result = harness.evaluate(ctx, subject, tokenizer, model_name=args.model, extra=extra)
                if comp is not None:
                    counted = result.results["sparsity"]["achieved"]
                    if not structured and abs(counted - comp.sparsity) > 1e-3:
                        raise UserError(f"internal check failed: compressor reports {comp.sparsity:.4f} sparsity "
                                        f"but the weights have {counted:.4f}")
                d = tmp / "runs" / name
                d.mkdir(parents=True)
                write_results(d, result)
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
