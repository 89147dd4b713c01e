"""Failures of files and the environment, turned into one line that names the file and the fix.

Two kinds of help, both in this one place:
- checks that run before a model is loaded (`check_safetensors`, `check_weight_shapes`), so a damaged
  or mismatched checkpoint is named precisely instead of failing deep inside transformers;
- `explain(exc)`, which maps what still escapes (disk full, a pickle the safe loader refuses, a missing
  optional package, a corrupt file found late) to a `UserError`. The CLI calls it for every exception
  that is not already a `UserError`; loaders call it with the folder they were reading.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Iterable

from llmprune.errors import UserError
from llmprune.io.checkpoint import CORRUPT_FIX

# import name -> what to pip install (only where the two differ or an extra is the right answer)
_PIP_NAMES = {"triton": "'llmprune[kernels]' (or pip install triton)", "lm_eval": "lm-eval",
              "yaml": "pyyaml", "sklearn": "scikit-learn"}


def check_safetensors(files: Iterable[str | os.PathLike]) -> None:
    """Read each file's header (cheap: no tensor data) and refuse a truncated or corrupt one by name
    (the IO layer's header check: it also sees data offsets that run past the end of the file)."""
    from llmprune.io.checkpoint import read_header

    for path in files:
        read_header(path)


def local_weight_files(directory: str | os.PathLike) -> list[Path]:
    return sorted(Path(directory).glob("*.safetensors"))


def check_weight_shapes(directory: str | os.PathLike, model) -> None:
    """Every stored tensor whose name the model has must have the model's shape (from config.json).

    `model` may live on the meta device. Names the model does not have are left to transformers (it
    renames some legacy keys); only an exact name with a different shape is refused here.
    """
    from safetensors import safe_open

    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    for path in local_weight_files(directory):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                want = expected.get(name)
                if want is None:
                    continue
                got = tuple(handle.get_slice(name).get_shape())
                if got != want:
                    raise UserError(f"{path}: tensor {name} has shape {list(got)} but {Path(directory) / 'config.json'} "
                                    f"implies {list(want)}; the weights and config.json are from different models")


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)      # safetensors (Rust) and some libraries wrap the OS error in their own type
    return "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text


def disk_full_error(where: str | os.PathLike, written: int | None = None, expected: int | None = None) -> UserError:
    """'disk full' with how much space there is, how much was needed (when known) and where."""
    from llmprune.io.files import format_bytes

    where = Path(where)
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = format_bytes(shutil.disk_usage(probe).free)
    except OSError:
        free = "unknown"
    if expected:
        need = f"the output needs about {format_bytes(expected)}"
    elif written:
        need = f"the output needs more than the {format_bytes(written)} written before the disk filled"
    else:
        need = "the output needs more space"
    return UserError(f"disk full while writing {where} ({free} free on that disk; {need}); "
                     "free space there or write the output elsewhere")


def explain(exc: BaseException, where: str | os.PathLike | None = None) -> UserError | None:
    """A one-line UserError for a known failure of files or environment, else None."""
    text = f"{type(exc).__name__}: {exc}"
    if is_disk_full(exc):
        return disk_full_error(getattr(exc, "filename", None) or where or os.getcwd())
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        top = exc.name.split(".")[0]
        if top == "llmprune":
            # one of our own modules is missing: a broken install, not a package the user should add
            return UserError(f"this llmprune install is incomplete ({exc.name} is missing); reinstall it with "
                             "pip install --force-reinstall llmprune (or pip install -e . in a checkout)")
        return UserError(f"the Python package {top!r} is needed here but not installed; "
                         f"pip install {_PIP_NAMES.get(top, top)}")
    if "Weights only load failed" in text or "UnpicklingError" in type(exc).__name__:
        pickles = [str(p) for p in sorted(Path(where).glob("*.bin"))] if where and Path(where).is_dir() else []
        named = ", ".join(pickles) or (str(where) if where else "a pickle (.bin) weight file")
        return UserError(f"{named}: torch's safe loader refuses this pickle (it holds more than tensors, which "
                         "could run code); get a safetensors copy of the model, or convert it where you trust it")
    if "SafetensorError" in type(exc).__name__ or "deserializing header" in text:
        if where and Path(where).is_dir():
            check_safetensors(local_weight_files(where))       # names the damaged file when it can
        return UserError(f"a safetensors file{f' in {where}' if where else ''} is truncated or corrupt "
                         f"({_first_line(exc)}); {CORRUPT_FIX}")
    if "ignore_mismatched_sizes" in text or "size mismatch" in text:
        return UserError(f"the weights{f' in {where}' if where else ''} do not match the shapes config.json "
                         "describes; the weights and config.json are from different models")
    return None


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__

