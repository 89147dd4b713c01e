"""A model bigger than --max-memory: peak RSS and wall time of a streamed compress vs the in-memory path.

    python benchmarks/scale_bench.py                       # ~4 GB fp32 random Llama, --max-memory 1GiB
    python benchmarks/scale_bench.py --layers 40           # ~2 GB (a busy machine)

Builds a random-init Llama (hidden 1024, MLP 2816, 16 heads / 8 KV heads, vocab 2048 from the
stdlib-llama tokenizer) with `--layers` decoder layers in benchmarks/_cache/scale-llama-L<layers>
(once), then runs `llmprune compress` twice as separate processes, one thread each:
- streamed: `--max-memory SIZE` (decoder layers read from the input shards and written straight
  into the output shards, one at a time);
- in memory: `--in-memory` (the whole model loaded, `save_pretrained` at the end).
Peak RSS is the whole process's (`wait4` rusage of the child: interpreter, torch, model, page
faults of memory-mapped reads). It checks that both outputs hold the same tensors bit for bit.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / "_cache"


def build_model(path: Path, layers: int) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (path / "config.json").is_file():
        return
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2048, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    LlamaForCausalLM(config).save_pretrained(tmp, max_shard_size="1GB")
    AutoTokenizer.from_pretrained(CACHE / "stdlib-llama").save_pretrained(tmp)
    tmp.rename(path)


def run(argv: list[str]) -> tuple[int, float, float, str]:
    """(exit status, wall seconds, peak RSS GiB, stderr tail) of one `llmprune` process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "llmprune", *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    return proc.returncode, wall, usage.ru_maxrss / 2**20, err[-2000:]


def same_tensors(a: Path, b: Path) -> bool:
    """Tensor by tensor (never both models in memory)."""
    from llmprune.io.checkpoint import CheckpointReader

    ra, rb = CheckpointReader(a), CheckpointReader(b)
    if set(ra.names) != set(rb.names):
        return False
    for name in ra.names:
        x, y = ra.get(name), rb.get(name)
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.view(torch.uint8), y.view(torch.uint8)):
            return False
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=85, help="decoder layers (47 MB each in fp32; 85: ~4.1 GB)")
    p.add_argument("--max-memory", default="1GiB")
    p.add_argument("--method", default="wanda")
    p.add_argument("--calib-samples", type=int, default=4)
    p.add_argument("--calib-seqlen", type=int, default=32)
    p.add_argument("--skip-in-memory", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)

    model = CACHE / f"scale-llama-L{args.layers}"
    build_model(model, args.layers)
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    out = ROOT / "_out" / "scale"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    common = ["compress", str(model), "--method", args.method, "--sparsity", "0.5", "--quiet"]
    if args.method != "magnitude":
        common += ["--calib-data", "stdlib", "--calib-samples", str(args.calib_samples),
                   "--calib-seqlen", str(args.calib_seqlen)]
    rows = []
    runs = [("streamed", ["--max-memory", args.max_memory], out / "streamed")]
    if not args.skip_in_memory:
        runs.append(("in memory", ["--in-memory"], out / "in-memory"))
    for label, extra, target in runs:
        rc, wall, rss, err = run([*common, *extra, "--output", str(target)])
        if rc != 0:
            sys.exit(f"{label} run failed ({rc}): {err}")
        rows.append((label, " ".join(extra), wall, rss))
    identical = same_tensors(out / "streamed", out / "in-memory") if not args.skip_in_memory else None

    print(f"model: random Llama, {args.layers} layers, {size / 2**30:.2f} GiB fp32 safetensors; "
          f"{args.method} 0.5, calibration {args.calib_samples}x{args.calib_seqlen} (stdlib); 1 thread")
    print("| path | flags | wall s | peak RSS GiB |")
    print("|---|---|---|---|")
    for label, flags, wall, rss in rows:
        print(f"| {label} | `{flags}` | {wall:.1f} | {rss:.2f} |")
    if identical is not None:
        print(f"outputs bit-identical tensor by tensor: {identical}")
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
