"""Small trained models for benchmarks: a byte-level BPE tokenizer, a plain training loop, the
SparseGPT/Wanda perplexity protocol, and a cached small Llama trained on the Python stdlib.

Import from a script in benchmarks/:

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tinymodel import get_trained_llama, heldout_perplexity

Everything runs offline on CPU: the text is the interpreter's own stdlib sources
(`llmprune.calibration.data.stdlib_texts`), split ~90/10 into train and test by file name.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

CACHE_DIR = Path(__file__).resolve().parent / "_cache"

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


# --------------------------------------------------------------------------------------------
# tokenizer


def build_tokenizer(texts: Sequence[str], vocab_size: int, individual_digits: bool = False):
    """Train a byte-level BPE (GPT-2 style pre-tokenizer, no prefix space) on `texts`.

    `individual_digits` splits every digit into its own token first (as Llama does), so numbers
    are digit sequences rather than arbitrary BPE chunks ("100" vs "1" "00"): what a model that
    must learn arithmetic needs.
    Returns a `PreTrainedTokenizerFast` with bos/eos/pad set; it adds no special tokens on its own
    (the calibration/perplexity code tokenizes with add_special_tokens=False anyway).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if individual_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=1 << 30,
    )


def encode_joined(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """The documents joined with "\\n\\n" and tokenized as one string -> 1-D LongTensor."""
    text = "\n\n".join(t for t in texts if t and t.strip())
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


# --------------------------------------------------------------------------------------------
# training


def train_causal_lm(model, tokenizer, texts: Sequence[str], steps: int, seqlen: int, batch_size: int,
                    lr: float = 3e-3, seed: int = 0, warmup: int | None = None, weight_decay: float = 0.1,
                    max_wall_s: float | None = None, log_every: int = 25, tokens: torch.Tensor | None = None):
    """AdamW + linear warmup + cosine decay on random `seqlen` windows of the joined text.

    `max_wall_s` re-plans the step count every 20 steps from the measured rate so the run ends
    within the budget (never more than `steps`); the cosine schedule follows the new count, so the
    learning rate still decays at the end. Returns the model (in eval mode).
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    stream = encode_joined(tokenizer, texts) if tokens is None else tokens
    if stream.numel() <= seqlen + 1:
        raise ValueError(f"only {stream.numel()} tokens of training text for seqlen {seqlen}")
    warmup = max(1, steps // 20) if warmup is None else warmup
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))

    def lr_at(step: int, total: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))

    model.train()
    total = steps
    start = time.perf_counter()
    running = None
    step = 0
    while step < total:
        starts = torch.randint(0, stream.numel() - seqlen, (batch_size,), generator=gen)
        batch = torch.stack([stream[s: s + seqlen] for s in starts.tolist()])  # [batch, seqlen]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        step += 1
        elapsed = time.perf_counter() - start
        if max_wall_s is not None and step >= 20 and step % 20 == 0:
            # Re-plan from the measured rate (the machine may be shared): never more than `steps`.
            affordable = min(steps, step + int((max_wall_s - elapsed) / (elapsed / step)))
            if affordable != total:
                print(f"  [train] {elapsed / step:.2f} s/step: {total} -> {max(affordable, step + 1)} steps "
                      f"to fit {max_wall_s:.0f} s", flush=True)
                total = max(affordable, step + 1)
        if step % log_every == 0 or step == total:
            print(f"  [train] step {step}/{total}  loss {running:.3f}  lr {lr_at(step - 1, total):.2e}  "
                  f"{elapsed:.0f}s", flush=True)
    model.eval()
    model.trained_steps = total  # what actually ran (max_wall_s may have changed it)
    return model


# --------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def heldout_perplexity(model, tokenizer, texts: Sequence[str], seqlen: int, batch_size: int = 8,
                       max_windows: int | None = None, tokens: torch.Tensor | None = None) -> float:
    """The SparseGPT/Wanda protocol: join with "\\n\\n", tokenize once, cut non-overlapping
    `seqlen` windows (tail dropped), exp(mean over windows of the mean next-token NLL).

    `max_windows` keeps only the first windows (for quick benchmarks); `tokens` skips tokenizing.
    """
    stream = encode_joined(tokenizer, texts) if tokens is None else tokens
    n = stream.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"only {stream.numel()} tokens of held-out text for seqlen {seqlen}")
    windows = stream[: n * seqlen].view(n, seqlen)
    # Equal-length windows: the mean of per-window means is the token mean that llmprune eval uses.
    from llmprune.eval.ppl import perplexity_of_windows

    return perplexity_of_windows(model, windows, batch_size=batch_size).ppl


def unigram_perplexity(train_tokens: torch.Tensor, test_tokens: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of an add-one unigram model fitted on the train tokens (a floor to beat)."""
    counts = torch.bincount(train_tokens, minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[test_tokens].mean().item())


# --------------------------------------------------------------------------------------------
# cached small Llama


def llama_config(vocab_size: int, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int,
                 seqlen: int, tie_embeddings: bool, tokenizer, dtype: str = "float32",
                 max_positions: int | None = None):
    """`max_positions`: the config's max_position_embeddings (default max(2048, seqlen), as the
    benchmark models always had; pass `seqlen` to state the context the model was trained on)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions or max(2048, seqlen), rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=tie_embeddings, initializer_range=0.02,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, dtype=dtype,
    )


def train_stdlib_llama(out_dir: Path, *, vocab_size: int, hidden: int, layers: int, heads: int, kv_heads: int,
                       intermediate: int, seqlen: int, batch_size: int, steps: int, lr: float,
                       max_wall_s: float, seed: int, tie_embeddings: bool, save_dtype: str = "float32",
                       eval_windows: int | None = None, readme: str | None = None, threads: int = 1,
                       extra_texts: Sequence[str] = (), stdlib_repeats: int = 1, individual_digits: bool = False,
                       max_positions: int | None = None) -> dict:
    """Train tokenizer + Llama on stdlib train, save to `out_dir`, return the metadata dict.

    `threads`: torch CPU threads while training. One thread is the default: it makes the result
    independent of the machine's core count, and on a shared 2-core box it is faster than two
    oversubscribed threads.
    `extra_texts`: more training documents (the tokenizer is trained on them too); the training
    stream is the stdlib train tokens `stdlib_repeats` times followed by the extra documents' tokens,
    and windows are drawn uniformly from it, so the repeats set the stdlib share of training.
    `individual_digits` / `max_positions`: see `build_tokenizer` / `llama_config`.
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _train_stdlib_llama(out_dir, vocab_size=vocab_size, hidden=hidden, layers=layers, heads=heads,
                                   kv_heads=kv_heads, intermediate=intermediate, seqlen=seqlen,
                                   batch_size=batch_size, steps=steps, lr=lr, max_wall_s=max_wall_s, seed=seed,
                                   tie_embeddings=tie_embeddings, save_dtype=save_dtype,
                                   eval_windows=eval_windows, readme=readme, extra_texts=extra_texts,
                                   stdlib_repeats=stdlib_repeats, individual_digits=individual_digits,
                                   max_positions=max_positions)
    finally:
        torch.set_num_threads(previous_threads)


def _train_stdlib_llama(out_dir: Path, *, vocab_size, hidden, layers, heads, kv_heads, intermediate, seqlen,
                        batch_size, steps, lr, max_wall_s, seed, tie_embeddings, save_dtype, eval_windows,
                        readme, extra_texts=(), stdlib_repeats=1, individual_digits=False,
                        max_positions=None) -> dict:
    from transformers import GenerationConfig, LlamaForCausalLM

    from llmprune.calibration.data import stdlib_texts

    random.seed(seed)
    torch.manual_seed(seed)
    train_texts, test_texts = stdlib_texts("train"), stdlib_texts("test")
    t0 = time.perf_counter()
    tokenizer = build_tokenizer(list(train_texts) + list(extra_texts), vocab_size, individual_digits)
    train_tokens = encode_joined(tokenizer, train_texts)
    test_tokens = encode_joined(tokenizer, test_texts)
    stream = train_tokens
    extra_tokens = 0
    if extra_texts:
        extra = encode_joined(tokenizer, extra_texts)
        extra_tokens = extra.numel()
        stream = torch.cat([train_tokens] * stdlib_repeats + [extra])
    print(f"  tokenizer: vocab {len(tokenizer)}, train {train_tokens.numel()} tokens, "
          f"test {test_tokens.numel()} tokens, extra {extra_tokens} tokens "
          f"({time.perf_counter() - t0:.1f}s)", flush=True)
    config = llama_config(len(tokenizer), hidden, layers, heads, kv_heads, intermediate, seqlen,
                          tie_embeddings, tokenizer, max_positions=max_positions)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"  model: {n_params / 1e6:.2f}M parameters", flush=True)
    t1 = time.perf_counter()
    train_causal_lm(model, tokenizer, train_texts, steps=steps, seqlen=seqlen, batch_size=batch_size, lr=lr,
                    seed=seed, max_wall_s=max_wall_s, tokens=stream)
    train_s = time.perf_counter() - t1
    if save_dtype != "float32":
        model = model.to(getattr(torch, save_dtype))
        model.config.dtype = save_dtype
    ppl = heldout_perplexity(model, tokenizer, test_texts, seqlen, max_windows=eval_windows, tokens=test_tokens)
    unigram = unigram_perplexity(train_tokens, test_tokens, len(tokenizer))
    print(f"  held-out stdlib perplexity (seqlen {seqlen}): {ppl:.2f}   (add-one unigram: {unigram:.1f})",
          flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False,
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    meta = {
        "parameters": n_params, "steps": getattr(model, "trained_steps", steps), "train_tokens": int(train_tokens.numel()), "test_tokens": int(test_tokens.numel()),
        "train_seconds": round(train_s, 1), "heldout_perplexity": round(ppl, 4),
        "unigram_perplexity": round(unigram, 2), "seqlen": seqlen, "extra_tokens": extra_tokens,
        "stream_tokens": int(stream.numel()),
    }
    if readme is not None:
        (out_dir / "README.md").write_text(readme.format(**meta))
    return meta


# --------------------------------------------------------------------------------------------
# results file


def replace_results_section(results_md: Path, name: str, body: str) -> None:
    """Put `body` between `<!-- NAME:start -->` / `<!-- NAME:end -->` markers in RESULTS.md, replacing what
    an earlier run wrote there (appended at the end the first time)."""
    import re

    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    section = f"{start}\n\n{body}\n\n{end}"
    text = results_md.read_text() if results_md.is_file() else "# Benchmark results\n"
    if start in text and end in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda m: section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    results_md.write_text(text)


# Default recipe of the benchmark model. Changing any value retrains (the cache key is these args).
STDLIB_LLAMA = dict(vocab_size=2048, hidden=256, layers=4, heads=8, kv_heads=4, intermediate=688,
                    seqlen=256, batch_size=8, steps=1000, lr=3e-3, max_wall_s=900.0, seed=0,
                    tie_embeddings=False)


# The compression benchmark's model: ~5x the compute per token of STDLIB_LLAMA, so that a whole
# process is dominated by pruning rather than by Python/transformers start-up (~4 s per process).
COMPRESS_BENCH_LLAMA = dict(STDLIB_LLAMA, hidden=512, layers=6, heads=8, kv_heads=4, intermediate=1408,
                            steps=800, max_wall_s=1500.0)


def cached_model(name: str, args: dict, train: Callable[[Path, dict], dict]) -> Path:
    """benchmarks/_cache/<name> if it was trained with exactly `args`, else `train(tmp_dir, args)` (returns
    the training metadata) into a temporary folder renamed into place; prints the held-out perplexity."""
    import shutil

    out = CACHE_DIR / name
    meta_path = out / "train_meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("args") == args and (out / "model.safetensors").is_file():
            print(f"reusing {out}: held-out stdlib perplexity {meta['heldout_perplexity']:.2f} "
                  f"(unigram {meta['unigram_perplexity']:.1f}), {meta['steps']} steps", flush=True)
            return out
    print(f"training {name} into {out} (once; cached afterwards)", flush=True)
    tmp = CACHE_DIR / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)   # independent of the core count; faster than oversubscribed threads on a shared box
    try:
        meta = train(tmp, args)
    finally:
        torch.set_num_threads(previous_threads)
    meta["args"] = args
    (tmp / "train_meta.json").write_text(json.dumps(meta, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def get_trained_llama(name: str = "stdlib-llama", **overrides) -> Path:
    """Train (or reuse from benchmarks/_cache/<name>) a small Llama on stdlib train; returns its
    `save_pretrained` directory (model + tokenizer). Prints the held-out perplexity."""
    return cached_model(name, {**STDLIB_LLAMA, **overrides}, lambda tmp, args: train_stdlib_llama(tmp, **args))


if __name__ == "__main__":
    print(get_trained_llama())
