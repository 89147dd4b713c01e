"""Masked LoRA (PERP's MaskLoRA): a low-rank update that can only touch the weights that survived.

A wrapped linear computes

    y = base(x) + x · ((B A) · scale ⊙ M)ᵀ        A: [rank, in], B: [out, rank], M: keep_mask [out, in]

so the function trained is exactly the one that `merge` writes back, W ← W + (B A · scale) ⊙ M: every
zero of W stays zero, and an N:M pattern stays valid. A linear with no zeros (dense, or a structured
output whose shapes shrank) has no mask and uses the cheaper factored form base(x) + B(A x) · scale.

The mask is either given (a bool buffer) or read from the frozen base weight on every forward as
`W != 0`, which costs no memory: the base weight never changes while the adapter trains.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llmprune.arch import is_linear, weight_2d
from llmprune.errors import UserError


class MaskedLoRA(nn.Module):
    """A frozen linear (nn.Linear or GPT-2 Conv1D) plus a trainable low-rank update through its mask."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, keep_mask: torch.Tensor | None, masked: bool,
                 generator: torch.Generator):
        super().__init__()
        if not is_linear(base):
            raise TypeError(f"MaskedLoRA wraps a linear, not {type(base).__name__}")
        self.base = base
        weight = weight_2d(base)                                  # [out, in]
        out_features, in_features = weight.shape
        self.scale = alpha / rank
        self.masked = masked or keep_mask is not None
        # PEFT's init: A ~ kaiming_uniform(a=√5) = U(-1/√in, 1/√in), B = 0, so the wrapped model starts
        # as exactly the base model. Adapters are fp32 masters whatever the model's dtype.
        bound = 1.0 / math.sqrt(in_features)
        lora_a = (torch.rand(rank, in_features, generator=generator, dtype=torch.float32) * 2 - 1) * bound
        self.lora_A = nn.Parameter(lora_a.to(weight.device))                                     # [rank, in]
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=torch.float32, device=weight.device))
        if keep_mask is not None:
            self.register_buffer("keep_mask", keep_mask.to(device=weight.device, dtype=torch.bool), persistent=False)
        else:
            self.keep_mask = None

    def mask(self) -> torch.Tensor | None:
        """The keep mask [out, in] (bool), or None for an unmasked linear."""
        if not self.masked:
            return None
        return self.keep_mask if self.keep_mask is not None else weight_2d(self.base) != 0

    def delta(self) -> torch.Tensor:
        """(B A) · scale ⊙ M, [out, in], in the adapters' dtype (fp32 outside autocast)."""
        delta = (self.lora_B @ self.lora_A) * self.scale
        mask = self.mask()
        return delta if mask is None else delta * mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.masked:      # factored: never materialises an [out, in] matrix
            return y + F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)) * self.scale
        return y + F.linear(x, self.delta().to(x.dtype))

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Write W + (B A · scale) ⊙ M into the base weight (in its own dtype) and return the base module.

        Raises RuntimeError if any entry outside the mask is non-zero afterwards (never expected: it
        would mean the pattern the caller paid for was lost).
        """
        weight = weight_2d(self.base)                        # [out, in] view into the module's storage
        mask = self.mask()                                   # a new tensor or the buffer: safe to overwrite W
        delta = (self.lora_B @ self.lora_A) * self.scale     # fp32 (no autocast here)
        if mask is not None:
            delta = delta * mask
        weight.copy_((weight.float() + delta).to(weight.dtype))
        if mask is not None:
            leaked = int((weight[~mask] != 0).sum())
            if leaked:
                raise RuntimeError(f"LoRA merge left {leaked} non-zero weights outside the keep mask")
        return self.base


def attach_lora(model: nn.Module, linears: dict[str, nn.Module], rank: int, alpha: float,
                masks: dict[str, torch.Tensor] | None, generator: torch.Generator) -> dict[str, MaskedLoRA]:
    """Replace each named linear by a MaskedLoRA wrapper, in place; returns the wrappers by name.

    With `masks` (name -> keep_mask [out, in]) a linear listed there is masked by it; linears not
    listed are treated as dense. Without `masks`, a linear is masked iff its weight has zeros
    (mask read from the weight itself).
    """
    wrappers: dict[str, MaskedLoRA] = {}
    for name, module in linears.items():
        weight = weight_2d(module)
        keep_mask = masks.get(name) if masks is not None else None
        if keep_mask is not None:
            if tuple(keep_mask.shape) != tuple(weight.shape) or keep_mask.dtype != torch.bool:
                raise UserError(f"mask for {name} must be a bool tensor of shape {tuple(weight.shape)}, "
                                f"got {keep_mask.dtype} {tuple(keep_mask.shape)}")
            if bool((weight[~keep_mask.to(weight.device)] != 0).any()):
                raise UserError(f"mask for {name} marks non-zero weights as pruned; it is not this model's mask")
        masked = keep_mask is not None if masks is not None else bool((weight == 0).any())
        wrapper = MaskedLoRA(module, rank, alpha, keep_mask, masked, generator)
        _set_submodule(model, name, wrapper)
        wrappers[name] = wrapper
    return wrappers


def merge_lora(model: nn.Module, wrappers: dict[str, MaskedLoRA]) -> None:
    """Merge every wrapper into its base linear and put the plain module back (no LoRA left)."""
    for name, wrapper in wrappers.items():
        _set_submodule(model, name, wrapper.merge())


def detach_lora(model: nn.Module, wrappers: dict[str, MaskedLoRA]) -> None:
    """Put the untouched base linears back without merging (used when training fails)."""
    for name, wrapper in wrappers.items():
        _set_submodule(model, name, wrapper.base)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
