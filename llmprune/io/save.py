"""Atomic output directories and the `llmprune.json` sidecar.

Every command that writes a model goes through `output_dir()`: the work happens in a hidden
temporary sibling of the target, which is renamed into place only when everything succeeded.
A failure (or Ctrl-C) removes the temporary directory; an existing target is refused up front
unless `overwrite=True`, and even then it is only replaced after the new one is complete.

Sparsity and provenance go into `llmprune.json` (`llmprune.io.sidecar`), never into
`config.json`'s `quantization_config`.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from llmprune.errors import UserError

RECIPE_NAME = "recipe.yaml"
# The sidecar's reader/writer lives in llmprune.io.sidecar; these names stay importable from here.
from llmprune.io.sidecar import SIDECAR_NAME, read_sidecar, write_json, write_sidecar  # noqa: E402,F401


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output before any work starts. Returns the resolved path."""
    target = Path(path).expanduser().resolve()
    if target.exists() and not overwrite:
        raise UserError(f"output directory {target} already exists; pass --overwrite to replace it")
    if target.exists() and not target.is_dir():
        raise UserError(f"output path {target} exists and is not a directory")
    ancestor = target.parent        # missing parents are created later, so check the first existing one
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK):
        raise UserError(f"cannot write to {ancestor}; choose another --output")
    return target


@contextlib.contextmanager
def output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `path` when the block exits without error."""
    target = check_output_dir(path, overwrite)
    created = [p for p in reversed(target.parents) if not p.exists()]   # outermost first
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:                 # leave no empty parents behind either
            shutil.rmtree(created[0], ignore_errors=True)
        raise
    # Re-check: the target may have appeared while we worked.
    if target.exists() and not overwrite:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"output directory {target} appeared while working; pass --overwrite to replace it")
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.rename(target, old)
    os.rename(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_model(model, tokenizer, directory: str | os.PathLike, max_shard_size: str | int = "5GB") -> list[str]:
    """What `save_pretrained` writes (config, generation config, tokenizer, safetensors shards with
    the same tensor names), through llmprune's own shard writer, with exact zeros: `-0.0` is
    written as `+0.0` (masked weights are multiplied by 0, which leaves `-0.0` where the weight was
    negative; some sparse loaders read the sign bit as "non-zero", vLLM #13198). The model is not
    modified. Returns the shard file names."""
    from llmprune.io.checkpoint import save_model_files, state_dict_to_save, write_state_dict

    files = write_state_dict(state_dict_to_save(model), directory, max_shard_size)
    save_model_files(model, tokenizer, directory)
    return files
