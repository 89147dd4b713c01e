"""Which model a directory holds: its weights fingerprint, its Hub id when it is a Hub cache snapshot,
and its license when the model says.

`model_fingerprint(DIR)` ties files that describe a model (`eval/results.json`, `llmprune.json`) to the
weights they describe: `llmprune eval` records it in results.json, every llmprune output records it
in llmprune.json, and `card` / `push` recompute it from the directory and refuse results measured on
other weights. It is a sha256 over
  - config.json, parsed, with the keys a re-save rewrites dropped (`transformers_version`,
    `_name_or_path`), dumped with sorted keys;
  - every `*.safetensors` file (sorted by name): its name, size, header (names, dtypes, shapes,
    offsets) and, for every tensor, samples of its bytes: the first and last 4 KiB and 16 spread
    chunks of 256 bytes.
Headers alone would not do: two prunings of one model (50% vs 70%, uniform vs OWL) have identical
headers. Sampling keeps it fast on a 70B checkpoint (a few MB read) while any other pruning, merge or
fine-tune of the same architecture changes the sampled bytes of essentially every tensor. It guards
against mixing up results, not against someone forging them.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path
from typing import Any

FINGERPRINT_SCHEME = "v1"
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "_commit_hash")
_EDGE_BYTES = 4096
_SPREAD_CHUNKS = 16
_SPREAD_BYTES = 256


def _config_bytes(directory: Path) -> bytes:
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return path.read_bytes() if path.is_file() else b""
    if isinstance(config, dict):
        config = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    return json.dumps(config, sort_keys=True).encode()


def _sample_ranges(start: int, end: int) -> list[tuple[int, int]]:
    """Byte ranges [a, b) of one tensor's data that enter the fingerprint."""
    size = end - start
    if size <= 2 * _EDGE_BYTES + _SPREAD_CHUNKS * _SPREAD_BYTES:
        return [(start, end)]
    ranges = [(start, start + _EDGE_BYTES), (end - _EDGE_BYTES, end)]
    step = size // (_SPREAD_CHUNKS + 1)
    ranges += [(start + k * step, start + k * step + _SPREAD_BYTES) for k in range(1, _SPREAD_CHUNKS + 1)]
    return ranges


def _hash_safetensors(digest, path: Path) -> None:
    size = path.stat().st_size
    digest.update(f"{path.name}\0{size}\0".encode())
    with open(path, "rb") as fh:
        head = fh.read(8)
        header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < header_len <= size - 8:
            # Not a safetensors layout (damaged or a stand-in): the bytes themselves, at the edges.
            fh.seek(0)
            digest.update(fh.read(1 << 16))
            fh.seek(max(0, size - (1 << 16)))
            digest.update(fh.read(1 << 16))
            return
        header_bytes = fh.read(header_len)
        digest.update(header_bytes)
        try:
            header = json.loads(header_bytes)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return
        base = 8 + header_len
        for name in sorted(k for k in header if k != "__metadata__"):
            offsets = header[name].get("data_offsets") if isinstance(header[name], dict) else None
            if not (isinstance(offsets, list) and len(offsets) == 2):
                continue
            for a, b in _sample_ranges(base + int(offsets[0]), base + int(offsets[1])):
                fh.seek(a)
                digest.update(fh.read(b - a))


def model_fingerprint(directory: str | os.PathLike) -> str | None:
    """The fingerprint of the weights in `directory` (see the module doc), or None when it holds no
    safetensors weights (nothing to tie results to)."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    shards = sorted(p for p in directory.glob("*.safetensors") if p.is_file())
    if not shards:
        return None
    digest = hashlib.sha256()
    digest.update(_config_bytes(directory))
    for shard in shards:
        try:
            _hash_safetensors(digest, shard)
        except OSError:
            return None
    return f"{FINGERPRINT_SCHEME}:{digest.hexdigest()}"


def short_fingerprint(fingerprint: Any) -> str:
    """`v1:3fa2b9c0…` -> `3fa2b9c0` (for messages and the card)."""
    text = str(fingerprint)
    return text.split(":", 1)[-1][:12]


# ---- Hub cache snapshots -------------------------------------------------------------------------

_SNAPSHOT_REVISION = re.compile(r"[0-9a-f]{40}")


def hub_snapshot_id(path: str | os.PathLike | None) -> tuple[str, str | None] | None:
    """(repo id, revision) when `path` is inside a Hub cache snapshot `…/models--ORG--NAME/snapshots/REV`,
    else None. REV is the commit hash (None when the folder name is not one)."""
    if not path:
        return None
    try:
        parts = Path(path).expanduser().absolute().parts
    except (OSError, ValueError):
        return None
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith("models--") and i + 1 < len(parts):
            pieces = parts[i - 1][len("models--"):].split("--")
            if not all(pieces) or len(pieces) > 2:
                return None
            revision = parts[i + 1]
            return "/".join(pieces), revision if _SNAPSHOT_REVISION.fullmatch(revision) else None
    return None


def hub_cache_dir(repo_id: str, revision: str | None = None) -> Path | None:
    """The local snapshot folder of a Hub model that is in the cache (None when it is not)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # an invalid id, an unreadable cache: not cached
        return None
    return Path(found).parent if isinstance(found, str) else None


# ---- license ---------------------------------------------------------------------------------------

def _front_matter(text: str) -> dict[str, Any]:
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    import yaml

    try:
        data = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def read_license(directory: str | os.PathLike | None) -> dict[str, str] | None:
    """The license a model directory declares: `license` (and `license_name` / `license_link` for
    "other") from its README.md front matter (what the Hub shows), else a `license` key of
    config.json. None when neither says."""
    if not directory:
        return None
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        return None
    found: dict[str, str] = {}
    try:
        meta = _front_matter((directory / "README.md").read_text(encoding="utf-8", errors="replace"))
    except OSError:
        meta = {}
    value = meta.get("license")
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, str) and value.strip():
        found["license"] = value.strip()
        for key in ("license_name", "license_link"):
            if isinstance(meta.get(key), str) and meta[key].strip():
                found[key] = meta[key].strip()
        return found
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(config, dict) and isinstance(config.get("license"), str) and config["license"].strip():
        return {"license": config["license"].strip()}
    return None
