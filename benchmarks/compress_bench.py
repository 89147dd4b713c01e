"""Compression benchmark (issue 2): perplexity and wall time of magnitude / Wanda / SparseGPT at
50%, 4:8 and 2:4 on a small trained Llama, per-matrix timings at LLaMA-7B shapes, and the
side-by-side with llm-compressor 0.14 on the same model and the same calibration windows.

    .venv/bin/python benchmarks/compress_bench.py                     # everything (~25-40 min on a shared 2-core box)
    .venv/bin/python benchmarks/compress_bench.py --no-llmc --no-matrix
    .venv/bin/python benchmarks/compress_bench.py --results-md benchmarks/RESULTS.md   # also write tables

What is measured
- Model (`--model`): `20m` (default) is `get_trained_llama("stdlib-llama-20m", **COMPRESS_BENCH_LLAMA)`,
  a 6-layer Llama, hidden 512, MLP 1408, GQA 8/4, 19.8M parameters, big enough that a whole
  process is mostly pruning rather than the ~4 s of Python/torch/transformers start-up and teardown
  every process pays. `4m` is `get_trained_llama()` (4 layers, hidden 256; better trained, so
  pruning hurts it more visibly). Both are trained on the stdlib train split and cached in
  benchmarks/_cache/.
- Calibration: 128 windows x 256 tokens of stdlib train, seed 0 (`calibration_windows`, what
  `llmprune compress --calib-data stdlib --calib-samples 128 --calib-seqlen 256` draws), saved to
  benchmarks/_cache/bench/calib.pt and given to both tools.
- Perplexity: stdlib test split, joined with "\\n\\n", non-overlapping 256-token windows
  (`tinymodel.heldout_perplexity`), the same code for every model including llm-compressor's.
- Time: for each tool, a fresh Python process that loads the saved model, reads calib.pt, prunes
  and saves (benchmarks/llmprune_run.py; benchmarks/llmc_run.py inside benchmarks/_cache/llmc-venv),
  timed from outside ("process s"); plus llmprune's own timing of `compress()` from its llmprune.json.
  SparseGPT runs twice for llmprune: its default (true-sequential, one pass per layer) and
  `--no-true-sequential` (the reference two-pass schedule, the one llm-compressor uses).
- Per matrix: the method functions called directly on random weights with statistics from 4096
  random tokens (Hessian / squared input norms), the setting of ../shared/reference/toolkits.md §4.3.

llm-compressor venv (once; never lets pip pick torch):
    python3 -m venv benchmarks/_cache/llmc-venv
    benchmarks/_cache/llmc-venv/bin/pip install torch==2.13.0
    benchmarks/_cache/llmc-venv/bin/pip install llmcompressor==0.14.0.1
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from tinymodel import (CACHE_DIR, COMPRESS_BENCH_LLAMA, encode_joined, get_trained_llama,  # noqa: E402
                       heldout_perplexity, replace_results_section)

METHODS = ("magnitude", "wanda", "sparsegpt")
PATTERNS = ("0.5", "4:8", "2:4")
LLMC_PYTHON = CACHE_DIR / "llmc-venv" / "bin" / "python"
WORK = CACHE_DIR / "bench"
MODELS = {"20m": ("stdlib-llama-20m", COMPRESS_BENCH_LLAMA), "4m": ("stdlib-llama", {})}
TWO_PASS = "llmprune-two-pass"   # llmprune with --no-true-sequential


def table(rows: list[list[str]], header: list[str]) -> str:
    """A GitHub markdown table (also readable as plain text)."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in rows])


