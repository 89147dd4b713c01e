"""Small file helpers every command shares: JSON in, sizes out, peak memory, atomic small writes.

One of each, so messages and units are the same everywhere:
    read_json(path, what)       -> dict    (one-line UserError for a missing, invalid or non-object file)
    format_bytes(n)             -> "1.5 GiB"
    peak_rss_bytes()            -> int     (this process's peak resident memory)
    dir_bytes(path)             -> int     (bytes of the files below a folder)
    write_text_atomic(path, s)           (temp file + rename; mode follows the umask)
"""
from __future__ import annotations

import json
import os
import resource
import tempfile
from pathlib import Path
from typing import Any

from llmprune.errors import UserError


def read_json(path: str | os.PathLike, what: str, hint: str = "") -> dict[str, Any]:
    """The JSON object in `path`. `what` names the file for the user ("llmprune.json", "results file");
    `hint` is appended to the message when the file is broken (what to do about it)."""
    path = Path(path)
    suffix = f"; {hint}" if hint else ""
    label = str(path) if path.name == what else f"{what} {path}"
    if not path.is_file():
        raise UserError(f"{label} does not exist{suffix}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{label} is not a text file{suffix}") from None
    except OSError as exc:
        raise UserError(f"cannot read {label} ({exc.strerror or type(exc).__name__}){suffix}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{label} is not valid JSON ({exc.msg} at line {exc.lineno}){suffix}") from None
    if not isinstance(data, dict):
        raise UserError(f"{label} holds a JSON {type(data).__name__}, not an object{suffix}")
    return data


def format_bytes(n: float) -> str:
    """Binary units, one decimal: 512 B, 1.5 KiB, 3.2 GiB."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def dir_bytes(path: str | os.PathLike) -> int:
    """Total size of the regular files below `path` (0 when it does not exist)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


def current_umask() -> int:
    # os.umask can only be read by setting it; set it straight back (we are single-threaded here).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `path` through a temp file in the same folder and a rename: a crash never leaves half a
    file, a symlink at `path` is replaced (not written through), and the mode follows the umask."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o666 & ~current_umask())   # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
