"""Per-matrix quality benchmark (issue 13): time and relative reconstruction error of SparseGPT vs ALPS
(± its CG refit, short and reference-length ADMM) vs Wanda (± DSnoT, ± refit) at 50/70/80% and 2:4.

    .venv/bin/python benchmarks/quality_matrix.py                          # 1024² and 4096², synthetic H (~1 h, 1 thread)
    .venv/bin/python benchmarks/quality_matrix.py --sizes 1024 --patterns 0.7,2:4
    .venv/bin/python benchmarks/quality_matrix.py --model /work/main/benchmarks/_cache/stdlib-llama --sizes ""

What is measured
- error: tr((W − Ŵ) H (W − Ŵ)ᵀ) / tr(W H Wᵀ) = ‖WX − ŴX‖² / ‖WX‖² on the calibration inputs X
  (H = XᵀX, undamped), the quantity every method here minimises;
- time: wall seconds of the method function on this machine (CPU, torch.set_num_threads(--threads)),
  "x sgpt" is the ratio to SparseGPT on the same matrix and pattern;
- synthetic H (`--sizes`): X [2·n tokens, n] with correlated channels (a random rotation of a power-law
  spectrum), log-normal per-channel scales, 1% outlier channels x10 and a non-zero mean, like the
  inputs of LLM linears after a norm; W Gaussian / sqrt(n). One fixed seed;
- trained model (`--model DIR`): every linear of decoder layer `--layer` of a saved Llama, its inputs
  captured on the dense model from 64 x 256-token stdlib windows (the statistics the engine collects).

Rows: sparsegpt (block 128, damp 0.01); sparsegpt+refit[:K] (its mask, kept weights refit by K = 20 CG steps);
alps (default: 30 ADMM iterations + 10 CG); alps-norefit (same, refit_iters=0); alps-ref (the reference
schedule, max_iter 300); alps:I:R (max_iter I, refit_iters R; e.g. --rows sparsegpt,alps:6:5); wanda; wanda+dsnot (reference DSnoT, 50 cycles, Hessian guard on);
wanda+dsnot+refit.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmprune.masks import parse_pattern  # noqa: E402
from llmprune.methods import METHODS, LinearStats  # noqa: E402
from llmprune.methods.dsnot import dsnot_refine  # noqa: E402
from llmprune.methods.refit import refit_on_mask  # noqa: E402

ROWS = ("sparsegpt", "sparsegpt+refit", "alps", "alps-norefit", "alps-ref", "wanda", "wanda+dsnot", "wanda+dsnot+refit")


def synthetic_stats(n: int, seed: int = 0) -> LinearStats:
    g = torch.Generator().manual_seed(seed)
    tokens = 2 * n
    rotation, _ = torch.linalg.qr(torch.randn(n, n, generator=g))                 # [n, n]
    spectrum = torch.arange(1, n + 1, dtype=torch.float32) ** -0.5                 # power-law channel correlation
    scale = torch.exp(0.6 * torch.randn(n, generator=g))
    scale[torch.randperm(n, generator=g)[: max(1, n // 100)]] *= 10.0               # outlier channels
    x = (torch.randn(tokens, n, generator=g) * spectrum * n ** 0.25) @ rotation     # [tokens, n]
    x = (x + 0.3 * torch.randn(n, generator=g)) * scale                             # non-zero means
    return LinearStats(n_tokens=tokens, input_sq_norm=(x * x).sum(0), input_sum=x.sum(0), hessian=x.t() @ x)


def model_stats(model_dir: str, layer: int, split: str = "train") -> dict[str, tuple[torch.Tensor, LinearStats]]:
    """{linear name: (dense weight [out, in], stats of its inputs)} for one decoder layer of a saved Llama,
    from 64 x 256-token windows of the stdlib `split` (train: calibration; test: held-out check)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmprune.arch import prunable_linears, weight_2d
    from llmprune.calibration.data import calibration_windows, stdlib_texts

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = calibration_windows(tokenizer, stdlib_texts(split), 64, 256, seed=0)
    prefix = f"model.layers.{layer}."
    linears = {n: m for n, m in prunable_linears(model).items() if n.startswith(prefix)}
    stats = {n: LinearStats() for n in linears}

    def hook(name):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            s = stats[name]
            s.n_tokens += x.shape[0]
            for key, value in (("input_sq_norm", (x * x).sum(0)), ("input_sum", x.sum(0)), ("hessian", x.t() @ x)):
                setattr(s, key, value if getattr(s, key) is None else getattr(s, key) + value)
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    with torch.no_grad():
        for batch in ids.split(8):
            model(batch)
    for h in handles:
        h.remove()
    return {n[len(prefix):]: (weight_2d(m).detach().float().clone(), stats[n]) for n, m in linears.items()}


