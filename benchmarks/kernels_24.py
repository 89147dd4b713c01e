"""2:4 kernel benchmark: per-layer latency vs M for Llama-3-8B shapes, and end-to-end decode.

    python benchmarks/kernels_24.py                  # full run on a CUDA GPU (H200 target), ~5-10 min
    python benchmarks/kernels_24.py --tune           # first search launch configs per shape/M bucket
    python benchmarks/kernels_24.py --smoke          # tiny shapes on CPU through TRITON_INTERPRET=1

Per (weight shape N x K, M tokens), bf16, all implementations on the same random inputs:

  dense      F.linear(x, W) on the dense-with-zeros weight (cuBLAS)
  cslt       torch.sparse.to_sparse_semi_structured(W) (cuSPARSELt backend), where it runs
  ours       llmprune.kernels.sparse24_linear (the M-dispatch: gemv / mm / unpack+cuBLAS)
  path       which of those the dispatch took
  twin       the same Triton kernel and config reading a dense weight, no decompression
             (separates kernel engineering from the sparsity gain); '-' on the prefill path
  mm         the expand + tl.dot kernel forced at every M (vs gemv at tiny M, vs unpack+cuBLAS
             in prefill: shows where the dispatch thresholds belong)
  bound      roofline time of the 2:4 layer: max(bytes / copy-BW, FLOPs / GEMM-rate), both measured
  x_dense    dense / ours (speedup), x_bound = dense roofline / 2:4 roofline (the best possible)
  of_bound   bound / ours (fraction of the roofline achieved);  GB/s achieved by ours

Timing: triton.testing.do_bench median (it flushes L2 before every call) while rotating enough
distinct weight copies that together they exceed 3x L2; with --graphs, also CUDA-graph timings
(do_bench_cudagraph, no launch overhead) for M <= 16. Every row checks ours against an fp32
reference. End-to-end: a random-init Llama-3-8B-shaped model, 2:4 magnitude-pruned, greedy
decode of --new-tokens tokens at batch 1 and 8, dense vs packed (SparseLinear24), eager and
with a static cache + torch.compile(mode="reduce-overhead").

Writes OUT/results.json, OUT/table.md and OUT/speedup_vs_m.png (OUT = benchmarks/_out/kernels_24).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]  # (N=out, K=in): o/q, k/v, gate/up, down
MS = [1, 2, 4, 8, 16, 32, 64, 128, 512, 2048]
SMOKE_SHAPES = [(96, 256), (64, 512)]
SMOKE_MS = [1, 3, 16, 40, 200]
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                 rope_theta=500000.0, tie_word_embeddings=False)
SMOKE_LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU through the Triton interpreter")
    p.add_argument("--ms", default=None, help="comma-separated M values (default: 1,2,...,2048)")
    p.add_argument("--shapes", default=None, help="comma-separated NxK (default: the Llama-3-8B linears)")
    p.add_argument("--copies", type=int, default=4, help="minimum number of rotated weight copies (default 4)")
    p.add_argument("--graphs", action="store_true", help="also time with CUDA graphs for M <= 16")
    p.add_argument("--tune", action="store_true", help="search launch configs first (adds a few minutes)")
    p.add_argument("--configs", default=None, help="load tuned configs (JSON from an earlier --tune)")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end decode benchmark")
    p.add_argument("--no-layers", action="store_true", help="skip the per-layer sweep (end-to-end only)")
    p.add_argument("--no-compile", action="store_true", help="e2e: eager only")
    p.add_argument("--new-tokens", type=int, default=None, help="e2e greedy tokens (default 128; smoke 8)")
    p.add_argument("--batches", default=None, help="e2e batch sizes (default 1,8; smoke 1,2)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "_out" / "kernels_24"))
    return p.parse_args(argv)


args = parse_args()
if args.smoke:  # must happen before Triton kernels are defined (import of llmprune.kernels)
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from llmprune.kernels import pack_24, sparse24_linear, sparsify_model  # noqa: E402
from llmprune.triton_kernels import ops  # noqa: E402

DEVICE = torch.device("cpu" if args.smoke else "cuda")
DTYPE = torch.bfloat16


# ------------------------------------------------------------------------------------ timing

def bench(fn, graphs: bool = False, rep: int = 100) -> float:
    """Median microseconds of fn()."""
    if DEVICE.type == "cuda":
        import triton.testing as tt

        if graphs:
            with torch.cuda.stream(torch.cuda.Stream()):
                return tt.do_bench_cudagraph(fn, rep=rep, return_mode="median") * 1e3
        return tt.do_bench(fn, warmup=25, rep=rep, return_mode="median") * 1e3
    fn()  # CPU (smoke): a few runs, perf_counter median
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def measure_ceilings() -> dict:
    """Copy bandwidth (bytes read + written per second) and dense bf16 GEMM rate, measured."""
    nbytes = (1 << 30) if DEVICE.type == "cuda" else (64 << 20)
    src = torch.empty(nbytes // 2, dtype=DTYPE, device=DEVICE).uniform_()
    dst = torch.empty_like(src)
    copy_us = bench(lambda: dst.copy_(src))
    del src, dst
    n = 8192 if DEVICE.type == "cuda" else 512
    a = torch.randn(n, n, dtype=DTYPE, device=DEVICE)
    b = torch.randn(n, n, dtype=DTYPE, device=DEVICE)
    mm_us = bench(lambda: a @ b)
    ceil = {"copy_bw_GBps": 2 * nbytes / copy_us / 1e3, "gemm_TFLOPs": 2 * n**3 / mm_us / 1e6}
    if DEVICE.type == "cuda":
        props = torch.cuda.get_device_properties(DEVICE)
        ceil.update(device=props.name, sms=props.multi_processor_count,
                    l2_bytes=getattr(props, "L2_cache_size", 60 * 2**20))
    else:
        ceil.update(device="cpu (TRITON_INTERPRET=1)", sms=0, l2_bytes=32 * 2**20)
    return ceil


def roofline_us(M: int, N: int, K: int, weight_bytes: float, ceil: dict) -> float:
    moved = weight_bytes + (M * K + M * N) * 2
    return max(moved / (ceil["copy_bw_GBps"] * 1e3), 2 * M * N * K / (ceil["gemm_TFLOPs"] * 1e6))


# ------------------------------------------------------------------------------------ weights

def random_24_weight(N: int, K: int, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(N, K, device=DEVICE, dtype=torch.float32, generator=gen)
    groups = w.view(N, K // 4, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.abs().topk(2, -1).indices, True)
    return torch.where(keep.view(N, K), w, 0.0).to(DTYPE)


def make_copies(N: int, K: int, ceil: dict):
    """Enough distinct weights that one rotation streams > 3x L2 even for the packed format."""
    packed_bytes = N * K * 2 * 9 / 16
    n = max(args.copies, math.ceil(3 * ceil["l2_bytes"] / packed_bytes))
    n = min(n, 64) if DEVICE.type == "cuda" else 2
    gen = torch.Generator(device=DEVICE).manual_seed(N * 7 + K)
    copies = []
    for _ in range(n):
        w = random_24_weight(N, K, gen)
        values, bitmask = pack_24(w)
        cslt = None
        if DEVICE.type == "cuda":
            try:
                from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

                SparseSemiStructuredTensor._FORCE_CUTLASS = False
                cslt = to_sparse_semi_structured(w)
            except Exception as exc:  # noqa: BLE001 - report why it cannot run, keep going
                cslt = f"{type(exc).__name__}: {str(exc).splitlines()[0][:60]}"
        copies.append({"dense": w, "values": values, "bitmask": bitmask, "cslt": cslt})
    return copies


def rotating(copies, call):
    it = itertools.cycle(copies)
    return lambda: call(next(it))


def path_for(M: int) -> str:
    if M <= ops.dispatch.gemv_max_m:
        return "gemv"
    return "mm" if M <= ops.dispatch.mm_max_m else "unpack+cuBLAS"


# ------------------------------------------------------------------------------------ tuning

def tune_shape(N: int, K: int, ms: list[int], copies) -> None:
    """Time candidate configs per (kernel, M bucket) and keep the fastest in ops.tuned."""
    gemv_cands = [ops.Config(BN, BK, s, 4, 1) for BN in (8, 16, 32) for BK in (128, 256, 512) for s in (1, 2, 4, 8)]
    mm_cands = [ops.Config(BN, BK, s, 4 if BN == 64 else 8, 2) for BN in (64, 128) for BK in (64, 128)
                for s in (1, 2, 4, 8)]
    if DEVICE.type != "cuda":  # smoke: exercise the code path only
        gemv_cands, mm_cands = gemv_cands[:2], mm_cands[:2]
    for M in ms:
        kernel = path_for(M)
        if kernel not in ("gemv", "mm"):
            continue
        cands = gemv_cands if kernel == "gemv" else mm_cands
        launch = ops.launch_gemv if kernel == "gemv" else ops.launch_mm
        x = torch.randn(M, K, device=DEVICE, dtype=DTYPE)
        best = (float("inf"), None)
        for cfg in cands:
            if K // cfg.SPLIT_K < 2 * cfg.BK:
                continue
            try:
                t = bench(rotating(copies, lambda c, cfg=cfg: launch(x, c["values"], c["bitmask"], None, config=cfg)),
                          rep=30)
            except Exception:  # noqa: BLE001 - a config that does not fit (registers/smem) or compile
                continue
            best = min(best, (t, cfg), key=lambda b: b[0])
        if best[1] is not None:
            ops.tuned[(kernel, N, K, ops.m_bucket(M))] = best[1]
            print(f"  tuned {kernel:4s} N={N:5d} K={K:5d} M={M:4d}: {best[1]} {best[0]:.1f} us", flush=True)


# ------------------------------------------------------------------------------------ sweep

def sweep_shape(N: int, K: int, ms: list[int], ceil: dict) -> list[dict]:
    copies = make_copies(N, K, ceil)
    if args.tune:
        tune_shape(N, K, ms, copies)
    rows = []
    for M in ms:
        x = torch.randn(M, K, device=DEVICE, dtype=DTYPE)
        c0 = copies[0]
        ref = x.float() @ c0["dense"].float().T
        out = sparse24_linear(x, c0["values"], c0["bitmask"])
        err = ((out.float() - ref).norm() / ref.norm()).item()
        path = path_for(M)
        row = {"N": N, "K": K, "M": M, "path": path, "rel_err": err, "copies": len(copies)}
        row["dense_us"] = bench(rotating(copies, lambda c: F.linear(x, c["dense"])))
        row["ours_us"] = bench(rotating(copies, lambda c: sparse24_linear(x, c["values"], c["bitmask"])))
        if isinstance(c0["cslt"], str) or c0["cslt"] is None:
            row["cslt_us"] = None
            row["cslt_note"] = c0["cslt"] or "cuda only"
        else:
            try:
                row["cslt_us"] = bench(rotating(copies, lambda c: F.linear(x, c["cslt"])))
            except Exception as exc:  # noqa: BLE001
                row["cslt_us"], row["cslt_note"] = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:60]}"
        if path in ("gemv", "mm"):
            launch = ops.launch_gemv if path == "gemv" else ops.launch_mm
            cfg = ops.get_config(path, M, N, K, DEVICE)
            row["config"] = str(cfg)
            row["twin_us"] = bench(rotating(copies, lambda c: launch(x, c["dense"], None, None, config=cfg, dense=True)))
        else:
            row["twin_us"] = None
        row["mm_us"] = bench(rotating(copies, lambda c: ops.launch_mm(x, c["values"], c["bitmask"], None)))
        if args.graphs and DEVICE.type == "cuda" and M <= 16:
            row["dense_graph_us"] = bench(rotating(copies, lambda c: F.linear(x, c["dense"])), graphs=True)
            row["ours_graph_us"] = bench(rotating(copies, lambda c: sparse24_linear(x, c["values"], c["bitmask"])),
                                         graphs=True)
        packed_bytes = N * K * 2 * 9 / 16
        row["bound_us"] = roofline_us(M, N, K, packed_bytes, ceil)
        row["dense_bound_us"] = roofline_us(M, N, K, N * K * 2, ceil)
        row["x_dense"] = row["dense_us"] / row["ours_us"]
        row["x_bound"] = row["dense_bound_us"] / row["bound_us"]
        row["of_bound"] = row["bound_us"] / row["ours_us"]
        row["GBps"] = (packed_bytes + (M * K + M * N) * 2) / row["ours_us"] / 1e3
        rows.append(row)
        print(fmt_row(row), flush=True)
    del copies
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
    return rows


COLS = [("N", "{:>6}"), ("K", "{:>6}"), ("M", "{:>5}"), ("path", "{:>13}"), ("dense_us", "{:>9.1f}"),
        ("cslt_us", "{:>8.1f}"), ("ours_us", "{:>8.1f}"), ("twin_us", "{:>8.1f}"), ("mm_us", "{:>8.1f}"),
        ("bound_us", "{:>8.1f}"), ("x_dense", "{:>7.2f}"), ("x_bound", "{:>7.2f}"), ("of_bound", "{:>8.0%}"),
        ("GBps", "{:>7.0f}"), ("rel_err", "{:>8.1e}")]


def fmt_row(row: dict, sep: str = " ") -> str:
    cells = []
    for key, f in COLS:
        v = row.get(key)
        width = int("".join(ch for ch in f.split(":")[1].split(".")[0] if ch.isdigit()) or 0)
        cells.append(f.format(v) if v is not None else "-".rjust(width))
    return sep.join(cells)


def header(sep: str = " ") -> str:
    out = []
    for key, f in COLS:
        width = int("".join(ch for ch in f.split(":")[1].split(".")[0] if ch.isdigit()) or 0)
        out.append(key.rjust(width))
    return sep.join(out)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(k for k, _ in COLS) + " |", "|" + "---|" * len(COLS)]
    for r in rows:
        lines.append("| " + " | ".join(c.strip() for c in fmt_row(r, sep="\x00").split("\x00")) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["N"], r["K"]) for r in rows}, key=lambda s: -s[0] * s[1])
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 3.6), sharey=True, squeeze=False)
    for ax, (N, K) in zip(axes[0], shapes):
        rs = sorted((r for r in rows if (r["N"], r["K"]) == (N, K)), key=lambda r: r["M"])
        m = [r["M"] for r in rs]
        ax.plot(m, [r["x_bound"] for r in rs], "k--", label="2:4 roofline bound")
        ax.plot(m, [r["x_dense"] for r in rs], "o-", label="llmprune 2:4")
        ax.plot(m, [r["dense_us"] / r["twin_us"] if r["twin_us"] else float("nan") for r in rs], "s:",
                label="dense twin (no sparsity)")
        ax.plot(m, [r["dense_us"] / r["cslt_us"] if r["cslt_us"] else float("nan") for r in rs], "^-.",
                label="torch cuSPARSELt")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"W {N}x{K}")
        ax.set_xlabel("M (tokens)")
    axes[0][0].set_ylabel("speedup vs dense cuBLAS")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------ end to end

def e2e(new_tokens: int, batches: list[int], compile_too: bool) -> list[dict]:
    """Greedy decode tokens/s of a random-init 2:4-pruned Llama, dense vs packed."""
    from transformers import AutoModelForCausalLM, CompileConfig, LlamaConfig

    config = LlamaConfig(**(SMOKE_LLAMA if args.smoke else LLAMA3_8B))
    torch.manual_seed(0)
    with torch.device(DEVICE):  # random init directly in bf16 on the device (8B: 16 GB)
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPE).eval()
    with torch.no_grad():  # 2:4 magnitude pruning of every decoder linear (lm_head stays dense)
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                w = mod.weight
                g = w.view(w.shape[0], -1, 4)
                keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.abs().topk(2, -1).indices, True)
                w.copy_(torch.where(keep.view_as(w), w, 0.0))
    model.generation_config.pad_token_id = 0
    prompt_len = 32
    modes = ["eager"] + (["compiled"] if compile_too and DEVICE.type == "cuda" else [])
    results = []
    outputs = {}
    for variant in ("dense", "2:4 packed"):
        if variant == "2:4 packed":
            torch._dynamo.reset()
            report = sparsify_model(model)
            print(f"  packed {len(report.swapped)} linears: {report.bytes_dense / 2**30:.2f} GiB -> "
                  f"{report.bytes_packed / 2**30:.2f} GiB", flush=True)
        for mode in modes:
            for bs in batches:
                ids = torch.randint(0, config.vocab_size, (bs, prompt_len), device=DEVICE,
                                    generator=torch.Generator(device=DEVICE).manual_seed(bs))
                kw = dict(do_sample=False, attention_mask=torch.ones_like(ids))
                if mode == "compiled":  # transformers compiles the decode step itself for a static cache
                    kw.update(cache_implementation="static", compile_config=CompileConfig(mode="reduce-overhead"))
                else:
                    kw["disable_compile"] = True
                try:
                    for _ in range(2 if mode == "compiled" else 1):  # warm-up (compile, graph capture)
                        model.generate(ids, max_new_tokens=min(8, new_tokens), **kw)
                    t_pre = timed(lambda: model.generate(ids, max_new_tokens=1, **kw))
                    t_all = timed(lambda: model.generate(ids, max_new_tokens=new_tokens, **kw), keep=outputs,
                                  key=(variant, mode, bs))
                    decode_s = max(t_all - t_pre, 1e-9)
                    row = {"variant": variant, "mode": mode, "batch": bs, "new_tokens": new_tokens,
                           "prefill_ms": t_pre * 1e3, "decode_tok_s": bs * (new_tokens - 1) / decode_s}
                    if DEVICE.type == "cuda":
                        row["peak_mem_GiB"] = torch.cuda.max_memory_allocated() / 2**30
                except Exception as exc:  # noqa: BLE001 - e.g. compile failing: report, continue
                    row = {"variant": variant, "mode": mode, "batch": bs, "error": f"{type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:120] if str(exc) else ''}"}
                results.append(row)
                print("  " + json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}),
                      flush=True)
    for r in results:
        if r["variant"] == "2:4 packed" and "decode_tok_s" in r:
            base = next((d for d in results if d["variant"] == "dense" and d["mode"] == r["mode"]
                         and d["batch"] == r["batch"] and "decode_tok_s" in d), None)
            if base:
                r["speedup"] = r["decode_tok_s"] / base["decode_tok_s"]
                a, b = outputs.get(("dense", r["mode"], r["batch"])), outputs.get(("2:4 packed", r["mode"], r["batch"]))
                if a is not None and b is not None:
                    r["same_tokens"] = float((a == b).float().mean())
    return results


def timed(fn, keep=None, key=None) -> float:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    if keep is not None:
        keep[key] = out.cpu()
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------ main

def main() -> int:
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU visible; run with --smoke for the CPU interpreter check", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.configs:
        print(f"loaded {ops.load_configs(args.configs)} tuned configs from {args.configs}")
    shapes = ([tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")] if args.shapes
              else SMOKE_SHAPES if args.smoke else SHAPES)
    ms = [int(v) for v in args.ms.split(",")] if args.ms else SMOKE_MS if args.smoke else MS
    if args.smoke:  # scale the dispatch thresholds to the tiny shapes so every path runs
        ops.dispatch.mm_max_m = 64
    meta = {"torch": torch.__version__, "dtype": str(DTYPE), "dispatch": vars(ops.dispatch), "argv": sys.argv[1:]}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    t0 = time.perf_counter()
    ceil = measure_ceilings()
    meta.update(ceil)
    print(f"device {ceil['device']}: copy {ceil['copy_bw_GBps']:.0f} GB/s (read+write), "
          f"GEMM {ceil['gemm_TFLOPs']:.0f} TFLOP/s bf16", flush=True)
    print(header(), flush=True)
    rows = []
    for N, K in ([] if args.no_layers else shapes):
        rows += sweep_shape(N, K, ms, ceil)
    if args.tune:
        ops.save_configs(out_dir / "tuned_configs.json")
    e2e_rows = []
    if not args.no_e2e:
        print("end-to-end decode:", flush=True)
        batches = [int(b) for b in args.batches.split(",")] if args.batches else [1, 2] if args.smoke else [1, 8]
        e2e_rows = e2e(args.new_tokens or (8 if args.smoke else 128), batches, compile_too=not args.no_compile)
    meta["wall_s"] = time.perf_counter() - t0

    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "layers": rows, "e2e": e2e_rows}, indent=1,
                                                     default=str) + "\n")
    md = [f"device: {ceil['device']}; copy BW {ceil['copy_bw_GBps']:.0f} GB/s; bf16 GEMM "
          f"{ceil['gemm_TFLOPs']:.0f} TFLOP/s; torch {meta['torch']}, triton {meta.get('triton')}", "",
          markdown_table(rows), ""]
    if e2e_rows:
        md += ["| variant | mode | batch | decode tok/s | speedup | prefill ms | same tokens |", "|---|---|---|---|---|---|---|"]
        for r in e2e_rows:
            if "error" in r:
                md.append(f"| {r['variant']} | {r['mode']} | {r['batch']} | error: {r['error']} | | | |")
            else:
                md.append(f"| {r['variant']} | {r['mode']} | {r['batch']} | {r['decode_tok_s']:.1f} | "
                          f"{r.get('speedup', float('nan')):.2f} | {r['prefill_ms']:.1f} | "
                          f"{r.get('same_tokens', float('nan')):.2f} |")
    (out_dir / "table.md").write_text("\n".join(md) + "\n")
    if rows:
        plot(rows, out_dir / "speedup_vs_m.png")

    # summary against the goals (GPU numbers only mean something on the H200)
    def worst(pred):
        sel = [r["x_dense"] for r in rows if pred(r["M"])]
        return min(sel) if sel else float("nan")

    print(f"\nsummary: min speedup M<=16 {worst(lambda m: m <= 16):.2f}x (goal 1.5x), "
          f"M 32-64 {worst(lambda m: 32 <= m <= 64):.2f}x (goal 1.2x), any M {worst(lambda m: True):.2f}x "
          f"(goal 0.95x); max rel err {max((r['rel_err'] for r in rows), default=float('nan')):.1e}")
    for r in e2e_rows:
        if "speedup" in r:
            print(f"e2e {r['mode']} batch {r['batch']}: {r['speedup']:.2f}x decode tokens/s (goal 1.3x)")
    print(f"wrote {out_dir}/results.json, table.md, speedup_vs_m.png ({meta['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
