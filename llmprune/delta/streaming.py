"""Tensor-by-tensor access to safetensors checkpoints, and writers that never hold a whole model.

`CheckpointReader` reads the shard headers once (names, shapes, dtypes) and then loads one tensor
at a time; each load opens and closes its shard, so no mapping of a whole shard stays resident.

`PlannedShardWriter` writes a model whose tensor names, shapes and dtypes are known up front (the
output of `llmprune delta` has exactly the fine-tune's layout): every shard header is computed
first, then each tensor's bytes are appended as soon as it is computed. Peak memory is one tensor.

`AppendShardWriter` writes tensors whose shapes are only known when they arrive (the sparse
delta): bytes go to a temporary data file and the header is prepended when the shard closes.
"""
from __future__ import annotations

import json
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from llmprune.errors import UserError

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"

# safetensors dtype codes <-> torch dtypes (names, so this module imports without torch).
DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}

# Files copied from the fine-tune next to the weights (config, generation config, tokenizer).
MODEL_FILE_PATTERNS = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "*.model", "vocab.json", "vocab.txt",
    "merges.txt", "chat_template.json", "chat_template.jinja", "*.tiktoken", "preprocessor_config.json",
)


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


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '1.5GiB' / 1000 -> bytes (decimal units as in `save_pretrained`)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B?)\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise UserError(f"cannot read size {text!r}; write it like 5GB, 500MB or 1000000")
    number, unit = float(m.group(1)), m.group(2).upper()
    base = 1024 if "I" in unit else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[:1] if unit[:1] in "KMGT" else ""]
    size = int(number * base ** power)
    if size <= 0:
        raise UserError(f"size {text!r} must be positive")
    return size


def read_header(path: Path) -> dict:
    """The JSON header of one safetensors file (names -> dtype/shape/offsets), without mapping it."""
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > 100_000_000:
                raise ValueError("header length is implausible")
            header = json.loads(fh.read(n))
    except (OSError, ValueError, struct.error) as exc:
        raise UserError(f"{path} is not a readable safetensors file ({exc})") from None
    header.pop("__metadata__", None)
    return header


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors code, e.g. "BF16"
    shard: Path

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]


class CheckpointReader:
    """Names, shapes and dtypes of a safetensors checkpoint, and one tensor at a time."""

    def __init__(self, directory: str | Path, stem: str = "model"):
        self.directory = Path(directory)
        index = self.directory / f"{stem}.safetensors.index.json"
        single = self.directory / f"{stem}.safetensors"
        if index.is_file():
            from llmprune.io.files import read_json

            weight_map = read_json(index, "safetensors index").get("weight_map")
            if not isinstance(weight_map, dict):
                raise UserError(f"{index} is not a valid safetensors index (no weight_map)")
            shards = list(dict.fromkeys(weight_map.values()))
        elif single.is_file():
            shards = [single.name]
        else:
            if any(self.directory.glob("*.bin")) or any(self.directory.glob("*.pt")):
                raise UserError(f"{self.directory} has only PyTorch pickle weights; llmprune reads safetensors only "
                                "(convert it once with `save_pretrained(..., safe_serialization=True)`)")
            raise UserError(f"{self.directory} has no {single.name} or {index.name}")
        self.tensors: dict[str, TensorInfo] = {}
        for shard in shards:
            if not (self.directory / shard).is_file():
                raise UserError(f"shard {shard} listed in {index.name} is missing from {self.directory}")
        from llmprune.io.errors import check_safetensors

        check_safetensors(self.directory / shard for shard in shards)   # a truncated file is named here
        for shard in shards:
            path = self.directory / shard
            for name, entry in read_header(path).items():
                self.tensors[name] = TensorInfo(name, tuple(entry["shape"]), entry["dtype"], path)

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def get(self, name: str):
        """Load one tensor (the shard is opened and closed again, so nothing else stays mapped)."""
        from safetensors import safe_open

        info = self.tensors[name]
        with safe_open(str(info.shard), framework="pt") as fh:
            return fh.get_tensor(name)

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in {t.shard for t in self.tensors.values()})


def tensor_bytes(tensor) -> memoryview:
    """The raw little-endian bytes of a tensor (no copy when it is already contiguous)."""
    import torch

    flat = tensor.detach().reshape(-1).contiguous()
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return memoryview(flat.view(torch.uint8).numpy())


def _header_bytes(entries: dict) -> bytes:
    data = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    data += b" " * (-len(data) % 8)  # safetensors pads the header to 8-byte alignment
    return struct.pack("<Q", len(data)) + data


