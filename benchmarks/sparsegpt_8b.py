"""GPU-scale pruning timing: SparseGPT / Wanda on a random-init Llama-3-8B-shaped model.

    python benchmarks/sparsegpt_8b.py --device cuda                # the issue's setting: 128 x 2048
    python benchmarks/sparsegpt_8b.py --smoke                      # tiny shapes on CPU (checks the script)

Random weights say nothing about quality; they time the engine exactly as a real 8B model would
run (same shapes, same number of calibration tokens, same layer-by-layer onloading).
Goal (issue 2): SparseGPT on one H200 in under 3 minutes for 128 x 2048 calibration tokens.
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import llmprune

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0)
SMOKE = dict(vocab_size=512, hidden_size=128, intermediate_size=448, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def random_model(shape: dict, dtype: torch.dtype, fill_device: str = "cpu") -> torch.nn.Module:
    """Allocate on meta, then fill N(0, 0.02) in place (skips slow per-module init). The model lives on
    the CPU (compress onloads it layer by layer); `fill_device` cuda draws the numbers there (seconds
    instead of minutes for 8B parameters), then copies them in."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=dtype)
    model = model.to_empty(device="cpu")
    gen = torch.Generator(fill_device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32, device=fill_device)
                            .mul_(0.02))
    # to_empty left the rotary inv_freq buffers uninitialised: rebuild that module for real.
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model.model.rotary_emb = LlamaRotaryEmbedding(model.config)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--methods", default="sparsegpt,wanda")
    ap.add_argument("--sparsity", default="0.5")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder layers (default 32, smoke 2); fewer to fit a time budget, with a 32-layer estimate")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    shape = dict(SMOKE if args.smoke else LLAMA3_8B)
    full_layers = LLAMA3_8B["num_hidden_layers"]
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    fill_device = "cuda" if args.device.startswith("cuda") and torch.cuda.is_available() else "cpu"
    samples, seqlen = (8, 64) if args.smoke else (args.samples, args.seqlen)
    rows = []
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        model = random_model(shape, torch.float32 if args.smoke else torch.bfloat16, fill_device)
        build_s = time.perf_counter() - t0
        ids = torch.randint(0, shape["vocab_size"], (samples, seqlen), generator=torch.Generator().manual_seed(0))
        recipe = llmprune.Recipe.from_cli(method, args.sparsity, samples=samples, seqlen=seqlen)
        t1 = time.perf_counter()
        _, report = llmprune.compress(model, None, recipe, calib=ids, device=args.device)
        seconds = time.perf_counter() - t1
        cuda = report.peak_memory.get("cuda_bytes", 0) / 2**30
        layers = shape["num_hidden_layers"]
        # the layers are alike, so prune time scales with their count (embeddings/head are not pruned)
        estimate = f"{seconds * full_layers / layers:.1f}" if layers != full_layers and not args.smoke else "-"
        rows.append((method, args.sparsity, f"{samples}x{seqlen}", layers, f"{build_s:.0f}", f"{seconds:.1f}",
                     estimate, f"{report.sparsity:.4f}", f"{cuda:.1f}", report.device))
        del model
    header = ("method", "sparsity", "calib", "layers", "build s", "prune s", f"est. {full_layers} layers s",
              "achieved", "peak GPU GiB", "device")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
