"""`SparseLinear24` (an nn.Linear stored packed) and `sparsify_model` (swap the 2:4 linears).

A packable linear is an `nn.Linear` or GPT-2's `Conv1D` (the same function with its weight stored
transposed, [in, out]); both are packed from their `[out_features, in_features]` view, so the 2:4
groups always run along in_features and SparseLinear24 computes exactly what the module did.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .format import Not24Error, is_24, pack_24, packed_nbytes, unpack_24
from .ops import dispatch, sparse24_linear

# Output heads stay dense unless targeted explicitly (CONTRIBUTING.md): the family's head from the
# architecture registry (`embed_out` for GPT-NeoX), and any module that is the model's output embedding,
# are always skipped (`output_heads`). `skip` adds names (matched by their last component).
DEFAULT_SKIP: tuple[str, ...] = ()


def output_heads(model: nn.Module) -> set[str]:
    """Full names of the model's output head: the registry's `lm_head` for its family (plain `lm_head`
    for a family the registry does not know) and whatever module is its output embedding."""
    from llmprune.io.tensor_names import head_module_names

    return head_module_names(model)


class SparseLinear24(nn.Module):
    """y = x Wᵀ + b with W kept packed: `values` [out, in/2] and `bitmask` uint8 [out, in/8]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        if in_features % 8 != 0:
            raise Not24Error(f"in_features={in_features} must be a multiple of 8 for the packed 2:4 format")
        self.in_features = in_features
        self.out_features = out_features
        dtype = dtype or torch.get_default_dtype()
        self.register_buffer("values", torch.empty(out_features, in_features // 2, device=device, dtype=dtype))
        self.register_buffer("bitmask", torch.empty(out_features, in_features // 8, device=device, dtype=torch.uint8))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Module, keep_mask: torch.Tensor | None = None) -> "SparseLinear24":
        """Pack a dense-with-zeros nn.Linear or Conv1D (raises Not24Error if its [out, in] weight is
        not 2:4 along in_features). keep_mask: optional bool [out, in]."""
        weight = weight_oi(linear).detach()
        out_features, in_features = weight.shape
        values, bitmask = pack_24(weight, keep_mask)
        module = cls(in_features, out_features, bias=linear.bias is not None,
                     device=weight.device, dtype=weight.dtype)
        module.values = values
        module.bitmask = bitmask
        if linear.bias is not None:
            module.bias.data = linear.bias.detach().clone()
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cslt_weight is not None and x.numel() > dispatch.mm_max_m * self.in_features:
            return F.linear(x, self.cslt_weight, self.bias)  # opt-in prefill path, see below
        return sparse24_linear(x, self.values, self.bitmask, self.bias)

    # Prefill (M > dispatch.mm_max_m) is compute-bound: there the default path unpacks the weight
    # and calls cuBLAS, which costs one extra pass over the weight bytes (~0.64x dense at M=512,
    # ~0.88x at M=2048 for Llama-3-8B shapes at H200 rates). cuSPARSELt's sparse tensor cores can
    # beat dense there, but need their own arch-specific compressed copy: +9/16 of the dense bytes
    # (1.125x dense in total). Opt-in, CUDA only, not saved in the state dict.
    cslt_weight = None

    def enable_cusparselt_prefill(self) -> None:
        from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

        if not self.values.is_cuda:
            raise ValueError("cuSPARSELt needs the module on a CUDA GPU")
        SparseSemiStructuredTensor._FORCE_CUTLASS = False
        self.cslt_weight = to_sparse_semi_structured(self.dense_weight())

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.values.dtype

    def dense_weight(self) -> torch.Tensor:
        return unpack_24(self.values, self.bitmask)

    def to_linear(self) -> nn.Linear:
        """The dense-with-zeros nn.Linear (for export and debugging)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dense_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def packed_nbytes(self) -> int:
        return packed_nbytes(self.values, self.bitmask)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, dtype={self.values.dtype}, format=sparse24")


@dataclass
class SparsifyReport:
    swapped: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # linear name -> why it stayed dense
    bytes_dense: int = 0  # weight bytes of the swapped linears before ...
    bytes_packed: int = 0  # ... and after packing

    def table(self) -> str:
        ratio = self.bytes_packed / self.bytes_dense if self.bytes_dense else float("nan")
        return (f"packed linears  {len(self.swapped)}\n"
                f"left dense      {len(self.skipped)}\n"
                f"weight bytes    {self.bytes_dense / 2**20:,.1f} MiB -> {self.bytes_packed / 2**20:,.1f} MiB "
                f"({ratio:.2%})")


def is_packable_type(module: nn.Module) -> bool:
    """nn.Linear or GPT-2's Conv1D, by exact type (subclasses may carry extra state)."""
    return type(module) is nn.Linear or type(module).__name__ == "Conv1D"


def weight_oi(module: nn.Module) -> torch.Tensor:
    """The weight of an nn.Linear / Conv1D as [out_features, in_features] (a view)."""
    if type(module).__name__ == "Conv1D":
        return module.weight.t()  # Conv1D stores [in, out]: y = x @ W + b
    return module.weight


def skip_reason(name: str, module: nn.Module, out_emb: nn.Module | None, skip: tuple[str, ...] = DEFAULT_SKIP,
                check_values: bool = True, heads: set[str] | frozenset[str] = frozenset()) -> str | None:
    """Why a packable-type module stays dense (None: it can be packed). `heads`: the model's output
    heads (`output_heads`). With check_values=False only what is known from shapes is checked (works on
    a meta-device model)."""
    if name in heads or name.split(".")[-1] in skip or module is out_emb:
        return "output head"
    in_features = weight_oi(module).shape[1]
    if in_features % 8 != 0:
        return "in_features not a multiple of 8"
    if not check_values:
        return None
    if module.weight.is_meta:
        return "weight not materialised"
    if not is_24(weight_oi(module).detach()):
        return "not 2:4"
    return None


def candidate_linears(model: nn.Module, skip: tuple[str, ...] = DEFAULT_SKIP):
    """Yield (name, linear, reason_to_skip_or_None) for every nn.Linear / Conv1D of the model."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads = output_heads(model)
    seen_weights: dict[int, str] = {}
    for name, module in model.named_modules():
        if not is_packable_type(module):
            continue
        ptr = module.weight.data_ptr()
        reason = skip_reason(name, module, out_emb, skip, check_values=False, heads=heads)
        if reason is None and ptr in seen_weights and not module.weight.is_meta:
            reason = f"weight shared with {seen_weights[ptr]}"
        if reason is None:
            reason = skip_reason(name, module, out_emb, skip, heads=heads)
        seen_weights.setdefault(ptr, name)
        yield name, module, reason


def sparsify_model(model: nn.Module, skip: tuple[str, ...] = DEFAULT_SKIP,
                   cusparselt_prefill: bool = False) -> SparsifyReport:
    """Replace (in place) every nn.Linear / Conv1D whose weight is 2:4 along in_features by a
    SparseLinear24; the output head (`output_heads`: the registry's, e.g. GPT-NeoX `embed_out`) stays
    dense. Returns what was swapped.
    cusparselt_prefill: also keep a cuSPARSELt copy for prefill (see SparseLinear24)."""
    report = SparsifyReport()
    swaps = []
    for name, linear, reason in candidate_linears(model, skip):
        if reason is not None:
            report.skipped[name] = reason
            continue
        swaps.append((name, linear))
    for name, linear in swaps:
        packed = SparseLinear24.from_linear(linear)
        if cusparselt_prefill:
            packed.enable_cusparselt_prefill()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, packed)
        report.swapped.append(name)
        report.bytes_dense += linear.weight.numel() * linear.weight.element_size()
        report.bytes_packed += packed.packed_nbytes()
    return report
