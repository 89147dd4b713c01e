"""`heal_model`: a short training run that wins back what pruning cost without undoing the pruning.

Modes (methods reference §5 PERP, §1.3 self-generated data):
  perp     train only normalisation weights and biases (PERP, Zimmer et al., arXiv:2312.15230); every
           linear weight is frozen, so sparsity (any pattern) is untouched.
  lora     a masked LoRA on the decoder linears, trained as W + (B A · scale) ⊙ M and merged through
           the mask (PERP's MaskLoRA), so every zero stays zero and N:M stays valid.
  distill  the unpruned teacher's next-token distributions are the target: KL(teacher ‖ student) on
           text windows, or, with prompts, the teacher's own responses (self-generated data: a
           completion-only CE, or KL, on the response tokens). What it trains is `train`
           (lora by default, so sparsity survives; perp; or all, with pruned weights held at zero).

The objective of perp/lora is the plain next-token loss on the training windows. Everything that is
not trained has requires_grad False, so the optimizer (AdamW) holds state only for what is trained.
Schedule: linear warmup over min(50, steps/10) steps, then cosine decay to 10% of `lr`; gradients
clipped to norm 1. Trained parameters are fp32 masters; with `dtype=bfloat16` the forward runs
under autocast. The seed fixes the batch order, the LoRA init, dropout and sampling: same seed and
inputs -> bit-identical weights on CPU.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from llmprune.arch import Matrix, decoder_matrices, prunable_linears, weight_2d
from llmprune.errors import UserError
from llmprune.heal.distill import GENERATIONS, generate_responses, kl_sum
from llmprune.heal.lora import MaskedLoRA, attach_lora, detach_lora, merge_lora

HEAL_MODES = ("perp", "lora", "distill")
TRAIN_SETS = ("lora", "perp", "all")
DISTILL_LOSSES = ("kl", "ce")
TRAIN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Learning rates by what is trained: conservative for LLMs. The 4M benchmark model (benchmarks/heal_bench.py)
# prefers higher ones at 40 steps: perp 3e-3, lora 1e-2.
DEFAULT_LR = {"perp": 1e-3, "lora": 1e-3, "all": 1e-4}
_PRECISION = {torch.float16: 0, torch.bfloat16: 0, torch.float32: 1, torch.float64: 2}


@dataclass
class HealResult:
    mode: str
    train: str                      # what was trained: lora | perp | all
    steps: int
    lr: float
    batch_size: int
    seed: int
    dtype: str                      # the training compute dtype
    loss_before: float              # held-out mean next-token NLL (nats) on eval_ids, before
    loss_after: float               # ... and after (the returned, merged model in its own dtype)
    trainable_parameters: int
    total_parameters: int
    seconds: float
    seqlen: int
    train_windows: int
    eval_windows: int
    rank: int | None = None
    alpha: float | None = None
    train_loss_first: float | None = None   # training loss of the first step
    train_loss_last: float | None = None    # mean training loss over the last min(10, steps) steps
    masked_modules: int = 0                 # linears whose zeros were held (mask) while training
    dense_modules: int = 0                  # linears trained/merged without a mask
    teacher_loss: float | None = None       # distill: the teacher's held-out NLL (the ceiling)
    distill: dict | None = None             # distill: loss, temperature, self_generated, ...

    def params(self) -> dict:
        """The settings (a recipe stage's keys), as opposed to the measurements."""
        keys = ("mode", "train", "steps", "lr", "batch_size", "seqlen", "seed", "dtype", "rank", "alpha")
        out = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
        if self.distill:
            out.update({k: v for k, v in self.distill.items()
                        if k in ("loss", "temperature", "self_generated", "response_tokens", "generation")})
        return out

    def summary_rows(self) -> list[tuple[str, str]]:
        """(label, text) rows for a summary: what was trained, held-out loss before/after, time."""
        what = {"perp": "norms and biases", "lora": f"masked LoRA rank {self.rank}", "all": "all weights (masked)"}
        rows = [
            ("heal", f"{self.mode} ({what[self.train]}): {self.steps} steps × {self.batch_size} windows × "
                     f"{self.seqlen} tokens, lr {self.lr:g}, {self.dtype}"),
            ("trainable parameters", f"{self.trainable_parameters:,} of {self.total_parameters:,} "
                                     f"({self.trainable_parameters / self.total_parameters:.3%})"),
            ("held-out loss", f"{self.loss_before:.4f} -> {self.loss_after:.4f}  (perplexity "
                              f"{math.exp(self.loss_before):.2f} -> {math.exp(self.loss_after):.2f}, "
                              f"{self.eval_windows} windows)"),
        ]
        if self.teacher_loss is not None:
            rows.append(("teacher loss", f"{self.teacher_loss:.4f}  (perplexity {math.exp(self.teacher_loss):.2f})"))
        return rows

    def to_dict(self) -> dict:
        out = asdict(self)
        for key in ("loss_before", "loss_after", "teacher_loss", "train_loss_first", "train_loss_last"):
            if out[key] is not None:
                out[key] = round(out[key], 6)
        out["seconds"] = round(out["seconds"], 3)
        return {k: v for k, v in out.items() if v is not None}


def perp_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """PERP's trainable set: every normalisation weight (LayerNorm, RMSNorm, any *Norm module) and every bias."""
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()
        for param_name, param in module.named_parameters(recurse=False):
            if (param_name == "bias" or (is_norm and param_name == "weight")) and id(param) not in seen:
                seen.add(id(param))
                out[f"{module_name}.{param_name}" if module_name else param_name] = param
    return out


def mean_nll(model: nn.Module, ids: torch.Tensor, batch_size: int) -> float:
    """Mean next-token NLL (nats) of `model` over token windows [n, seqlen], in the model's own dtype."""
    from llmprune.eval.ppl import perplexity_of_windows

    result = perplexity_of_windows(model, ids, batch_size=batch_size)
    return result.nll_sum / result.tokens


def heal_model(model: nn.Module, *, mode: str, train_ids: torch.Tensor | None, eval_ids: torch.Tensor, steps: int,
               lr: float, batch_size: int = 8, seed: int = 0, rank: int = 8, alpha: float | None = None,
               train: str | None = None, dtype: torch.dtype | str | None = None,
               gradient_checkpointing: bool = False, micro_batch_size: int | None = None,
               masks: dict[str, torch.Tensor] | None = None, teacher: nn.Module | None = None,
               temperature: float = 1.0, distill_loss: str | None = None, prompts_ids: torch.Tensor | None = None,
               response_tokens: int | None = None, generation: str = "sample", progress: bool = True,
               device: str = "cpu") -> HealResult:
    """Heal a pruned causal LM in place; returns the held-out loss before/after and what was trained.

    model: the pruned model (edited in place; returned on its original device, in eval mode, its
        parameters in their original dtypes with their original requires_grad flags, and no LoRA
        modules left: plain HF modules, `save_pretrained`-able).
    mode: perp | lora | distill (see the module docstring).
    train_ids: LongTensor [n, seqlen] training windows (unused when `prompts_ids` is given).
    eval_ids: LongTensor [m, seqlen] held-out windows for loss_before / loss_after.
    steps, lr, batch_size: optimizer steps of `batch_size` windows each (windows are visited in
        seeded random order, epoch after epoch). `micro_batch_size` splits a step's windows into
        smaller forward/backward passes (gradient accumulation; same result up to rounding).
    rank, alpha: LoRA rank and scale alpha/rank (alpha defaults to 2·rank).
    train: distill only: what the distillation trains, lora (default) | perp | all. `all` trains
        every parameter with the pruned weights' gradients masked, so zeros stay zero.
    dtype: training compute dtype, torch.float32 | torch.bfloat16 (or their names); default the
        model's own. bf16 runs the forward under autocast with fp32 trained parameters.
    gradient_checkpointing: recompute activations in backward (HF gradient_checkpointing_enable).
    masks: {matrix name: bool keep_mask [out, in]} (e.g. `edits.MaskState.by_name(model)`; MoE experts'
        slices as `...experts.gate_up_proj[5]`, `arch.decoder_matrices`): a listed decoder linear is
        trained through its mask, an unlisted one as dense; other listed matrices (experts' slices,
        routers, a pruned lm_head) stay frozen, or with train=all keep their pruned entries at zero.
        None: a decoder matrix with zeros keeps its zeros (mask = W != 0), one without is dense
        (structured outputs: just merged).
    teacher: distill: the unpruned model, on whatever device the caller put it (e.g. CPU offload);
        run under no_grad in its own dtype.
    temperature: distill KL temperature (the loss is scaled by T²).
    distill_loss: kl | ce. ce (a completion-only loss on the teacher's responses, as the
        self-generated-data papers do) needs `prompts_ids`; default kl for windows, ce for prompts.
    prompts_ids: LongTensor [n, P]: distill on the teacher's responses to these prompts
        (`response_tokens` new tokens each, default P; `generation` sample | greedy).
    device: where to train (cpu, cuda, cuda:N); the model is moved there and back.
    """
    compute_dtype = _check_args(mode, train_ids, eval_ids, steps, lr, batch_size, rank, alpha, train, dtype,
                                micro_batch_size, teacher, model, temperature, distill_loss, prompts_ids,
                                response_tokens, generation)
    train = train or ("lora" if mode == "distill" else mode)
    alpha = float(alpha) if alpha is not None else 2.0 * rank
    self_generated = mode == "distill" and prompts_ids is not None
    distill_loss = (distill_loss or ("ce" if self_generated else "kl")) if mode == "distill" else None
    micro = micro_batch_size or batch_size
    t0 = time.perf_counter()

    params = dict(model.named_parameters())
    total_parameters = sum(p.numel() for p in params.values())
    orig_dtype = {name: p.dtype for name, p in params.items()}
    orig_requires_grad = {name: p.requires_grad for name, p in params.items()}
    model_dtype = next(iter(params.values())).dtype
    # Default: the model's own dtype; fp16 trains in fp32 (fp16 autocast would need loss scaling).
    compute_dtype = compute_dtype or (model_dtype if model_dtype in TRAIN_DTYPES.values() else torch.float32)
    orig_device = next(iter(params.values())).device
    was_checkpointing = _is_checkpointing(model)
    target_device = torch.device(device)
    model.to(target_device)

    try:
        linears = prunable_linears(model)
        # Pruned matrices whose zeros must survive (handles for weight_2d: linears, MoE experts' slices
        # of fused 3-D parameters, routers, a targeted lm_head): the given masks, else every decoder
        # matrix that has zeros.
        matrices = decoder_matrices(model)
        if masks is not None:
            named = dict(model.named_modules())
            unknown = sorted(n for n in masks if n not in matrices and n not in named)
            if unknown:
                raise UserError(f"masks name matrices this model does not have: {', '.join(unknown[:3])}")
            masked = {name: matrices.get(name) or named[name] for name in sorted(masks)}
        else:
            masked = {n: m for n, m in matrices.items() if (weight_2d(m) == 0).any()}
        zeros_before = {name: int((weight_2d(m) == 0).sum()) for name, m in masked.items()}

        fork_devices = [target_device.index or 0] if target_device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
            loss_before = mean_nll(model, eval_ids, micro)
            teacher_loss = None
            loss_mask = None
            sequences = train_ids
            if mode == "distill":
                teacher.eval()
                teacher_loss = mean_nll(teacher, eval_ids, micro)
                if self_generated:
                    sequences, loss_mask = generate_responses(
                        teacher, prompts_ids, response_tokens or prompts_ids.shape[1], generation=generation,
                        batch_size=micro, progress=progress)

            wrappers: dict[str, MaskedLoRA] = {}
            grad_hooks = []
            merged = False
            try:
                for p in params.values():
                    p.requires_grad_(False)
                if _PRECISION[compute_dtype] > min(_PRECISION[d] for d in orig_dtype.values()):
                    _cast_params(params.values(), compute_dtype)       # e.g. a bf16 checkpoint trained in fp32
                keep_masks: dict[str, torch.Tensor] = {}      # train=all: [out, in] per masked matrix
                param_keep: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}   # ... per parameter, its layout
                if train == "lora":
                    lora_masks = None if masks is None else {n: k for n, k in masks.items() if n in linears}
                    wrappers = attach_lora(model, linears, rank, alpha, lora_masks, generator)
                    trainable = [p for w in wrappers.values() for p in (w.lora_A, w.lora_B)]
                elif train == "perp":
                    trainable = list(perp_parameters(model).values())
                    if not trainable:
                        raise UserError("this model has no normalisation weights or biases to train (perp)")
                else:   # all: every parameter; pruned entries get zero gradient and are re-zeroed after each step
                    trainable = list(params.values())
                    for name, handle in masked.items():
                        weight = weight_2d(handle)
                        keep = masks[name].to(weight.device) if masks is not None else weight != 0
                        keep_masks[name] = keep
                        # The hook sees the gradient of the whole parameter, in its own layout (GPT-2
                        # Conv1D: [in, out]; fused experts: [experts, out, in], this matrix at `expert`).
                        param, expert, transposed = _parameter_of(handle)
                        full = param_keep.setdefault(id(param), (param, torch.ones_like(param, dtype=torch.bool)))[1]
                        (full if expert is None else full[expert]).copy_(keep.t() if transposed else keep)
                for p in trainable:
                    if p.dtype != torch.float32:
                        p.data = p.data.float()                         # fp32 masters for what is trained
                    p.requires_grad_(True)
                for param, keep in param_keep.values():
                    grad_hooks.append(param.register_hook(lambda g, k=keep: g * k))
                trainable_parameters = sum(p.numel() for p in trainable)

                if gradient_checkpointing and not was_checkpointing:
                    _set_checkpointing(model, True)

                def batch_loss(rows: torch.Tensor, total_positions: int) -> torch.Tensor:
                    ids = sequences[rows].to(target_device)                              # [b, L]
                    mask = loss_mask[rows].to(target_device)[:, 1:] if loss_mask is not None else None   # [b, L-1]
                    with torch.autocast(target_device.type, dtype=compute_dtype,
                                        enabled=compute_dtype != torch.float32):
                        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]    # [b, L-1, V]
                    if distill_loss == "kl":
                        with torch.no_grad():
                            teacher_device = next(teacher.parameters()).device
                            teacher_logits = teacher(input_ids=ids.to(teacher_device), use_cache=False).logits[:, :-1]
                        total, _ = kl_sum(logits, teacher_logits.to(target_device), temperature, mask)
                    else:
                        nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                              reduction="none").view(ids.shape[0], -1)    # [b, L-1]
                        total = nll.sum() if mask is None else (nll * mask).sum()
                    return total / total_positions

                def after_step() -> None:
                    with torch.no_grad():
                        for name, keep in keep_masks.items():
                            weight_2d(masked[name]).mul_(keep)

                desc = f"heal {mode}" + (f" ({train})" if mode == "distill" else "")
                losses = _train(model, trainable, sequences, loss_mask, steps, lr, batch_size, micro, generator,
                                batch_loss, after_step, progress, desc)
                if wrappers:
                    merge_lora(model, wrappers)      # raises if a zero outside a mask would be lost
                    merged = True
            finally:
                for hook in grad_hooks:
                    hook.remove()
                if wrappers and not merged:
                    detach_lora(model, wrappers)
                if gradient_checkpointing and not was_checkpointing and _is_checkpointing(model):
                    _set_checkpointing(model, False)
                model.eval()
                for name, p in params.items():
                    if p.dtype != orig_dtype[name]:
                        p.data = p.data.to(orig_dtype[name])
                    p.requires_grad_(orig_requires_grad[name])
                    if p.grad is not None:
                        p.grad = None

        _check_zeros_kept(masked, masks or keep_masks, zeros_before)
        loss_after = mean_nll(model, eval_ids, micro)
    finally:
        model.to(orig_device)      # also when training failed
    last = losses[-min(10, len(losses)):]
    distill = None
    if mode == "distill":
        distill = {"loss": distill_loss, "temperature": temperature, "self_generated": self_generated}
        if self_generated:
            distill.update(prompts=int(prompts_ids.shape[0]), prompt_tokens=int(prompts_ids.shape[1]),
                           response_tokens=int(response_tokens or prompts_ids.shape[1]), generation=generation,
                           response_tokens_total=int(loss_mask[:, 1:].sum()))
    return HealResult(
        mode=mode, train=train, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
        dtype=str(compute_dtype).replace("torch.", ""), loss_before=loss_before, loss_after=loss_after,
        trainable_parameters=trainable_parameters, total_parameters=total_parameters,
        seconds=time.perf_counter() - t0, seqlen=int(sequences.shape[1]), train_windows=int(sequences.shape[0]),
        eval_windows=int(eval_ids.shape[0]), rank=rank if train == "lora" else None,
        alpha=alpha if train == "lora" else None, train_loss_first=losses[0], train_loss_last=sum(last) / len(last),
        masked_modules=len([n for n in masked if n in linears]) if train != "perp" else 0,
        dense_modules=len([n for n in linears if n not in masked]) if train != "perp" else 0,
        teacher_loss=teacher_loss, distill=distill,
    )


