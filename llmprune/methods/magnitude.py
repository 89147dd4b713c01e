"""Magnitude pruning: drop the smallest |W| of each matrix (no calibration data)."""
from __future__ import annotations

import torch

from llmprune.masks import Pattern, keep_mask_for
from llmprune.methods import LinearStats, register


@register("magnitude", needs=set(), summary="smallest |W| per matrix (N:M: per group of M inputs); no data needed")
def magnitude(weight: torch.Tensor, stats: LinearStats, pattern: Pattern) -> torch.Tensor:
    """|W| compared over the whole matrix (the reference baseline), or per N:M group."""
    keep_mask = keep_mask_for(weight.abs(), pattern, comparison="matrix")
    return weight * keep_mask
