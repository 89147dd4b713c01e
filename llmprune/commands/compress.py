"""`llmprune compress MODEL --method ... --sparsity ... --output DIR`."""
from __future__ import annotations

import argparse
import sys
import time

from llmprune.commands import add_model_args


def register(sub) -> None:
    p = sub.add_parser("compress", help="prune a model (magnitude, Wanda, SparseGPT; uniform or OWL)",
                       description="Prune MODEL (a Hub id, a local save_pretrained dir, or llmprune-tiny) "
                                   "layer by layer and write a loadable checkpoint to --output.")
    p.add_argument("model", help="Hub id, local directory, or the embedded 'llmprune-tiny'")
    p.add_argument("--method", help="magnitude | wanda | sparsegpt (or use --recipe)")
    p.add_argument("--sparsity", help="fraction like 0.5 (unstructured) or N:M like 2:4 (N zeros per M inputs)")
    p.add_argument("--recipe", help="a named recipe (see `llmprune recipes`) or a YAML file")
    p.add_argument("--allocation", choices=("uniform", "owl", "global"), default=None,
                   help="how sparsity is spread over layers: uniform (default), owl (outlier-weighted), "
                        "global (magnitude only: one |W| ranking across matrices)")
    p.add_argument("--owl-m", type=float, default=None, help="OWL outlier threshold M (default 5)")
    p.add_argument("--owl-lambda", type=float, default=None, help="OWL λ: layer sparsities span a 2λ-wide window, S+mean(r)−2λ .. S+mean(r) (default 0.08)")
    p.add_argument("--min-density", type=float, default=None, help="global allocation: per-matrix minimum density")
    p.add_argument("--calib-data", default=None, help="c4 | wikitext2 | stdlib | PATH (.txt/.jsonl/.parquet); default c4")
    p.add_argument("--calib-samples", type=int, default=None, help="number of calibration windows (default 128)")
    p.add_argument("--calib-seqlen", type=int, default=None, help="tokens per window (default 2048)")
    p.add_argument("--seed", type=int, default=None, help="calibration sampling seed (default 0)")
    p.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=None,
                   help="prune the linears of each layer one after another, each calibrated on the already-pruned "
                        "ones' outputs, in one forward pass per layer (SparseGPT's --true-sequential: faster, but "
                        "holds a layer's activations for all calibration tokens at once). Default: on for "
                        "sparsegpt when that fits in half the free memory, off for wanda (the reference schedule)")
    p.add_argument("--targets", default=None, help="regex of module names to prune (default: all decoder linears)")
    p.add_argument("--ignore", default=None, help="regex of module names to leave dense")
    add_model_args(p)
    p.add_argument("--save-format", choices=("dense", "sparse24"), default="dense",
                   help="dense: plain HF safetensors with zeros (default); sparse24: packed 2:4 (load with "
                        "llmprune.load_pretrained)")
    p.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="push the output to this Hub repo")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    p.add_argument("--output", "-o", required=True, help="output directory (must not exist unless --overwrite)")
    p.set_defaults(func=run)


def build_recipe(args: argparse.Namespace):
    from llmprune.errors import UserError
    from llmprune.recipe import CALIB_KEYS, Recipe, load_recipe

    calib = {"data": args.calib_data, "samples": args.calib_samples, "seqlen": args.calib_seqlen, "seed": args.seed}
    stage_flags = {"allocation": args.allocation, "owl_m": args.owl_m, "owl_lambda": args.owl_lambda,
                   "min_density": args.min_density, "targets": args.targets, "ignore": args.ignore,
                   "true_sequential": args.true_sequential}
    if args.recipe:
        if args.method or args.sparsity:
            raise UserError("give either --recipe or --method/--sparsity, not both")
        recipe = load_recipe(args.recipe)
        data = recipe.to_dict()
        data["calibration"].update({k: v for k, v in calib.items() if v is not None})
        for stage in data["stages"]:
            stage.update({k: v for k, v in stage_flags.items() if v is not None})
        rebuilt = Recipe.from_dict(data, where=f"recipe {recipe.name}")
        rebuilt.name = recipe.name
        return rebuilt
    if not args.method or not args.sparsity:
        raise UserError("give --method and --sparsity (e.g. --method wanda --sparsity 0.5), or --recipe NAME")
    assert set(calib) <= set(CALIB_KEYS)
    return Recipe.from_cli(args.method, args.sparsity, allocation=args.allocation or "uniform",
                           **{k: v for k, v in stage_flags.items() if k != "allocation"}, **calib)


