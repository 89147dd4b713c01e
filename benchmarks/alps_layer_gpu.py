"""ALPS vs SparseGPT on one Llama-3-8B-shaped decoder layer (issue 13's GPU line): wall time and the
layer's output error, same calibration, same device.

    python benchmarks/alps_layer_gpu.py --device cuda            # 1 layer, 128 x 2048 calibration tokens
    python benchmarks/alps_layer_gpu.py --smoke                  # tiny shapes on CPU (checks the script)

Model: a random-init Llama with Llama-3-8B's layer shapes (hidden 4096, 32 / 8 heads, MLP 14336) and
one decoder layer (vocab 32000: the embedding is not pruned and only feeds the layer), bf16 on CUDA.
Random weights and tokens say nothing about quality in the absolute; the error column compares the two
methods on the same layer and inputs: ‖h_pruned − h_dense‖ / ‖h_dense‖ of the layer's output (after the
final RMS norm) on --eval-samples held-out random windows.
Each run starts from the same dense weights; `llmprune.compress` with one prune stage at --sparsity.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

LAYER_8B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=1,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0)
SMOKE = dict(vocab_size=512, hidden_size=128, intermediate_size=448, num_hidden_layers=1,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def layer_output(model, ids: torch.Tensor, batch: int) -> torch.Tensor:
    """The decoder's last hidden states (the one layer's output after the final RMS norm), fp32,
    [n, seqlen, hidden]."""
    with torch.no_grad():
        return torch.cat([model.model(ids[i:i + batch].to(model.device)).last_hidden_state.float()
                          for i in range(0, ids.shape[0], batch)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sparsity", default="0.7,2:4", help="comma-separated targets (default 0.7,2:4)")
    parser.add_argument("--methods", default="sparsegpt,alps")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--eval-samples", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU")
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    import llmprune

    if args.smoke:
        args.device, args.samples, args.seqlen, args.eval_samples = "cpu", 8, 64, 2
    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = SMOKE if args.smoke else LAYER_8B
    torch.manual_seed(0)
    with torch.device(args.device):
        dense = LlamaForCausalLM(LlamaConfig(**shape)).to(dtype).eval()
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, shape["vocab_size"], (args.samples, args.seqlen), generator=gen)
    held_out = torch.randint(0, shape["vocab_size"], (args.eval_samples, args.seqlen), generator=gen)
    reference = layer_output(dense, held_out, 4)
    where = torch.cuda.get_device_name(0) if cuda else "CPU"
    print(f"one Llama layer hidden {shape['hidden_size']}, MLP {shape['intermediate_size']}, {dtype}, {where}; "
          f"calibration {args.samples} x {args.seqlen}; error on {args.eval_samples} held-out windows", flush=True)
    rows = []
    for sparsity in args.sparsity.split(","):
        for method in args.methods.split(","):
            model = copy.deepcopy(dense)
            recipe = {"calibration": {"batch_size": 8}, "stages": [{"method": method, "sparsity": sparsity}]}
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            _, report = llmprune.compress(model, None, recipe, calib=calib, device=args.device, progress=False)
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            out = layer_output(model, held_out, 4)
            error = ((out - reference).norm() / reference.norm()).item()
            rows.append({"method": method, "sparsity": sparsity, "seconds": seconds, "error": error,
                         "achieved": report.sparsity})
            print(f"{method} {sparsity}: {seconds:.1f} s, output rel. error {error:.4f}", flush=True)
            del model
    print("\n| target | method | compress s | x SparseGPT | layer output rel. error | achieved sparsity |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        ref = next((x for x in rows if x["sparsity"] == r["sparsity"] and x["method"] == "sparsegpt"), None)
        ratio = f"{r['seconds'] / ref['seconds']:.2f}" if ref else "-"
        print(f"| {r['sparsity']} | {r['method']} | {r['seconds']:.1f} | {ratio} | {r['error']:.4f} | "
              f"{r['achieved']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
