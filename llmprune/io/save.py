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
import fcntl
import os
import re
import secrets
import shutil
import sys
from pathlib import Path
from typing import Iterable, Iterator

from llmprune.errors import UserError
from llmprune.io.files import dir_bytes, format_bytes

RECIPE_NAME = "recipe.yaml"


def check_output_dir(path: str | os.PathLike, overwrite: bool,
                     inputs: Iterable[str | os.PathLike | None] = (),
                     inside_ok: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Refuse a bad output before any work starts. Returns the resolved path.

    The output must not be, contain, or lie inside any of `inputs` (local paths; names that are not
    paths, like Hub ids or `c4`, are skipped): with --overwrite it would be deleted. `inside_ok` are
    inputs the output may lie inside (eval writes `MODEL/eval` by design) but still not be or contain.
    Leftovers of an earlier killed run to the same output are cleaned up here (one note line).
    """
    target = Path(path).expanduser().resolve()          # symlinks resolved: an alias is the same folder
    _refuse_overlap(path, target, inputs, inside_ok)
    if target.exists() and not target.is_dir():
        raise UserError(f"--output {path} is an existing file, not a directory; choose a directory path")
    _clean_leftovers(target)
    if target.exists() and not overwrite:
        raise UserError(f"output directory {target} already exists; pass --overwrite to replace it")
    ancestor = target.parent        # missing parents are created later, so check the first existing one
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK):
        raise UserError(f"cannot write to {ancestor}; choose another --output")
    return target


def _refuse_overlap(given, target: Path, inputs, inside_ok) -> None:
    checks = [(name, True) for name in inputs] + [(name, False) for name in inside_ok]
    for name, refuse_inside in checks:
        if name is None or str(name) == "":
            continue
        source = Path(name).expanduser()
        if not source.exists():                          # a Hub id, a dataset name: nothing local to protect
            continue
        source = source.resolve()
        if source == target:
            raise UserError(f"--output {given} is the input {name}; choose another directory "
                            "(the input would be replaced)")
        if target in source.parents:
            raise UserError(f"--output {given} contains the input {name}; choose another directory "
                            "(replacing it would delete the input)")
        if refuse_inside and source in target.parents:
            raise UserError(f"--output {given} lies inside the input {name}; choose a directory outside it")


# Temporary and replaced outputs sit beside the target as `.NAME.tmp-PID-RAND` / `.NAME.old-PID`. A live
# run holds an flock on its temp folder, so a temp folder nobody holds is a leftover of a killed run (the
# kernel drops the locks of a dead process, whatever its pid, host or container). `.old-PID` exists only
# for the instant between two renames and is never locked: there the pid decides.
def _leftovers(target: Path) -> list[tuple[Path, str, int]]:
    """(path, "tmp" | "old", pid) of the leftover folders beside `target`."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(tmp|old)-(\d+)(-[0-9a-f]+)?$")
    try:
        entries = sorted(target.parent.iterdir())
    except OSError:                                      # parent missing or unreadable
        return []
    found = []
    for path in entries:
        match = pattern.match(path.name)
        if match and path.is_dir() and not path.is_symlink():
            found.append((path, match.group(1), int(match.group(2))))
    return found


def _in_use(path: Path, kind: str, pid: int) -> bool:
    if str(path) in _LOCKS:
        return True
    if kind == "old":
        return _pid_alive(pid)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return True                                      # cannot tell: leave it alone
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:                                      # no flock here (some network filesystems): the pid
        return _pid_alive(pid)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False                                     # ours are in _LOCKS; the same pid here is a reused one
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_leftovers(target: Path) -> None:
    removed, restored = [], None
    for path, kind, pid in _leftovers(target):
        if _in_use(path, kind, pid):
            continue
        if kind == "old" and not target.exists() and restored is None:
            # Killed between moving the old output aside and moving the new one in: put the old one back.
            os.rename(path, target)
            restored = path.name
            continue
        size = dir_bytes(path)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(f"{path.name} ({format_bytes(size)})")
    if restored:
        print(f"llmprune: note: restored {target} from {restored}, left by an earlier run that was killed "
              "while replacing it", file=sys.stderr)
    if removed:
        print(f"llmprune: note: removed leftovers of an earlier killed run beside {target}: {', '.join(removed)}",
              file=sys.stderr)


_LOCKS: dict[str, int] = {}     # temp folders this process is writing -> the fd holding their flock


@contextlib.contextmanager
def output_dir(path: str | os.PathLike, overwrite: bool = False,
               inputs: Iterable[str | os.PathLike | None] = (),
               inside_ok: Iterable[str | os.PathLike | None] = (),
               expected_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary directory that becomes `path` when the block exits without error.

    `expected_bytes` (roughly what will be written) makes a disk-full message say how much is needed.
    """
    target = check_output_dir(path, overwrite, inputs, inside_ok)
    created = [p for p in reversed(target.parents) if not p.exists()]   # outermost first
    target.parent.mkdir(parents=True, exist_ok=True)
    # os.mkdir (not mkdtemp, which makes 0700) so the output's mode follows the umask like `mkdir`.
    while True:
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.mkdir(tmp)
            break
        except FileExistsError:
            continue
    lock = os.open(tmp, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pass                                             # no flock on this filesystem: the pid check remains
    _LOCKS[str(tmp)] = lock
    try:
        try:
            yield tmp
        except BaseException as exc:
            written = dir_bytes(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            if created:                 # leave no empty parents behind either
                shutil.rmtree(created[0], ignore_errors=True)
            from llmprune.io.errors import disk_full_error, is_disk_full

            if is_disk_full(exc):
                raise disk_full_error(target, written, expected_bytes) from None
            raise
        _follow_umask(tmp)
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
    finally:
        _LOCKS.pop(str(tmp), None)
        os.close(lock)


def _follow_umask(root: Path) -> None:
    """Modes as a plain `mkdir`/write under the umask would give: some writers use private temp files
    (safetensors shards come out 0600), which would make a shared output unreadable to others."""
    from llmprune.io.files import current_umask

    mask = current_umask()
    os.chmod(root, 0o777 & ~mask)
    for base, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(base, name), 0o777 & ~mask)
        for name in files:
            path = os.path.join(base, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


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
