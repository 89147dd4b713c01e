"""Distillation pieces: the KL to the teacher's next-token distributions, and self-generated data.

Self-generated data (Thangarasa et al., arXiv:2410.09982; Shrestha et al., arXiv:2602.01997 §1.3 of
the methods reference): the unpruned model answers prompts, and the pruned model is fine-tuned on
those answers with a loss on the response tokens only (their code: SFT with a completion-only loss;
vLLM sampling at temperature 0.9, top_p 0.95).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

GENERATIONS = ("sample", "greedy")
SAMPLE_TEMPERATURE = 0.9   # the limits paper's generate_responses.py
SAMPLE_TOP_P = 0.95


def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
           loss_mask: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """Σ over positions of KL(teacher ‖ student) at `temperature`, times T² (Hinton's gradient scale).

    logits: [b, L, V]; loss_mask: [b, L] bool (positions that count) or None. Returns (sum, positions).
    """
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1) * temperature ** 2   # [b, L]
    if loss_mask is None:
        return kl.sum(), kl.numel()
    return (kl * loss_mask).sum(), int(loss_mask.sum())


@torch.no_grad()
def generate_responses(teacher: nn.Module, prompts_ids: torch.Tensor, response_tokens: int, *, generation: str,
                       batch_size: int, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's continuations of `prompts_ids` [n, P] -> (sequences [n, P+R], response_mask [n, P+R]).

    `generation`: "sample" (temperature 0.9, top_p 0.95; the caller seeds torch's RNG) or "greedy".
    A response ends at the teacher's EOS (included in the mask); later positions are padding and
    are masked out. The RNG draws are the same for the same seed, so the data is reproducible.
    """
    from transformers import GenerationConfig

    if generation not in GENERATIONS:
        raise ValueError(f"generation must be one of {GENERATIONS}, got {generation!r}")
    config = teacher.config
    eos = getattr(teacher.generation_config, "eos_token_id", None) or getattr(config, "eos_token_id", None)
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos]))
    pad = getattr(config, "pad_token_id", None)
    pad = pad if pad is not None else (min(eos_ids) if eos_ids else 0)
    sampling = dict(do_sample=True, temperature=SAMPLE_TEMPERATURE, top_p=SAMPLE_TOP_P, top_k=0) \
        if generation == "sample" else dict(do_sample=False)
    gen_config = GenerationConfig(max_new_tokens=response_tokens, min_new_tokens=0, pad_token_id=pad,
                                  eos_token_id=sorted(eos_ids) or None, **sampling)
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    n, prompt_len = prompts_ids.shape
    total = prompt_len + response_tokens
    sequences = torch.full((n, total), pad, dtype=torch.long)
    response_mask = torch.zeros((n, total), dtype=torch.bool)
    try:
        for start in tqdm(range(0, n, batch_size), desc="teacher generates", unit="batch", disable=not progress):
            prompts = prompts_ids[start: start + batch_size].to(device)                  # [b, P]
            out = teacher.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                                   generation_config=gen_config).cpu()                  # [b, P + r], r <= R
            rows = slice(start, start + out.shape[0])
            sequences[rows, : out.shape[1]] = out
            response = torch.zeros_like(out, dtype=torch.bool)
            response[:, prompt_len:] = True
            if eos_ids:     # keep up to and including the first EOS of each response
                is_eos = torch.isin(out[:, prompt_len:], torch.tensor(sorted(eos_ids)))
                after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0                   # strictly after the first EOS
                response[:, prompt_len:] &= ~after_eos
            response_mask[rows, : out.shape[1]] = response
    finally:
        teacher.train(was_training)
    return sequences, response_mask
