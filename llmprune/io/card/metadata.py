"""The card's YAML front matter (Hub metadata) and the facts about the output it is built from: which
kind of output it is and which sparsity patterns its stages left.

Hub metadata: the Hub documents four values for `base_model_relation` (adapter, merge, quantized,
finetune). A pruned checkpoint is none of the first three, and "finetune" would claim training that
did not happen, so compress and pack outputs set `base_model` without a relation (the `pruned` tag
says what it is); a delta merge of several fine-tunes is a `merge` of the base and the fine-tunes.
`license` is set only when the models it descends from declare one (see `models.card_license`).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from llmprune.errors import UserError
from llmprune.io import sidecar as sidecar_io
from llmprune.io.card.format import tag
from llmprune.io.card.models import card_license, hub_id

# Hub `base_model_relation` values we emit, per output kind (None: leave the relation out).
RELATION = {"compress": None, "pack": None, "delta-merge": "merge", "delta-single": None}


def kind(sidecar: dict[str, Any]) -> str:
    """compress | pack | delta-single | delta-merge (raises UserError for anything else)."""
    value = sidecar.get("kind")
    if value not in ("compress", "delta", "pack"):
        raise UserError(f"llmprune.json has kind {value!r}; expected compress, delta or pack "
                        f"(is this an output of a newer llmprune?)")
    if value == "delta":
        return "delta-merge" if len(sidecar.get("finetuned") or []) > 1 else "delta-single"
    if value == "compress" and sidecar.get("save_format") == "sparse24":
        return "pack"  # `compress --save-format sparse24` writes the same packed checkpoint as `pack`
    return value


def _nm(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and re.fullmatch(r"\s*\d+:\d+\s*", value) else None


def patterns(sidecar: dict[str, Any]) -> list[str]:
    """The zero patterns the prune stages left, in stage order without repeats: "N:M" or
    "unstructured" (attention 0.3 + MLP 2:4 gives ["unstructured", "2:4"])."""
    found: list[str] = []
    for record in sidecar_io.stages(sidecar):
        params = record.get("params") if isinstance(record.get("params"), dict) else {}
        if record.get("kind") != "prune" and "sparsity" not in params:
            continue
        target = params.get("sparsity", record.get("target"))
        pattern = _nm(target) or ("unstructured" if target is not None else None)
        if pattern and pattern not in found:
            found.append(pattern)
    if not found:   # a sidecar without stage records that still says what it did
        sparsity = sidecar.get("sparsity") if isinstance(sidecar.get("sparsity"), dict) else {}
        for value in (sparsity.get("pattern"), sparsity.get("target")):
            if _nm(value):
                return [_nm(value)]
        if isinstance(sparsity.get("pattern"), str) and sparsity["pattern"] != "mixed":
            return [sparsity["pattern"]]
    if not found and sidecar.get("kind") == "pack":
        found.append("2:4")         # `pack` stores 2:4 weights, whatever made them
    return found


def pattern(sidecar: dict[str, Any]) -> str | None:
    """The one zero pattern of the whole model, "mixed" when stages left different ones, or None."""
    found = patterns(sidecar)
    return found[0] if len(found) == 1 else ("mixed" if found else None)


def allocations(sidecar: dict[str, Any]) -> list[str]:
    """Non-uniform layer allocations of the prune stages (owl, global), in stage order."""
    found: list[str] = []
    for record in sidecar_io.stages(sidecar):
        params = record.get("params") if isinstance(record.get("params"), dict) else {}
        value = params.get("allocation")
        if isinstance(value, str) and value not in ("uniform", "mixed") and value not in found:
            found.append(value)
    value = (sidecar.get("sparsity") or {}).get("allocation") if isinstance(sidecar.get("sparsity"), dict) else None
    if not found and isinstance(value, str) and value not in ("uniform", "mixed"):
        found.append(value)
    return found


def find_methods(obj: Any) -> list[str]:
    """Every string value of a `method` key anywhere in the recipe, in order, without repeats."""
    found: list[str] = []

    def walk(o: Any) -> None:
        if isinstance(o, dict):
            for k, v in o.items():
                if k == "method" and isinstance(v, str) and v not in found:
                    found.append(v)
                else:
                    walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)

    walk(obj)
    return found


def pipeline_tag(directory: Path) -> str | None:
    """text-generation when config.json declares a causal-LM architecture (the file backs the claim)."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    archs = config.get("architectures") or [] if isinstance(config, dict) else []
    if any(isinstance(a, str) and a.endswith("ForCausalLM") for a in archs):
        return "text-generation"
    return None


def front_matter(directory: Path, sidecar: dict[str, Any]) -> dict[str, Any]:
    out_kind = kind(sidecar)
    base = sidecar.get("base_model") or {}
    meta: dict[str, Any] = {}
    base_ids: list[str] = []
    if hub_id(base, sidecar):
        base_ids.append(hub_id(base, sidecar))
    if out_kind.startswith("delta"):
        ft_ids = [hub_id(ft, sidecar) for ft in sidecar.get("finetuned") or [] if hub_id(ft, sidecar)]
        # One fine-tune: the output is that fine-tune with a sparsified delta, so it descends from it.
        base_ids = ft_ids if out_kind == "delta-single" else base_ids + ft_ids
    if base_ids:
        meta["base_model"] = base_ids[0] if len(base_ids) == 1 else base_ids
        if RELATION[out_kind] and len(base_ids) > 1:
            meta["base_model_relation"] = RELATION[out_kind]
    license_info = card_license(sidecar, out_kind)
    if license_info:
        meta.update(license_info)
    if out_kind != "pack":  # packed weights need llmprune.load_pretrained, not transformers
        meta["library_name"] = "transformers"
    pipeline = pipeline_tag(directory)
    if pipeline:
        meta["pipeline_tag"] = pipeline

    tags = ["llmprune"]
    if out_kind in ("compress", "pack"):
        found = patterns(sidecar)
        tags += ["pruned"] + (["sparse"] if found else [])
        if sidecar_io.is_structured(sidecar):
            tags.append("structured-pruning")
        for value in found:
            # "2of4", not "2:4": the Hub reads `prefix:value` tags (license:, base_model:) specially.
            tags.append(f"{value.replace(':', 'of')}-sparse" if ":" in value else f"{tag(value)}-sparsity")
        tags += [tag(a) for a in allocations(sidecar)]
        tags += [tag(m) for m in find_methods(sidecar.get("recipe"))]
        if out_kind == "pack":
            tags.append(tag((sidecar.get("pack") or {}).get("format") or "packed"))
    else:
        tags.append("delta-sparsification")
        method = (sidecar.get("delta") or {}).get("method")
        if method:
            tags.append(tag(method))
        if out_kind == "delta-merge":
            tags.append("merge")
    meta["tags"] = list(dict.fromkeys(t for t in tags if t))
    return meta
