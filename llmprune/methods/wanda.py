"""Wanda (Sun et al., 2023): score |W_ij| * ||X_j||_2, compared within each output row. No update."""
from __future__ import annotations

import torch

from llmprune.masks import Pattern, keep_mask_for
from llmprune.methods import LinearStats, register


@register("wanda", needs={"input_sq_norm"}, summary="|W|·‖X‖₂ per output row (N:M per group); no weight update")
def wanda(weight: torch.Tensor, stats: LinearStats, pattern: Pattern) -> torch.Tensor:
    """Prune by |W_ij|·‖X_j‖₂ within each output row (N:M: within each group of M inputs)."""
    input_norm = stats.input_sq_norm.to(weight.device).sqrt()   # [in]
    score = weight.abs() * input_norm.unsqueeze(0)               # [out, in]
    keep_mask = keep_mask_for(score, pattern, comparison="row")
    return weight * keep_mask
