"""The calibration windows of one run: drawn once, shared by every stage of a recipe."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmprune.calibration.data import calibration_windows, describe_source, load_texts
from llmprune.errors import UserError


@dataclass
class CalibrationSet:
    """Calibration token windows and the spec that describes them in the sidecar."""
    ids: torch.Tensor      # [n_samples, seqlen] token ids
    spec: dict


def calibration_set(config, tokenizer, recipe, calib=None) -> CalibrationSet:
    """Draw the recipe's calibration windows (or wrap a given id tensor). Needs only the config.

    calib: None (the recipe's source), a source spec ("c4", "wikitext2", "stdlib", a file path), a
    LongTensor [n_samples, seqlen] of token ids, or a CalibrationSet (returned as is).
    """
    if isinstance(calib, CalibrationSet):
        return calib
    c = recipe.calibration
    if isinstance(calib, torch.Tensor):
        if calib.dim() != 2 or calib.dtype not in (torch.long, torch.int32, torch.int64):
            raise UserError("calib tensor must be integer token ids of shape [n_samples, seqlen]")
        return CalibrationSet(calib.long(), {"source": "tensor", "samples": calib.shape[0],
                                             "seqlen": calib.shape[1], "tokens": calib.numel()})
    if tokenizer is None:
        raise UserError("calibration from text needs a tokenizer; pass tokenizer= or a token-id tensor as calib=")
    source = calib or c.data
    seqlen, note = c.window(config)
    ids = calibration_windows(tokenizer, load_texts(source, "train"), c.samples, seqlen, c.seed)
    spec = {"source": describe_source(source), "split": "train", "samples": c.samples, "seqlen": seqlen,
            "seed": c.seed, "tokens": ids.numel()}
    if note:
        spec["note"] = note
    return CalibrationSet(ids, spec)
