"""Public face of the 2:4 kernels (the implementation lives in `llmprune.triton_kernels`).

    values, bitmask = pack_24(weight)              # [N, K/2] + uint8 [N, K/8] (sparse-24-bitmask)
    weight = unpack_24(values, bitmask)            # bit-exact round trip
    y = sparse24_linear(x, values, bitmask, bias)  # x @ Wᵀ (+ bias), any leading shape of x
    layer = SparseLinear24.from_linear(linear)
    report = sparsify_model(model)                 # swap every 2:4 nn.Linear/Conv1D (not lm_head), in place
    info = save_sparse24(model, tokenizer, dir)    # packed checkpoint; returns llmprune.json's `pack`
    model = load_pretrained(dir)                   # rebuild with packed modules, no dense weights
    unpack_sparse24(dir, dense_dir)                # the plain dense checkpoint it stands for
    check_sparse24_possible(meta_model, recipe)    # before pruning: can the result be stored packed?

Importing this module defines the Triton kernels, so on a machine without a GPU set
TRITON_INTERPRET=1 *before* importing it to run them in the interpreter (otherwise CPU tensors
take the torch reference path).
"""
from llmprune.triton_kernels.checkpoint import (check_sparse24_possible, is_packed_checkpoint, load_pretrained,
                                               save_sparse24, unpack_sparse24)
from llmprune.triton_kernels.format import Not24Error, check_packed, is_24, keep_mask_24, pack_24, unpack_24
from llmprune.triton_kernels.module import SparseLinear24, SparsifyReport, sparsify_model
from llmprune.triton_kernels.ops import dispatch, sparse24_linear

__all__ = [
    "pack_24", "unpack_24", "is_24", "keep_mask_24", "check_packed", "Not24Error",
    "sparse24_linear", "dispatch", "SparseLinear24", "sparsify_model", "SparsifyReport",
    "save_sparse24", "load_pretrained", "is_packed_checkpoint", "unpack_sparse24", "check_sparse24_possible",
]
