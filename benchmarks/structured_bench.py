"""Structured pruning on the trained benchmark Llama: perplexity vs parameters removed, per criterion,
with and without reconstruction; and CPU latency of the smaller models vs dense.

    .venv/bin/python benchmarks/structured_bench.py                          # everything (~15-30 min, 2 cores)
    .venv/bin/python benchmarks/structured_bench.py --results-md benchmarks/RESULTS.md
    .venv/bin/python benchmarks/structured_bench.py --no-latency --windows 128

Model: `get_trained_llama()` (benchmarks/tinymodel.py; 4 layers, hidden 256, 8 heads / 4 KV heads, MLP 688,
trained on the stdlib train split, cached under benchmarks/_cache/). Calibration: `--calib-samples`
windows of 256 tokens of stdlib train (seed 0), the same for every run. Perplexity: stdlib test,
non-overlapping 256-token windows (the first `--windows`).
Latency: prefill (one 256-token sequence) and greedy decode (batch 1, 64 new tokens with KV cache)
tokens/s, median of `--repeats`, for the trained model and for a larger random-init Llama where
the matmuls dominate (`--latency-model`), dense vs 25% / 50% width (MLP + heads) vs 1 / 2 layers dropped.

GPU line (issue 10; needs a CUDA GPU, ~2 min on an H200):
    python benchmarks/structured_bench.py --latency-only --latency-model llama3-8b --device cuda \
        --dtype bfloat16 --results-md benchmarks/RESULTS.md
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tinymodel import encode_joined, get_trained_llama, heldout_perplexity, replace_results_section  # noqa: E402

import llmprune  # noqa: E402
from llmprune.calibration.data import calibration_windows, stdlib_texts  # noqa: E402


def width_runs(kind: str, keeps: list[float], criteria: list[str], random_seeds: int) -> list[dict]:
    runs = []
    for keep in keeps:
        for criterion in criteria:
            for reconstruct in ((True,) if criterion == "obs" else (True, False)):    # obs selects for the refit
                # one draw of `random` can be lucky or unlucky: it is run with several seeds
                for seed in range(random_seeds if criterion == "random" else 1):
                    runs.append({"group": kind, "stage": {"method": "width", f"{kind}_keep": keep,
                                                         "criterion": criterion, "reconstruct": reconstruct,
                                                         "seed": seed}})
    return runs


def depth_runs(counts: list[int], criteria: list[str]) -> list[dict]:
    return [{"group": "depth", "stage": {"method": "layer-drop", "num_layers": n, "criterion": c}}
            for n in counts for c in criteria]


def run_one(model, tokenizer, stage: dict, calib: torch.Tensor, test_tokens, seqlen: int, windows: int) -> dict:
    pruned = copy.deepcopy(model)
    t0 = time.perf_counter()
    pruned, report = llmprune.compress(pruned, tokenizer, {"stages": [stage], "calibration": {"batch_size": 16}},
                                       calib=calib, device="cpu", progress=False)
    seconds = time.perf_counter() - t0
    ppl = heldout_perplexity(pruned, tokenizer, [], seqlen, tokens=test_tokens, max_windows=windows)
    removed = 1 - report.parameters_after / report.parameters_before
    return {"ppl": ppl, "removed": removed, "seconds": seconds, "params": report.parameters_after,
            "chosen": report.stages[0].removed.get("layers")}


def label(stage: dict) -> str:
    if stage["method"] == "layer-drop":
        return f"drop {stage['num_layers']} ({stage['criterion']})"
    return f"{stage['criterion']}{'' if stage['reconstruct'] else ' (no recon.)'}"


def ppl_cell(rows: list[dict]) -> str:
    """One run's perplexity, or the mean (min-max) of a criterion's seeds."""
    ppls = [r["ppl"] for r in rows]
    if len(ppls) == 1:
        return f"{ppls[0]:.2f}"
    return f"{statistics.mean(ppls):.2f} ({min(ppls):.2f}-{max(ppls):.2f}, {len(ppls)} seeds)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def latency(model, seqlen: int, new_tokens: int, repeats: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s): median over repeats, batch 1."""
    device = next(model.parameters()).device
    prompt = torch.randint(3, model.config.vocab_size, (1, seqlen), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(device)
    prefill, decode = [], []
    model(prompt[:, :16])                                         # warm-up
    model.generate(prompt[:, :8], max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        model(prompt)
        _sync(device)
        prefill.append(seqlen / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        model.generate(prompt[:, :8], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       use_cache=True, pad_token_id=0)
        _sync(device)
        decode.append(new_tokens / (time.perf_counter() - t0))
    return statistics.median(prefill), statistics.median(decode)


def latency_table(models: dict[str, torch.nn.Module], seqlen: int, new_tokens: int, repeats: int) -> str:
    rows = ["| model | parameters | prefill tok/s | x dense | decode tok/s | x dense |", "|---|---|---|---|---|---|"]
    base = None
    for name, m in models.items():
        pf, dc = latency(m, seqlen, new_tokens, repeats)
        base = base or (pf, dc)
        params = sum(p.numel() for p in m.parameters())
        rows.append(f"| {name} | {params / 1e6:.2f}M | {pf:,.0f} | {pf / base[0]:.2f} | {dc:,.1f} | {dc / base[1]:.2f} |")
    return "\n".join(rows)


def smaller_models(model, tokenizer, calib, device: str = "cpu") -> dict[str, torch.nn.Module]:
    out = {"dense": model}
    for name, stage in [("width 25% (MLP + heads 0.75)", {"method": "width", "mlp_keep": 0.75, "heads_keep": 0.75}),
                        ("width 50% (MLP + heads 0.5)", {"method": "width", "mlp_keep": 0.5, "heads_keep": 0.5}),
                        ("drop 1 layer", {"method": "layer-drop", "num_layers": 1}),
                        ("drop 2 layers", {"method": "layer-drop", "num_layers": 2})]:
        out[name], _ = llmprune.compress(copy.deepcopy(model), tokenizer, {"stages": [stage]}, calib=calib,
                                         device=device, progress=False)
    return out


def latency_llama(spec: str, dtype: torch.dtype, device: str):
    """A random-init Llama for timing: "HIDDENxLAYERS" (GQA, 64-dim heads) or "llama3-8b"."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if spec == "llama3-8b":
        config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                             rope_theta=500000.0)
    else:
        hidden, layers = (int(x) for x in spec.split("x"))
        config = LlamaConfig(vocab_size=8192, hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
                             num_hidden_layers=layers, num_attention_heads=hidden // 64,
                             num_key_value_heads=hidden // 128, max_position_embeddings=1024)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    return model


def run_latency(args, trained, tokenizer, calib, seqlen: int) -> str:
    """Latency tables: the trained model (CPU runs only) and the random-init `--latency-model`."""
    parts = []
    if trained is not None:
        table = latency_table(smaller_models(trained, tokenizer, calib), seqlen, 64, args.repeats)
        parts.append(f"#### CPU latency, trained model ({torch.get_num_threads()} threads)\n\n{table}")
    dtype = getattr(torch, args.dtype)
    big = latency_llama(args.latency_model, dtype, args.device)
    big_calib = torch.randint(3, big.config.vocab_size, (16, 128), generator=torch.Generator().manual_seed(0))
    table = latency_table(smaller_models(big, None, big_calib, args.device), seqlen, 64, args.repeats)
    where = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    parts.append(f"#### Latency, random-init Llama {args.latency_model} ({args.dtype}, {where})\n\n{table}")
    return "\n\n".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--windows", type=int, default=256, help="held-out perplexity windows (256 tokens each)")
    parser.add_argument("--no-latency", action="store_true", help="skip the latency tables (their RESULTS.md "
                        "section is left as it is)")
    parser.add_argument("--random-seeds", type=int, default=3, help="seeds of the random criterion (mean reported)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--latency-model", default="1024x8",
                        help="random-init latency Llama: HIDDENxLAYERS, or llama3-8b")
    parser.add_argument("--latency-only", action="store_true", help="skip the quality runs (e.g. on a GPU)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (latency runs)")
    parser.add_argument("--dtype", default="float32", help="dtype of the random-init latency model")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--results-md", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.latency_only:
        text = run_latency(args, None, None, None, 256)
        print(text)
        if args.results_md:
            replace_results_section(args.results_md, f"structured_latency:{args.latency_model}:{args.device}",
                                    "### Structured pruning latency (`benchmarks/structured_bench.py`)\n\nCommand: "
                                    "`python benchmarks/structured_bench.py " + " ".join(sys.argv[1:]) + "`\n\n" + text)
        return 0
    model_dir = get_trained_llama()
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    seqlen = 256
    calib = calibration_windows(tokenizer, stdlib_texts("train"), args.calib_samples, seqlen, 0)
    test_tokens = encode_joined(tokenizer, stdlib_texts("test"))
    dense_ppl = heldout_perplexity(model, tokenizer, [], seqlen, tokens=test_tokens, max_windows=args.windows)
    print(f"dense: held-out ppl {dense_ppl:.3f}", flush=True)

    runs = (width_runs("mlp", [0.75, 0.5], ["activation", "obs", "magnitude", "maw", "random"], args.random_seeds)
            + width_runs("heads", [0.75, 0.5], ["activation", "obs", "magnitude", "random"], args.random_seeds)
            + depth_runs([1, 2], ["bi", "angular", "ppl"]))
    results = []
    for r in runs:
        out = run_one(model, tokenizer, r["stage"], calib, test_tokens, seqlen, args.windows)
        results.append({**r, **out})
        print(f"  {r['group']:5s} {r['stage']}: ppl {out['ppl']:.3f}, {out['removed']:.1%} params removed, "
              f"{out['seconds']:.1f}s", flush=True)

    tables = []
    for group, title, knob in (("mlp", "Width, MLP neurons (`--mlp-keep`)", "mlp_keep"),
                               ("heads", "Width, attention KV groups (`--heads-keep`; 4 KV groups x 2 query heads)",
                                "heads_keep")):
        keeps = sorted({r["stage"][knob] for r in results if r["group"] == group}, reverse=True)
        header = "| criterion | " + " | ".join(f"{knob} {k} ({next(r['removed'] for r in results if r['group'] == group and r['stage'][knob] == k):.1%} params removed)" for k in keeps) + " |"
        lines = [f"#### {title}", "", header, "|---|" + "---|" * len(keeps)]
        for name in dict.fromkeys(label(r["stage"]) for r in results if r["group"] == group):
            cells = [ppl_cell([r for r in results if r["group"] == group and r["stage"][knob] == k
                               and label(r["stage"]) == name]) for k in keeps]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        tables.append("\n".join(lines))
    lines = ["#### Depth (`--method layer-drop`)", "", "| criterion | layers removed | params removed | ppl | time s |",
             "|---|---|---|---|---|"]
    for r in results:
        if r["group"] == "depth":
            lines.append(f"| {r['stage']['criterion']} | {r['chosen']} | {r['removed']:.1%} | {r['ppl']:.2f} | "
                         f"{r['seconds']:.1f} |")
    tables.append("\n".join(lines))
    quality = "\n\n".join(tables)
    print(f"\nheld-out perplexity (dense {dense_ppl:.2f}):\n\n{quality}")

    latency_text = ""
    if not args.no_latency:
        latency_text = run_latency(args, model if args.device == "cpu" else None, tokenizer, calib, seqlen)
        print("\n" + latency_text)

    if args.results_md:
        command = "`.venv/bin/python benchmarks/structured_bench.py " + " ".join(sys.argv[1:]) + "`"
        body = "\n\n".join(x for x in [
            "## Structured pruning: width and depth (`benchmarks/structured_bench.py`)",
            f"Command: {command}. Model: the trained stdlib Llama (`get_trained_llama()`, "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, dense held-out ppl "
            f"{dense_ppl:.2f}); calibration {args.calib_samples} x {seqlen} stdlib-train tokens; perplexity on the "
            f"first {args.windows} stdlib-test windows of {seqlen} tokens. Parameters removed count the whole "
            f"model (embeddings and head included).",
            quality] if x)
        replace_results_section(args.results_md, "structured_bench", body)
        if latency_text:
            replace_results_section(args.results_md, "structured_latency:cpu",
                                    "### Structured pruning latency, CPU (`benchmarks/structured_bench.py`)\n\n"
                                    f"Command: {command}\n\n{latency_text}")
        print(f"\nwrote section into {args.results_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
