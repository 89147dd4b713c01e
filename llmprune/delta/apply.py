"""The sparse delta artifact (`--save-delta`) and `llmprune delta apply BASE DELTA_DIR`.

Format (a custom, non-Hugging-Face format; `delta.json` says so):
  delta.json                     manifest: output tensors in order, with for each the base tensor it
                                 patches, a blake2b hash of that base tensor's stored bytes, and
                                 `storage` = patch | dense
  delta[-0000i-of-0000n].safetensors
      "<name>::idx"  int32/int64   flat (row-major) positions where the output differs from the base
      "<name>::val"  output dtype  the output weights at those positions (θ_base + Δ̂, already cast)
      "<name>::dense"              the whole output tensor (no base, a different vocabulary size, or
                                   when a patch would be larger than the tensor)
  config.json, tokenizer files   copied from the fine-tune

Storing the output values (not float32 Δ̂) at the changed positions makes the rebuild bit-exact by
construction: `apply` starts from the base cast to the output dtype (with -0.0 -> +0.0, as the
writer does) and overwrites exactly the positions that differ. Δ̂ itself is `val − base[idx]`.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from llmprune.delta.streaming import bit_view, copy_model_files, local_model_dir, positive_zero, tensor_bytes
from llmprune.io.checkpoint import CheckpointReader, ShardWriter, dtype_code, torch_dtype
from llmprune.errors import UserError

DELTA_SUBDIR = "sparse_delta"
MANIFEST_NAME = "delta.json"
FORMAT = "llmprune-sparse-delta"
NOTE = ("Not a Hugging Face checkpoint: a sparse patch on top of a base model. "
        "Rebuild the model with `llmprune delta apply BASE THIS_DIR --output DIR`.")


def tensor_hash(tensor) -> str:
    """blake2b of a tensor's stored bytes: identifies the exact base a patch belongs to."""
    return hashlib.blake2b(tensor_bytes(tensor), digest_size=16).hexdigest()


