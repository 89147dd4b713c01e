"""The `heal` stage kind: a short training run after pruning that wins back quality, keeping the pruning.

    stages:
      - {method: sparsegpt, sparsity: 0.7}
      - {method: heal, mode: lora, steps: 50}

Modes (`llmprune.heal.core`; methods.md §5 PERP, §1.3 self-generated data): `perp` trains only
norm weights and biases; `lora` a masked LoRA merged through the mask; `distill` makes the unpruned
model (`StageContext.teacher`: the API's `teacher=`, by default a copy of the input taken before the
first stage; the CLI reloads MODEL) the teacher.

Masks: the keep-masks the earlier stages recorded (`ctx.masks`) are held exactly: every zero stays
zero, and an N:M target is re-checked on the weights before the stage returns. A decoder matrix that
no stage masked but that has zeros (an already-pruned input) keeps its zeros too; one without zeros
(structured outputs: sliced, not masked) is trained densely and just merged. MoE experts' slices of
fused 3-D parameters and routers are not LoRA targets (they stay frozen in perp/lora); distill with
`train: all` trains them with their pruned entries held at zero.

Data: `data`, by default the calibration source of this run, in windows disjoint from its calibration
windows (`heal_windows`); `eval_samples` further disjoint windows give the held-out loss before/after.
"""
from __future__ import annotations

import inspect
from typing import Annotated, Literal

import torch
from torch import nn

from llmprune.arch import decoder_matrices, weight_2d
from llmprune.errors import UserError
from llmprune.params import Range
from llmprune.report import StageRecord
from llmprune.stages import StageContext, stage_kind

# Keys that only mean something for mode distill.
DISTILL_KEYS = ("train", "temperature", "self_generate", "distill_loss", "generation", "teacher_device")


def _validate(params: dict, where: str) -> dict:
    # A key that does not apply is refused only when it differs from its default, so the recipe as run
    # (every default written out) validates again.
    defaults = {k: p.default for k, p in inspect.signature(heal).parameters.items()}
    mode = params["mode"]
    if mode != "distill":
        given = [k for k in DISTILL_KEYS if k in params and params[k] != defaults[k]]
        if given:
            raise UserError(f"{where}: {', '.join(given)} only apply to mode distill")
    lora = mode == "lora" or (mode == "distill" and params.get("train", "lora") == "lora")
    if not lora:
        given = [k for k in ("rank", "alpha") if k in params and params[k] != defaults[k]]
        if given:
            raise UserError(f"{where}: {', '.join(given)} only apply to LoRA (mode lora, or distill with train lora)")
    if params.get("distill_loss") == "ce" and not params.get("self_generate"):
        raise UserError(f"{where}: distill_loss ce trains on the teacher's responses; add self_generate: true")
    if params.get("generation", "sample") != "sample" and not params.get("self_generate"):
        raise UserError(f"{where}: generation only applies with self_generate: true")
    micro, batch = params.get("micro_batch_size"), params.get("batch_size", 8)
    if micro is not None and batch % micro:
        raise UserError(f"{where}: micro_batch_size {micro} must divide batch_size {batch}")
    if params.get("self_generate") and params.get("seqlen") is not None and params["seqlen"] < 4:
        raise UserError(f"{where}: self_generate needs windows of at least 4 tokens, got seqlen {params['seqlen']}")
    if params.get("data") is not None:
        from llmprune.calibration.data import check_source

        check_source(params["data"], "data", check_hub=False)
    return params


def _max_positions(config) -> int | None:
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def _check_model(model: nn.Module, params: dict, where: str) -> None:
    max_pos = _max_positions(model.config)
    if params.get("seqlen") is not None and max_pos and params["seqlen"] > max_pos:
        raise UserError(f"{where}: seqlen {params['seqlen']} exceeds the model's {max_pos} positions")


@stage_kind("heal", needs_calibration=lambda params: False, validate=_validate, check_model=_check_model,
            summary="recover quality by a short training run (PERP, masked LoRA, distillation); zeros stay zero")