def load(path: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model


def decoder_sparsity(model) -> tuple[float, float]:
    """(sparsity of the decoder-layer linears, sparsity of lm_head)."""
    zeros = total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            zeros += (module.weight == 0).sum().item()
            total += module.weight.numel()
    head = model.get_output_embeddings().weight
    return zeros / total, (head == 0).float().mean().item()


def run_process(cmd: list[str], tag: str, log: Path) -> tuple[dict | None, float, str]:
    """Run one tool as a fresh process; return (its RESULT json, whole-process seconds, tail)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith(tag + " "):
            result = json.loads(line[len(tag) + 1:])
    tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:160]
    if result is None:
        result = {"ok": False, "error": f"exit {proc.returncode}: {tail}"}
    return result, seconds, tail


# --------------------------------------------------------------------------------------------


def bench_processes(model_dir: Path, calib_path: Path, tokenizer, test_tokens, seqlen: int, methods, patterns,
                    with_llmc: bool, device: str) -> dict:
    """Whole-process runs of both tools on the same saved model and calib.pt; perplexity of the outputs."""
    results = {}
    ours = [sys.executable, str(HERE / "llmprune_run.py"), "--device", device]
    tools = [("llmprune", ours, "LLMPRUNE_RESULT"),
             (TWO_PASS, ours + ["--no-true-sequential"], "LLMPRUNE_RESULT")]
    if with_llmc:
        tools.append(("llm-compressor", [str(LLMC_PYTHON), str(HERE / "llmc_run.py")], "LLMC_RESULT"))
    for method in methods:
        for pattern in patterns:
            for tool, prefix, tag in tools:
                if tool == TWO_PASS and method != "sparsegpt":   # wanda's default already is two-pass
                    continue
                out = WORK / f"{tool}-{method}-{pattern.replace(':', 'of')}"
                if out.exists():
                    shutil.rmtree(out)
                cmd = prefix + ["--model", str(model_dir), "--calib", str(calib_path), "--method", method,
                                "--pattern", pattern, "--output", str(out)]
                result, seconds, _ = run_process(cmd, tag, WORK / f"{out.name}.log")
                entry = {"process_s": seconds, **result}
                if result.get("ok") and (out / "config.json").is_file():
                    sidecar = out / "llmprune.json"
                    if sidecar.is_file():   # llmprune's own timing of compress() inside the process
                        entry["compress_s"] = json.loads(sidecar.read_text())["wall_time_s"]
                    model = load(out)
                    entry["ppl"] = heldout_perplexity(model, tokenizer, None, seqlen, tokens=test_tokens)
                    entry["sparsity"], entry["head"] = decoder_sparsity(model)
                    del model
                results[(tool, method, pattern)] = entry
                shown = (f"ppl {entry['ppl']:9.3f}  sparsity {entry['sparsity']:.4f}  lm_head {entry['head']:.2f}"
                         if "ppl" in entry else f"FAILED: {entry.get('error')}")
                print(f"  {tool:18s} {method:9s} {pattern:4s}  process {seconds:6.1f}s  {shown}", flush=True)
    return results


def bench_matrices(shapes, n_tokens: int, device: str, patterns=("0.5", "2:4")) -> list[list[str]]:
    """Per-matrix time of llmprune's sparsegpt/wanda functions on random weights (statistics untimed)."""
    from llmprune.masks import parse_pattern
    from llmprune.methods import LinearStats, get_method

    rows = []
    gen = torch.Generator().manual_seed(0)
    for out_features, in_features in shapes:
        weight = torch.randn(out_features, in_features, generator=gen) * 0.02        # [out, in]
        x = torch.randn(n_tokens, in_features, generator=gen)                       # [tokens, in]
        t0 = time.perf_counter()
        hessian = x.t() @ x                                                         # [in, in]
        hessian_s = time.perf_counter() - t0
        stats = LinearStats(n_tokens=n_tokens, input_sq_norm=(x * x).sum(0), hessian=hessian)
        del x
        for method in ("sparsegpt", "wanda"):
            fn = get_method(method).fn
            for pattern in patterns:
                w = weight.clone().to(device)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                pruned = fn(w, stats, parse_pattern(pattern))
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - t0
                achieved = (pruned == 0).float().mean().item()
                rows.append([f"{out_features}x{in_features}", method, pattern, f"{seconds:.2f}", f"{achieved:.4f}"])
                print(f"  matrix {out_features}x{in_features} {method:9s} {pattern:4s}  {seconds:7.2f}s  "
                      f"sparsity {achieved:.4f}", flush=True)
        rows.append([f"{out_features}x{in_features}", f"(H = XᵀX, {n_tokens} tokens)", "", f"{hessian_s:.2f}", ""])
    return rows


# --------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="20m")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--patterns", default=",".join(PATTERNS))
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--no-llmc", action="store_true", help="skip the llm-compressor side-by-side")
    parser.add_argument("--no-matrix", action="store_true", help="skip per-matrix timings")
    parser.add_argument("--matrix-shapes", default="4096x4096,4096x11008", help="OUTxIN,...")
    parser.add_argument("--llmc-matrix-shapes", default="4096x4096",
                        help="shapes to time llm-compressor's per-matrix functions at ('' = none; slow: ~80 s "
                             "for SparseGPT 4096x4096 on 2 cores, ~250 s at 4096x11008)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--results-md", type=Path, help="write the tables into this markdown file's section")
    args = parser.parse_args()
    methods, patterns = args.methods.split(","), args.patterns.split(",")
    bench_t0 = time.perf_counter()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from transformers import AutoTokenizer

    from llmprune.calibration.data import calibration_windows, stdlib_texts

    model_name, overrides = MODELS[args.model]
    model_dir = get_trained_llama(model_name, **overrides)
    meta = json.loads((model_dir / "train_meta.json").read_text())
    seqlen = meta["seqlen"]
    cfg = json.loads((model_dir / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    test_tokens = encode_joined(tokenizer, stdlib_texts("test"))
    WORK.mkdir(parents=True, exist_ok=True)
    calib = calibration_windows(tokenizer, stdlib_texts("train"), args.calib_samples, seqlen, seed=0)  # [n, seqlen]
    calib_path = WORK / "calib.pt"
    torch.save(calib, calib_path)
    print(f"model {model_dir} ({meta['parameters'] / 1e6:.2f}M params); calibration {tuple(calib.shape)}; "
          f"held-out {test_tokens.numel()} tokens = {test_tokens.numel() // seqlen} windows of {seqlen}", flush=True)

    dense = load(model_dir)
    dense_ppl = heldout_perplexity(dense, tokenizer, None, seqlen, tokens=test_tokens)
    print(f"  dense ppl {dense_ppl:.3f}", flush=True)
    del dense

    with_llmc = not args.no_llmc and LLMC_PYTHON.is_file()
    if not args.no_llmc and not with_llmc:
        print(f"llm-compressor venv not found at {LLMC_PYTHON}; skipping the side-by-side (see --help)")
    print("whole-process runs" + (" (llmprune and llm-compressor):" if with_llmc else " (llmprune):"), flush=True)
    procs = bench_processes(model_dir, calib_path, tokenizer, test_tokens, seqlen, methods, patterns, with_llmc,
                            args.device)

    matrix_rows = []
    if not args.no_matrix:
        print("per-matrix timings:", flush=True)
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.matrix_shapes.split(",")]
        matrix_rows = bench_matrices(shapes, 4096, args.device)
        llmc_times = {}
        if with_llmc and args.llmc_matrix_shapes:
            print(f"per-matrix timings of llm-compressor's functions ({args.llmc_matrix_shapes}):", flush=True)
            cmd = [str(LLMC_PYTHON), str(HERE / "llmc_matrix.py"), "--shapes", args.llmc_matrix_shapes]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            for line in proc.stdout.splitlines():
                if line.startswith("LLMC_MATRIX "):
                    r = json.loads(line[len("LLMC_MATRIX "):])
                    llmc_times[(r["shape"], r["method"], r["pattern"])] = r["seconds"]
                    print(f"  llm-compressor {r['shape']} {r['method']:9s} {r['pattern']:4s}  {r['seconds']:7.2f}s", flush=True)
        for row in matrix_rows:
            theirs = llmc_times.get((row[0], row[1], row[2]))
            row.append(f"{theirs:.2f}" if theirs is not None else "-")
            row.append(f"{theirs / float(row[3]):.1f}x" if theirs is not None and float(row[3]) > 0 else "-")

    # ---- tables
    rows = [["dense", "-", f"{dense_ppl:.3f}", "-", "-", "-"] + (["-", "-", "-"] if with_llmc else [])]
    variants = [(tool, method) for method in methods
                for tool in (["llmprune", TWO_PASS] if method == "sparsegpt" else ["llmprune"])]
    for tool, method in variants:
        for pattern in patterns:
            ours = procs.get((tool, method, pattern), {})
            label = method + (" (two-pass)" if tool == TWO_PASS else
                              " (true-seq.)" if ours.get("true_sequential") else "")
            row = [label, pattern, f"{ours['ppl']:.3f}" if "ppl" in ours else f"failed: {ours.get('error')}",
                   f"{ours['sparsity']:.4f}" if "sparsity" in ours else "-",
                   f"{ours['compress_s']:.2f}" if "compress_s" in ours else "-", f"{ours.get('process_s', 0):.1f}"]
            if with_llmc:
                theirs = procs.get(("llm-compressor", method, pattern), {})
                if "ppl" in theirs:
                    speedup = theirs["process_s"] / ours["process_s"] if ours.get("process_s") else 0.0
                    row += [f"{theirs['ppl']:.3f}", f"{theirs['process_s']:.1f}", f"{speedup:.2f}x"]
                else:
                    row += [f"— {theirs.get('error', 'not run')}", f"{theirs.get('process_s', 0):.1f}", "-"]
            rows.append(row)
    header = ["method", "pattern", "llmprune ppl", "sparsity", "compress() s", "process s"]
    if with_llmc:
        header += ["llm-compressor ppl", "llm-compressor process s", "speedup"]
    side = table(rows, header)

    matrix = table(matrix_rows, ["W (out x in)", "method", "pattern", "llmprune s", "sparsity", "llm-compressor s",
                                 "speedup"]) if matrix_rows else ""
    total = time.perf_counter() - bench_t0
    env = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
           f"device {args.device}; model: {meta['parameters'] / 1e6:.2f}M-param Llama ({cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}), "
           f"trained {meta['train_seconds']:.0f}s on stdlib train; held-out {test_tokens.numel()} tokens; "
           f"calibration {calib.shape[0]}x{calib.shape[1]} tokens; benchmark wall time {total / 60:.1f} min")
    print("\n" + env)
    print(f"\nHeld-out perplexity (stdlib test, seqlen {seqlen}) and time; 'process s' = a whole process "
          "(load + prune + save) per tool, same model, same calib.pt:\n" + side)
    if matrix:
        print("\nPer-matrix time (random weights, statistics from 4096 random tokens):\n" + matrix)

    if args.results_md:
        command = "`.venv/bin/python benchmarks/compress_bench.py " + " ".join(sys.argv[1:]) + "`"
        body = "\n\n".join(x for x in [
            f"### Model `{model_name}`", f"Command: {command}", env,
            f"#### Held-out perplexity (stdlib test, seqlen {seqlen}) and time, side by side with llm-compressor "
            f"0.14.0.1\n\n'compress() s' is llmprune's own timing of `llmprune.compress()`; 'process s' is a whole "
            f"process per tool (start Python, load the saved model, prune on the same calib.pt, save); "
            f"speedup = llm-compressor process s / llmprune process s.\n\n{side}",
            f"#### Per-matrix time (random weights, statistics from 4096 random tokens)\n\n{matrix}" if matrix else ""]
            if x)
        replace_results_section(args.results_md, f"compress_bench:{args.model}", body)
        print(f"\nwrote section into {args.results_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
