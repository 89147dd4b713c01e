"""Eval-harness benchmark: `llmprune sweep` with Wanda at 0/0.3/0.5/0.7 on the small trained Llama.

Everything is offline. The model (benchmarks/tinymodel.py) is trained on Python stdlib sources, so
the suites measure what such a model can know:

  lm             paper-protocol token perplexity on the held-out stdlib files
                 + `stdlib_heldout_bpb`: lm-eval loglikelihood_rolling bits/byte on the same files
  stdlib_knowledge  `stdlib_import_mc`: closed-book "from ___ import NAME", 4 modules to choose from
                 (multiple_choice over modules of the *training* split: memorised API knowledge)
  probes         the built-in probes (arithmetic, brackets, key-value retrieval)

Usage:  .venv/bin/python benchmarks/eval_sweep.py [--limit N] [--output DIR]
Prints the report table and writes DIR (default benchmarks/_out/eval_sweep: runs/, report/).
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

LM_YAML = """\
name: lm
description: Held-out stdlib text - paper-protocol token perplexity and lm-eval rolling bits/byte.
perplexity: [stdlib]
tasks:
  - task: stdlib_heldout_bpb
    metric: bits_per_byte,none
    num_fewshot: 0
    higher_is_better: false
"""

SUITE_YAML = """\
name: stdlib_knowledge
description: >
  What a model trained on the Python stdlib knows. Closed-book: which module defines NAME; which line
  follows in a *training* file (memorised). In-distribution skill: which line follows in a held-out
  file, and generating the last word of a held-out line (LAMBADA-style, exact match).
tasks:
  - task: stdlib_import_mc
    metric: acc,none
    num_fewshot: 0
    chance: 0.25
  - task: stdlib_nextline_train_mc
    metric: acc,none
    num_fewshot: 0
    chance: 0.25
  - task: stdlib_nextline_heldout_mc
    metric: acc,none
    num_fewshot: 0
    chance: 0.25
  - task: stdlib_linecomplete_gen
    metric: exact_match,none
    num_fewshot: 0
    chance: 0.0
"""

EASY_PROBES_YAML = """\
name: probes_easy
description: The built-in probes at a difficulty a 4-layer model can partly solve.
tasks:
  - probe: arithmetic
    name: probe_arith_1digit
    params: {n: 100, seed: 0, digits: 1, shots: 6}
  - probe: brackets
    name: probe_brackets_short
    params: {n: 100, seed: 0, length: 4, max_depth: 2, shots: 6}
  - probe: kv_retrieval
    name: probe_kv_4pairs
    params: {n: 100, seed: 0, pairs: 4}
"""


def public_names(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    return [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_")]


def _code_lines(split: str) -> list[tuple[str, list[str]]]:
    from llmprune.calibration.data import stdlib_files

    return [(p.stem, p.read_text(encoding="utf-8", errors="replace").split("\n")) for p in stdlib_files(split)]


def nextline_tasks(task_dir: Path, rng: random.Random, n: int = 200, context: int = 6) -> None:
    """Next-line multiple choice (train and held-out files) and held-out line completion."""
    def draw(files) -> tuple[list[str], int]:
        """A random file with more than `context` + 1 lines and a line index with `context` lines before it."""
        while True:
            _, lines = rng.choice(files)
            if len(lines) > context + 1:
                return lines, rng.randrange(context, len(lines))

    def good(line: str) -> bool:
        return 12 <= len(line.strip()) <= 80 and not line.strip().startswith("#")

    for split, task in (("train", "stdlib_nextline_train_mc"), ("test", "stdlib_nextline_heldout_mc")):
        files = _code_lines(split)
        pool = [l for _, lines in files for l in lines if good(l)]
        rows = []
        while len(rows) < n:
            lines, i = draw(files)
            if not good(lines[i]) or sum(not l.strip() for l in lines[i - context:i]) > 2:
                continue
            wrong = [l for l in rng.sample(pool, 6) if l.strip() != lines[i].strip()][:3]
            choices = [lines[i]] + wrong
            rng.shuffle(choices)
            rows.append({"context": "\n".join(lines[i - context:i]) + "\n", "choices": choices,
                         "answer": choices.index(lines[i])})
        with open(task_dir / f"{task}.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
        (task_dir / f"{task}.yaml").write_text(f"""\
