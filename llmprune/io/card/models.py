"""The models a card names: the base model and the fine-tunes, by Hub id when one is known (recorded,
given with --base-model, or recovered from a Hub cache snapshot folder), else by folder name; and the
license they carry."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from llmprune.io.sidecar import base_model_hub_id

_HUB_ID = re.compile(r"^[\w\-.]{1,96}/[\w\-.]{1,96}$")
LICENSE_KEYS = ("license", "license_name", "license_link")


def is_hub_model_id(model_id: Any) -> bool:
    """Whether `model_id` looks like a Hub repo `namespace/name` (not a local path, not the embedded
    `llmprune-tiny`). A local model recorded as a relative `dir/sub` path cannot be told apart from a
    Hub id offline, so the compression core records local models by their absolute path."""
    if not isinstance(model_id, str) or not model_id:
        return False
    if model_id.startswith(("/", ".", "~")) or "\\" in model_id:
        return False
    if not _HUB_ID.fullmatch(model_id) or "--" in model_id or ".." in model_id:
        return False
    return True


def with_base_model(sidecar: dict[str, Any], hub_id: str | None) -> dict[str, Any]:
    """The sidecar as the card sees it when `--base-model HUB_ID` names the base: the recorded license
    stays (it was read from the same model); the revision only when it was recorded for that id."""
    if not hub_id:
        return sidecar
    old = sidecar.get("base_model") if isinstance(sidecar.get("base_model"), dict) else {}
    same = base_model_hub_id(old) == hub_id or old.get("id") == hub_id
    entry = {**{k: old[k] for k in LICENSE_KEYS + ("model_type",) if k in old},
             "id": hub_id, "hub_id": hub_id, "revision": old.get("revision") if same else None, "local": False}
    return {**sidecar, "base_model": entry}


def hub_id(entry: Any, sidecar: dict[str, Any]) -> str | None:
    """The Hub id of a model entry of the sidecar, or None when it is (or may be) a local directory."""
    if not isinstance(entry, dict):
        return None
    known = base_model_hub_id(entry)               # recorded, --base-model, or a Hub cache snapshot
    if known:
        return known
    model_id = entry.get("id")
    if entry.get("local") or not is_hub_model_id(model_id):   # compress records "local": true
        return None
    if Path(model_id).expanduser().exists():  # a relative local path seen from here
        return None
    packed_from = sidecar.get("packed_from")
    if isinstance(packed_from, dict) and sidecar.get("kind") == "pack" and packed_from.get("kind") is None:
        return None  # `pack` of a directory without llmprune.json records that directory as the base
    return model_id


def model_link(entry: Any, sidecar: dict[str, Any] | None = None) -> str:
    """How the card names a model: a Hub link (with its revision) or a local folder's name."""
    entry = entry if isinstance(entry, dict) else {}
    revision = entry.get("revision")
    known = hub_id(entry, sidecar or {})
    model_id = entry.get("id")
    if known:
        text = f"[{known}](https://huggingface.co/{known})"
    elif isinstance(model_id, str) and (model_id.startswith(("/", "~", ".")) or "/" in model_id.strip("/")):
        # A local path says nothing useful to a reader of a published card beyond its name.
        text = f"`{Path(model_id).name}` (a local model directory)"
    else:
        text = f"`{model_id}`"
    if isinstance(revision, str) and revision:
        text += f" at revision `{revision}`"
    return text


def entry_license(entry: Any) -> dict[str, str] | None:
    """The license recorded for a model entry; for sidecars written before it was recorded, read from
    the model's folder when it is still on this machine."""
    if not isinstance(entry, dict):
        return None
    if isinstance(entry.get("license"), str) and entry["license"]:
        return {k: entry[k] for k in LICENSE_KEYS if isinstance(entry.get(k), str) and entry[k]}
    from llmprune.io.identity import read_license

    for key in ("path", "id"):
        value = entry.get(key)
        if isinstance(value, str) and value and Path(value).expanduser().is_dir():
            found = read_license(value)
            if found:
                return found
    return None


def card_license(sidecar: dict[str, Any], kind: str) -> dict[str, str] | None:
    """The license the card declares: the base model's for a pruned or packed model, the fine-tune's
    for one sparsified fine-tune, and for a merge only when the base and every fine-tune declare the
    same one. None (no `license` key) when it is not known."""
    fts = [ft for ft in sidecar.get("finetuned") or [] if isinstance(ft, dict)]
    if kind == "delta-single":
        return entry_license(fts[0]) if fts else None
    if kind == "delta-merge":
        found = [entry_license(e) for e in [sidecar.get("base_model"), *fts]]
        if all(found) and all(f == found[0] for f in found):
            return found[0]
        return None
    return entry_license(sidecar.get("base_model"))
