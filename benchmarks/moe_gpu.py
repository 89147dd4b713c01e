"""Time REAP expert-drop + SparseGPT on a Qwen3-MoE-shaped random model (a GPU run; CPU for a smoke test).

    .venv/bin/python benchmarks/moe_gpu.py --layers 8 --device cuda          # Qwen3-30B-A3B layer shapes
    .venv/bin/python benchmarks/moe_gpu.py --smoke --device cpu              # tiny shapes, seconds

The model has Qwen3-30B-A3B's per-layer shapes (hidden 2048, 32 heads / 4 KV heads of 128, 128 experts of
intermediate 768, top-8, norm_topk_prob) with `--layers` decoder layers, random init (bf16 on CUDA), so
routing is close to uniform: this measures time and memory, not quality. Calibration: random token
windows. One `llmprune.compress` run with two stages: `expert-drop` (REAP, `--keep` of the experts) then
`sparsegpt` at `--sparsity`; the stage times, peak memory and the summary table are printed.
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--keep", type=float, default=0.5, help="fraction of experts kept (default 0.5: 128 -> 64)")
    parser.add_argument("--sparsity", default="0.5")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU smoke test of this script)")
    args = parser.parse_args()

    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    import llmprune

    shapes = dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                  num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=6144,
                  vocab_size=151936)
    if args.smoke:
        shapes = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=16,
                      num_experts_per_tok=4, moe_intermediate_size=32, intermediate_size=128, vocab_size=512)
        args.calib_samples, args.seqlen = min(args.calib_samples, 8), min(args.seqlen, 64)
    config = Qwen3MoeConfig(num_hidden_layers=args.layers, norm_topk_prob=True, max_position_embeddings=4096,
                            tie_word_embeddings=False, **shapes)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(args.device):
        model = Qwen3MoeForCausalLM(config).to(dtype).eval()
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, {args.layers} layers, "
          f"{dtype}, built in {time.perf_counter() - t0:.1f}s", flush=True)
    ids = torch.randint(0, shapes["vocab_size"], (args.calib_samples, args.seqlen),
                        generator=torch.Generator().manual_seed(0))
    recipe = {"calibration": {"batch_size": 8}, "stages": [
        {"method": "expert-drop", "expert_ratio": args.keep, "criterion": "reap"},
        {"method": "sparsegpt", "sparsity": args.sparsity}]}
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    model, report = llmprune.compress(model, None, recipe, calib=ids, device=args.device, progress=True)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    total = time.perf_counter() - t0
    print(report.summary_table())
    for record in report.stages:
        print(f"stage {record.index} {record.method}: {record.seconds:.1f}s")
    print(f"total {total:.1f}s for {args.calib_samples} x {args.seqlen} calibration tokens")


if __name__ == "__main__":
    main()
