"""Atomic output directories and the `llmprune.json` sidecar.

Every command that writes a model goes through `output_dir()`: the work happens in a hidden
temporary sibling of the target, which is renamed into place only when everything succeeded.
A failure (or Ctrl-C) removes the temporary directory; an existing target is refused up front
unless `overwrite=True`, and even then it is only replaced after the new one is complete.

Sparsity and provenance go into `llmprune.json`, never into `config.json`'s
`quantization_config` (vLLM >= 0.24 rejects checkpoints carrying a vestigial sparsity_config).
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

from llmprune.errors import UserError

SIDECAR_NAME = "llmprune.json"
RECIPE_NAME = "recipe.yaml"


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


def versions() -> dict[str, str]:
    """Versions of the packages that decide the numbers, for provenance."""
    out = {"python": platform.python_version()}
    for name in ("llmprune", "torch", "transformers", "accelerate", "datasets", "safetensors",
                 "triton", "lm_eval", "huggingface_hub"):
        try:
            from importlib.metadata import version

            out[name] = version(name.replace("_", "-") if name == "lm_eval" else name)
        except Exception:  # not installed: leave it out rather than guess
            continue
    return out


def write_json(path: str | os.PathLike, data: Any) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_sidecar(directory: str | os.PathLike, sidecar: dict[str, Any]) -> Path:
    """Write `llmprune.json`. `sidecar` must have at least `kind` (compress|delta|pack)."""
    if "kind" not in sidecar:
        raise ValueError("sidecar needs a 'kind'")
    data = {"format_version": 1, **sidecar}
    data.setdefault("versions", versions())
    data.setdefault("command", command_line())
    path = Path(directory) / SIDECAR_NAME
    write_json(path, data)
    return path


def read_sidecar(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / SIDECAR_NAME
    if not path.is_file():
        raise UserError(f"{directory} is not an llmprune output (no {SIDECAR_NAME}); run `llmprune compress` or `llmprune delta` first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def command_line() -> str:
    """The command as the user typed it (best effort), for 'how to reproduce'."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(("llmprune", "__main__.py", "cli.py")):
        argv[0] = "llmprune"
    import shlex

    return " ".join(shlex.quote(a) for a in argv)


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
