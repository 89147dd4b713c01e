"""Heal windows: text from the calibration source, none of it a calibration window, none seen twice.

The recipe stage and `llmprune heal` both call `heal_windows`; the returned `spec` is the `data`
record of the heal stage in llmprune.json.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmprune.errors import UserError


@dataclass
class HealWindows:
    train_ids: torch.Tensor     # [n_train, seqlen]
    eval_ids: torch.Tensor      # [n_eval, seqlen], held out from training too
    spec: dict                  # source, windows, eval_windows, seqlen, seed, tokens, disjoint_from_calibration


def heal_windows(tokenizer, source: str, *, seqlen: int, train_samples: int | None, eval_samples: int, seed: int,
                 calibration: dict | None = None, default_train_samples: int | None = None) -> HealWindows:
    """Draw eval + train windows from `source` (train split), disjoint from each other and from the
    calibration windows when `calibration` ({source, samples, seqlen, seed}, as recorded in the sidecar)
    describes the same source.

    train_samples: exactly this many training windows (UserError if the text cannot hold them), or None:
    up to `default_train_samples` (e.g. steps × batch size), fewer if the text is shorter (then epochs repeat).
    """
    from llmprune.calibration.data import describe_source, disjoint_windows, load_texts

    described = describe_source(source)
    exclude = None
    if calibration and calibration.get("source") == described:
        exclude = {"samples": int(calibration["samples"]), "seqlen": int(calibration["seqlen"]),
                   "seed": int(calibration.get("seed", 0))}
    wanted = train_samples or default_train_samples
    if wanted is None:
        raise ValueError("give train_samples or default_train_samples")
    windows = disjoint_windows(tokenizer, load_texts(source, "train"), eval_samples + wanted, seqlen, seed,
                               exclude_samples=(exclude or {}).get("samples", 0),
                               exclude_seqlen=(exclude or {}).get("seqlen"),
                               exclude_seed=(exclude or {}).get("seed", 0),
                               allow_fewer=train_samples is None)
    if windows.shape[0] <= eval_samples:
        raise UserError(f"{described} holds only {windows.shape[0]} windows of {seqlen} tokens outside the calibration "
                        f"windows, not enough for {eval_samples} held-out windows and training; give more text, a "
                        "smaller seqlen or fewer eval samples")
    eval_ids, train_ids = windows[:eval_samples], windows[eval_samples:]
    spec = {"source": described, "split": "train", "windows": int(train_ids.shape[0]),
            "eval_windows": int(eval_ids.shape[0]), "seqlen": seqlen, "seed": seed,
            "tokens": int(train_ids.numel()), "disjoint_from_calibration": exclude}
    return HealWindows(train_ids=train_ids, eval_ids=eval_ids, spec=spec)
