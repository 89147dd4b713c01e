"""Regenerate the embedded default model `llmprune-tiny` (llmprune/assets/tiny-llama/).

    .venv/bin/python benchmarks/make_tiny_model.py               # ~20 min training on one CPU thread
                                                                 # + ~15 min for the README's pruning table
    .venv/bin/python benchmarks/make_tiny_model.py --out DIR     # somewhere else
    .venv/bin/python benchmarks/make_tiny_model.py --table-only  # re-measure the table of the shipped model

A small Llama trained for a fixed number of steps (seed 0, one CPU thread) on the train split of
this interpreter's Python stdlib sources mixed with synthetic text in the exact surface formats of
the built-in probes (`llmprune eval --suite probes`): doctest arithmetic lines, bracket closing,
dict-literal lookups. The synthetic items come from their own RNG stream and every item that the
probes generate for seeds 0-9 (1000 items each) is left out, so the probes measure a learned skill,
not recall.
The config states the 256-token training window as max_position_embeddings, so calibration and
evaluation use the context the model knows. Saved in bfloat16 so the package stays small. Fixed
step count (no wall-clock cap): the same machine and torch version give the same weights.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tinymodel import replace_results_section, train_stdlib_llama  # noqa: E402

from llmprune.eval import probes  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "llmprune" / "assets" / "tiny-llama"

TINY_LLAMA = dict(vocab_size=2048, hidden=128, layers=4, heads=4, kv_heads=2, intermediate=352,
                  seqlen=256, batch_size=8, steps=1600, lr=3e-3, max_wall_s=None, seed=0,
                  tie_embeddings=False, save_dtype="bfloat16", individual_digits=True, max_positions=256)

# Synthetic documents per probe skill (each document is a few items in the probe's format).
PROBE_DOCS = dict(arithmetic=10000, brackets=3000, kv_retrieval=6000)
STDLIB_REPEATS = 1
EXCLUDED_SEEDS = range(10)   # probe seeds whose items never appear in training
KV_FULL_SHARE = 1 / 2        # kv documents with the probe's 8 keys (the rest: 2-7 keys)

README = """# llmprune-tiny

The embedded default model of llmprune: `llmprune compress llmprune-tiny ...` uses it, so the tool
and its tests work with no network. It is a real (trained) model, not a random one, so pruning
damage shows up in its perplexity and in the built-in probes.

- Architecture: `LlamaForCausalLM`, 4 layers, hidden 128, 4 attention heads / 2 KV heads (GQA),
  MLP 352, RoPE, untied `lm_head`; {parameters} parameters, stored in bfloat16.
- Context: {seqlen} tokens (`max_position_embeddings`), the window it was trained on: `compress`
  calibrates and `eval` measures with {seqlen}-token windows.
- Tokenizer: byte-level BPE with 2048 tokens (`<s>`, `</s>`, `<pad>` special), every digit its
  own token, trained on the training text.
- Data: the top-level `*.py` files of the Python standard library, split ~90/10 by a hash of the
  file name (`llmprune.calibration.data.stdlib_texts`): {train_tokens} training tokens; plus
  {extra_tokens} tokens of synthetic text in the exact formats of `llmprune eval --suite probes`
  (doctest arithmetic `>>> 347 + 582`, bracket closing `( [ {{ }} -> ] )`, dict-literal lookups),
  drawn from their own random stream, with every item the probes generate for seeds 0-9 left out.
- Training: AdamW (lr {lr}, betas 0.9/0.95, weight decay 0.1), warmup + cosine, {steps} steps of
  {batch_size} x {seqlen}-token random windows of the mixed stream ({stream_tokens} tokens), seed 0,
  one CPU thread ({train_seconds} s).
- Held-out perplexity on the stdlib test split ({test_tokens} tokens, non-overlapping {seqlen}-token
  windows, bfloat16 weights): **{heldout_perplexity}** (an add-one unigram model: {unigram_perplexity}).

<!-- table:start -->
{table}<!-- table:end -->