def _train(model: nn.Module, trainable: list[nn.Parameter], sequences: torch.Tensor, loss_mask: torch.Tensor | None,
           steps: int, lr: float, batch_size: int, micro: int, generator: torch.Generator,
           batch_loss: Callable[[torch.Tensor, int], torch.Tensor], after_step: Callable[[], None],
           progress: bool, desc: str) -> list[float]:
    """AdamW over `trainable` only; returns the per-step training loss."""
    optimizer = torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    warmup = min(50, max(1, steps // 10))

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress_ = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress_)))

    # Epochs of seeded permutations, cut into steps: every window is seen before any is repeated.
    n = sequences.shape[0]
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(math.ceil(steps * batch_size / n))])
    order = order[: steps * batch_size].view(steps, batch_size)                         # [steps, batch]
    seqlen = sequences.shape[1]
    losses: list[float] = []
    model.train()
    with tqdm(total=steps, desc=desc, unit="step", disable=not progress) as bar:
        for step in range(steps):
            rows = order[step]
            positions = (int(loss_mask[rows][:, 1:].sum()) if loss_mask is not None
                         else rows.numel() * (seqlen - 1))
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            step_loss = 0.0
            for start in range(0, batch_size, micro):
                loss = batch_loss(rows[start: start + micro], max(positions, 1))
                loss.backward()
                step_loss += loss.item()
            if not math.isfinite(step_loss):
                raise UserError(f"heal diverged at step {step + 1} (loss {step_loss}); lower --lr")
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            after_step()
            losses.append(step_loss)
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.4f}", refresh=False)
            bar.update(1)
    return losses


