"""Expert dropping on a small trained Mixtral: held-out perplexity vs experts kept, for every criterion.

    .venv/bin/python benchmarks/moe_bench.py                       # all criteria at 6/8, 4/8, 2/8
    .venv/bin/python benchmarks/moe_bench.py --kept 4 --criteria reap merge:reroute-fit

What is measured
- Model: `moe_model.get_trained_mixtral()` (4 layers, 8 experts, top-2, hidden 192; stdlib train split).
- Calibration: 64 windows x 256 tokens of stdlib train at seeded random offsets (`calibration_windows`,
  what `--calib-data stdlib --calib-samples 64 --calib-seqlen 256` draws). The hidden states entering
  every MoE block are captured once from the unpruned model (Lu et al.'s layer-wise setting) and feed
  every criterion; statistics (frequency, soft counts, REAP) come from the same forwards.
- Perplexity: stdlib test split, non-overlapping 256-token windows (`tinymodel.heldout_perplexity`),
  the first `--eval-windows` of them.
- "layer err": Σ over MoE layers of ‖Z − Z'‖_F / ‖Z‖_F on the calibration tokens, Z the block's output
  before, Z' after the edit (merged tensors included), on the same captured inputs.
- Criteria are called as functions (llmprune.moe.criteria / edit); the CLI wiring comes later.
  `random` is the mean over `--random-seeds` seeds (spread printed). `merge:<mode>` keeps the experts of
  `--merge-base` and folds the rest in with that merge mode; `merge:<mode>@<base>` picks the base.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe_model import get_trained_mixtral  # noqa: E402
from tinymodel import encode_joined, heldout_perplexity  # noqa: E402

DEFAULT_CRITERIA = ("frequency", "router-weight", "reap", "reconstruction", "random",
                    "merge:average", "merge:fold-fit", "merge:reroute-fit", "merge:reroute-fit@reconstruction")


@torch.no_grad()
def layer_errors(original, edited, inputs) -> float:
    from llmprune.moe.families import moe_blocks

    before, after = moe_blocks(original), moe_blocks(edited)
    total = 0.0
    for layer, x in inputs.items():
        z = torch.cat([before[layer](c[None])[0] for c in x.split(4096)]).double()
        z2 = torch.cat([after[layer](c[None])[0] for c in x.split(4096)]).double()
        total += ((z - z2).norm() / z.norm()).item()
    return total


def run_one(model, criterion: str, kept: int, inputs, stats, seed: int, merge_base: str):
    from llmprune.moe import criteria, edit

    name, mode, base = criterion, None, merge_base
    if criterion.startswith("merge:"):
        name, rest = "merge", criterion.split(":", 1)[1]
        mode, _, base_override = rest.partition("@")
        base = base_override or merge_base
    pruned = copy.deepcopy(model)
    t0 = time.perf_counter()
    selection = criteria.select_experts(pruned, name, kept, inputs=inputs, stats=stats, seed=seed,
                                        merge_base=base, merge_mode=mode or "reroute-fit")
    merged = {layer: (s.merge.gate_up_proj, s.merge.down_proj) for layer, s in selection.items() if s.merge}
    report = edit.drop_experts(pruned, {layer: s.keep for layer, s in selection.items()}, merged)
    seconds = time.perf_counter() - t0
    return pruned, report, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kept", type=int, nargs="+", default=[6, 4, 2])
    parser.add_argument("--criteria", nargs="+", default=list(DEFAULT_CRITERIA))
    parser.add_argument("--calib-windows", type=int, default=64)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--random-seeds", type=int, default=3)
    parser.add_argument("--merge-base", default="reap")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--show-share", action="store_true",
                        help="print each pruned model's routed-token share per kept expert (calibration tokens)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmprune.calibration.data import calibration_windows, stdlib_texts
    from llmprune.moe.observe import capture_moe_inputs, observing

    path = get_trained_mixtral()
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    seqlen = json.loads((path / "train_meta.json").read_text())["args"]["seqlen"]
    test_tokens = encode_joined(tokenizer, stdlib_texts("test"))
    calib = calibration_windows(tokenizer, stdlib_texts("train"), args.calib_windows, seqlen, seed=0)
    batches = list(calib.split(8))

    def ppl(m) -> float:
        return heldout_perplexity(m, tokenizer, [], seqlen, max_windows=args.eval_windows, tokens=test_tokens)

    t0 = time.perf_counter()
    inputs = capture_moe_inputs(model, batches)
    with observing(model) as stats:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids, use_cache=False)
    print(f"calibration: {calib.shape[0]} x {seqlen} tokens, inputs + statistics in {time.perf_counter() - t0:.1f}s")
    for layer, s in stats.items():
        share = " ".join(f"{100 * v:4.1f}" for v in s.routed_share().tolist())
        print(f"  layer {layer} routed share %: {share}")
    base_ppl = ppl(model)
    params = sum(p.numel() for p in model.parameters())
    print(f"\nunpruned: perplexity {base_ppl:.3f}, {params / 1e6:.3f}M parameters\n")

    rows = []
    header = f"{'kept':>5} {'criterion':<34} {'ppl':>9} {'layer err':>9} {'params M':>9} {'select s':>8}"
    print(header)
    print("-" * len(header))
    for kept in args.kept:
        for criterion in args.criteria:
            seeds = range(args.random_seeds) if criterion == "random" else [0]
            results = []
            for seed in seeds:
                pruned, report, seconds = run_one(model, criterion, kept, inputs, stats, seed, args.merge_base)
                results.append((ppl(pruned), layer_errors(model, pruned, inputs), report, seconds))
                if args.show_share:
                    with observing(pruned) as after, torch.no_grad():
                        for ids in batches:
                            pruned(input_ids=ids, use_cache=False)
                    for layer, s in after.items():
                        share = " ".join(f"{e}:{100 * v:4.1f}" for e, v in zip(report.kept[layer], s.routed_share().tolist()))
                        print(f"      layer {layer} routed share % after: {share}")
            ppls = [r[0] for r in results]
            mean_ppl = sum(ppls) / len(ppls)
            err = sum(r[1] for r in results) / len(results)
            report, seconds = results[0][2], results[0][3]
            spread = f"  (seeds: {', '.join(f'{p:.2f}' for p in ppls)})" if len(ppls) > 1 else ""
            print(f"{kept:>3}/8 {criterion:<34} {mean_ppl:9.3f} {err:9.3f} {report.parameters_after / 1e6:9.3f} "
                  f"{seconds:8.1f}{spread}", flush=True)
            rows.append({"kept": kept, "criterion": criterion, "ppl": mean_ppl, "ppl_seeds": ppls, "layer_err": err,
                         "parameters_after": report.parameters_after, "select_seconds": seconds,
                         "kept_experts": {str(k): v for k, v in report.kept.items()} if len(ppls) == 1 else None})
        print()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"unpruned_ppl": base_ppl, "parameters": params, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