def _shard_names(stem: str, count: int) -> list[str]:
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _write_index(directory: Path, stem: str, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (directory / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


class PlannedShardWriter:
    """Writes `plan` (name, shape, dtype code) in order into shards of at most `max_shard_bytes`."""

    def __init__(self, directory: Path, plan: list[tuple[str, tuple[int, ...], str]], max_shard_bytes: int,
                 stem: str = "model"):
        self.directory = Path(directory)
        self.stem = stem
        groups: list[list[tuple[str, tuple[int, ...], str]]] = [[]]
        size = 0
        for item in plan:
            nbytes = _numel(item[1]) * DTYPE_BYTES[item[2]]
            if groups[-1] and size + nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(item)
            size += nbytes
        self.files = _shard_names(stem, len(groups))
        self.groups = groups
        self.order = [item for group in groups for item in group]
        self.position = 0
        self.shard = -1
        self.handle = None
        self.total_size = sum(_numel(s) * DTYPE_BYTES[d] for _, s, d in plan)

    def _open_next(self) -> None:
        self.shard += 1
        entries, offset = {}, 0
        for name, shape, code in self.groups[self.shard]:
            end = offset + _numel(shape) * DTYPE_BYTES[code]
            entries[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, end]}
            offset = end
        self.handle = open(self.directory / self.files[self.shard], "wb")
        self.handle.write(_header_bytes(entries))
        self.left_in_shard = len(self.groups[self.shard])

    def write(self, name: str, tensor) -> None:
        expected_name, shape, code = self.order[self.position]
        if name != expected_name:
            raise RuntimeError(f"writer expected {expected_name} next, got {name}")
        if tuple(tensor.shape) != tuple(shape) or dtype_code(tensor.dtype) != code:
            raise RuntimeError(f"{name}: planned {code}{list(shape)}, got {dtype_code(tensor.dtype)}{list(tensor.shape)}")
        if self.handle is None:
            self._open_next()
        self.handle.write(tensor_bytes(tensor))
        self.position += 1
        self.left_in_shard -= 1
        if self.left_in_shard == 0:
            self.handle.close()
            self.handle = None

    def close(self) -> list[str]:
        if self.position != len(self.order):
            raise RuntimeError(f"writer closed after {self.position} of {len(self.order)} tensors")
        if len(self.files) > 1:
            weight_map = {name: self.files[i] for i, group in enumerate(self.groups) for name, _, _ in group}
            _write_index(self.directory, self.stem, weight_map, self.total_size)
        return self.files


class AppendShardWriter:
    """Writes tensors of shapes not known in advance; a shard is finished when it exceeds the limit.

    Data go to a temporary file; on shard close the header is written and the data copied after it.
    """

    def __init__(self, directory: Path, max_shard_bytes: int, stem: str):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self.stem = stem
        self.finished: list[tuple[Path, list[str]]] = []  # (temporary final file, names)
        self.entries: dict = {}
        self.offset = 0
        self.data = None
        self.total_size = 0

    def write(self, name: str, tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.entries and self.offset + nbytes > self.max_shard_bytes:
            self._finish_shard()
        if self.data is None:
            self.data_path = self.directory / f".{self.stem}-{len(self.finished)}.data.tmp"
            self.data = open(self.data_path, "wb")
        self.data.write(tensor_bytes(tensor))
        self.entries[name] = {"dtype": dtype_code(tensor.dtype), "shape": list(tensor.shape),
                              "data_offsets": [self.offset, self.offset + nbytes]}
        self.offset += nbytes
        self.total_size += nbytes

    def _finish_shard(self) -> None:
        self.data.close()
        final = self.directory / f".{self.stem}-{len(self.finished)}.safetensors.tmp"
        with open(final, "wb") as out, open(self.data_path, "rb") as data:
            out.write(_header_bytes(self.entries))
            shutil.copyfileobj(data, out, length=16 << 20)
        self.data_path.unlink()
        self.finished.append((final, list(self.entries)))
        self.entries, self.offset, self.data = {}, 0, None

    def close(self) -> list[str]:
        if self.data is None and not self.finished:  # nothing written: still produce a valid empty file
            self.data_path = self.directory / f".{self.stem}-0.data.tmp"
            self.data = open(self.data_path, "wb")
        if self.data is not None:
            self._finish_shard()
        names = _shard_names(self.stem, len(self.finished))
        weight_map = {}
        for (tmp, tensor_names), name in zip(self.finished, names):
            tmp.rename(self.directory / name)
            weight_map.update({t: name for t in tensor_names})
        if len(names) > 1:
            _write_index(self.directory, self.stem, weight_map, self.total_size)
        return names


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def copy_model_files(source: Path, target: Path) -> list[str]:
    """Copy config, generation config and tokenizer files (never weights) from `source` to `target`.

    A config with `auto_map` needs its modeling code next to it, so then the `*.py` files come too.
    """
    copied = []
    patterns = list(MODEL_FILE_PATTERNS)
    try:
        if "auto_map" in json.loads((Path(source) / "config.json").read_text()):
            patterns.append("*.py")
    except (OSError, ValueError):
        pass
    for pattern in patterns:
        for path in sorted(Path(source).glob(pattern)):
            if path.is_file() and not (target / path.name).exists():
                shutil.copy2(path, target / path.name)
                copied.append(path.name)
    return copied


def local_model_dir(name: str) -> Path:
    """A local directory holding the safetensors of `name` (a local path, embedded name or Hub id)."""
    from llmprune.io.load import _hub_error, resolve_model_path

    path = resolve_model_path(name)
    if Path(path).is_dir():
        return Path(path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, allow_patterns=["*.safetensors", "*.json", "*.model", "*.txt",
                                                            "*.jinja", "*.tiktoken"]))
    except Exception as exc:  # network / cache / not-found errors come in many types
        raise _hub_error(name, exc) from None


def positive_zero(tensor):
    """`-0.0` -> `+0.0` (x + 0.0 leaves every other value, NaN included, unchanged).

    Sparse loaders may read the sign bit of -0.0 as "non-zero" (vLLM #13198); `save_model` does the
    same normalisation for `save_pretrained` outputs.
    """
    return tensor + 0.0 if tensor.is_floating_point() else tensor


def bit_view(tensor):
    """The tensor's bits as integers of the same width, for exact (sign- and NaN-aware) comparison."""
    import torch

    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    if tensor.dtype == torch.bool:
        return tensor.to(torch.uint8)
    return tensor.view(ints[tensor.element_size()])