def rel_error(dense: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    d = (dense - pruned).double()
    h = hessian.double()
    return float(((d @ h) * d).sum() / ((dense.double() @ h) * dense.double()).sum())


def fresh(stats: LinearStats) -> LinearStats:
    """Same statistics, empty memo (so no method reuses another's inverse factor)."""
    return LinearStats(n_tokens=stats.n_tokens, input_sq_norm=stats.input_sq_norm, input_sum=stats.input_sum,
                       hessian=stats.hessian)


def run_row(row: str, weight: torch.Tensor, stats: LinearStats, pattern) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    if row == "sparsegpt":
        out = METHODS["sparsegpt"].fn(weight.clone(), fresh(stats), pattern)
    elif row.startswith("sparsegpt+refit"):             # sparsegpt+refit[:<iters>] (default 20)
        iters = int(row.split(":")[1]) if ":" in row else 20
        base = METHODS["sparsegpt"].fn(weight.clone(), fresh(stats), pattern)
        out = refit_on_mask(weight, base != 0, stats.hessian, iters=iters, n_tokens=stats.n_tokens, init=base)
    elif row == "alps":
        out = METHODS["alps"].fn(weight.clone(), fresh(stats), pattern)
    elif row == "alps-norefit":
        out = METHODS["alps"].fn(weight.clone(), fresh(stats), pattern, refit_iters=0)
    elif row == "alps-ref":
        out = METHODS["alps"].fn(weight.clone(), fresh(stats), pattern, max_iter=300)
    elif row.startswith("alps:"):                       # alps:<max_iter>:<refit_iters>
        max_iter, refit_iters = (int(v) for v in row.split(":")[1:])
        out = METHODS["alps"].fn(weight.clone(), fresh(stats), pattern, max_iter=max_iter, refit_iters=refit_iters)
    elif row == "wanda":
        out = METHODS["wanda"].fn(weight.clone(), fresh(stats), pattern)
    elif row in ("wanda+dsnot", "wanda+dsnot+refit"):
        keep = METHODS["wanda"].fn(weight.clone(), fresh(stats), pattern) != 0
        keep = dsnot_refine(weight, keep, stats, pattern)
        out = weight * keep if row == "wanda+dsnot" else refit_on_mask(weight, keep, stats.hessian, n_tokens=stats.n_tokens)
    else:
        raise ValueError(row)
    return out, time.perf_counter() - t0


def bench(label: str, weight: torch.Tensor, stats: LinearStats, patterns, rows,
          heldout: LinearStats | None = None) -> list[list[str]]:
    """Rows of [label, pattern, method, seconds, x sgpt, error, x sgpt (, held-out error, x sgpt)]."""
    table = []
    for spec in patterns:
        pattern = parse_pattern(spec)
        ref_time = ref_err = None
        for row in rows:
            out, seconds = run_row(row, weight, stats, pattern)
            err = rel_error(weight, out, stats.hessian)
            held = rel_error(weight, out, heldout.hessian) if heldout is not None else None
            if row == "sparsegpt":
                ref_time, ref_err, ref_held = seconds, err, held
            ratio_t = f"{seconds / ref_time:.2f}" if ref_time else "-"
            ratio_e = f"{err / ref_err:.3f}" if ref_err else "-"
            table.append([label, spec, row, f"{seconds:.2f}", ratio_t, f"{err:.5f}", ratio_e])
            if held is not None:
                table[-1] += [f"{held:.5f}", f"{held / ref_held:.3f}" if ref_held else "-"]
            print(" | ".join(table[-1]), flush=True)
    return table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1024,4096", help="square synthetic matrices, comma separated ('' for none)")
    ap.add_argument("--patterns", default="0.5,0.7,0.8,2:4")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--skip-ref-above", type=int, default=1024, help="run alps-ref only up to this size (slow)")
    ap.add_argument("--model", default="", help="saved Llama dir: also benchmark one decoder layer's linears")
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    patterns = [p for p in args.patterns.split(",") if p]
    rows = [r for r in args.rows.split(",") if r]
    print("shape | pattern | method | seconds | x sgpt time | rel. error | x sgpt error")
    table = []
    for size in [int(s) for s in args.sizes.split(",") if s]:
        stats = synthetic_stats(size)
        weight = torch.randn(size, size, generator=torch.Generator().manual_seed(1)) / size ** 0.5
        use = [r for r in rows if r != "alps-ref" or size <= args.skip_ref_above]
        table += bench(f"{size}x{size} synthetic", weight, stats, patterns, use)
    print("\n| shape | pattern | method | seconds | x sgpt time | rel. error | x sgpt error |\n|---|---|---|---|---|---|---|")
    for r in table:
        print("| " + " | ".join(r) + " |")
    if args.model:
        heldout = model_stats(args.model, args.layer, split="test")
        model_table = []
        for name, (weight, stats) in model_stats(args.model, args.layer).items():
            model_table += bench(f"{name} {tuple(weight.shape)}", weight, stats, patterns, rows, heldout[name][1])
        print(f"\nlayer {args.layer} of {args.model}; error on the calibration windows and on held-out (test split) windows")
        print("| linear | pattern | method | seconds | x sgpt time | rel. error | x sgpt error | held-out error | x sgpt |\n"
              "|---|---|---|---|---|---|---|---|---|")
        for r in model_table:
            print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
