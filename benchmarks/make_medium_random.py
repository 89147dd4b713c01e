"""A random-init Llama wide enough that pruning, not process start-up, dominates a whole-process run.

    python benchmarks/make_medium_random.py benchmarks/_cache/medium-random

Hidden 2048, MLP 5632, 4 layers (16 heads / 8 KV heads), the stdlib-llama tokenizer (vocab 2048).
Its perplexity means nothing; it exists to time llmprune vs llm-compressor end to end on the same
calibration windows (`benchmarks/_cache/bench/calib.pt`).
"""
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

out = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/_cache/medium-random")
torch.manual_seed(0)
config = LlamaConfig(vocab_size=2048, hidden_size=2048, intermediate_size=5632, num_hidden_layers=4,
                     num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=2048,
                     tie_word_embeddings=False)
LlamaForCausalLM(config).save_pretrained(out)
AutoTokenizer.from_pretrained(Path(__file__).resolve().parent / "_cache" / "stdlib-llama").save_pretrained(out)
print(out)
