"""`llmprune compress MODEL --method ... --sparsity ... --output DIR`."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from llmprune.commands import add_model_args


def register(sub) -> None:
    p = sub.add_parser("compress", help="prune a model: zeros (magnitude, Wanda, SparseGPT) or a smaller model "
                                        "(width, layer-drop, expert-drop)",
                       description="Compress MODEL (a Hub id, a local save_pretrained dir, or llmprune-tiny) "
                                   "layer by layer and write a loadable checkpoint to --output.")
    p.add_argument("model", help="Hub id, local directory, or the embedded 'llmprune-tiny'")
    p.add_argument("--method", help="magnitude | wanda | sparsegpt | alps (zeros), width | layer-drop | expert-drop "
                                    "(smaller model); or use --recipe")
    p.add_argument("--sparsity", help="fraction like 0.5 (unstructured) or N:M like 2:4 (N zeros per M inputs)")
    p.add_argument("--recipe", help="a named recipe (see `llmprune recipes`) or a YAML file")
    p.add_argument("--allocation", choices=("uniform", "owl", "global", "search"), default=None,
                   help="how sparsity is spread over layers: uniform (default), owl (outlier-weighted), "
                        "global (magnitude only: one |W| ranking across matrices), search (per-layer levels "
                        "chosen by measured calibration loss, mean = --sparsity, never worse than uniform)")
    p.add_argument("--owl-m", type=float, default=None, help="OWL outlier threshold M (default 5)")
    p.add_argument("--owl-lambda", type=float, default=None, help="OWL λ: layer sparsities span a 2λ-wide window, S+mean(r)−2λ .. S+mean(r) (default 0.08)")
    p.add_argument("--min-density", type=float, default=None, help="global allocation: per-matrix minimum density")
    p.add_argument("--refine", choices=("none", "dsnot"), default=None,
                   help="after the method: dsnot = training-free mask swaps that lower each row's reconstruction "
                        "error, sparsity and N:M pattern unchanged (default none)")
    p.add_argument("--permute", action=argparse.BooleanOptionalAction, default=None,
                   help="N:M only: permute input channels (with the producers' rows, function unchanged) where "
                        "that lowers the N:M error")
    width = p.add_argument_group("width (--method width)")
    width.add_argument("--mlp-keep", type=float, default=None, help="fraction of MLP neurons kept in every layer")
    width.add_argument("--heads-keep", type=float, default=None,
                       help="fraction of attention heads kept (whole KV groups with their query heads under GQA)")
    width.add_argument("--round-to", type=int, default=None, help="kept MLP width is a multiple of this (default 8)")
    width.add_argument("--reconstruct", action=argparse.BooleanOptionalAction, default=None,
                       help="re-fit o_proj/down_proj on the kept channels by least squares (default on)")
    depth = p.add_argument_group("depth (--method layer-drop)")
    depth.add_argument("--num-layers", type=int, default=None, help="decoder layers to remove")
    depth.add_argument("--layer-fraction", type=float, default=None, help="fraction of decoder layers to remove")
    depth.add_argument("--keep-first", action=argparse.BooleanOptionalAction, default=None,
                       help="never remove layer 0 (default on)")
    experts = p.add_argument_group("MoE experts (--method expert-drop)")
    experts.add_argument("--experts-keep", type=int, default=None, help="routed experts kept in every MoE layer")
    experts.add_argument("--expert-ratio", type=float, default=None,
                         help="fraction of routed experts kept in every MoE layer (0.75 of 8 = 6)")
    experts.add_argument("--merge-mode", choices=("reroute-fit", "fold-fit", "average"), default=None,
                         help="criterion merge: how the kept experts absorb the removed ones (default reroute-fit)")
    experts.add_argument("--merge-base", choices=("reap", "frequency", "router-weight", "reconstruction", "random"),
                         default=None, help="criterion merge: which experts are kept (default reap)")
    experts.add_argument("--progressive", action=argparse.BooleanOptionalAction, default=None,
                         help="calibrate each MoE layer on the already-pruned earlier layers' outputs (default on)")
    p.add_argument("--criterion", default=None,
                   help="width: obs | activation | magnitude | maw | random (default obs; activation with --no-reconstruct); "
                        "layer-drop: bi | angular | ppl (default bi); expert-drop: merge | reap | frequency | "
                        "router-weight | reconstruction | random (default merge)")
    p.add_argument("--calib-data", default=None, help="c4 | wikitext2 | stdlib | PATH (.txt/.jsonl/.parquet); default c4")
    p.add_argument("--calib-samples", type=int, default=None, help="number of calibration windows (default 128)")
    p.add_argument("--calib-seqlen", type=int, default=None, help="tokens per window (default 2048, or the model's maximum if smaller)")
    p.add_argument("--seed", type=int, default=None, help="calibration sampling seed (default 0)")
    p.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=None,
                   help="prune the linears of each layer one after another, each calibrated on the already-pruned "
                        "ones' outputs, in one forward pass per layer (SparseGPT's --true-sequential: faster, but "
                        "holds a layer's activations for all calibration tokens at once). Default: on for "
                        "sparsegpt and width when that fits in half the free memory, off for wanda")
    p.add_argument("--targets", default=None, help="regex of module names to prune (default: all decoder linears)")
    p.add_argument("--ignore", default=None, help="regex of module names to leave dense")
    add_model_args(p)
    p.add_argument("--save-format", choices=("dense", "sparse24"), default="dense",
                   help="dense: plain HF safetensors with zeros (default); sparse24: packed 2:4 (load with "
                        "llmprune.load_pretrained)")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="largest safetensors shard written, e.g. 5GB, 5G, 500MiB (default: 5GB)")
    big = p.add_argument_group("big models, crashes, several processes")
    big.add_argument("--max-memory", metavar="SIZE", default=None,
                     help="host memory the run may use, e.g. 64GiB: decoder layers are read from disk one at a "
                          "time and written straight into the output, calibration activations spill to disk "
                          "when they do not fit (default: what is free now)")
    big.add_argument("--resume", action="store_true",
                     help="continue a run to the same --output that was interrupted (crash, kill, Ctrl-C) from "
                          "its last finished layer; the result is the one the run would have given")
    big.add_argument("--in-memory", action="store_true",
                     help="load the whole model and write it at the end (no journal, so no --resume)")
    p.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="push the output to this Hub repo")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    p.add_argument("--base-model", metavar="HUB_ID", default=None,
                   help="the Hub id MODEL stands for, recorded as the base model in llmprune.json and the model "
                        "card (for a local copy; a Hub cache snapshot folder is recognised without it)")
    p.add_argument("--output", "-o", required=True, help="output directory (must not exist unless --overwrite)")
    p.epilog = ("Every run that can is journalled layer by layer in .OUTPUT.partial beside the output (removed "
                "when it succeeds): after a crash, kill or Ctrl-C, rerun the same command with --resume. Several "
                "processes: torchrun --nproc-per-node N -m llmprune compress ... (NCCL on GPUs, gloo on CPU) gives "
                "the same checkpoint as one process.")
    p.set_defaults(func=run)


# CLI flag -> stage key, for the flags that set stage parameters.
STAGE_FLAGS = {"allocation": "allocation", "owl_m": "owl_m", "owl_lambda": "owl_lambda", "min_density": "min_density",
               "refine": "refine", "permute": "permute",
               "targets": "targets", "ignore": "ignore", "true_sequential": "true_sequential",
               "mlp_keep": "mlp_keep", "heads_keep": "heads_keep", "round_to": "round_to",
               "reconstruct": "reconstruct", "num_layers": "num_layers", "layer_fraction": "layer_fraction",
               "keep_first": "keep_first", "criterion": "criterion", "experts_keep": "experts_keep",
               "expert_ratio": "expert_ratio", "merge_mode": "merge_mode", "merge_base": "merge_base",
               "progressive": "progressive"}


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def build_recipe(args: argparse.Namespace):
    from llmprune.errors import UserError
    from llmprune.recipe import Recipe, load_recipe
    from llmprune.stages import kind_for, stage_params

    calib = {"data": args.calib_data, "samples": args.calib_samples, "seqlen": args.calib_seqlen, "seed": args.seed}
    flags = {key: getattr(args, attr) for attr, key in STAGE_FLAGS.items() if getattr(args, attr) is not None}
    if args.recipe:
        if args.method or args.sparsity:
            raise UserError("give either --recipe or --method/--sparsity, not both")
        recipe = load_recipe(args.recipe)
        data = recipe.to_dict()
        data["calibration"].update({k: v for k, v in calib.items() if v is not None})
        for key, value in flags.items():     # a flag sets its key on every stage that has it
            takers = [s for s in data["stages"] if key in stage_params(s["method"])]
            if not takers:
                raise UserError(f"{_flag(key)} applies to no stage of recipe {recipe.name}")
            for stage in takers:
                stage[key] = value
        rebuilt = Recipe.from_dict(data, where=f"recipe {recipe.name}")
        rebuilt.name = recipe.name
        return rebuilt
    if not args.method:
        raise UserError("give --method (e.g. --method wanda --sparsity 0.5, --method width --mlp-keep 0.75) "
                        "or --recipe NAME")
    kind = kind_for(args.method)
    if kind.name == "prune" and not args.sparsity:
        raise UserError(f"--method {args.method} needs --sparsity (e.g. 0.5 or 2:4)")
    if kind.name != "prune" and args.sparsity:
        raise UserError(f"--sparsity is for pruning methods; --method {args.method} takes "
                        f"{', '.join(_flag(k) for k in stage_params(args.method))}")
    accepted = stage_params(args.method)
    for key in flags:
        if key not in accepted:
            raise UserError(f"{_flag(key)} does not apply to --method {args.method} "
                            f"(it takes {', '.join(_flag(k) for k in accepted)})")
    return Recipe.from_cli(args.method, args.sparsity, **flags, **calib)


def run(args: argparse.Namespace) -> int:
    from llmprune import distributed
    from llmprune.io.workdir import release_locks

    try:
        return _run(args)
    finally:
        release_locks()
        distributed.shutdown()


def _run(args: argparse.Namespace) -> int:
    from llmprune import distributed
    from llmprune.calibration.data import check_source
    from llmprune.errors import UserError
    from llmprune.io.save import check_output_dir, output_dir

    # Everything a user can get wrong is checked before the model is loaded.
    recipe = build_recipe(args)
    from llmprune.io.checkpoint import parse_size
    from llmprune.io.load import model_input_path, resolve_model_path
    from llmprune.io.workdir import WorkDir, check_resumable, clean_finished

    streaming_flags = [f for f, on in (("--max-memory", args.max_memory is not None), ("--resume", args.resume),
                                       ("torchrun", distributed.env_world_size() > 1)) if on]
    if args.in_memory and streaming_flags:
        raise UserError(f"--in-memory cannot be combined with {streaming_flags[0]} (which streams layers from disk)")
    max_memory = parse_size(args.max_memory, "--max-memory") if args.max_memory is not None else None
    inputs = [model_input_path(args.model), args.recipe, recipe.calibration.data,   # --overwrite never deletes them
              *[s.params["data"] for s in recipe.stages if s.method == "heal" and s.params.get("data")]]
    work = WorkDir(args.output)
    main = distributed.env_rank() == 0
    if main:
        clean_finished(work)                          # a run that finished but was killed before tidying up
        check_output_dir(args.output, args.overwrite, inputs=inputs)
    journal = check_resumable(work, args.resume) if main and not args.in_memory else None
    max_shard_size = parse_size(args.max_shard_size, "--max-shard-size")
    resolve_model_path(args.model, args.revision)      # a mistyped MODEL is reported before the data
    needs_calib = recipe.needs_calibration()
    heal_stages = [s for s in recipe.stages if s.method == "heal"]
    # A heal stage trains on text: the tokenizer, and the calibration source unless it names its own data.
    needs_text = needs_calib or any(s.params.get("data") is None for s in heal_stages)
    if needs_text:
        check_source(recipe.calibration.data, check_hub=False)   # a bad path now; Hub sources below
    if args.base_model is not None:
        from llmprune.io.hub import check_repo_id

        args.base_model = check_repo_id(args.base_model, "--base-model")
    if args.push_to_hub:
        from llmprune.io.hub import check_push_ready, check_repo_id

        check_repo_id(args.push_to_hub)
        check_push_ready()
    prune_stages = [s for s in recipe.stages if s.pattern is not None]
    if args.save_format == "sparse24" and (not prune_stages or str(prune_stages[-1].pattern) != "2:4"):
        raise UserError("--save-format sparse24 needs a last pruning stage with sparsity 2:4")

    import torch
    from transformers import AutoModelForCausalLM

    from llmprune.api import calibration_set, check_recipe, compress
    from llmprune.arch import spec_for
    from llmprune.io.load import (cpu_has_fast_bf16, load_config, load_model, load_tokenizer, model_revision,
                                  resolve_device, torch_dtype)
    from llmprune.io.sidecar import base_model_entry, compress_sidecar, write_sidecar

    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    torch_dtype(args.dtype, "--dtype")
    device = resolve_device(args.device, "--device")
    device = distributed.init_from_env(device)         # torchrun: join the process group, one device per rank
    if not distributed.is_main():
        args.quiet = True
    t0 = time.perf_counter()
    config = load_config(args.model, args.trust_remote_code, args.revision)
    spec_for(config)                                   # unsupported family: fail before loading weights
    with torch.device("meta"):                         # check targets / shapes / counts without any weights
        meta_model = AutoModelForCausalLM.from_config(config, trust_remote_code=args.trust_remote_code)
        check_recipe(meta_model, recipe)
        if args.save_format == "sparse24":             # the packed save must not fail after the work
            from llmprune.kernels import check_sparse24_possible

            check_sparse24_possible(meta_model, recipe)
    problem = "--in-memory" if args.in_memory else _stream_problem(meta_model, recipe, args)
    if problem is not None and streaming_flags:
        raise UserError(f"{streaming_flags[0]} needs the run to stream decoder layers from disk, and this one cannot: "
                        f"{problem}")
    del meta_model
    if needs_text:
        check_source(recipe.calibration.data)              # c4 / wikitext2 with the Hub unreachable: say so now
    # Only calibration needs a tokenizer; without one (magnitude) a folder lacking tokenizer files is fine.
    tokenizer = load_tokenizer(args.model, args.trust_remote_code, args.revision,
                               required=needs_calib or bool(heal_stages))
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
    if (args.dtype == "auto" and device == "cpu" and not cpu_has_fast_bf16()
            and getattr(config, "dtype", None) in (torch.bfloat16, torch.float16)):
        work_dtype, save_dtype = "float32", config.dtype
    store = None
    if problem is None:
        model, store = _streamed_model(args, config, recipe, calib, device, work_dtype, save_dtype, max_memory,
                                       max_shard_size, work, journal)
        try:
            model, report = compress(model, tokenizer, recipe, calib=calib, device=device, progress=not args.quiet,
                                     layers=store)
        except KeyboardInterrupt as exc:
            exc.llmprune_hint = (f"the finished layers are kept in {work.path}; rerun the same command with --resume "
                                 "to continue")
            raise
    else:
        model = load_model(args.model, work_dtype, args.trust_remote_code, args.revision)
        teacher = None
        if any(s.params.get("mode") == "distill" for s in heal_stages):
            # A distilling heal stage's teacher: MODEL read again when the stage runs (no copy held before).
            def teacher():
                return load_model(args.model, work_dtype, args.trust_remote_code, args.revision)
        model, report = compress(model, tokenizer, recipe, calib=calib, device=device, progress=not args.quiet,
                                 teacher=teacher)
    if save_dtype is not None:
        model.to(save_dtype)
    if not distributed.is_main():
        return 0

    base = base_model_entry(args.model, revision=model_revision(model) or args.revision,
                            model_type=model.config.model_type, hub_id=args.base_model)
    sidecar = compress_sidecar(report, base, dtype=str(model.dtype).replace("torch.", ""),
                               save_format=args.save_format)
    with output_dir(args.output, args.overwrite, inputs=inputs,
                    expected_bytes=sum(t.numel() * t.element_size() for t in model.state_dict().values())) as tmp:
        if store is not None:                          # the shards were written layer by layer
            store.commit(tmp)
            from llmprune.io.checkpoint import save_model_files

            save_model_files(model, tokenizer, tmp)
        else:
            packed = write_checkpoint(model, tokenizer, tmp, args.save_format, max_shard_size)
            if packed is not None:
                sidecar["pack"] = packed
        (tmp / "recipe.yaml").write_text(report.recipe.to_yaml())   # as run: defaults resolved
        sidecar["wall_time_s"] = round(time.perf_counter() - t0, 3)
        write_sidecar(tmp, sidecar)
    if store is not None:
        work.remove()                                  # the output is in place: the journal has done its job
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


def _stream_problem(meta_model, recipe, args) -> str | None:
    """Why this run cannot stream its layers from disk (None: it can, which is the default)."""
    from llmprune.io.load import is_local_model, resolve_model_path

    path = resolve_model_path(args.model, args.revision)
    if is_local_model(args.model) and not any(Path(path).glob("*.safetensors")):
        return f"{args.model} has no safetensors weights"
    from llmprune.io.streamed import streamed_problem

    meta_model.tie_weights()                         # names and order as the loaded model saves them
    return streamed_problem(meta_model, recipe, args.save_format)


def _streamed_model(args, config, recipe, calib, device, work_dtype, save_dtype, max_memory, max_shard_size, work,
                    journal):
    """The skeleton model and its streamed layer store; a resumed run checks its fingerprint first."""
    import hashlib
    import sys

    import torch

    from llmprune import __version__, distributed
    from llmprune.errors import UserError
    from llmprune.io.checkpoint import CheckpointReader
    from llmprune.io.streamed import StreamedLayers, StreamPlan, build_skeleton
    from llmprune.io.workdir import describe_progress, fingerprint_difference

    source = _local_weights(args.model, args.revision)
    from llmprune.io.load import check_local_weights

    check_local_weights(str(source), config, args.trust_remote_code)   # a damaged shard, a wrong shape: one line
    reader = CheckpointReader(source)
    if work_dtype == "auto":
        dtype = getattr(config, "dtype", None)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if dtype is None:
            from llmprune.io.checkpoint import torch_dtype as code_dtype

            floats = [code_dtype(i.dtype) for i in reader.tensors.values() if i.dtype in ("F32", "F16", "BF16", "F64")]
            dtype = floats[0] if floats else torch.float32
    else:
        dtype = getattr(torch, work_dtype)
    weights = hashlib.sha256(repr(sorted((i.name, i.shape, i.dtype) for i in reader.tensors.values())).encode()
                             + repr(sorted(p.stat().st_size for p in reader.shards)).encode()).hexdigest()
    ids = calib.ids.contiguous() if calib is not None else None
    fingerprint = {
        "recipe": recipe.to_dict(),
        "model": {"name": args.model, "revision": getattr(config, "_commit_hash", None) or args.revision,
                  "weights": weights},
        "calibration": None if ids is None else {"spec": {k: v for k, v in calib.spec.items() if k != "note"},
                                                 "ids_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest()},
        "version": __version__,
        "dtype": {"work": str(dtype), "save": str(save_dtype)},
        "device": torch.device(device).type,
        "max_shard_size": max_shard_size,
        "save_format": args.save_format,
    }
    if distributed.env_world_size() > 1:               # the other ranks read what rank 0 decided
        journal = _shared_journal(work, journal)
    if journal is not None:
        differs = fingerprint_difference(journal["fingerprint"], fingerprint)
        if differs:
            raise UserError(f"cannot resume from {work.path}: the interrupted run used another {', '.join(differs)}; "
                            f"rerun it with the same settings, or remove that folder to start over")
        if distributed.is_main():
            print(f"llmprune: resuming {args.output} from {work.path} ({describe_progress(journal)})", file=sys.stderr)
    if distributed.is_main():
        work.lock()
    model = build_skeleton(config, dtype, str(source), args.trust_remote_code, args.revision)
    samples = calib.ids.numel() if calib is not None else 0
    hidden = model.get_input_embeddings().weight.shape[1]
    plan = StreamPlan(source=source, work=work, n_stages=len(recipe.stages), fingerprint=fingerprint,
                      save_dtype=save_dtype, max_shard_size=max_shard_size, budget=max_memory,
                      activation_bytes=samples * hidden * torch.empty((), dtype=dtype).element_size(), journal=journal)
    return model, StreamedLayers(model, plan)


def _shared_journal(work, journal):
    """Under torchrun: rank 0 checked the work folder; every other rank reads the same journal."""
    from llmprune import distributed

    distributed.barrier()
    if distributed.is_main():
        return journal
    data = work.read_journal() if work.exists() else None
    return data


def _local_weights(name: str, revision: str | None):
    """A local folder with the model's safetensors (a Hub id: its snapshot, downloaded or cached)."""
    from pathlib import Path

    from llmprune.io.load import _hub_error, resolve_model_path

    path = resolve_model_path(name, revision)
    if Path(path).is_dir():
        return Path(path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, revision=revision,
                                      allow_patterns=["*.safetensors", "*.safetensors.index.json", "*.json"]))
    except Exception as exc:  # network / cache / not-found errors come in many types
        raise _hub_error(name, exc) from None


def write_checkpoint(model, tokenizer, directory, save_format: str, max_shard_size: str | int = "5GB") -> dict | None:
    """Dense HF checkpoint, or packed 2:4 (returns the sidecar's `pack` section)."""
    if save_format == "sparse24":
        from llmprune.kernels import save_sparse24

        return save_sparse24(model, tokenizer, directory, max_shard_size=max_shard_size)
    from llmprune.io.save import save_model

    save_model(model, tokenizer, directory, max_shard_size=max_shard_size)
    return None
