"""Masked-LoRA heal steps on a Llama-3-8B-shaped random model on one GPU (issue 12's GPU line): seconds
per step and the extrapolated time of --target-steps steps.

    python benchmarks/heal_gpu.py --device cuda --steps 500      # the issue's setting
    python benchmarks/heal_gpu.py --device cuda --steps 60       # a timed part, extrapolated to 500
    python benchmarks/heal_gpu.py --smoke                        # tiny shapes on CPU (checks the script)

Model: random-init Llama-3-8B shapes (32 layers, hidden 4096, MLP 14336, vocab 128256), bf16 on the GPU,
first pruned to 50% by magnitude (data-free, so the LoRA trains through real masks). Heal:
`llmprune.heal.heal_model(mode="lora")`, rank 8, batch --batch-size windows of --seqlen random tokens,
lr 1e-3, bf16. Random data: this times the loop, it says nothing about recovered quality. A first short run
(--warm-steps) takes the one-time costs (kernel selection, allocator growth); the timed run's seconds per
step include heal_model's fixed costs (held-out loss before/after on --eval-windows windows, LoRA attach
and merge), so the extrapolation to --target-steps is an upper bound.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0)
SMOKE = dict(vocab_size=512, hidden_size=128, intermediate_size=448, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=500, help="timed heal steps")
    parser.add_argument("--warm-steps", type=int, default=5, help="a first, untimed short run; 0 = none")
    parser.add_argument("--target-steps", type=int, default=500, help="extrapolate to this many steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 32)")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU")
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    import llmprune
    from llmprune.heal import heal_model

    if args.smoke:
        args.device, args.steps, args.warm_steps, args.seqlen, args.eval_windows = "cpu", 4, 2, 64, 2
    shape = dict(SMOKE if args.smoke else LLAMA3_8B)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(args.device):
        model = LlamaForCausalLM(LlamaConfig(**shape)).to(dtype).eval()
    llmprune.compress(model, None, {"stages": [{"method": "magnitude", "sparsity": 0.5}]}, device=args.device,
                      progress=False)
    where = torch.cuda.get_device_name(0) if cuda else "CPU"
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, {shape['num_hidden_layers']} "
          f"layers, {dtype}, magnitude 50%, on {where}; built and pruned in {time.perf_counter() - t0:.0f} s",
          flush=True)
    gen = torch.Generator().manual_seed(0)
    train = torch.randint(0, shape["vocab_size"], (args.batch_size * max(args.steps, 1), args.seqlen), generator=gen)
    held_out = torch.randint(0, shape["vocab_size"], (args.eval_windows, args.seqlen), generator=gen)

    def run(steps: int):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        result = heal_model(model, mode="lora", train_ids=train, eval_ids=held_out, steps=steps, lr=1e-3,
                            batch_size=args.batch_size, dtype=dtype, gradient_checkpointing=args.checkpointing,
                            progress=False, device=args.device)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
        print(f"{steps} steps: {result.seconds:.1f} s (train loss {result.train_loss_first:.3f} -> "
              f"{result.train_loss_last:.3f}; {result.trainable_parameters:,} trainable, "
              f"{result.masked_modules} masked linears; peak GPU {peak:.1f} GiB)", flush=True)
        return result, peak

    if args.warm_steps:
        run(args.warm_steps)
    result, peak = run(args.steps)
    per_step = result.seconds / args.steps          # fixed costs included: an upper bound per step
    print(f"\n| model | steps timed | batch x seqlen | heal s | s / step | est. {args.target_steps} steps s "
          "| peak GPU GiB |")
    print("|---|---:|---|---:|---:|---:|---:|")
    print(f"| Llama {'smoke' if args.smoke else '3-8B shape'} ({shape['num_hidden_layers']} layers), masked LoRA r8 | "
          f"{args.steps} | {args.batch_size} x {args.seqlen} | {result.seconds:.1f} | {per_step:.3f} | "
          f"{per_step * args.target_steps:.0f} | {peak:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
