"""MoE expert pruning on a small trained Mixtral, through `llmprune.compress` (the real stages).

    .venv/bin/python benchmarks/moe_bench.py                  # every table, written into RESULTS.md
    .venv/bin/python benchmarks/moe_bench.py --part drop --kept 4 --criteria reap merge
    .venv/bin/python benchmarks/moe_bench.py --part stun

What is measured
- Model: `moe_model.get_trained_mixtral()` (4 layers, 8 experts, top-2, hidden 192; stdlib train split),
  loaded with transformers' default experts implementation.
- Calibration: 64 windows x 256 tokens of stdlib train at seeded random offsets (`calibration_windows`,
  what `--calib-data stdlib --calib-samples 64 --calib-seqlen 256` draws), batch 8.
- Perplexity: stdlib test split, non-overlapping 256-token windows (`tinymodel.heldout_perplexity`), the
  first `--eval-windows` (64) of them.
- Part `drop`: one `expert-drop` stage per row, at 6/8, 4/8, 2/8 experts kept. `random` is the mean over
  `--random-seeds` seeds. `merge:<mode>` sets merge_mode, `@<base>` merge_base, `/layerwise` progressive: false.
  "removed share": the routed-token share the removed experts had on the calibration tokens (mean over
  layers, from the stage record).
- Part `stun`: STUN (expert-drop of 25% of the experts, 8 -> 6, then Wanda at sparsity s on every
  remaining decoder matrix: attention and the kept experts' slices; routers and the rest untouched)
  vs Wanda alone at the same total number of nonzero parameters. "Nonzero parameters" counts every
  parameter of the whole saved model that is not exactly zero (embeddings, lm_head, norms, routers
  included). Wanda alone prunes the same kinds of matrices (attention + all 8 experts' slices), at the
  sparsity s_w = (N_dense − N_stun) / M that removes the same number: N_dense the dense model's nonzero
  count, N_stun the STUN model's, M the elements of Wanda's target matrices. Both counts are printed.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe_model import get_trained_mixtral  # noqa: E402
from tinymodel import encode_joined, heldout_perplexity, replace_results_section  # noqa: E402

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
DROP_CRITERIA = ("frequency", "router-weight", "reap", "reconstruction", "random",
                 "merge:average", "merge:fold-fit", "merge", "merge/layerwise", "merge@reconstruction")


def stage_for(criterion: str, kept: int, seed: int = 0) -> dict:
    """`merge:fold-fit@reconstruction/layerwise` -> an expert-drop stage dict."""
    stage: dict = {"method": "expert-drop", "experts_keep": kept}
    name, _, flags = criterion.partition("/")
    name, _, base = name.partition("@")
    name, _, mode = name.partition(":")
    stage["criterion"] = name
    if mode:
        stage["merge_mode"] = mode
    if base:
        stage["merge_base"] = base
    if flags == "layerwise":
        stage["progressive"] = False
    if name == "random":
        stage["seed"] = seed
    return stage


def nonzero_parameters(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += int(torch.count_nonzero(p).item())
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("all", "drop", "stun"), default="all")
    parser.add_argument("--kept", type=int, nargs="+", default=[6, 4, 2])
    parser.add_argument("--criteria", nargs="+", default=list(DROP_CRITERIA))
    parser.add_argument("--stun-sparsity", type=float, nargs="+", default=[0.4, 0.5, 0.6])
    parser.add_argument("--stun-criteria", nargs="+", default=["merge", "reap"])
    parser.add_argument("--calib-windows", type=int, default=64)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--random-seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="do not write RESULTS.md")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import llmprune
    from llmprune.calibration.data import calibration_windows, stdlib_texts

    path = get_trained_mixtral()
    base = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    seqlen = json.loads((path / "train_meta.json").read_text())["args"]["seqlen"]
    test_tokens = encode_joined(tokenizer, stdlib_texts("test"))
    calib = calibration_windows(tokenizer, stdlib_texts("train"), args.calib_windows, seqlen, seed=0)

    def ppl(m) -> float:
        return heldout_perplexity(m, tokenizer, [], seqlen, max_windows=args.eval_windows, tokens=test_tokens)

    def run(stages: list[dict]):
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        model, report = llmprune.compress(model, None, {"stages": stages, "calibration": {"batch_size": 8}},
                                          calib=calib, device="cpu", progress=False)
        return model, report, time.perf_counter() - t0

    dense_ppl = ppl(base)
    dense_params = sum(p.numel() for p in base.parameters())
    dense_nonzero = nonzero_parameters(base)
    print(f"unpruned: perplexity {dense_ppl:.2f}, {dense_params / 1e6:.3f}M parameters "
          f"({dense_nonzero / 1e6:.3f}M nonzero); calibration {calib.shape[0]} x {seqlen}", flush=True)
    out: dict = {"dense_ppl": dense_ppl, "parameters": dense_params, "drop": [], "stun": []}
    sections = [f"Model: 4-layer Mixtral, 8 experts, top-2, hidden 192, trained on the stdlib train split "
                f"(`benchmarks/moe_model.py`), {dense_params / 1e6:.2f}M parameters, held-out perplexity "
                f"**{dense_ppl:.2f}** (stdlib test, {args.eval_windows} x {seqlen}-token windows). Calibration: "
                f"{calib.shape[0]} x {seqlen} tokens of stdlib train. Every row is one run of "
                f"`llmprune.compress` (CPU, {args.threads} thread). Command: `.venv/bin/python benchmarks/moe_bench.py`."]

    if args.part in ("all", "drop"):
        print(f"\n{'kept':>5} {'criterion':<24} {'ppl':>8} {'removed share':>13} {'params M':>9} {'s':>6}")
        table: dict[str, dict[int, str]] = {}
        for kept in args.kept:
            for criterion in args.criteria:
                seeds = range(args.random_seeds) if criterion == "random" else [0]
                ppls, shares, seconds, params = [], [], [], 0
                for seed in seeds:
                    model, report, sec = run([stage_for(criterion, kept, seed)])
                    ppls.append(ppl(model))
                    seconds.append(sec)
                    shares.append(report.stages[0].achieved.get("routed_share_removed"))
                    params = report.parameters_after
                mean = sum(ppls) / len(ppls)
                share = shares[0]
                spread = f"  (seeds {', '.join(f'{p:.1f}' for p in ppls)})" if len(ppls) > 1 else ""
                share_text = f"{share:.1%}" if share is not None else "-"
                print(f"{kept:>3}/8 {criterion:<24} {mean:8.2f} {share_text:>13} {params / 1e6:9.3f} "
                      f"{sum(seconds) / len(seconds):6.1f}{spread}", flush=True)
                out["drop"].append({"kept": kept, "criterion": criterion, "ppl": mean, "ppl_seeds": ppls,
                                    "routed_share_removed": share, "parameters": params,
                                    "seconds": sum(seconds) / len(seconds)})
                table.setdefault(criterion, {})[kept] = f"{mean:.1f}" + (" ±" + f"{(max(ppls) - min(ppls)) / 2:.0f}"
                                                                           if len(ppls) > 1 else "")
        params_by_kept = {r["kept"]: r["parameters"] for r in out["drop"]}
        header = "| criterion | " + " | ".join(f"{k}/8 kept" for k in args.kept) + " |"
        lines = [header, "|---|" + "---|" * len(args.kept),
                 "| parameters | " + " | ".join(f"{params_by_kept[k] / 1e6:.2f}M" for k in args.kept) + " |"]
        for criterion, cells in table.items():
            label = f"`{stage_label(criterion)}`"
            lines.append(f"| {label} | " + " | ".join(cells.get(k, "-") for k in args.kept) + " |")
        sections.append("### Held-out perplexity vs experts kept (`--method expert-drop`)\n\n"
                        f"Dense: {dense_ppl:.2f}. `random`: mean over {args.random_seeds} seeds (± half the range). "
                        "Rows are stage keys; `merge` alone is the default (`merge_mode: reroute-fit`, "
                        "`merge_base: reap`, `progressive: true`).\n\n" + "\n".join(lines))

    if args.part in ("all", "stun"):
        from llmprune.arch import prunable_matrices

        wanda_elements = sum(m.weight.numel() for m in prunable_matrices(base).values())
        print(f"\nSTUN vs Wanda alone at equal nonzero parameters (Wanda targets: {wanda_elements / 1e6:.3f}M elements)")
        print(f"{'method':<44} {'ppl':>8} {'nonzero M':>10}")
        lines = ["| STUN: expert-drop 8 -> 6, then Wanda | STUN ppl | Wanda alone (matched) | Wanda ppl | nonzero "
                 "parameters (STUN / Wanda) |", "|---|---|---|---|---|"]
        for criterion in args.stun_criteria:
            for sparsity in args.stun_sparsity:
                stun_stages = [stage_for(criterion, 6), {"method": "wanda", "sparsity": sparsity}]
                model, report, _ = run(stun_stages)
                stun_ppl, stun_nonzero = ppl(model), nonzero_parameters(model)
                matched = round((dense_nonzero - stun_nonzero) / wanda_elements, 4)
                wmodel, _, _ = run([{"method": "wanda", "sparsity": matched}])
                wanda_ppl, wanda_nonzero = ppl(wmodel), nonzero_parameters(wmodel)
                name = f"STUN {stage_label(criterion)} + wanda {sparsity}"
                print(f"{name:<44} {stun_ppl:8.2f} {stun_nonzero / 1e6:10.4f}")
                print(f"{'wanda ' + str(matched):<44} {wanda_ppl:8.2f} {wanda_nonzero / 1e6:10.4f}", flush=True)
                out["stun"].append({"criterion": criterion, "sparsity": sparsity, "stun_ppl": stun_ppl,
                                    "stun_nonzero": stun_nonzero, "wanda_sparsity": matched,
                                    "wanda_ppl": wanda_ppl, "wanda_nonzero": wanda_nonzero})
                lines.append(f"| `{stage_label(criterion)}` + wanda {sparsity} | {stun_ppl:.1f} | wanda {matched:.3f} | "
                             f"{wanda_ppl:.1f} | {stun_nonzero / 1e6:.3f}M / {wanda_nonzero / 1e6:.3f}M |")
        sections.append("### STUN vs Wanda alone at the same number of nonzero parameters\n\n"
                        "STUN: `expert-drop` keeping 6 of 8 experts, then `wanda` at sparsity s on every remaining "
                        "decoder matrix (attention and the kept experts; routers untouched). Wanda alone prunes the "
                        "same kinds of matrices of the dense model (all 8 experts) at the sparsity that leaves the "
                        "same number of nonzero parameters in the whole model (embeddings, lm_head, norms and "
                        "routers included; they are identical in both, so this equals the same nonzero count in "
                        f"the pruned matrices): s_w = (N_dense − N_STUN) / M, N_dense = {dense_nonzero:,}, "
                        f"M = {wanda_elements:,} elements of Wanda's target matrices. Dense perplexity "
                        f"{dense_ppl:.2f}.\n\n" + "\n".join(lines))

    sections.append("### GPU line (REAP + SparseGPT on a Qwen3-MoE-shaped model)\n\nNot run: no GPU was available. "
                    "Ready for one: Qwen3-30B-A3B's per-layer shapes (128 experts of 768, top-8, hidden 2048), "
                    "random init, bf16, `--layers` decoder layers; one `llmprune.compress` with `expert-drop` "
                    "(REAP, 128 -> 64 experts) then `sparsegpt` 0.5, 128 x 2048 random calibration tokens; prints "
                    "each stage's time and the peak memory:\n\n```\n"
                    ".venv/bin/python benchmarks/moe_gpu.py --layers 8 --device cuda\n```")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    if not args.no_write and args.part == "all":
        replace_results_section(RESULTS_MD, "moe_bench", "## MoE: expert dropping and STUN (`benchmarks/moe_bench.py`)"
                                "\n\n" + "\n\n".join(sections))
        print(f"wrote the moe_bench section of {RESULTS_MD}")


def stage_label(criterion: str) -> str:
    """A row label as stage keys: `merge:fold-fit@reconstruction` -> `merge (fold-fit, base reconstruction)`."""
    stage = stage_for(criterion, 0)
    extras = [f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in stage.items()
              if k not in ("method", "experts_keep", "criterion", "seed")]
    return stage["criterion"] + (f" ({', '.join(extras)})" if extras else "")


if __name__ == "__main__":
    main()
