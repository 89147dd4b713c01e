"""`llmprune heal DIR --mode perp|lora|distill --output OUT`: win back what pruning cost, keeping the pruning.

DIR is an llmprune output (dense, zeros included). Its zeros are the masks: perp trains only norms and
biases; lora trains a masked LoRA and merges it through the mask; distill makes the unpruned base
model (DIR's llmprune.json, or --teacher) the teacher. Training text comes from DIR's calibration
source (or --data), in windows disjoint from the calibration windows; the held-out loss is measured on
further disjoint windows. OUT gets the healed model and DIR's llmprune.json with a heal record
appended to its `stages` list.
"""
from __future__ import annotations

import argparse

DESCRIPTION = __doc__.split("\n", 2)[2]
# Kept literal here so `llmprune --help` does not import torch (llmprune.heal.core holds the same tuples).
MODES = ("perp", "lora", "distill")
TRAIN_SETS = ("lora", "perp", "all")


def register(sub) -> None:
    p = sub.add_parser("heal", help="recover a pruned output's quality: PERP, masked LoRA or distillation",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="DIR", help="an llmprune output directory (e.g. from `llmprune compress`)")
    p.add_argument("--mode", required=True, choices=MODES,
                   help="perp: norms and biases only; lora: masked LoRA merged through the mask; "
                        "distill: the unpruned model teaches")
    p.add_argument("--output", "-o", required=True, metavar="OUT", help="output directory (must not exist)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: 1e-3 for lora/perp, 1e-4 for all)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per step (default 8)")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="windows per forward/backward pass (gradient accumulation; default: --batch-size)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per window (default: DIR's calibration seqlen)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha; scale = alpha/rank (default 2·rank)")
    p.add_argument("--train", choices=TRAIN_SETS, default=None,
                   help="distill: what to train: lora (default, sparsity kept), perp, or all (pruned weights "
                        "held at 0)")
    p.add_argument("--data", default=None,
                   help="c4 | wikitext2 | stdlib | PATH (.txt/.jsonl/.parquet); default: DIR's calibration source")
    p.add_argument("--samples", type=int, default=None,
                   help="distinct training windows (default: steps × batch size, or as many as the text holds)")
    p.add_argument("--eval-samples", type=int, default=16,
                   help="held-out windows for the loss before/after (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the window draw, LoRA init, batch order, sampling")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="training compute dtype (default: the checkpoint's; float32 on CPUs without fast bf16). "
                        "The output keeps DIR's dtype")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations to save memory")
    p.add_argument("--teacher", default=None, metavar="MODEL",
                   help="distill: the unpruned model (default: the base model in DIR's llmprune.json)")
    p.add_argument("--teacher-device", default="cpu", help="where the teacher runs (default cpu: offloaded)")
    p.add_argument("--temperature", type=float, default=1.0, help="distill: KL temperature (default 1)")
    p.add_argument("--self-generate", action="store_true",
                   help="distill on the teacher's own responses: the first half of each window is the prompt, "
                        "the teacher writes the rest (self-generated data)")
    p.add_argument("--distill-loss", choices=("kl", "ce"), default=None,
                   help="distill: kl to the teacher's distributions, or ce on its responses (needs --self-generate; "
                        "default kl, ce with --self-generate)")
    p.add_argument("--greedy", action="store_true", help="--self-generate: greedy decoding instead of sampling "
                                                         "(temperature 0.9, top-p 0.95)")
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom modelling code")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _check_numbers(args: argparse.Namespace) -> None:
    from llmprune.errors import UserError

    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--rank", args.rank),
                        ("--eval-samples", args.eval_samples), ("--samples", args.samples),
                        ("--micro-batch-size", args.micro_batch_size)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if args.micro_batch_size is not None and args.batch_size % args.micro_batch_size:
        raise UserError(f"--micro-batch-size {args.micro_batch_size} must divide --batch-size {args.batch_size}")
    if args.seqlen is not None and args.seqlen < (4 if args.self_generate else 2):
        raise UserError(f"--seqlen must be at least {4 if args.self_generate else 2}, got {args.seqlen}")
    if args.lr is not None and not (0 < args.lr < 1):
        raise UserError(f"--lr must be in (0, 1), got {args.lr}")
    if args.alpha is not None and args.alpha <= 0:
        raise UserError(f"--alpha must be positive, got {args.alpha}")
    if not args.temperature > 0:
        raise UserError(f"--temperature must be positive, got {args.temperature}")
    if args.mode != "distill":
        given = [flag for flag, on in (("--teacher", args.teacher is not None), ("--train", args.train is not None),
                                       ("--self-generate", args.self_generate), ("--greedy", args.greedy),
                                       ("--distill-loss", args.distill_loss is not None)) if on]
        if given:
            raise UserError(f"{', '.join(given)} only apply to --mode distill")
    if args.distill_loss == "ce" and not args.self_generate:
        raise UserError("--distill-loss ce trains on the teacher's responses; add --self-generate")
    if args.greedy and not args.self_generate:
        raise UserError("--greedy only applies with --self-generate")
    if args.mode == "perp" and args.alpha is not None:
        raise UserError("--alpha only applies to LoRA (--mode lora, or distill with --train lora)")


