"""Tiny, self-contained model + tokenizer + lm-eval tasks for smoke tests (no downloads).

The tokenizer is a byte-level BPE trained on a few KiB of text in a fraction of a second, so every
string round-trips; the model is a random-init 2-layer Llama. Numbers produced with these are
meaningless except as a check that the plumbing is right (and that they change when weights do).
"""
from __future__ import annotations

import json
from pathlib import Path

_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Question: What is the capital of France? Answer: Paris.",
    "def add(a, b):\n    return a + b\n\nprint(add(12, 30))  # 42\n",
    ">>> 347 + 582\n929\n>>> 12 * 7\n84\n>>> d = {'kiwi': 417, 'plum': 82}\n>>> d['plum']\n82\n",
    "( [ { < > } ] ) -> [ ( ) ] { } 0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
]


def make_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_model(tokenizer, seed: int = 0, hidden: int = 64, layers: int = 2, max_positions: int = 256):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=max_positions, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def write_tasks(directory: str | Path, n: int = 8) -> dict[str, str]:
    """Write one local lm-eval task per output type (jsonl data + YAML) into `directory`.

    Returns {task_name: output_type}. Use the directory as lm-eval `include_path`.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    capitals = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
                ("Egypt", "Cairo"), ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Chile", "Santiago")]
    cities = [c for _, c in capitals]
    mc, gen, roll = [], [], []
    for i in range(n):
        country, city = capitals[i % len(capitals)]
        choices = [city] + [c for c in cities if c != city][: 3]
        order = sorted(range(4), key=lambda j: (j * 7 + i) % 4)
        mc.append({"question": f"What is the capital of {country}?", "choices": [choices[j] for j in order],
                   "answer": order.index(0)})
        a, b = 10 + 7 * i, 3 + 5 * i
        gen.append({"question": f"{a} + {b} =", "answer": str(a + b)})
        roll.append({"text": f"def f{i}(x):\n    return x * {i} + {a}\n\nprint(f{i}({b}))\n" * 3})
    for name, rows in (("toy_mc", mc), ("toy_gen", gen), ("toy_roll", roll)):
        with open(d / f"{name}.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    common = "dataset_path: json\ndataset_name: null\ntest_split: test\nmetadata:\n  version: 1.0\n"
    (d / "toy_mc.yaml").write_text(
        f"task: toy_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {d / 'toy_mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    (d / "toy_gen.yaml").write_text(
        f"task: toy_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {d / 'toy_gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: \"{{question}}\"\ndoc_to_target: \" {{answer}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        "    regexes_to_ignore: [\" \"]\n")
    (d / "toy_roll.yaml").write_text(
        f"task: toy_roll\n{common}dataset_kwargs:\n  data_files:\n    test: {d / 'toy_roll.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n    aggregation: weighted_perplexity\n    higher_is_better: false\n"
        "  - metric: byte_perplexity\n    aggregation: weighted_perplexity\n    higher_is_better: false\n"
        "  - metric: bits_per_byte\n    aggregation: bits_per_byte\n    higher_is_better: false\n")
    return {"toy_mc": "multiple_choice", "toy_gen": "generate_until", "toy_roll": "loglikelihood_rolling"}