At this size (1.3M parameters, one CPU thread, 1600 steps) the bracket probe is the one it learns;
3-digit arithmetic and 8-key dict retrieval stay at 0 even dense, despite their training text.
It writes Python-looking text and closes brackets: use it to try the tool, not as a language model.
Regenerate with `python benchmarks/make_tiny_model.py` (repository checkout; it trains, then
measures the table above with the commands shown).
"""

# The pruning table of the README: (label, compress flags or None for the dense model).
TABLE_RUNS = [("dense", None),
              ("magnitude 50%", ["--method", "magnitude", "--sparsity", "0.5"]),
              ("wanda 50%", ["--method", "wanda", "--sparsity", "0.5"]),
              ("wanda 2:4", ["--method", "wanda", "--sparsity", "2:4"]),
              ("sparsegpt 2:4", ["--method", "sparsegpt", "--sparsity", "2:4"]),
              ("magnitude 70%", ["--method", "magnitude", "--sparsity", "0.7"]),
              ("wanda 70%", ["--method", "wanda", "--sparsity", "0.7"]),
              ("sparsegpt 70%", ["--method", "sparsegpt", "--sparsity", "0.7"])]
TRAINING_JSON = "training.json"   # the recipe and measurements of the run, next to the weights


def _excluded_items() -> dict[str, set[str]]:
    """Every question line, bracket sequence and dict literal that the probes produce for the
    excluded seeds with their default parameters (3-digit arithmetic), demonstrations included.
    1- and 2-digit problems are not excluded: there are only ~250 and ~17k of them, and 1000 probe
    items per seed would cover nearly all; they are the addition table the 3-digit skill builds on."""
    seen: dict[str, set[str]] = {"arithmetic": set(), "brackets": set(), "kv_retrieval": set()}
    for seed in EXCLUDED_SEEDS:
        for it in probes.make_arithmetic(1000, seed=seed, digits=3):
            seen["arithmetic"].update(line for line in it.prompt.split("\n") if line.startswith(">>> "))
        for it in probes.make_brackets(1000, seed=seed):
            seen["brackets"].update(line.split(" ->")[0] for line in it.prompt.split("\n")[1:])
        for it in probes.make_kv_retrieval(1000, seed=seed):
            seen["kv_retrieval"].add(it.prompt.split("\n")[0])
    return seen


def probe_skill_docs(counts: dict[str, int], seed: int) -> list[str]:
    """Synthetic training documents in the probes' surface formats, shuffled.

    arithmetic    3-12 lines of ">>> a op b" / answer; 3 digits, or 1-2 in a third of the documents
                  (the easy cases teach digit alignment and the addition table sooner)
    brackets      "Close every open bracket." then 3-10 lines "( [ { } -> ] )" (8 symbols, depth <= 4)
    kv_retrieval  a dict literal of string keys -> 3-digit ints (8 keys, or 2-7 in half of the
                  documents: a small dict gives the retrieval circuit a signal early), then a lookup
                  of every key, in random order
    """
    rng = random.Random(f"llmprune-tiny-train-{seed}")
    excluded = _excluded_items()
    docs: list[str] = []
    for _ in range(counts["arithmetic"]):
        digits = rng.choice((1, 2, 3, 3, 3, 3))
        lines: list[str] = []
        n_lines = rng.randint(3, 12)
        while len(lines) < 2 * n_lines:
            question, answer = probes._arith_problem(rng, digits)
            if f">>> {question}" not in excluded["arithmetic"]:
                lines += [f">>> {question}", str(answer)]
        docs.append("\n".join(lines) + "\n")
    for _ in range(counts["brackets"]):
        lines = []
        for _ in range(rng.randint(3, 10)):
            while True:
                seq = " ".join(probes._bracket_prefix(rng, 8, 4)[0])
                if seq not in excluded["brackets"]:
                    break
            lines.append(f"{seq} -> {probes.closing_sequence(seq)}\n")
        docs.append("Close every open bracket.\n" + "".join(lines))
    for _ in range(counts["kv_retrieval"]):
        pairs = 8 if rng.random() < KV_FULL_SHARE else rng.randint(2, 7)
        keys: list[str] = []
        while len(keys) < pairs:
            key = "".join(rng.choice(probes._SYLLABLES) for _ in range(2))
            if key not in keys:
                keys.append(key)
        values = [rng.randint(100, 999) for _ in keys]
        head = ">>> d = {" + ", ".join(f'"{k}": {v}' for k, v in zip(keys, values)) + "}"
        if head in excluded["kv_retrieval"]:
            continue
        lookups = rng.sample(range(pairs), pairs)
        docs.append(head + "\n" + "".join(f'>>> d["{keys[i]}"]\n{values[i]}\n' for i in lookups))
    rng.shuffle(docs)
    return docs


def _llmprune(*argv: str) -> float:
    """Run the real CLI in a subprocess (as a user would); returns its wall time in seconds."""
    start = time.perf_counter()
    # One thread, as in training: two threads on a busy 2-core machine run several times slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "llmprune", *argv], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"llmprune {' '.join(argv)} failed:\n{proc.stdout}{proc.stderr}")
    return time.perf_counter() - start


def pruning_table(model: Path, work: Path) -> str:
    """Markdown: dense vs pruned held-out stdlib perplexity and probe scores, measured with
    `llmprune compress ... --calib-data stdlib` and `llmprune eval --suite probes --ppl-data stdlib`."""
    rows = []
    for label, flags in TABLE_RUNS:
        target, compress_s = model, None
        if flags is not None:
            target = work / label.replace(" ", "-").replace("%", "").replace(":", "of")
            compress_s = _llmprune("compress", str(model), *flags, "--calib-data", "stdlib", "--quiet",
                                   "--output", str(target))
        results_dir = work / f"eval-{target.name}"
        eval_s = _llmprune("eval", str(target), "--suite", "probes", "--ppl-data", "stdlib", "--quiet",
                           "--output", str(results_dir))
        tasks = json.loads((results_dir / "results.json").read_text())["tasks"]
        rows.append((label, tasks, compress_s, eval_s))
        print(f"  {label}: " + ", ".join(f"{k} {t['value']:.4g}" for k, t in tasks.items()), flush=True)
    names = list(rows[0][1])
    lines = ["Pruned with `llmprune compress llmprune-tiny --method M --sparsity S --calib-data stdlib` and",
             "measured with `llmprune eval DIR --suite probes --ppl-data stdlib` (exact match over 100 items per",
             "probe, greedy; perplexity over the stdlib test split):", "",
             "| model | " + " | ".join(names) + " | compress s | eval s |",
             "|---|" + "---:|" * (len(names) + 2)]
    for label, tasks, compress_s, eval_s in rows:
        cells = [f"{tasks[n]['value']:.2f}" for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {'' if compress_s is None else f'{compress_s:.0f}'}"
                     f" | {eval_s:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=TINY_LLAMA["steps"],
                        help=f"training steps (default {TINY_LLAMA['steps']})")
    parser.add_argument("--no-table", action="store_true", help="skip the README's pruning table (~10 minutes)")
    parser.add_argument("--table-only", action="store_true",
                        help="no training: re-measure the pruning table of the model in --out and rewrite it "
                             "in its README (after a CLI change)")
    args = parser.parse_args()
    out = args.out.resolve()
    if args.table_only:
        with tempfile.TemporaryDirectory() as work:
            table = pruning_table(out, Path(work))
        replace_results_section(out / "README.md", "table", table.rstrip("\n"))
        print(table)
        return 0
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    print(f"training llmprune-tiny -> {out}", flush=True)
    docs = probe_skill_docs(PROBE_DOCS, TINY_LLAMA["seed"])
    meta = train_stdlib_llama(tmp, **{**TINY_LLAMA, "steps": args.steps}, extra_texts=docs,
                              stdlib_repeats=STDLIB_REPEATS)
    (tmp / TRAINING_JSON).write_text(json.dumps({**TINY_LLAMA, "steps": args.steps, "probe_docs": PROBE_DOCS,
                                                 "stdlib_repeats": STDLIB_REPEATS, **meta}, indent=1) + "\n")
    for path in tmp.iterdir():  # save_pretrained may leave 0600 files; installed package data must be readable
        path.chmod(0o644)
    table = ""
    if not args.no_table:
        print("measuring the pruning table", flush=True)
        with tempfile.TemporaryDirectory() as work:
            table = pruning_table(tmp, Path(work))
    (tmp / "README.md").write_text(README.format(**meta, lr=TINY_LLAMA["lr"], batch_size=TINY_LLAMA["batch_size"],
                                                 table=table))
    (tmp / "README.md").chmod(0o644)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out} ({size / 1e6:.2f} MB): " + ", ".join(sorted(p.name for p in out.iterdir())))
    print(f"held-out stdlib perplexity: {meta['heldout_perplexity']:.2f} (unigram {meta['unigram_perplexity']:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
