"""Prune a saved model with llmprune on given calibration windows, as one process (the llmprune half
of benchmarks/compress_bench.py's side-by-side; the mirror of llmc_run.py):

    .venv/bin/python benchmarks/llmprune_run.py --model DIR --calib windows.pt \
        --method {magnitude,wanda,sparsegpt} --pattern {0.5,2:4,4:8} --output DIR [--true-sequential]

It does what `llmprune compress` does (load, compress through the Python API, save through
llmprune.io.save with the sidecar), but reads the token windows from the same `.pt` file that
llm-compressor gets, so both tools see byte-identical calibration data.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", required=True, help=".pt file with a [n, seqlen] LongTensor")
    parser.add_argument("--method", required=True)
    parser.add_argument("--pattern", required=True, help="0.5 (unstructured) or N:M")
    parser.add_argument("--output", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=None,
                        help="default: the method's own (sparsegpt: true-sequential, wanda: two-pass)")
    args = parser.parse_args()

    t0 = time.perf_counter()
    import torch

    import llmprune
    from llmprune.io.load import load_model, load_tokenizer
    from llmprune.io.save import output_dir, save_model
    from llmprune.io.sidecar import write_sidecar

    windows = torch.load(args.calib)  # [n, seqlen]
    model = load_model(args.model, dtype="auto")
    tokenizer = load_tokenizer(args.model)
    t_load = time.perf_counter()
    stage = {"method": args.method, "sparsity": args.pattern}
    if args.true_sequential is not None:
        stage["true_sequential"] = args.true_sequential
    recipe = {"stages": [stage],
              "calibration": {"data": "stdlib", "samples": windows.shape[0], "seqlen": windows.shape[1]}}
    model, report = llmprune.compress(model, tokenizer, recipe, calib=windows, device=args.device, progress=False)
    t_prune = time.perf_counter()
    with output_dir(args.output, overwrite=True) as tmp:
        save_model(model, tokenizer, tmp)
        write_sidecar(tmp, {"kind": "compress", **report.sidecar()})
    result = {"ok": True, "achieved": report.sparsity, "load_s": t_load - t0, "compress_s": t_prune - t_load,
              "true_sequential": report.recipe.stages[0].true_sequential,
              "seconds": time.perf_counter() - t0}
    print("LLMPRUNE_RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
