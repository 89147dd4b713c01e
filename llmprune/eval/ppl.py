"""Token-level perplexity with the SparseGPT / Wanda protocol (not lm-eval's document-level `wikitext`).

The whole text is joined into one string (wikitext2 and most sources with "\\n\\n", c4 with " " over the
first 1100 validation documents), tokenized once (so only the very first window starts with BOS), cut
into non-overlapping `seqlen` windows with the tail dropped (c4: at most 256 windows), and

    ppl = exp( sum over windows of sum_{t=1..seqlen-1} -log p(x_t | x_<t)  /  (windows * (seqlen-1)) )

The papers compute `mean_loss * seqlen / (windows * seqlen)`, which is the same mean per predicted token.
Per-window NLL sums are kept so the report can bootstrap a paired CI over windows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from llmprune.errors import UserError

# name -> (joiner, max documents, max windows); anything else uses the wikitext2 protocol.
PROTOCOLS = {
    "wikitext2": ("\n\n", None, None),
    "c4": (" ", 1100, 256),
}


@dataclass
class PerplexityResult:
    ppl: float
    nll_sum: float          # total negative log-likelihood (nats) over predicted tokens
    tokens: int             # predicted tokens = windows * (seqlen - 1)
    windows: int
    seqlen: int
    window_nll: list[float] = field(default_factory=list)   # per-window NLL sums, same order as the text


def protocol_for(name: str) -> tuple[str, int | None, int | None]:
    return PROTOCOLS.get(name, ("\n\n", None, None))


def token_windows(tokenizer, texts: Sequence[str], seqlen: int, joiner: str = "\n\n",
                  max_docs: int | None = None, max_windows: int | None = None):
    """`[windows, seqlen]` LongTensor of non-overlapping windows of the joined text (tail dropped)."""
    if seqlen < 2:
        raise UserError(f"--seqlen must be at least 2 (got {seqlen})")
    docs = list(texts[:max_docs] if max_docs else texts)
    ids = tokenizer(joiner.join(docs), return_tensors="pt").input_ids[0]
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise UserError(f"perplexity text has only {ids.numel()} tokens, fewer than one --seqlen window "
                        f"({seqlen}); give more text or a smaller --seqlen")
    return ids[: n * seqlen].view(n, seqlen)


def auto_batch_size(seqlen: int, vocab_size: int, logits_budget: int = 1 << 28, max_tokens: int = 16384) -> int:
    """Windows per forward for `--batch-size auto`: as many as keep the float32 logits under
    `logits_budget` bytes and the tokens under `max_tokens` (1 for a 2048-token window of a 128k
    vocabulary, whose logits alone are 1 GiB; dozens for a small model's short windows)."""
    by_logits = logits_budget // max(1, seqlen * vocab_size * 4)
    return max(1, min(by_logits, max_tokens // max(1, seqlen)))


def perplexity_of_windows(model, windows, batch_size: int = 1, progress: bool = False,
                          desc: str = "perplexity") -> PerplexityResult:
    """Perplexity of the model on pre-cut token windows `[n, seqlen]` (logits upcast to float32)."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    n, seqlen = windows.shape
    window_nll: list[float] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, unit="batch"):
                x = windows[start: start + batch_size].to(device)                       # [b, seqlen]
                logits = model(input_ids=x, use_cache=False).logits[:, :-1, :].float()   # [b, seqlen-1, V]
                nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1),
                                      reduction="none").view(x.size(0), -1)              # [b, seqlen-1]
                window_nll.extend(nll.double().sum(dim=1).tolist())
    finally:
        model.train(was_training)
    nll_sum = float(sum(window_nll))
    tokens = n * (seqlen - 1)
    ppl = math.exp(nll_sum / tokens)
    if not math.isfinite(ppl):
        ppl = float("inf")
    return PerplexityResult(ppl=ppl, nll_sum=nll_sum, tokens=tokens, windows=n, seqlen=seqlen,
                            window_nll=window_nll)


def perplexity(model, tokenizer, texts: Sequence[str], seqlen: int = 2048, name: str = "wikitext2",
               batch_size: int = 1, progress: bool = False) -> PerplexityResult:
    """Paper-protocol perplexity of `texts` (the protocol is chosen by `name`, see PROTOCOLS)."""
    joiner, max_docs, max_windows = protocol_for(name)
    windows = token_windows(tokenizer, texts, seqlen, joiner, max_docs, max_windows)
    return perplexity_of_windows(model, windows, batch_size=batch_size, progress=progress,
                                 desc=f"ppl {name}")