def heal(ctx: StageContext, *,
         mode: Literal["perp", "lora", "distill"],
         steps: Annotated[int, Range(1)] = 200,
         lr: Annotated[float, Range(0, 1, low_open=True, high_open=True)] | None = None,
         batch_size: Annotated[int, Range(1)] = 8,
         micro_batch_size: Annotated[int, Range(1)] | None = None,
         seqlen: Annotated[int, Range(2)] | None = None,
         rank: Annotated[int, Range(1)] = 8,
         alpha: Annotated[float, Range(0, low_open=True)] | None = None,
         train: Literal["lora", "perp", "all"] | None = None,
         data: str | None = None,
         samples: Annotated[int, Range(1)] | None = None,
         eval_samples: Annotated[int, Range(1)] = 16,
         seed: int = 0,
         dtype: Literal["auto", "float32", "bfloat16"] = "auto",
         gradient_checkpointing: bool = False,
         temperature: Annotated[float, Range(0, low_open=True)] = 1.0,
         self_generate: bool = False,
         distill_loss: Literal["kl", "ce"] | None = None,
         generation: Literal["sample", "greedy"] = "sample",
         teacher_device: str = "cpu") -> StageRecord:
    """Train `steps` steps of `mode` (perp | lora | distill) on text disjoint from the calibration windows."""
    from llmprune.heal import DEFAULT_LR, heal_model, heal_windows
    from llmprune.io.load import resolve_device

    model = ctx.model
    if ctx.tokenizer is None:
        raise UserError(f"{ctx.where}: heal trains on text and needs the tokenizer (pass tokenizer= to compress)")
    source, calibration = _source(ctx, data)
    seqlen = _seqlen(ctx, seqlen)
    train = train or ("lora" if mode == "distill" else mode)
    lr = lr or DEFAULT_LR[train]
    windows = heal_windows(ctx.tokenizer, source, seqlen=seqlen, train_samples=samples, eval_samples=eval_samples,
                           seed=seed, calibration=calibration, default_train_samples=steps * batch_size)
    train_ids, prompts = windows.train_ids, None
    if self_generate:       # the first half of each window is the prompt, the teacher writes the rest
        prompts, train_ids = train_ids[:, : seqlen // 2], None
    teacher = None
    if mode == "distill":
        if ctx.teacher is None:
            raise UserError(f"{ctx.where}: mode distill needs the unpruned model; pass teacher= to compress")
        teacher = ctx.teacher().to(resolve_device(teacher_device))
    masks = keep_masks(model, ctx.masks.by_name(model))
    result = heal_model(
        model, mode=mode, train_ids=train_ids, eval_ids=windows.eval_ids, steps=steps, lr=lr, batch_size=batch_size,
        micro_batch_size=micro_batch_size, seed=seed, rank=rank, alpha=alpha,
        train=train if mode == "distill" else None, dtype=_train_dtype(model, dtype, ctx.device),
        gradient_checkpointing=gradient_checkpointing, masks=masks,
        teacher=teacher, temperature=temperature, distill_loss=distill_loss, prompts_ids=prompts,
        response_tokens=(seqlen - seqlen // 2) if prompts is not None else None, generation=generation,
        progress=ctx.progress, device=ctx.device)
    check_nm_kept(model, ctx.masks)

    record = StageRecord()
    # What ran, as recipe keys (run_stage puts them in the recipe as run): the defaults resolved.
    record.params = {"lr": lr, "seqlen": seqlen, "data": source, "dtype": result.dtype}
    if mode == "distill":
        record.params["train"] = train
    if result.alpha is not None:
        record.params["alpha"] = result.alpha
    # The same record shape as `llmprune heal` writes: heal's measurements at the top level.
    record.measured = {**result.to_dict(), "data": windows.spec}
    record.measured.pop("seconds")
    record.measured["train_seconds"] = round(result.seconds, 3)
    if mode == "distill":
        record.measured["teacher"] = {"device": resolve_device(teacher_device)}
    record.summary_lines = [f"{label}: {text}" for label, text in result.summary_rows()]
    record.summary_lines.append(f"training time: {result.seconds:.1f}s")
    return record


def _source(ctx: StageContext, data: str | None) -> tuple[str, dict | None]:
    """The heal text source and the calibration spec its windows must avoid (None: nothing to avoid)."""
    spec = ctx.calib.spec if ctx.calib is not None else None
    if data is not None:
        return data, spec
    if spec is not None:
        if spec.get("source") == "tensor":
            raise UserError(f"{ctx.where}: the calibration data was a token tensor, so heal has no text to default "
                            "to; give the stage `data:` (c4, wikitext2, stdlib or a .txt/.jsonl/.parquet file)")
        return spec["source"], spec
    return ctx.calibration.data, None


def _seqlen(ctx: StageContext, seqlen: int | None) -> int:
    """The given seqlen, else the calibration windows' (capped at the model's positions)."""
    if seqlen is not None:
        return seqlen
    if ctx.calib is not None:
        return ctx.calib.spec["seqlen"]          # already fitted to the model's positions
    return ctx.calibration.window(ctx.model.config)[0]


def _train_dtype(model: nn.Module, dtype: str, device: str) -> torch.dtype:
    """auto: bf16 for a bf16 model (unless on a CPU without fast bf16), else fp32."""
    if dtype != "auto":
        return getattr(torch, dtype)
    from llmprune.io.load import cpu_has_fast_bf16

    if model.dtype == torch.bfloat16 and not (device == "cpu" and not cpu_has_fast_bf16()):
        return torch.bfloat16
    return torch.float32


def keep_masks(model: nn.Module, recorded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The masks heal holds, by matrix name: every recorded keep-mask (a kept weight may be exactly zero),
    and for a decoder matrix no stage masked (a linear, an expert's slice, a router), its zeros (an input
    that was pruned before this run). Matrices without zeros are left out: they train densely."""
    masks = dict(recorded)
    for name, matrix in decoder_matrices(model).items():
        if name not in masks:
            weight = weight_2d(matrix)
            if bool((weight == 0).any()):
                masks[name] = (weight != 0).cpu()
    return masks


def check_nm_kept(model: nn.Module, masks) -> None:
    """Every matrix an earlier stage pruned to N:M still has N zeros in every group of M inputs."""
    from llmprune.masks import parse_pattern

    handles = {m: (n, m) for n, m in model.named_modules()}                # a targeted lm_head
    handles.update({matrix.key: (name, matrix) for name, matrix in decoder_matrices(model).items()})
    for key, target in masks.targets.items():
        if key not in handles or not (isinstance(target, str) and ":" in target):
            continue                                    # gone (an earlier structured edit) or not N:M
        name, handle = handles[key]
        pattern = parse_pattern(target)
        weight = weight_2d(handle)                                         # [out, in]
        if weight.shape[1] % pattern.m:
            continue                # columns past the last full group were never N:M (the prune stage decides)
        zeros = (weight == 0).view(weight.shape[0], -1, pattern.m).sum(-1)  # [out, in/m]
        if bool((zeros < pattern.n).any()):
            raise RuntimeError(f"heal broke the {target} pattern of {name}")
