"""Tiny random-init models of every supported family, and a small local tokenizer (no downloads)."""
from __future__ import annotations

import functools
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

VOCAB = 384
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=128, max_position_embeddings=256, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)
_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)

ARCH_CONFIGS = {
    "llama": dict(_COMMON, num_key_value_heads=2),
    "mistral": dict(_COMMON, num_key_value_heads=2, sliding_window=None),
    "qwen2": dict(_COMMON, num_key_value_heads=2),
    "qwen3": dict(_COMMON, num_key_value_heads=2, head_dim=16),
    "gemma2": dict(_COMMON, num_key_value_heads=2, head_dim=16, sliding_window=16, query_pre_attn_scalar=16),
    "gemma3_text": dict(_COMMON, num_key_value_heads=2, head_dim=16, sliding_window=16, query_pre_attn_scalar=16,
                        layer_types=["sliding_attention", "full_attention"]),
    "phi3": dict(_COMMON, num_key_value_heads=2),
    "opt": dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                max_position_embeddings=256, word_embed_proj_dim=64, tie_word_embeddings=False, **_IDS),
    "gpt2": dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256, tie_word_embeddings=False, **_IDS),
    "gpt_neox": dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=256, tie_word_embeddings=False, **_IDS),
}

# MoE families (transformers v5: fused 3-D experts). 8 experts, top-2, and each family's routing quirks:
# Qwen2-MoE un-normalised top-k + a gated shared expert + one dense layer (mlp_only_layers); Qwen3-MoE
# norm_topk_prob; OLMoE un-normalised; DeepSeek-V3 sigmoid scores + correction bias + 2 groups of 4 with
# topk_group=1 + routed_scaling_factor + a dense first layer + a shared expert (MLA attention).
_MOE_COMMON = dict(_COMMON, intermediate_size=96, num_key_value_heads=2, num_experts_per_tok=2)
MOE_CONFIGS = {
    "mixtral": dict(_MOE_COMMON, intermediate_size=32, num_local_experts=8, sliding_window=None),
    "qwen2_moe": dict(_MOE_COMMON, num_hidden_layers=3, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                      num_experts=8, norm_topk_prob=False, mlp_only_layers=[1]),
    "qwen3_moe": dict(_MOE_COMMON, head_dim=16, moe_intermediate_size=32, num_experts=8, norm_topk_prob=True),
    "olmoe": dict(_MOE_COMMON, intermediate_size=32, num_experts=8, norm_topk_prob=False),
    "deepseek_v3": dict(_MOE_COMMON, num_hidden_layers=3, num_key_value_heads=4, moe_intermediate_size=32,
                        n_routed_experts=8, n_shared_experts=1, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                        norm_topk_prob=True, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
}


def tiny_config(model_type: str, **overrides):
    base = ARCH_CONFIGS[model_type] if model_type in ARCH_CONFIGS else MOE_CONFIGS[model_type]
    return AutoConfig.for_model(model_type, **{**base, **overrides})


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    model.eval()
    return model


def sample_text() -> str:
    """Local text (Python stdlib sources) for tokenizer training and calibration files."""
    from llmprune.calibration.data import stdlib_files

    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files("train")[:12])


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([sample_text()[:200_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def save_tiny(path: Path, model_type: str = "llama", seed: int = 0) -> Path:
    model = tiny_model(model_type, seed)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def text_windows(seqlen: int) -> torch.Tensor:
    """`sample_text()` through the tiny tokenizer, cut into `[n, seqlen]` windows (tail dropped)."""
    stream = torch.tensor(tiny_tokenizer()(sample_text(), add_special_tokens=False)["input_ids"])
    return stream[: stream.numel() // seqlen * seqlen].view(-1, seqlen)


def train_tiny_llama(windows: torch.Tensor, steps: int = 150) -> torch.nn.Module:
    """A tiny Llama trained for a few seconds on `windows` (seeded: the same model every call)."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = windows[torch.randint(0, windows.shape[0], (8,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return model


def outlier_model() -> torch.nn.Module:
    """A one-layer tiny Llama whose input norms have varied (log-normal) scales: random models have no
    outlier features, real LLMs do, and activation-aware methods only differ from magnitude with them."""
    model = tiny_model("llama", num_hidden_layers=1, hidden_size=128, intermediate_size=256)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for norm in (model.model.layers[0].input_layernorm, model.model.layers[0].post_attention_layernorm):
            norm.weight.copy_(torch.exp(torch.randn(norm.weight.shape, generator=gen)))
    return model
