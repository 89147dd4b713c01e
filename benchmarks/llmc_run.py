"""Prune a saved model with llm-compressor 0.14 on given calibration windows (the side-by-side
half of benchmarks/compress_bench.py). Runs inside benchmarks/_cache/llmc-venv, never the main venv:

    benchmarks/_cache/llmc-venv/bin/python benchmarks/llmc_run.py \
        --model DIR --calib windows.pt --method {wanda,sparsegpt,magnitude} --pattern {0.5,2:4,4:8} --output DIR

`windows.pt` is a `[n, seqlen]` LongTensor (the exact windows llmprune calibrates on). The recipe is
what llm-compressor's docs show for each method, with `ignore=["re:.*lm_head"]` (its default prunes
lm_head too) and `mask_structure` "0:0" (unstructured) or "N:M". Everything else is the library
default (batch_size 1, sequential pipeline, propagate_error). The caller times this whole process.

Exit status: 0 when a model was written; 3 when llm-compressor refused or ran a no-op (the
message says which); the achieved sparsity of the decoder linears is printed either way.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def build_modifier(method: str, pattern: str, owl: bool = False):
    sparsity = 0.5 if ":" in pattern else float(pattern)
    mask_structure = pattern if ":" in pattern else "0:0"
    # --owl: llm-compressor's own OWL profile with the OWL paper's M=5, λ=0.08 (llmprune's defaults).
    owl_args = {"sparsity_profile": "owl", "owl_m": 5, "owl_lmbda": 0.08} if owl else {}
    if method == "wanda":
        from llmcompressor.modifiers.pruning import WandaPruningModifier

        return WandaPruningModifier(sparsity=sparsity, mask_structure=mask_structure, targets=["Linear"],
                                    ignore=["re:.*lm_head"], **owl_args)
    if method == "sparsegpt":
        from llmcompressor.modifiers.pruning import SparseGPTModifier

        return SparseGPTModifier(sparsity=sparsity, mask_structure=mask_structure, targets=["Linear"],
                                 ignore=["re:.*lm_head"], **owl_args)
    if method == "magnitude":
        from llmcompressor.modifiers.pruning import MagnitudePruningModifier

        # Its mask factory only knows unstructured/channel/filter/block_*: "2:4" raises ValueError.
        return MagnitudePruningModifier(targets=["re:.*proj"], init_sparsity=sparsity, final_sparsity=sparsity,
                                        mask_structure="unstructured" if ":" not in pattern else pattern)
    raise SystemExit(f"unknown method {method}")


def decoder_sparsity(model) -> float:
    import torch

    zeros = total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            zeros += (module.weight == 0).sum().item()
            total += module.weight.numel()
    return zeros / max(total, 1)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", required=True, help=".pt file with a [n, seqlen] LongTensor")
    parser.add_argument("--method", required=True, choices=["wanda", "sparsegpt", "magnitude"])
    parser.add_argument("--pattern", required=True, help="0.5 (unstructured) or N:M")
    parser.add_argument("--output", required=True)
    parser.add_argument("--owl", action="store_true", help="sparsegpt/wanda with sparsity_profile owl (M=5, λ=0.08)")
    args = parser.parse_args()

    t0 = time.perf_counter()
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    windows = torch.load(args.calib)  # [n, seqlen]
    n, seqlen = windows.shape
    dataset = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": [[1] * seqlen] * n})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    t_load = time.perf_counter()
    try:
        modifier = build_modifier(args.method, args.pattern, args.owl)
        oneshot(model=model, tokenizer=tokenizer, recipe=modifier, dataset=dataset, num_calibration_samples=n,
                max_seq_length=seqlen, shuffle_calibration_samples=False, output_dir=args.output)
    except Exception as exc:  # report llm-compressor's refusal as data, not as a crash of the benchmark
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        print("LLMC_RESULT " + json.dumps({"ok": False, "error": message, "seconds": time.perf_counter() - t0}))
        return 3
    achieved = decoder_sparsity(model)
    result = {"ok": achieved > 0.0, "achieved": achieved, "load_s": t_load - t0,
              "oneshot_s": time.perf_counter() - t_load, "seconds": time.perf_counter() - t0}
    if achieved == 0.0:
        result["error"] = "ran without error but pruned nothing (0.0 sparsity in every decoder linear)"
    print("LLMC_RESULT " + json.dumps(result))
    return 0 if result["ok"] else 3


if __name__ == "__main__":
    sys.exit(main())
