"""Per-matrix time of llm-compressor 0.14's own SparseGPT / Wanda functions (the counterpart of
compress_bench.py's per-matrix table). Runs inside benchmarks/_cache/llmc-venv:

    benchmarks/_cache/llmc-venv/bin/python benchmarks/llmc_matrix.py --shapes 4096x4096 --patterns 0.5,2:4

Same setting as llmprune's side: fp32 random weights (seed 0, std 0.02), statistics accumulated
(untimed) from 4096 random tokens with llm-compressor's accumulate_* functions, 50% / N:M, the
modifiers' defaults (block_size 128, dampening_frac 0.01). Prints one LLMC_MATRIX json line per run.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from llmcompressor.modifiers.pruning.sparsegpt import sgpt_sparsify
from llmcompressor.modifiers.pruning.wanda import wanda_sparsify


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="4096x4096")
    parser.add_argument("--patterns", default="0.5,2:4")
    parser.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    for shape in args.shapes.split(","):
        out_features, in_features = (int(v) for v in shape.split("x"))
        module = torch.nn.Linear(in_features, out_features, bias=False)
        with torch.no_grad():
            module.weight.copy_(torch.randn(out_features, in_features, generator=gen) * 0.02)
        x = torch.randn(args.tokens, in_features, generator=gen)                    # [tokens, in]
        hessian, n = sgpt_sparsify.make_empty_hessian(module), 0
        row_scalars, m = wanda_sparsify.make_empty_row_scalars(module), 0
        for chunk in x.split(512):   # 8 x 512 tokens, as the reference micro-benchmark
            hessian, n = sgpt_sparsify.accumulate_hessian(chunk.unsqueeze(0), module, hessian, n)
            row_scalars, m = wanda_sparsify.accumulate_row_scalars(chunk.unsqueeze(0), module, row_scalars, m)
        del x
        for method in ("sparsegpt", "wanda"):
            for pattern in args.patterns.split(","):
                prune_n, prune_m = (int(v) for v in pattern.split(":")) if ":" in pattern else (0, 0)
                sparsity = 0.5 if ":" in pattern else float(pattern)
                t0 = time.perf_counter()
                if method == "sparsegpt":
                    _, pruned = sgpt_sparsify.sparsify_weight(module, {module: hessian.clone()}, sparsity, prune_n,
                                                           prune_m, block_size=128, dampening_frac=0.01,
                                                           preserve_sparsity_mask=False)
                else:
                    pruned = wanda_sparsify.sparsify_weight(module, {module: row_scalars.clone()}, sparsity,
                                                            prune_n, prune_m)
                seconds = time.perf_counter() - t0
                print("LLMC_MATRIX " + json.dumps({"shape": shape, "method": method, "pattern": pattern,
                                                   "seconds": seconds,
                                                   "sparsity": (pruned == 0).float().mean().item()}), flush=True)


if __name__ == "__main__":
    main()