class SparseDeltaWriter:
    """Collects the output tensors as patches against the base, streaming them to disk."""

    def __init__(self, directory: Path, max_shard_bytes: int):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=False)
        self.writer = ShardWriter(self.directory, max_shard_bytes, stem="delta")  # patch sizes known only as they come
        self.max_shard_bytes = max_shard_bytes
        self.entries: list[dict] = []
        self._hashes: dict[str, str] = {}

    def add(self, name: str, out, base_name: str | None = None, base=None) -> None:
        """`out`: the output tensor; `base`: the stored base tensor named `base_name` (or None)."""
        import torch

        entry = {"name": name, "shape": list(out.shape), "dtype": dtype_code(out.dtype), "base": None,
                 "base_blake2b": None, "storage": "dense", "nnz": out.numel()}
        if base is not None and tuple(base.shape) == tuple(out.shape):
            reference = positive_zero(base.to(out.dtype))
            changed = (bit_view(out) != bit_view(reference)).reshape(-1)
            index = changed.nonzero().squeeze(1)
            index_dtype = torch.int32 if out.numel() < 2**31 else torch.int64
            patch_bytes = index.numel() * (index_dtype.itemsize + out.element_size())
            if patch_bytes < out.numel() * out.element_size():
                if base_name not in self._hashes:
                    self._hashes[base_name] = tensor_hash(base)
                entry.update(base=base_name, base_blake2b=self._hashes[base_name], storage="patch",
                             nnz=index.numel())
                self.writer.add(f"{name}::idx", index.to(index_dtype))
                self.writer.add(f"{name}::val", out.reshape(-1)[index])
                self.entries.append(entry)
                return
        self.writer.add(f"{name}::dense", out)
        self.entries.append(entry)

    def close(self, source_dir: Path, sidecar: dict, finetuned_bytes: int) -> int:
        """Finish the shards, copy config/tokenizer, write the manifest. Returns the artifact's bytes."""
        self.writer.close()
        copy_model_files(source_dir, self.directory)
        delta_bytes = sum(p.stat().st_size for p in self.directory.glob("delta*.safetensors"))
        manifest = {"format": FORMAT, "format_version": 1, "note": NOTE, "max_shard_bytes": self.max_shard_bytes,
                    "bytes": {"delta": delta_bytes, "finetuned": finetuned_bytes},
                    "sidecar": sidecar, "tensors": self.entries}
        (self.directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
        return delta_bytes


def read_manifest(delta_dir: Path) -> dict:
    from llmprune.io.files import read_json

    path = Path(delta_dir) / MANIFEST_NAME
    if not Path(delta_dir).is_dir():
        raise UserError(f"delta directory {delta_dir} does not exist")
    if not path.is_file():
        raise UserError(f"{delta_dir} has no {MANIFEST_NAME} (nor a {DELTA_SUBDIR} folder with one); give the output "
                        "of `llmprune delta ... --save-delta` or its `sparse_delta` folder")
    manifest = read_json(path, "sparse delta manifest")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != 1:
        raise UserError(f"{path} is not an llmprune sparse delta (format {manifest.get('format')!r}, "
                        f"version {manifest.get('format_version')!r})")
    return manifest


def rebuild_tensor(entry: dict, delta: CheckpointReader, base_reader: CheckpointReader, check_hash: bool = True):
    """One output tensor from the base and the delta artifact."""
    name = entry["name"]
    if entry["storage"] == "dense":
        return delta.get(f"{name}::dense")
    base_name = entry["base"]
    if base_name not in base_reader:
        raise UserError(f"base model has no tensor {base_name}; this delta was made from a different base")
    base = base_reader.get(base_name)
    if list(base.shape) != entry["shape"]:
        raise UserError(f"base tensor {base_name} has shape {list(base.shape)}, the delta expects {entry['shape']}; "
                        "this delta was made from a different base")
    if check_hash and tensor_hash(base) != entry["base_blake2b"]:
        raise UserError(f"base tensor {base_name} differs from the one this delta was made from "
                        "(content hash mismatch); give the exact base model used for `llmprune delta`")
    out = positive_zero(base.to(torch_dtype(entry["dtype"]))).contiguous()
    index = delta.get(f"{name}::idx").long()
    out.view(-1)[index] = delta.get(f"{name}::val")
    return out


def find_delta_dir(delta_dir: str | Path) -> Path:
    """The sparse delta folder: `delta_dir` itself, or its `sparse_delta` subfolder (the output of
    `llmprune delta --save-delta` given as a whole)."""
    delta_dir = Path(delta_dir).expanduser()
    if not (delta_dir / MANIFEST_NAME).is_file() and (delta_dir / DELTA_SUBDIR / MANIFEST_NAME).is_file():
        return delta_dir / DELTA_SUBDIR
    return delta_dir


def apply_delta(base: str, delta_dir: str | Path, output: Path, progress: bool = True) -> dict:
    """Write `base + delta` into the existing empty directory `output`. Returns a summary dict."""
    from tqdm.auto import tqdm

    start = time.time()
    delta_dir = find_delta_dir(delta_dir)
    manifest = read_manifest(delta_dir)
    base_dir = local_model_dir(base)
    base_reader = CheckpointReader(base_dir)
    delta_reader = CheckpointReader(delta_dir, stem="delta")
    for entry in manifest["tensors"]:  # cheap structural check before any work
        if entry["storage"] == "patch":
            info = base_reader.tensors.get(entry["base"])
            if info is None or list(info.shape) != entry["shape"]:
                raise UserError(f"base {base} does not match this delta (tensor {entry['base']} missing or of another "
                                "shape); give the base model used for `llmprune delta`")
    plan = [(e["name"], tuple(e["shape"]), e["dtype"]) for e in manifest["tensors"]]
    writer = ShardWriter(Path(output), manifest["max_shard_bytes"], plan=plan)
    for entry in tqdm(manifest["tensors"], desc="apply delta", unit="tensor", disable=not progress):
        writer.add(entry["name"], rebuild_tensor(entry, delta_reader, base_reader))
    files = writer.close()
    copy_model_files(delta_dir, Path(output))
    sidecar = dict(manifest.get("sidecar", {}))
    sidecar["rebuilt_from"] = {"base": base, "delta": str(delta_dir.resolve())}
    sidecar["wall_time_s"] = round(time.time() - start, 3)
    return {"sidecar": sidecar, "files": files, "tensors": len(plan)}
