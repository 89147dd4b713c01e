"""Back-to-back wall time of plain SparseGPT and the quality recipes' stages on the 4M benchmark Llama
(one process, one thread, same calibration as quality_bench.py), for the "within 5x SparseGPT" check:

    .venv/bin/python benchmarks/quality_timing.py [--repeats 2]

Prints seconds of `llmprune.compress` per run and each recipe's ratio to SparseGPT at the same target.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from tinymodel import CACHE_DIR, get_trained_llama  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import llmprune
    from llmprune.calibration.data import calibration_windows, stdlib_texts
    from llmprune.recipe import load_recipe
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = get_trained_llama("stdlib-llama")
    calib_path = CACHE_DIR / "quality" / "calib.pt"
    calib = torch.load(calib_path) if calib_path.is_file() else calibration_windows(
        AutoTokenizer.from_pretrained(model_dir), stdlib_texts("train"), 64, 256, seed=0)
    runs = {"sparsegpt 0.7": {"stages": [{"method": "sparsegpt", "sparsity": 0.7}]},
            "quality-70": load_recipe("quality-70").to_dict(),
            "sparsegpt 2:4": {"stages": [{"method": "sparsegpt", "sparsity": "2:4"}]},
            "quality-2of4": load_recipe("quality-2of4").to_dict()}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, recipe in runs.items():
            recipe = {**recipe, "calibration": {"batch_size": 8}}
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            t0 = time.perf_counter()
            llmprune.compress(model, None, recipe, calib=calib, device="cpu", progress=False)
            seconds[name].append(time.perf_counter() - t0)
            print(f"{name}: {seconds[name][-1]:.2f} s", flush=True)
    best = {name: min(values) for name, values in seconds.items()}
    print(f"\n| run | best of {args.repeats} (s) | x SparseGPT |\n|---|---|---|")
    for name, value in best.items():
        ref = best["sparsegpt 2:4"] if name in ("sparsegpt 2:4", "quality-2of4") else best["sparsegpt 0.7"]
        print(f"| {name} | {value:.2f} | {value / ref:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