task: {task}
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {task_dir / f'{task}.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    files = _code_lines("test")
    rows = []
    while len(rows) < n:
        lines, i = draw(files)
        line = lines[i]
        if not good(line):
            continue
        # LAMBADA-style: predict the last space-separated word of the line (cut before a space, so
        # the prompt ends on a token boundary)
        cut = line.rstrip().rfind(" ")
        if cut <= len(line) - len(line.lstrip()) or len(line.rstrip()) - cut < 3:
            continue
        rows.append({"context": "\n".join(lines[i - context:i]) + "\n" + line[:cut], "target": line[cut:].rstrip()})
    with open(task_dir / "stdlib_linecomplete_gen.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    (task_dir / "stdlib_linecomplete_gen.yaml").write_text(f"""\
task: stdlib_linecomplete_gen
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {task_dir / 'stdlib_linecomplete_gen.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 32
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")


def write_tasks(task_dir: Path, n_mc: int = 200) -> None:
    from llmprune.calibration.data import stdlib_files

    task_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    modules = {}
    for p in stdlib_files("train"):
        names = public_names(p.read_text(encoding="utf-8", errors="replace"))
        if names and not p.stem.startswith("_"):
            modules[p.stem] = names
    mods = sorted(modules)
    rows, seen = [], set()
    while len(rows) < n_mc:
        mod = rng.choice(mods)
        name = rng.choice(modules[mod])
        if (mod, name) in seen or sum(name in modules[m] for m in mods) > 1:
            continue  # ambiguous: defined in several modules
        seen.add((mod, name))
        choices = [mod] + rng.sample([m for m in mods if m != mod], 3)
        rng.shuffle(choices)
        rows.append({"name": name, "choices": [f"{m} import {name}" for m in choices], "answer": choices.index(mod)})
    with open(task_dir / "stdlib_import_mc.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    nextline_tasks(task_dir, rng)
    # held-out files in ~2000-character chunks (documents for loglikelihood_rolling)
    docs = []
    for p in stdlib_files("test"):
        text = p.read_text(encoding="utf-8", errors="replace")
        docs += [text[i:i + 2000] for i in range(0, len(text), 2000) if text[i:i + 2000].strip()]
    docs = docs[::4]  # every 4th chunk: ~100 documents keep the CPU run short
    with open(task_dir / "stdlib_heldout.jsonl", "w") as fh:
        fh.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    (task_dir / "stdlib_import_mc.yaml").write_text(f"""\
task: stdlib_import_mc
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {task_dir / 'stdlib_import_mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "from"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    (task_dir / "stdlib_heldout_bpb.yaml").write_text(f"""\
task: stdlib_heldout_bpb
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {task_dir / 'stdlib_heldout.jsonl'}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
metadata:
  version: 1.0
""")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=200, help="items per task/probe (default 200)")
    ap.add_argument("--output", default=str(HERE / "_out" / "eval_sweep"))
    ap.add_argument("--sparsities", default="0,0.3,0.5,0.7")
    args = ap.parse_args()

    from tinymodel import get_trained_llama

    model_dir = get_trained_llama()
    work = HERE / "_cache" / "eval_bench"
    if work.exists():
        shutil.rmtree(work)
    write_tasks(work / "tasks")
    (work / "lm_stdlib.yaml").write_text(LM_YAML)
    (work / "stdlib_knowledge.yaml").write_text(SUITE_YAML)
    (work / "probes_easy.yaml").write_text(EASY_PROBES_YAML)
    cmd = [str(Path(sys.executable).parent / "llmprune"), "sweep", str(model_dir), "--method", "wanda",
           "--sparsities", args.sparsities, "--calib-data", "stdlib", "--calib-samples", "64",
           "--calib-seqlen", "256", "--suite", f"{work / 'lm_stdlib.yaml'},{work / 'stdlib_knowledge.yaml'},probes",
           "--include-path", str(work / "tasks"), "--seqlen", "256",
           "--batch-size", "16", "--output", args.output, "--overwrite", "--quiet"]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    rc = subprocess.call(cmd, env=env)
    print(f"sweep wall time {time.time() - t0:.0f} s", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