def _teacher_name(args: argparse.Namespace, sidecar: dict) -> str:
    """--teacher, else the sidecar's base model (its local path when it was local, else its Hub id)."""
    from pathlib import Path

    from llmprune.errors import UserError
    from llmprune.io.load import resolve_model_path

    if args.teacher is not None:
        resolve_model_path(args.teacher)
        return args.teacher
    base = sidecar.get("base_model") or {}
    path, model_id = base.get("path"), base.get("id")
    if path and Path(path).expanduser().is_dir():
        return path
    if model_id and Path(str(model_id)).expanduser().is_dir():
        return model_id
    if model_id and not base.get("local"):
        return resolve_model_path(model_id)      # a Hub id (loading it fails clearly when offline)
    raise UserError(f"the base model recorded in {args.model}/llmprune.json ({path or model_id or 'none'}) is not "
                    "available; give the unpruned model with --teacher")


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from llmprune.errors import UserError
    from llmprune.io.save import RECIPE_NAME, check_output_dir
    from llmprune.io.sidecar import read_sidecar

    _check_numbers(args)
    src = Path(args.model).expanduser()
    if not src.is_dir() or not (src / "config.json").is_file():
        raise UserError(f"{args.model} is not a model directory (no config.json); give the output of "
                        "`llmprune compress`")
    source = read_sidecar(src)
    from llmprune.io.checkpoint import packed_checkpoint_info

    if source.get("kind") == "pack" or packed_checkpoint_info(src) is not None:
        raise UserError(f"{args.model} is packed 2:4 (sparse24); heal needs dense weights: unpack it with "
                        f"`llmprune pack --unpack {args.model} --output DENSE`, heal DENSE, then pack the result")
    if source.get("kind") == "delta":
        raise UserError(f"{args.model} is a delta-pruning output; heal is for pruned models (`llmprune compress`)")
    target = check_output_dir(args.output, args.overwrite, inputs=[src])   # --overwrite never deletes DIR

    from llmprune.calibration.data import check_source

    recipe_calib = (source.get("recipe") or {}).get("calibration") or {}
    calib = source.get("calibration") or None
    calib_source = (calib or {}).get("source")
    data = args.data or (calib_source if calib_source not in (None, "tensor") else recipe_calib.get("data") or "c4")
    check_source(data)
    teacher_name = _teacher_name(args, source) if args.mode == "distill" else None

    import torch

    from llmprune.io.load import cpu_has_fast_bf16
    from llmprune.heal import DEFAULT_LR, heal_model
    from llmprune.io.load import load_config, load_model, load_tokenizer, resolve_device

    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    device = resolve_device(args.device)
    teacher_device = resolve_device(args.teacher_device) if args.mode == "distill" else None
    t0 = time.perf_counter()
    config = load_config(str(src), args.trust_remote_code)
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    seqlen = args.seqlen or (calib or {}).get("seqlen") or recipe_calib.get("seqlen") or 2048
    if max_pos and seqlen > max_pos:
        if args.seqlen is not None:
            raise UserError(f"--seqlen {seqlen} exceeds the model's {max_pos} positions")
        seqlen = max_pos
    if args.self_generate and seqlen < 4:
        raise UserError(f"--self-generate needs windows of at least 4 tokens, got seqlen {seqlen}")

    # The windows, before any weights are loaded: too little text fails here.
    from llmprune.heal.data import heal_windows

    tokenizer = load_tokenizer(str(src), args.trust_remote_code)
    if calib and calib.get("source") == "tensor":
        print("note: DIR was calibrated on a token tensor; heal windows cannot be checked against it")
    windows = heal_windows(tokenizer, data, seqlen=seqlen, train_samples=args.samples, eval_samples=args.eval_samples,
                           seed=args.seed, calibration=calib, default_train_samples=args.steps * args.batch_size)
    train_ids, eval_ids = windows.train_ids, windows.eval_ids

    model = load_model(str(src), "auto", args.trust_remote_code)
    save_dtype = model.dtype
    if args.dtype != "auto":
        train_dtype = getattr(torch, args.dtype)
    elif save_dtype == torch.bfloat16 and not (device == "cpu" and not cpu_has_fast_bf16()):
        train_dtype = torch.bfloat16
    else:
        train_dtype = torch.float32
    teacher = None
    if teacher_name is not None:
        teacher = load_model(teacher_name, "auto", args.trust_remote_code).to(teacher_device)
    train = args.train or ("lora" if args.mode == "distill" else args.mode)
    lr = args.lr or DEFAULT_LR[train]
    prompts = None
    if args.self_generate:
        prompts, train_ids = train_ids[:, : seqlen // 2], None
    from llmprune.edits import linear_zeros, parameter_count

    zeros_before, _ = linear_zeros(model)
    result = heal_model(
        model, mode=args.mode, train_ids=train_ids, eval_ids=eval_ids, steps=args.steps, lr=lr,
        batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, seed=args.seed, rank=args.rank,
        alpha=args.alpha, train=args.train, dtype=train_dtype, gradient_checkpointing=args.gradient_checkpointing,
        teacher=teacher, temperature=args.temperature, distill_loss=args.distill_loss, prompts_ids=prompts,
        response_tokens=(seqlen - seqlen // 2) if prompts is not None else None,
        generation="greedy" if args.greedy else "sample", progress=not args.quiet, device=device)

    from llmprune.io.save import output_dir, save_model
    from llmprune.io.sidecar import command_line, stages, write_sidecar

    earlier = stages(source)               # format-1 sidecars: their one prune stage, synthesized
    zeros_after, elements = linear_zeros(model)
    parameters = parameter_count(model)
    # The shape of every stage record (llmprune.report.StageRecord.to_dict), then what heal measured.
    record = {"index": len(earlier), "method": "heal", "kind": "heal", "params": result.params(),
              "target": None, "achieved": None, "removed": {},
              "parameters": {"before": parameters, "after": parameters},
              "zeros": {"before": zeros_before, "after": zeros_after, "linear_elements": elements,
                        "fraction_after": round(zeros_after / elements, 6) if elements else 0.0},
              **result.to_dict(), "data": windows.spec}
    if teacher_name is not None:
        record["teacher"] = {"id": teacher_name, "device": teacher_device}
    record.update(input=str(src.resolve()), command=command_line())
    sidecar = {k: v for k, v in source.items() if k not in ("format_version", "versions")}
    sidecar["stages"] = [*earlier, record]
    sidecar["dtype"] = str(save_dtype).replace("torch.", "")
    if isinstance(sidecar.get("sparsity"), dict):      # the saved model's zeros (they can only have grown)
        sidecar["sparsity"] = _sparsity_after(model, sidecar["sparsity"])
    with output_dir(target, args.overwrite, inputs=[src]) as tmp:
        save_model(model, tokenizer, tmp)
        if (src / RECIPE_NAME).is_file():
            (tmp / RECIPE_NAME).write_text((src / RECIPE_NAME).read_text())
        write_sidecar(tmp, sidecar)

    print(_summary(result, time.perf_counter() - t0))
    print(f"wrote {args.output}")
    return 0


def _sparsity_after(model, sparsity: dict) -> dict:
    """DIR's `sparsity` section with `achieved` (overall and per module) measured on the healed model."""
    from llmprune.arch import decoder_matrices, weight_2d

    named = {**dict(model.named_modules()), **decoder_matrices(model)}     # MoE experts' slices by their names
    modules = {}
    zeros = total = 0
    for name, entry in (sparsity.get("modules") or {}).items():
        if name not in named or not isinstance(entry, dict):
            continue
        weight = weight_2d(named[name])
        module_zeros = int((weight == 0).sum())
        modules[name] = {**entry, "achieved": round(module_zeros / weight.numel(), 6)}
        zeros, total = zeros + module_zeros, total + weight.numel()
    if not total:
        return sparsity
    return {**sparsity, "achieved": round(zeros / total, 6), "modules": modules}


def _summary(result, wall_s: float) -> str:
    rows = result.summary_rows() + [("time", f"{result.seconds:.1f}s training · {wall_s:.1f}s in all")]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