def _is_checkpointing(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _set_checkpointing(model: nn.Module, on: bool) -> None:
    """HF activation (gradient) checkpointing on/off; non-reentrant, so frozen inputs need no grad hook."""
    if on:
        try:
            if hasattr(model, "activation_checkpointing_enable"):     # transformers >= 5.x name
                model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        except ValueError as exc:
            raise UserError(f"gradient checkpointing is not available for this model ({exc})") from None
        return
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()
    model.disable_input_require_grads()     # enable() hooked the embeddings; leave the model as it came


def _cast_params(params, dtype: torch.dtype) -> None:
    for p in params:
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def _parameter_of(handle: nn.Module | Matrix) -> tuple[nn.Parameter, int | None, bool]:
    """The parameter holding a matrix, the expert index into it (a fused 3-D expert parameter) and
    whether the matrix is stored transposed (GPT-2 Conv1D)."""
    if isinstance(handle, Matrix):
        if handle.expert is not None or handle.role == "router":
            return getattr(handle.module, handle.param), handle.expert, False
        handle = handle.module
    # weight_2d is a transposed view exactly when the strides differ.
    return handle.weight, None, weight_2d(handle).stride() != handle.weight.stride()


def _check_zeros_kept(masked: dict[str, nn.Module], masks: dict[str, torch.Tensor],
                      zeros_before: dict[str, int]) -> None:
    """Every pruned weight is still exactly zero (exact against a mask when there is one)."""
    for name, module in masked.items():
        weight = weight_2d(module)
        keep = masks.get(name)
        if keep is not None and bool((weight[~keep.to(weight.device)] != 0).any()):
            raise RuntimeError(f"heal changed pruned weights of {name}; the sparsity pattern was not kept")
        if int((weight == 0).sum()) < zeros_before[name]:
            raise RuntimeError(f"heal lost zeros of {name} ({zeros_before[name]} -> {int((weight == 0).sum())})")


def _check_args(mode, train_ids, eval_ids, steps, lr, batch_size, rank, alpha, train, dtype, micro_batch_size,
                teacher, model, temperature, distill_loss, prompts_ids, response_tokens,
                generation) -> torch.dtype | None:
    if mode not in HEAL_MODES:
        raise UserError(f"heal mode must be one of {', '.join(HEAL_MODES)}, got {mode!r}")
    for key, value in (("steps", steps), ("batch_size", batch_size), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"heal {key} must be a positive integer, got {value!r}")
    if micro_batch_size is not None and (not isinstance(micro_batch_size, int) or micro_batch_size < 1
                                         or batch_size % micro_batch_size):
        raise UserError(f"heal micro_batch_size must be a positive divisor of batch_size {batch_size}, "
                        f"got {micro_batch_size!r}")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not (0 < lr < 1) or math.isnan(lr):
        raise UserError(f"heal lr must be a number in (0, 1), got {lr!r}")
    if alpha is not None and (not isinstance(alpha, (int, float)) or alpha <= 0):
        raise UserError(f"heal alpha must be a positive number, got {alpha!r}")
    if train is not None:
        if train not in TRAIN_SETS:
            raise UserError(f"heal train must be one of {', '.join(TRAIN_SETS)}, got {train!r}")
        if mode != "distill" and train != mode:
            raise UserError(f"heal train={train} is only for mode distill (mode {mode} trains {mode})")
    for key, ids in (("train_ids", train_ids), ("eval_ids", eval_ids), ("prompts_ids", prompts_ids)):
        if ids is not None and (not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long
                                or ids.numel() == 0):
            raise UserError(f"heal {key} must be a LongTensor [n, seqlen] of token ids")
    if eval_ids is None or eval_ids.shape[1] < 2:
        raise UserError("heal needs eval_ids: held-out windows of at least 2 tokens")
    if mode == "distill":
        if teacher is None:
            raise UserError("heal mode distill needs a teacher (the unpruned model)")
        if teacher is model:
            raise UserError("the distillation teacher must be the unpruned model, not the model being healed")
        if teacher.config.vocab_size != model.config.vocab_size:
            raise UserError(f"teacher vocabulary ({teacher.config.vocab_size}) differs from the model's "
                            f"({model.config.vocab_size}); the teacher must be the model this one was pruned from")
        if distill_loss is not None and distill_loss not in DISTILL_LOSSES:
            raise UserError(f"distill loss must be kl or ce, got {distill_loss!r}")
        if distill_loss == "ce" and prompts_ids is None:
            raise UserError("distill loss ce trains on the teacher's responses; give prompts (self-generated data)")
        if generation not in GENERATIONS:
            raise UserError(f"generation must be sample or greedy, got {generation!r}")
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise UserError(f"distill temperature must be positive, got {temperature!r}")
        if response_tokens is not None and (not isinstance(response_tokens, int) or response_tokens < 1):
            raise UserError(f"response_tokens must be a positive integer, got {response_tokens!r}")
    elif teacher is not None or prompts_ids is not None:
        raise UserError(f"a teacher / prompts are only used by mode distill, not {mode}")
    if train_ids is None and not (mode == "distill" and prompts_ids is not None):
        raise UserError("heal needs train_ids (token windows to train on)")
    if train_ids is not None and train_ids.shape[1] < 2:
        raise UserError("heal train_ids windows need at least 2 tokens")
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in TRAIN_DTYPES:
            raise UserError(f"heal dtype must be float32 or bfloat16, got {dtype!r}")
        return TRAIN_DTYPES[dtype]
    if dtype not in TRAIN_DTYPES.values():
        raise UserError(f"heal dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    return dtype
