"""The one safetensors reader/writer: every command that reads or writes weights goes through here.

    parse_size("5GB" | "5G" | "500MiB" | "2e9" | 1000)    -> bytes (the only size parser)
    reader = CheckpointReader(dir)                         # headers only: names, shapes, dtypes
    tensor = reader.get(name)                              # one tensor, read on demand
    writer = ShardWriter(dir, "5GB"); writer.add(name, t); writer.close()
    state = state_dict_to_save(model)                      # what `save_pretrained` would write
    save_model_files(model, tokenizer, dir)                # config, generation config, tokenizer

Reading validates every shard header against the file (dtype, shape and offsets consistent, data
inside the file) so a truncated download is one line naming the file, never a traceback.

Writing follows Hugging Face's layout: `model.safetensors`, or `model-0000i-of-0000N.safetensors`
plus `model.safetensors.index.json` (`metadata.total_size`, `weight_map`), header metadata
`{"format": "pt"}`. The shard plan is greedy in the order tensors arrive (a new shard starts when
the next tensor would push the current one past `max_shard_size`), so the same sequence of tensors
always gives the same files. Tensors are written as they arrive (peak memory: one tensor):
  - with `plan` (every name/shape/dtype known up front, e.g. a model in memory) each shard header
    is written first and the data streamed after it;
  - without a plan (shapes decided as the work goes, e.g. layer by layer) the data go to a hidden
    temporary file and the header is prepended when the shard is complete. `state()` journals the
    writer after a finished unit of work and `ShardWriter.resume(dir, state)` continues from there,
    producing the same bytes as an uninterrupted run.
Floating-point `-0.0` is written as `+0.0` (sparse loaders may read the sign bit as a non-zero,
vLLM #13198) by writing x + 0.0, which leaves every other value unchanged.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from llmprune.errors import UserError

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"
CORRUPT_FIX = "copy or download it again, or re-save it"
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit

# safetensors dtype codes <-> torch dtype names (names, so this module imports without torch).
DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}

# Packed 2:4 checkpoints (llmprune pack / --save-format sparse24) carry this model_type, which
# transformers does not know, so `AutoModelForCausalLM.from_pretrained` fails loudly instead of
# running random linears; the real model_type (and auto_map) is kept under the same key.
PACKED_MODEL_TYPE = "llmprune_sparse24"
PACKED_CONFIG_KEY = "llmprune_sparse24"

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_SIZE_RE = re.compile(r"\s*((?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)\s*([kmgt]i?)?\s*(b|bytes?)?\s*", re.IGNORECASE)


def parse_size(size: str | int, what: str = "size") -> int:
    """'5GB' = '5G' = 5e9, '500MiB' = 500·2²⁰, '2e9', '1000' or 1000 -> bytes (decimal units, as
    `save_pretrained`'s max_shard_size; KiB/MiB/GiB are binary). Junk or <= 0 is a UserError."""
    hint = "write it like 5GB, 500MB, 2GiB or a number of bytes"
    if isinstance(size, bool):
        raise UserError(f"{what} {size!r} is not a size; {hint}")
    if isinstance(size, int):
        number = size
    else:
        m = _SIZE_RE.fullmatch(str(size))
        if not m:
            raise UserError(f"cannot read {what} {size!r}; {hint}")
        number = int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
    if number <= 0:
        raise UserError(f"{what} {size!r} must be at least one byte; {hint}")
    return number


def dtype_code(dtype) -> str:
    """torch dtype -> safetensors code."""
    name = str(dtype).replace("torch.", "")
    for code, torch_name in DTYPE_NAMES.items():
        if torch_name == name:
            return code
    raise UserError(f"dtype {name} cannot be stored in safetensors by llmprune")


def torch_dtype(code: str):
    import torch

    return getattr(torch, DTYPE_NAMES[code])


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _corrupt(path: Path, detail: str) -> UserError:
    return UserError(f"{path} is truncated or corrupt ({detail}); {CORRUPT_FIX}")


def read_header(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, dict]]:
    """(metadata, {name: {dtype, shape, data_offsets}}) of one safetensors file, checked against the
    file's size: a header that does not parse, or data that would lie past the end, is a UserError."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise _corrupt(path, f"{size} bytes, shorter than a safetensors header")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise _corrupt(path, f"header of {n} bytes does not fit in the {size}-byte file")
            raw = fh.read(n)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise _corrupt(path, "the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - n
    spans = []
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], [int(s) for s in entry["shape"]], entry["data_offsets"]
            valid = isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end and min(shape, default=0) >= 0
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            raise _corrupt(path, f"bad header entry for {name}")
        if dtype not in DTYPE_BYTES:
            raise UserError(f"{path}: tensor {name} has dtype {dtype}, which llmprune cannot read")
        if end - begin != _numel(shape) * DTYPE_BYTES[dtype]:
            raise _corrupt(path, f"{name}: {end - begin} bytes for a {dtype}{shape} tensor")
        spans.append((begin, end, name))
    spans.sort()
    position = 0
    for begin, end, name in spans:
        if begin != position:
            raise _corrupt(path, f"the data of {name} does not start where the previous tensor ends")
        position = end
    if position > data_size:
        raise _corrupt(path, f"the header needs {8 + n + position} bytes, the file has {size}")
    if position < data_size:
        raise _corrupt(path, f"{data_size - position} bytes after the last tensor")
    return metadata, header


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors code, e.g. "BF16"
    shard: Path

    @property
    def numel(self) -> int:
        return _numel(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]


class CheckpointReader:
    """Names, shapes and dtypes of a safetensors checkpoint (one file, or shards + index), and one
    tensor at a time. Every shard header is validated when the reader is built."""

    def __init__(self, directory: str | os.PathLike, stem: str = "model"):
        self.directory = Path(directory)
        index = self.directory / f"{stem}.safetensors.index.json"
        single = self.directory / f"{stem}.safetensors"
        listed: dict[str, str] | None = None
        if single.is_file():            # transformers prefers the single file too
            shards = [single.name]
        elif index.is_file():
            try:
                listed = json.loads(index.read_text())["weight_map"]
                if not isinstance(listed, dict) or not all(isinstance(v, str) for v in listed.values()):
                    raise ValueError("weight_map is not a {tensor: file} object")
            except (ValueError, KeyError, TypeError) as exc:
                raise UserError(f"{index} is not a valid safetensors index ({exc}); {CORRUPT_FIX}") from None
            shards = sorted(set(listed.values()))   # file order = the order the tensors were written
        else:
            if any(self.directory.glob("*.bin")) or any(self.directory.glob("*.pt")):
                raise UserError(f"{self.directory} has only PyTorch pickle weights; llmprune reads safetensors only "
                                "(convert it once with `save_pretrained(..., safe_serialization=True)`)")
            raise UserError(f"{self.directory} has no {single.name} or {index.name}")
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, dict] = {}   # shard file name -> its __metadata__
        for shard in shards:
            path = self.directory / shard
            if not path.is_file():
                raise UserError(f"shard {shard} listed in {index.name} is missing from {self.directory}; {CORRUPT_FIX}")
            meta, entries = read_header(path)
            self.metadata[shard] = meta
            for name, entry in entries.items():
                self.tensors[name] = TensorInfo(name, tuple(int(s) for s in entry["shape"]), entry["dtype"], path)
        if listed is not None:
            missing = [n for n, f in listed.items() if n not in self.tensors or self.tensors[n].shard.name != f]
            if missing:
                raise UserError(f"{index} lists {missing[0]} in a shard that does not hold it; {CORRUPT_FIX}")

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    @property
    def shards(self) -> list[Path]:
        return [self.directory / s for s in self.metadata]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def get(self, name: str, device: str = "cpu"):
        """Load one tensor (memory-mapped read; the shard is closed again, so nothing stays mapped)."""
        from safetensors import safe_open

        info = self.tensors[name]
        try:
            with safe_open(str(info.shard), framework="pt", device=device) as fh:
                return fh.get_tensor(name)
        except Exception as exc:  # SafetensorError and OSError: the file changed or is damaged
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise _corrupt(info.shard, f"reading {name}: {detail}") from None

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.shards)


# --------------------------------------------------------------------------------------------- writing

def shard_names(stem: str, count: int) -> list[str]:
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def plan_shards(sizes: Iterable[int], max_bytes: int) -> list[int]:
    """Shard number of each tensor, greedily in order: a tensor opens a new shard when it would push
    a non-empty shard past `max_bytes` (a tensor larger than the limit gets a shard of its own)."""
    out, shard, used, count = [], 0, 0, 0
    for nbytes in sizes:
        if count and used + nbytes > max_bytes:
            shard, used, count = shard + 1, 0, 0
        out.append(shard)
        used += nbytes
        count += 1
    return out


def _header_bytes(metadata: dict[str, str], entries: dict[str, dict]) -> bytes:
    data = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
    data += b" " * (-len(data) % 8)  # safetensors pads the header to 8-byte alignment
    return struct.pack("<Q", len(data)) + data


def _byte_chunks(tensor, positive_zero: bool, scratch: dict | None = None, chunk_bytes: int = 64 << 20):
    """The tensor's raw little-endian bytes in chunks, with -0.0 -> +0.0. `scratch` ({dtype: buffer},
    kept by the caller) is reused for the normalised copy: a fresh allocation per chunk costs more
    (page faults) than the arithmetic."""
    import torch

    t = tensor.detach()
    if t.is_meta:
        raise ValueError("cannot write a tensor on the meta device")
    flat = t.contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    step = max(1, chunk_bytes // flat.element_size())
    scratch = {} if scratch is None else scratch
    for start in range(0, flat.numel(), step):
        chunk = flat[start:start + step].cpu()
        if positive_zero and chunk.is_floating_point():
            buffer = scratch.get(chunk.dtype)
            if buffer is None or buffer.numel() < chunk.numel():
                buffer = scratch[chunk.dtype] = torch.empty(min(step, flat.numel()), dtype=chunk.dtype)
            out = buffer[:chunk.numel()]
            if chunk.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
                torch.add(chunk, 0.0, out=out)   # x + 0.0: -0.0 -> +0.0, every other value unchanged
            else:                                # float8: no CPU arithmetic; clear the -0.0 bit pattern
                ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[chunk.element_size()]
                bits = chunk.view(ints)
                out.view(ints).copy_(bits.masked_fill(bits == torch.iinfo(ints).min, 0))
            chunk = out
        yield memoryview(chunk.view(torch.uint8).numpy())


def _disk_full(path: Path, needed: int | None) -> UserError:
    usage = shutil.disk_usage(path.parent)
    need = f"about {needed / 1e9:.2f} GB more are needed; " if needed else ""
    return UserError(f"disk full while writing {path} ({usage.free / 1e9:.2f} GB free on that filesystem); "
                     f"{need}free space there or write --output to another disk")


class ShardWriter:
    """Streams tensors into Hugging Face-named safetensors shards of at most `max_shard_size` bytes.

    plan: optional [(name, shape, dtype code)] in the order `add` will be called; with it, headers
    are written up front and no temporary copy is made. Without it, each shard's data go to a hidden
    temporary file first (the header is prepended when the shard is complete), and the writer can be
    journalled with `state()` and continued with `ShardWriter.resume`. Both give identical files.
    """

    def __init__(self, directory: str | os.PathLike, max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE, *,
                 stem: str = "model", plan: list[tuple[str, tuple[int, ...], str]] | None = None,
                 metadata: dict[str, str] | None = None, positive_zero: bool = True):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)   # as save_pretrained does
        self.max_bytes = parse_size(max_shard_size, "max shard size")
        self.stem = stem
        self.metadata = {"format": "pt", **(metadata or {})}
        self.positive_zero = positive_zero
        self.total_size = 0
        self.finished: list[list[str]] = []   # tensor names of each finished shard
        self._entries: dict[str, dict] = {}   # the open shard: name -> header entry
        self._seen: set[str] = set()
        self._offset = 0
        self._fh = None
        self._closed = False
        self._scratch: dict = {}                # reused buffers for the -0.0 normalisation
        self._plan = None
        if plan is not None:
            names = [p[0] for p in plan]
            if len(set(names)) != len(names):
                raise ValueError("duplicate tensor names in the shard plan")
            sizes = [_numel(shape) * DTYPE_BYTES[code] for _, shape, code in plan]
            shard_of = plan_shards(sizes, self.max_bytes)
            count = shard_of[-1] + 1 if shard_of else 1
            self._plan = [(name, tuple(shape), code, shard) for (name, shape, code), shard in zip(plan, shard_of)]
            self._plan_files = shard_names(stem, count)
            self._plan_total = sum(sizes)
            self._position = 0

    # -- temporary names (append mode): deterministic, so a resumed writer finds them
    def _data_tmp(self, k: int) -> Path:
        return self.directory / f".{self.stem}-{k + 1:05d}.data.tmp"

    def _shard_tmp(self, k: int) -> Path:
        return self.directory / f".{self.stem}-{k + 1:05d}.safetensors.tmp"

    def add(self, name: str, tensor) -> None:
        """Append one tensor (written now; the caller may drop it afterwards)."""
        if self._closed:
            raise RuntimeError("ShardWriter.add after close")
        code = dtype_code(tensor.dtype)
        shape = tuple(tensor.shape)
        nbytes = _numel(shape) * DTYPE_BYTES[code]
        if self._plan is not None:
            self._add_planned(name, tensor, shape, code, nbytes)
            return
        if name in self._seen:
            raise ValueError(f"tensor {name} was already written")
        self._seen.add(name)
        if self._entries and self._offset + nbytes > self.max_bytes:
            self._finish_shard()
        if self._fh is None:
            self._fh = open(self._data_tmp(len(self.finished)), "wb")
        self._write(tensor, self._data_tmp(len(self.finished)), nbytes)
        self._entries[name] = {"dtype": code, "shape": list(shape),
                               "data_offsets": [self._offset, self._offset + nbytes]}
        self._offset += nbytes
        self.total_size += nbytes

    def _write(self, tensor, path: Path, nbytes: int) -> None:
        try:
            for chunk in _byte_chunks(tensor, self.positive_zero, self._scratch):
                self._fh.write(chunk)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                left = (self._plan_total - self.total_size) if self._plan is not None else nbytes
                raise _disk_full(path, left) from None
            raise

    def _add_planned(self, name: str, tensor, shape, code: str, nbytes: int) -> None:
        if self._position >= len(self._plan):
            raise RuntimeError(f"writer got {name} after the {len(self._plan)} planned tensors")
        want, want_shape, want_code, shard = self._plan[self._position]
        if name != want:
            raise RuntimeError(f"writer expected {want} next, got {name}")
        if shape != want_shape or code != want_code:
            raise RuntimeError(f"{name}: planned {want_code}{list(want_shape)}, got {code}{list(shape)}")
        if self._fh is None:   # the first tensor of its shard: write the whole header now
            entries, offset = {}, 0
            members = [p for p in self._plan if p[3] == shard]
            for n, s, c, _ in members:
                end = offset + _numel(s) * DTYPE_BYTES[c]
                entries[n] = {"dtype": c, "shape": list(s), "data_offsets": [offset, end]}
                offset = end
            path = self.directory / self._plan_files[shard]
            self._fh = open(path, "wb")
            self._left_in_shard = len(members)
            try:
                self._fh.write(_header_bytes(self.metadata, entries))
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise _disk_full(path, self._plan_total - self.total_size) from None
                raise
            self.finished.append([n for n, *_ in members])
        self._write(tensor, self.directory / self._plan_files[shard], nbytes)
        self._position += 1
        self.total_size += nbytes
        self._left_in_shard -= 1
        if self._left_in_shard == 0:
            self._fh.close()
            self._fh = None

    def _finish_shard(self) -> None:
        """Append mode: header + data -> the shard's temporary file; the data file goes away."""
        k = len(self.finished)
        if self._fh is None:                  # an empty checkpoint still gets one valid file
            open(self._data_tmp(k), "wb").close()
        else:
            self._fh.close()
            self._fh = None
        target = self._shard_tmp(k)
        try:
            with open(target, "wb") as out, open(self._data_tmp(k), "rb") as data:
                out.write(_header_bytes(self.metadata, self._entries))
                shutil.copyfileobj(data, out, length=16 << 20)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise _disk_full(target, self._offset) from None
            raise
        self._data_tmp(k).unlink()
        self.finished.append(list(self._entries))
        self._entries, self._offset = {}, 0

    def close(self) -> list[str]:
        """Finish the last shard, give every shard its final name, write the index when there are
        several. Returns the shard file names."""
        if self._closed:
            raise RuntimeError("ShardWriter closed twice")
        if self._plan is not None:
            if self._position != len(self._plan):
                raise RuntimeError(f"writer closed after {self._position} of {len(self._plan)} planned tensors")
            if not self._plan:                # nothing planned: one valid empty file
                (self.directory / self._plan_files[0]).write_bytes(_header_bytes(self.metadata, {}))
                self.finished.append([])
            files = self._plan_files
        else:
            if self._entries or not self.finished:
                self._finish_shard()
            files = shard_names(self.stem, len(self.finished))
            for k, name in enumerate(files):
                os.replace(self._shard_tmp(k), self.directory / name)
        self._closed = True
        self._scratch.clear()
        if len(files) > 1:
            weight_map = {t: f for f, names in zip(files, self.finished) for t in names}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            (self.directory / f"{self.stem}.safetensors.index.json").write_text(
                json.dumps(index, indent=2, sort_keys=True) + "\n")
        return files

    def abort(self) -> None:
        """Close any open file (the caller removes its temporary output directory)."""
        self._scratch.clear()
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self._closed = True

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    # -- journal / resume (append mode)
    def state(self) -> dict[str, Any]:
        """A JSON-able record of everything written so far (data flushed to disk first)."""
        if self._plan is not None:
            raise RuntimeError("state() is for writers without a plan")
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
        return {"version": 1, "stem": self.stem, "max_bytes": self.max_bytes, "metadata": dict(self.metadata),
                "positive_zero": self.positive_zero, "finished": [list(n) for n in self.finished],
                "entries": json.loads(json.dumps(self._entries)), "offset": self._offset,
                "total_size": self.total_size}

    @classmethod
    def resume(cls, directory: str | os.PathLike, state: dict[str, Any]) -> "ShardWriter":
        """Continue a writer from `state()`: whatever was written after that state is discarded, so
        adding the same tensors again yields the same files as a run that never stopped."""
        metadata = {k: v for k, v in state["metadata"].items() if k != "format"}
        writer = cls(directory, state["max_bytes"], stem=state["stem"], metadata=metadata,
                     positive_zero=state["positive_zero"])
        writer.metadata = dict(state["metadata"])
        writer.finished = [list(n) for n in state["finished"]]
        writer._entries = dict(state["entries"])
        writer._seen = {n for names in writer.finished for n in names} | set(writer._entries)
        writer._offset = state["offset"]
        writer.total_size = state["total_size"]
        for k in range(len(writer.finished)):
            if not writer._shard_tmp(k).is_file():
                raise UserError(f"cannot resume: {writer._shard_tmp(k)} is missing; start the run again")
        k = len(writer.finished)
        data, shard = writer._data_tmp(k), writer._shard_tmp(k)
        if not data.is_file() and shard.is_file():
            # the open shard was completed after the journal: recover its first `offset` data bytes
            with open(shard, "rb") as src, open(data, "wb") as dst:
                (n,) = struct.unpack("<Q", src.read(8))
                src.seek(8 + n)
                left = writer._offset
                while left:                   # in chunks: a shard can be larger than memory
                    chunk = src.read(min(left, 16 << 20))
                    if not chunk:
                        break
                    dst.write(chunk)
                    left -= len(chunk)
        if writer._offset or writer._entries:
            if not data.is_file() or data.stat().st_size < writer._offset:
                raise UserError(f"cannot resume: {data} is missing or shorter than journalled; start the run again")
            writer._fh = open(data, "r+b")
            writer._fh.truncate(writer._offset)
            writer._fh.seek(writer._offset)
        for stale in sorted(writer.directory.glob(f".{writer.stem}-*.tmp")):
            number = int(stale.name.split("-")[-1].split(".")[0]) - 1
            if number > k or (number == k and stale.name.endswith(".safetensors.tmp")):
                stale.unlink()   # written after the journalled state
        return writer


