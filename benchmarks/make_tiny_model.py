"""Regenerate the embedded default model `llmprune-tiny` (llmprune/assets/tiny-llama/).

    .venv/bin/python benchmarks/make_tiny_model.py            # ~5 minutes on 2 CPU cores
    .venv/bin/python benchmarks/make_tiny_model.py --out DIR  # somewhere else

A 4-layer Llama (hidden 128, 4 heads / 2 KV heads, MLP 352, untied 2048-token byte-level BPE)
trained for a fixed number of steps (seed 0) on the train split of this interpreter's Python
stdlib sources, saved in bfloat16 so the package stays small. Fixed step count (no wall-clock
cap), so the same machine and torch version give the same weights.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tinymodel import train_stdlib_llama  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "llmprune" / "assets" / "tiny-llama"

TINY_LLAMA = dict(vocab_size=2048, hidden=128, layers=4, heads=4, kv_heads=2, intermediate=352,
                  seqlen=256, batch_size=16, steps=800, lr=3e-3, max_wall_s=None, seed=0,
                  tie_embeddings=False, save_dtype="bfloat16")

README = """# llmprune-tiny

The embedded default model of llmprune: `llmprune compress llmprune-tiny ...` uses it, so the tool
and its tests work with no network. It is a real (trained) model, not a random one, so pruning
damage shows up in its perplexity.

- Architecture: `LlamaForCausalLM`, 4 layers, hidden 128, 4 attention heads / 2 KV heads (GQA),
  MLP 352, RoPE, untied `lm_head`; {parameters} parameters, stored in bfloat16.
- Tokenizer: byte-level BPE with 2048 tokens (`<s>`, `</s>`, `<pad>` special), trained on the same text.
- Data: the top-level `*.py` files of the Python standard library, split ~90/10 by a hash of the
  file name (`llmprune.calibration.data.stdlib_texts`): {train_tokens} training tokens.
- Training: AdamW (lr 3e-3, betas 0.9/0.95, weight decay 0.1), warmup + cosine, {steps} steps of
  16 x 256-token random windows, seed 0, one CPU thread ({train_seconds} s).
- Held-out perplexity on the stdlib test split ({test_tokens} tokens, non-overlapping 256-token
  windows, bfloat16 weights): **{heldout_perplexity}** (an add-one unigram model: {unigram_perplexity}).

It writes Python-looking text and nothing more: use it to try the tool, not as a language model.
Regenerate with `python benchmarks/make_tiny_model.py` (repository checkout).
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=TINY_LLAMA["steps"], help="training steps (default 800)")
    args = parser.parse_args()
    out = args.out.resolve()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    print(f"training llmprune-tiny -> {out}", flush=True)
    meta = train_stdlib_llama(tmp, **{**TINY_LLAMA, "steps": args.steps}, readme=README)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    for path in out.iterdir():  # save_pretrained may leave 0600 files; installed package data must be readable
        path.chmod(0o644)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out} ({size / 1e6:.2f} MB): " + ", ".join(sorted(p.name for p in out.iterdir())))
    print(f"held-out stdlib perplexity: {meta['heldout_perplexity']:.2f} (unigram {meta['unigram_perplexity']:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
