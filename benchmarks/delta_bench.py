"""Delta pruning benchmark: DARE vs DAREx-q (auto) vs magnitude on a small code->prose fine-tune.

Base:      the cached small Llama trained on Python stdlib *code* (benchmarks/tinymodel.py).
Fine-tune: a brief continued training of it on English *prose*: the Python reference manual
           topics shipped with the interpreter (`pydoc_data.topics`), split by topic into
           train (~80%) and held-out test (~20%). All local, no downloads.
For p in {0.5, 0.9, 0.99} it runs `llmprune.delta.prune_delta` (the code behind
`llmprune delta`) with DARE (rescale 1/(1-p)), DAREx-q (`--rescale auto`, calibrated on unlabeled
fine-tune-domain train text) and magnitude (no rescale), and prints the held-out loss (mean
next-token NLL, nats) on the fine-tune's domain, next to the fine-tune itself and the base.
The stdlib-code loss shows how much of the base domain each model keeps; the size column is the
`--save-delta` artifact (patches of the pruned tensors + the excluded embeddings/norms in full)
against the fine-tune's safetensors.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/delta_bench.py
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from tinymodel import CACHE_DIR, encode_joined, get_trained_llama, heldout_perplexity, train_causal_lm  # noqa: E402

FT_ARGS = dict(steps=200, seqlen=256, batch_size=8, lr=3e-4, weight_decay=0.0, seed=0, max_wall_s=300.0)


def prose_split() -> tuple[list[str], list[str]]:
    """Python reference-manual topics (English prose with some code), split ~80/20 by topic name."""
    import pydoc_data.topics

    topics = sorted(pydoc_data.topics.topics.items())
    is_test = [int(hashlib.sha1(k.encode()).hexdigest(), 16) % 5 == 0 for k, _ in topics]
    train = [v for (k, v), t in zip(topics, is_test) if not t]
    test = [v for (k, v), t in zip(topics, is_test) if t]
    return train, test


def get_finetune(base_dir: Path, train_texts: list[str]) -> Path:
    """Fine-tune the base on prose (cached in benchmarks/_cache/delta-prose-ft)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = CACHE_DIR / "delta-prose-ft"
    key = {**FT_ARGS, "base": json.loads((base_dir / "train_meta.json").read_text()).get("args")}
    meta_path = out / "ft_meta.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("key") == key:
        print(f"reusing fine-tune {out}", flush=True)
        return out
    print(f"fine-tuning the base on prose into {out} (once; cached afterwards)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    t0 = time.perf_counter()
    train_causal_lm(model, tokenizer, train_texts, **FT_ARGS)
    tmp = CACHE_DIR / f".delta-prose-ft.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "ft_meta.json").write_text(json.dumps({"key": key, "seconds": round(time.perf_counter() - t0, 1)}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drop-rates", default="0.5,0.9,0.99")
    parser.add_argument("--eval-windows", type=int, default=48, help="held-out windows of 256 tokens per domain")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmprune.calibration.data import stdlib_texts
    from llmprune.delta import prune_delta

    start = time.perf_counter()
    base_dir = get_trained_llama()
    train_texts, test_texts = prose_split()
    ft_dir = get_finetune(base_dir, train_texts)
    tokenizer = AutoTokenizer.from_pretrained(ft_dir)
    prose_tokens = encode_joined(tokenizer, test_texts)
    code_tokens = encode_joined(tokenizer, stdlib_texts("test"))
    print(f"held-out prose: {prose_tokens.numel()} tokens; stdlib code: {code_tokens.numel()} tokens", flush=True)

    def losses(model_dir: Path) -> tuple[float, float]:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        prose = math.log(heldout_perplexity(model, tokenizer, [], 256, max_windows=args.eval_windows,
                                            tokens=prose_tokens))
        code = math.log(heldout_perplexity(model, tokenizer, [], 256, max_windows=args.eval_windows,
                                           tokens=code_tokens))
        return prose, code

    rows = []
    ft_prose, ft_code = losses(ft_dir)
    base_prose, base_code = losses(base_dir)
    print(f"fine-tune: prose {ft_prose:.4f}  code {ft_code:.4f} | base: prose {base_prose:.4f}  code {base_code:.4f}",
          flush=True)
    work = Path(tempfile.mkdtemp(prefix="delta-bench-"))
    calib = work / "prose-train.txt"
    calib.write_text("\n\n".join(train_texts))
    methods = [("DARE (1/(1-p))", "dare", "inverse"), ("DAREx-q (auto)", "dare", "auto"),
               ("magnitude (no rescale)", "magnitude", "none")]
    try:
        for p in [float(x) for x in args.drop_rates.split(",")]:
            for label, method, rescale in methods:
                out = work / f"{method}-{rescale}-{p}"
                t0 = time.perf_counter()
                summary = prune_delta(str(base_dir), [str(ft_dir)], out, method=method, drop_rate=p, rescale=rescale,
                                      seed=args.seed, progress=False, save_delta=True,
                                      calib={"source": str(calib), "split": "train", "samples": args.calib_samples,
                                             "seqlen": 256, "seed": args.seed})
                seconds = time.perf_counter() - t0
                prose, code = losses(out)
                q = summary["q"] if rescale == "auto" else (1 - p if rescale == "inverse" else 1.0)
                size = summary["delta_bytes"] / summary["finetuned_bytes"]
                rows.append((p, label, q, summary["achieved_density"], size, prose, code, seconds))
                print(f"p={p:<5} {label:<24} q={q:.4f} density={summary['achieved_density']:.4f} "
                      f"sparse delta {size:.1%} of the fine-tune  prose {prose:.4f}  code {code:.4f}  ({seconds:.1f}s)",
                      flush=True)
                shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print("\n| p | method | q (Δ̂ = keep⊙Δ/q) | delta density | sparse delta / fine-tune size "
          "| held-out prose loss | stdlib code loss | time |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| - | fine-tune itself | - | 1 | - | {ft_prose:.4f} | {ft_code:.4f} | - |")
    print(f"| - | base itself | - | 0 | - | {base_prose:.4f} | {base_code:.4f} | - |")
    for p, label, q, density, size, prose, code, seconds in rows:
        print(f"| {p} | {label} | {q:.4f} | {density:.4f} | {size:.1%} | {prose:.4f} | {code:.4f} | {seconds:.1f} s |")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
