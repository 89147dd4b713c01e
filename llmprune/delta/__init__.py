"""Delta-parameter pruning and merging of fine-tunes: DARE, DAREx-q, magnitude, TIES.

    prune_delta(base, [finetuned, ...], output, method="dare", drop_rate=0.9, ...)  -> summary dict
    apply_delta_dir(base, delta_dir, output)                                         -> summary dict

Both stream tensor by tensor from safetensors shards (peak memory: a few tensors), write
through `llmprune.io.save.output_dir` (atomic) and leave a `llmprune.json` of kind "delta".
Modules: `streaming` (delta file helpers over `llmprune.io.checkpoint`), `sparsify` (per-tensor
rules), `merge` (linear / TIES), `darex` (q search), `pipeline` (the run), `apply` (sparse delta
artifact and rebuild).
"""
from __future__ import annotations

from pathlib import Path


def prune_delta(base: str, finetuned: list[str] | str, output: str | Path, *, method: str = "dare",
                drop_rate: float = 0.9, rescale: str | None = None, weights: list[float] | None = None,
                lam: float = 1.0, seed: int = 0, exclude: list[str] | tuple = (), default_exclude: bool = True,
                calib: dict | None = None, save_delta: bool = False, max_shard_size: str | int = "5GB",
                overwrite: bool = False, trust_remote_code: bool = False, progress: bool = True) -> dict:
    """Sparsify (and merge) the delta(s) of `finetuned` over `base` and save `base + Δ̂` to `output`.

    `rescale`: inverse | l1 | none | q=VALUE | auto (None: the method's default). `calib` for auto:
    {"source": "c4"|"wikitext2"|"stdlib"|PATH, "samples": 16, "seqlen": 256, "seed": 0}.
    """
    import yaml

    from llmprune.delta.pipeline import DeltaSpec, run_delta
    from llmprune.delta.sparsify import parse_rescale
    from llmprune.io.checkpoint import parse_size
    from llmprune.io.save import RECIPE_NAME, output_dir
    from llmprune.io.sidecar import write_sidecar

    finetuned = [finetuned] if isinstance(finetuned, str) else list(finetuned)
    spec = DeltaSpec(method=method, drop_rate=drop_rate, rescale=None if rescale is None else parse_rescale(rescale),
                     weights=None if weights is None else list(weights), lam=lam, seed=seed,
                     exclude=list(exclude), default_exclude=default_exclude)
    max_bytes = parse_size(max_shard_size)
    with output_dir(output, overwrite=overwrite, inputs=[base, *finetuned]) as tmp:
        result = run_delta(base, finetuned, spec, tmp, max_shard_bytes=max_bytes, save_delta=save_delta,
                           calib=calib, trust_remote_code=trust_remote_code, progress=progress)
        (tmp / RECIPE_NAME).write_text(yaml.safe_dump(result["recipe"], sort_keys=False))
        write_sidecar(tmp, result["sidecar"])
    return result["summary"]


def apply_delta_dir(base: str, delta_dir: str | Path, output: str | Path, *, overwrite: bool = False,
                    progress: bool = True) -> dict:
    """Rebuild the model written by `prune_delta(..., save_delta=True)` from `base` and its sparse delta."""
    from llmprune.delta.apply import apply_delta
    from llmprune.io.save import output_dir
    from llmprune.io.sidecar import write_sidecar

    with output_dir(output, overwrite=overwrite, inputs=[base, delta_dir]) as tmp:
        result = apply_delta(base, delta_dir, tmp, progress=progress)
        sidecar = dict(result["sidecar"])
        sidecar.setdefault("kind", "delta")
        write_sidecar(tmp, sidecar)
    return {"files": result["files"], "tensors": result["tensors"], "wall_time_s": sidecar["wall_time_s"]}
