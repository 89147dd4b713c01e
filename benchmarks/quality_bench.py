"""Whole-model quality benchmark (issue 13): held-out perplexity and wall time of llmprune's allocation
(uniform / owl / search) x method (sparsegpt / wanda / alps) x refine (none / dsnot) [x permute at N:M],
the shipped quality recipes, and llm-compressor 0.14 (SparseGPT, Wanda, each ± its OWL profile) on the
same calibration windows.

    .venv/bin/python benchmarks/quality_bench.py --patterns 0.7,2:4          # the two columns of the bar
    .venv/bin/python benchmarks/quality_bench.py --patterns 0.5,0.6,0.8 --methods sparsegpt,wanda
    .venv/bin/python benchmarks/quality_bench.py --table                     # print the tables of all runs

- Model: the trained 4M benchmark Llama (benchmarks/_cache/stdlib-llama, `get_trained_llama`).
- Calibration: `--calib-samples` (default 64) windows x 256 tokens of stdlib train, seed 0, saved to
  benchmarks/_cache/quality/calib.pt and given to both tools (llm-compressor via benchmarks/llmc_run.py
  inside benchmarks/_cache/llmc-venv, as a separate process).
- Perplexity: stdlib test, the first `--eval-windows` (default 128) non-overlapping 256-token windows
  (`tinymodel.heldout_perplexity`), the same code for both tools' outputs.
- Time: llmprune's `compress` wall seconds in this process; llm-compressor's `oneshot` seconds (its
  result line; model loading and imports excluded on both sides). torch.set_num_threads(--threads).
- Every run appends one json line to benchmarks/_cache/quality/runs.jsonl; a rerun skips the runs already
  there (delete the file to start over), so the tables are built from all runs so far.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from tinymodel import CACHE_DIR, encode_joined, get_trained_llama, heldout_perplexity  # noqa: E402

LLMC_PYTHON = CACHE_DIR / "llmc-venv" / "bin" / "python"
WORK = CACHE_DIR / "quality"
RUNS = WORK / "runs.jsonl"
RECIPES = ("quality-70", "quality-2of4")


def run_key(entry: dict) -> str:
    return json.dumps({k: entry[k] for k in ("tool", "pattern", "method", "allocation", "refine", "permute")},
                      sort_keys=True)


def done_runs() -> dict[str, dict]:
    if not RUNS.is_file():
        return {}
    runs = [json.loads(line) for line in RUNS.read_text().splitlines() if line.strip()]
    return {run_key(r): r for r in runs}


def record(entry: dict) -> None:
    with RUNS.open("a") as f:
        f.write(json.dumps(entry) + "\n")
    print("  " + json.dumps(entry), flush=True)


def llmprune_configs(patterns, methods, allocations, refines, permutes, recipes):
    for pattern in patterns:
        nm = ":" in pattern
        for method in methods:
            for allocation in (["uniform"] if nm else allocations):
                for refine in refines:
                    for permute in (permutes if nm else [False]):
                        yield {"tool": "llmprune", "pattern": pattern, "method": method, "allocation": allocation,
                               "refine": refine, "permute": permute}
    from llmprune.recipe import load_recipe

    for name in recipes:
        pattern = str(load_recipe(name).stages[-1].params["sparsity"])
        if pattern in patterns:
            yield {"tool": "llmprune", "pattern": pattern, "method": f"recipe:{name}", "allocation": "recipe",
                   "refine": "recipe", "permute": False}


def llmc_configs(patterns, methods, allocations):
    for pattern in patterns:
        for method in methods:
            for owl in ([False] if ":" in pattern else [a == "owl" for a in allocations]):
                yield {"tool": "llm-compressor", "pattern": pattern, "method": method,
                       "allocation": "owl" if owl else "uniform", "refine": "none", "permute": False}


def run_llmprune(config: dict, dense, tokenizer, calib: torch.Tensor, stage_extra: dict) -> tuple[object, dict]:
    import llmprune
    from llmprune.recipe import load_recipe

    if config["method"].startswith("recipe:"):
        recipe = load_recipe(config["method"].split(":", 1)[1]).to_dict()
    else:
        stage = {"method": config["method"], "sparsity": config["pattern"], "allocation": config["allocation"],
                 "refine": config["refine"], **stage_extra.get(config["method"], {})}
        if config["permute"]:
            stage["permute"] = True
        recipe = {"stages": [stage]}
    recipe["calibration"] = {"batch_size": 8}
    model = copy.deepcopy(dense)
    t0 = time.perf_counter()
    model, report = llmprune.compress(model, tokenizer, recipe, calib=calib, device="cpu", progress=False)
    seconds = time.perf_counter() - t0
    info = {"seconds": round(seconds, 2), "achieved": round(report.sparsity, 5)}
    for stage in report.stages:
        if "search" in stage.scores:
            search = stage.scores["search"]
            info["search"] = {"kept": search["kept"], "calibration_loss": search["calibration_loss"],
                              "layers": stage.layers}
        if stage.layers and "search" not in stage.scores:
            info["layers"] = stage.layers
    return model, info


def run_llmc(config: dict, model_dir: Path, calib_path: Path) -> tuple[object | None, dict]:
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(dir=WORK) as out:
        cmd = [str(LLMC_PYTHON), str(HERE / "llmc_run.py"), "--model", str(model_dir), "--calib", str(calib_path),
               "--method", config["method"], "--pattern", config["pattern"], "--output", out]
        if config["allocation"] == "owl":
            cmd.append("--owl")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        process_s = time.perf_counter() - t0
        result = None
        for line in proc.stdout.splitlines():
            if line.startswith("LLMC_RESULT "):
                result = json.loads(line[len("LLMC_RESULT "):])
        if result is None or not result.get("ok"):
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
            return None, {"error": (result or {}).get("error", f"exit {proc.returncode}: {tail}")}
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return model, {"seconds": round(result["oneshot_s"], 2), "process_s": round(process_s, 2),
                   "achieved": round(result["achieved"], 5)}


def label(r: dict) -> str:
    if r["method"].startswith("recipe:"):
        return f"**{r['method'][7:]}**"
    parts = [r["method"]] + ([r["allocation"]] if r["allocation"] != "uniform" else [])
    parts += ([r["refine"]] if r["refine"] != "none" else []) + (["permute"] if r["permute"] else [])
    return ("llmc " if r["tool"] == "llm-compressor" else "") + "+".join(parts)


def tables(runs: list[dict], dense_ppl: float | None) -> str:
    patterns = sorted({r["pattern"] for r in runs}, key=lambda p: (":" in p, p))
    rows: dict[str, dict[str, dict]] = {}
    for r in runs:
        rows.setdefault(label(r), {})[r["pattern"]] = r
    def sort_key(name):
        r = next(iter(rows[name].values()))
        return (r["tool"] != "llm-compressor", r["method"].startswith("recipe:"), r["method"], name)
    header = "| run | " + " | ".join(f"{p} ppl | {p} s" for p in patterns) + " |"
    lines = [header, "|" + "---|" * (1 + 2 * len(patterns))]
    if dense_ppl is not None:
        lines.append(f"| dense | " + " | ".join(f"{dense_ppl:.2f} | -" for _ in patterns) + " |")
    errors: dict[str, list[str]] = {}
    for name in sorted(rows, key=sort_key):
        cells = []
        for p in patterns:
            r = rows[name].get(p)
            if r is None:
                cells += ["", ""]
            elif "ppl" not in r:
                errors.setdefault(r.get("error", "?"), []).append(f"{name} @ {p}")
                cells += [f"error {list(errors).index(r.get('error', '?')) + 1}", "-"]
            else:
                cells += [f"{r['ppl']:.2f}", f"{r['seconds']:.1f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for i, (error, where) in enumerate(errors.items(), 1):
        lines.append(f"\nerror {i} ({', '.join(where)}): `{error}`")
    searched = [r for r in runs if "search" in r]
    if searched:
        lines += ["", "| search run | pattern | kept | calib loss uniform | calib loss searched | per-layer sparsity |",
                  "|---|---|---|---|---|---|"]
        for r in searched:
            s = r["search"]
            layers = ", ".join(f"{v:.2f}" for v in s["layers"].values())
            lines.append(f"| {label(r)} | {r['pattern']} | {s['kept']} | {s['calibration_loss']['uniform']} | "
                         f"{s['calibration_loss']['searched']} | {layers} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patterns", default="0.7,2:4")
    parser.add_argument("--methods", default="sparsegpt,wanda,alps")
    parser.add_argument("--allocations", default="uniform,owl,search")
    parser.add_argument("--refines", default="none,dsnot")
    parser.add_argument("--permutes", default="false,true", help="N:M patterns only")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--llmc-methods", default="sparsegpt,wanda", help="'' to skip llm-compressor")
    parser.add_argument("--llmc-allocations", default="uniform,owl", help="owl: its sparsity_profile owl")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--eval-windows", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--table", action="store_true", help="only print the tables of the recorded runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    split = lambda s: [v for v in s.split(",") if v]  # noqa: E731
    WORK.mkdir(parents=True, exist_ok=True)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmprune.calibration.data import calibration_windows, stdlib_texts

    model_dir = get_trained_llama("stdlib-llama")
    seqlen = json.loads((model_dir / "train_meta.json").read_text())["seqlen"]
    dense_file = WORK / "dense.json"
    if args.table:
        dense_ppl = json.loads(dense_file.read_text())["ppl"] if dense_file.is_file() else None
        print(tables(list(done_runs().values()), dense_ppl))
        return 0
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    test_tokens = encode_joined(tokenizer, stdlib_texts("test"))
    calib = calibration_windows(tokenizer, stdlib_texts("train"), args.calib_samples, seqlen, seed=0)  # [n, seqlen]
    calib_path = WORK / "calib.pt"
    torch.save(calib, calib_path)
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ppl = lambda m: heldout_perplexity(m, tokenizer, None, seqlen, max_windows=args.eval_windows,  # noqa: E731
                                       tokens=test_tokens)
    dense_ppl = ppl(dense)
    dense_file.write_text(json.dumps({"ppl": dense_ppl, "eval_windows": args.eval_windows,
                                      "calib": list(calib.shape)}))
    print(f"model {model_dir}; calibration {tuple(calib.shape)}; held-out {args.eval_windows} x {seqlen} tokens; "
          f"dense ppl {dense_ppl:.3f}", flush=True)

    done = done_runs()
    permutes = [v.lower() == "true" for v in split(args.permutes)]
    configs = list(llmc_configs(split(args.patterns), split(args.llmc_methods), split(args.llmc_allocations)))
    if args.llmc_methods and not LLMC_PYTHON.is_file():
        print(f"llm-compressor venv not found at {LLMC_PYTHON}; skipping it")
        configs = []
    configs += list(llmprune_configs(split(args.patterns), split(args.methods), split(args.allocations),
                                     split(args.refines), permutes, split(args.recipes)))
    for config in configs:
        if run_key(config) in done:
            continue
        print(f"{label(config)} @ {config['pattern']}", flush=True)
        if config["tool"] == "llm-compressor":
            model, info = run_llmc(config, model_dir, calib_path)
        else:
            model, info = run_llmprune(config, dense, tokenizer, calib, {})
        if model is not None:
            info["ppl"] = round(ppl(model), 4)
        record({**config, **info})
        del model
    print(tables(list(done_runs().values()), dense_ppl))
    return 0


if __name__ == "__main__":
    sys.exit(main())