def write_state_dict(state: dict[str, Any], directory: str | os.PathLike,
                     max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
                     metadata: dict[str, str] | None = None) -> list[str]:
    """Write {name: tensor} (all known up front) as HF shards. Returns the shard file names."""
    plan = [(name, tuple(t.shape), dtype_code(t.dtype)) for name, t in state.items()]
    writer = ShardWriter(directory, max_shard_size, plan=plan, metadata=metadata)
    with writer:
        for name, tensor in state.items():
            writer.add(name, tensor)
        return writer.close()


# ------------------------------------------------------------------------------------ transformers glue

def state_dict_to_save(model) -> dict[str, Any]:
    """{name: tensor} exactly as `model.save_pretrained` (transformers 5) writes it: keys in
    `_keys_to_ignore_on_save` dropped, tied weights written once (the name transformers re-ties on
    load), and v5's load-time weight conversions reversed (e.g. GPT-NeoX's `lm_head` -> `embed_out`).
    The tensors are the model's own (no copy)."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = model.state_dict()
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(key, None)
    state = remove_tied_weights_from_state_dict(state, model)
    return revert_weight_conversion(model, state)


def save_model_files(model, tokenizer, directory: str | os.PathLike) -> None:
    """config.json (+ remote code), generation_config.json and the tokenizer, as `save_pretrained`
    writes them (it records the weights' dtype and the model class in the config)."""
    directory = Path(directory)
    config = model.config
    config.dtype = str(model.dtype).split(".")[1]
    config.architectures = [type(model).__name__]
    if hasattr(model, "is_remote_code") and model.is_remote_code():
        from transformers.dynamic_module_utils import custom_object_save

        custom_object_save(model, directory, config=config)
    config.save_pretrained(directory)
    if hasattr(model, "can_generate") and model.can_generate():
        model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


# ----------------------------------------------------------------------------- packed 2:4 checkpoints

def _config_dict(directory: Path) -> dict | None:
    path = directory / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def packed_checkpoint_info(directory: str | os.PathLike) -> dict | None:
    """None for a dense checkpoint; for a packed 2:4 one (llmprune pack / --save-format sparse24)
    the record {original_model_type, ...} of its original config. Older packed checkpoints, written before
    the config was marked, are recognised by their `<name>.bitmask` + `<name>.compressed` tensors."""
    directory = Path(directory)
    config = _config_dict(directory)
    if config is None:
        return None
    if config.get("model_type") == PACKED_MODEL_TYPE:
        return dict(config.get(PACKED_CONFIG_KEY) or {})
    try:
        reader = CheckpointReader(directory)
    except UserError:
        return None
    if any(n.endswith(".bitmask") and n[: -len(".bitmask")] + ".compressed" in reader for n in reader.names):
        return {"original_model_type": config.get("model_type"), "unmarked": True}
    return None


def mark_packed_config(directory: str | os.PathLike) -> None:
    """Rewrite config.json of a packed checkpoint: model_type -> PACKED_MODEL_TYPE (so plain
    transformers refuses it), the original model_type and auto_map kept under PACKED_CONFIG_KEY.
    (Not under a nested "model_type" key: a model class's from_pretrained adopts any nested dict
    whose model_type matches its own, which would build a default-sized model.)"""
    path = Path(directory) / "config.json"
    config = json.loads(path.read_text())
    record = {"original_model_type": config["model_type"], "format": "sparse24",
              "load_with": "llmprune.load_pretrained(DIR)",
              "unpack_with": "llmprune pack --unpack DIR --output DENSE_DIR"}
    if "auto_map" in config:
        record["original_auto_map"] = config.pop("auto_map")
    config["model_type"] = PACKED_MODEL_TYPE
    config[PACKED_CONFIG_KEY] = record
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def unmarked_config_dict(directory: str | os.PathLike) -> dict:
    """config.json of a packed checkpoint as the original model's config (model_type restored)."""
    config = _config_dict(Path(directory))
    if config is None:
        raise UserError(f"{directory} has no readable config.json")
    record = config.pop(PACKED_CONFIG_KEY, None)
    if record is not None:
        config["model_type"] = record["original_model_type"]
        if "original_auto_map" in record:
            config["auto_map"] = record["original_auto_map"]
    return config


def check_local_weights(path: str | os.PathLike) -> None:
    """Validate the safetensors headers of a local model directory (a damaged file is one line naming
    it, before transformers reads it); directories with other weight formats are left to transformers."""
    path = Path(path)
    if path.is_dir() and any(path.glob("*.safetensors")):
        CheckpointReader(path)


def refuse_packed(path: str | os.PathLike, name: str | None = None) -> None:
    """One line for commands that need dense weights (compress, delta, sweep) given a packed dir."""
    if Path(path).is_dir() and packed_checkpoint_info(path) is not None:
        name = name or str(path)
        raise UserError(f"{name} is a packed 2:4 checkpoint (llmprune pack / --save-format sparse24), which needs "
                        f"dense weights here: give its dense source, or unpack it first with "
                        f"`llmprune pack --unpack {name} --output DENSE_DIR` (evaluate it as is with `llmprune eval`)")