def run(args: argparse.Namespace) -> int:
    from llmprune.calibration.data import check_source
    from llmprune.errors import UserError
    from llmprune.io.save import check_output_dir, output_dir

    # Everything a user can get wrong is checked before the model is loaded.
    recipe = build_recipe(args)
    from llmprune.io.load import model_input_path, resolve_model_path

    inputs = [model_input_path(args.model), args.recipe, recipe.calibration.data]   # --overwrite never deletes them
    check_output_dir(args.output, args.overwrite, inputs=inputs)
    resolve_model_path(args.model, args.revision)      # a mistyped MODEL is reported before the data
    from llmprune.methods import get_method

    needs_calib = any(get_method(s.method).needs or s.allocation == "owl" for s in recipe.stages)
    if needs_calib:
        check_source(recipe.calibration.data, check_hub=False)   # a bad path now; Hub sources below
    if args.push_to_hub:
        from llmprune.io.hub import check_push_ready, check_repo_id

        check_repo_id(args.push_to_hub)
        check_push_ready()
    if args.save_format == "sparse24" and any(not s.pattern.is_nm or (s.pattern.n, s.pattern.m) != (2, 4)
                                              for s in recipe.stages[-1:]):
        raise UserError("--save-format sparse24 needs --sparsity 2:4")

    import torch
    from transformers import AutoModelForCausalLM

    from llmprune.api import calibration_set, check_recipe, compress
    from llmprune.arch import spec_for
    from llmprune.io.load import is_local_model, load_config, load_model, load_tokenizer, model_revision, \
        resolve_device, resolve_model_path, torch_dtype

    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    torch_dtype(args.dtype, "--dtype")
    device = resolve_device(args.device, "--device")
    t0 = time.perf_counter()
    config = load_config(args.model, args.trust_remote_code, args.revision)
    spec_for(config)                                   # unsupported family: fail before loading weights
    with torch.device("meta"):                         # check targets / N:M shapes without any weights
        check_recipe(AutoModelForCausalLM.from_config(config, trust_remote_code=args.trust_remote_code), recipe)
    if needs_calib:
        check_source(recipe.calibration.data)              # c4 / wikitext2 with the Hub unreachable: say so now
    # Only calibration needs a tokenizer; without one (magnitude) a folder lacking tokenizer files is fine.
    tokenizer = load_tokenizer(args.model, args.trust_remote_code, args.revision, required=needs_calib)
    if tokenizer is None:
        print(f"llmprune: note: {args.model} has no tokenizer files; the output will have none either",
              file=sys.stderr)
    calib = None
    if needs_calib:
        calib = calibration_set(config, tokenizer, recipe)   # too little text fails here, before the weights
    # CPUs without native bf16 (no AVX512-BF16/AMX) run half-precision matmuls very slowly: with
    # --dtype auto on such a CPU, work in float32 and write the checkpoint back in its own dtype.
    save_dtype = None
    work_dtype = args.dtype
    if (args.dtype == "auto" and device == "cpu" and not _cpu_has_fast_bf16()
            and getattr(config, "dtype", None) in (torch.bfloat16, torch.float16)):
        work_dtype, save_dtype = "float32", config.dtype
    model = load_model(args.model, work_dtype, args.trust_remote_code, args.revision)
    model, report = compress(model, tokenizer, recipe, calib=calib, device=device, progress=not args.quiet)
    if save_dtype is not None:
        model.to(save_dtype)

    sidecar = {
        "kind": "compress",
        "base_model": {"id": args.model, "revision": model_revision(model) or args.revision,
                       "model_type": model.config.model_type, "path": resolve_model_path(args.model),
                       "local": is_local_model(args.model)},
        **report.sidecar(),
        "dtype": str(model.dtype).replace("torch.", ""),
        "save_format": args.save_format,
    }
    with output_dir(args.output, args.overwrite, inputs=inputs,
                    expected_bytes=sum(t.numel() * t.element_size() for t in model.state_dict().values())) as tmp:
        packed = write_checkpoint(model, tokenizer, tmp, args.save_format)
        if packed is not None:
            sidecar["pack"] = packed
        (tmp / "recipe.yaml").write_text(report.recipe.to_yaml())   # as run: defaults resolved
        sidecar["wall_time_s"] = round(time.perf_counter() - t0, 3)
        from llmprune.io.save import write_sidecar

        write_sidecar(tmp, sidecar)
    print(report.summary_table())
    print(f"wrote {args.output}")
    if args.push_to_hub:
        from llmprune.io.hub import push_output

        try:
            push_output(args.output, args.push_to_hub, private=args.private)
        except UserError as exc:
            raise UserError(f"{exc} (the model is saved in {args.output}; push it later with "
                            f"`llmprune push {args.output} {args.push_to_hub}`)") from None
    return 0


def _cpu_has_fast_bf16() -> bool:
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def write_checkpoint(model, tokenizer, directory, save_format: str) -> dict | None:
    """Dense HF checkpoint, or packed 2:4 (returns the sidecar's `pack` section)."""
    if save_format == "sparse24":
        from llmprune.kernels import save_sparse24

        return save_sparse24(model, tokenizer, directory)
    from llmprune.io.save import save_model

    save_model(model, tokenizer, directory)
    return None
