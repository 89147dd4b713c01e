"""`llmprune.json`: the one module that writes and reads the sidecar of every llmprune output.

Sparsity and provenance live here, never in `config.json`'s `quantization_config` (vLLM >= 0.24
rejects checkpoints carrying a vestigial sparsity_config).

Common keys: `format_version`, `kind` (compress | delta | pack), `base_model` (`base_model_entry`:
{id, revision, model_type, path, local, and when known hub_id, license}), `recipe` (as run),
`wall_time_s` (the whole command that wrote the directory), `peak_memory`, `versions`, `command`,
`fingerprint` (of the weights written beside it: `llmprune.io.identity.model_fingerprint`).
`kind: compress` (format 2) adds:
- `calibration`: {source, split, samples, seqlen, seed, tokens};
- `stages`: one record per recipe stage, in order: {index, method, kind, params, target, achieved,
  removed, parameters: {before, after}, zeros: {before, after, fraction_after}, seconds, and for
  prune stages `modules` {name: {shape, target, achieved}}, `layers`, `schedule`; expert-drop stages:
  `removed` {experts: {before, after}} and `scores` {kept: {MoE layer: [kept experts, original
  numbering]}, routed_share_before / routed_share_after (per expert, calibration tokens),
  routed_share_removed, criterion_scores, merged_into}};
  matrix names: linears by module name, MoE experts per expert as `...mlp.experts.gate_up_proj[5]`
  (2-D slices of the fused 3-D parameters), routers as `...mlp.gate`;
- `parameters`: {before, after} of the whole model;
- `sparsity`: the zeros of the saved model: {achieved (over the decoder layers' linear weights),
  target (the mean targeted zero fraction of the pruned matrices, a number), pattern
  ("unstructured" | "N:M" | "mixed" | null), allocation, layers, modules {name: {shape, target
  (a number, "N:M", or null = not pruned), achieved}}}.
Readers go through `stages()`, `describe()` and `parameters()` here, which also read format-1 files.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

from llmprune.errors import UserError

SIDECAR_NAME = "llmprune.json"
FORMAT_VERSION = 2


# ---- writing -------------------------------------------------------------------------------------

def versions() -> dict[str, str]:
    """Versions of the packages that decide the numbers, for provenance."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("llmprune", "torch", "transformers", "accelerate", "datasets", "safetensors",
                 "triton", "lm_eval", "huggingface_hub"):
        try:
            out[name] = version(name.replace("_", "-") if name == "lm_eval" else name)
        except PackageNotFoundError:   # not installed: leave it out rather than guess
            continue
    return out


def command_line() -> str:
    """The command as the user typed it (best effort), for 'how to reproduce'."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(("llmprune", "__main__.py", "cli.py")):
        argv[0] = "llmprune"
    return " ".join(shlex.quote(a) for a in argv)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: str | os.PathLike, data: Any) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_sidecar(directory: str | os.PathLike, sidecar: dict[str, Any]) -> Path:
    """Write `llmprune.json` beside the weights already written to `directory`. `sidecar` must have at
    least `kind` (compress|delta|pack). The fingerprint of those weights is always recomputed here (a
    sidecar copied from another directory, as pack does, must not carry the source's)."""
    from llmprune.io.identity import model_fingerprint

    if "kind" not in sidecar:
        raise ValueError("sidecar needs a 'kind'")
    data = {"format_version": FORMAT_VERSION, **sidecar}
    data.setdefault("versions", versions())
    data.setdefault("command", command_line())
    fingerprint = model_fingerprint(directory)
    if fingerprint is None:
        data.pop("fingerprint", None)
    else:
        data["fingerprint"] = fingerprint
    path = Path(directory) / SIDECAR_NAME
    write_json(path, data)
    return path


def base_model_entry(name: str, *, revision: str | None = None, model_type: str | None = None,
                     hub_id: str | None = None, path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The one shape of `base_model` (and of each `finetuned` entry of a delta): what the user named,
    the Hub revision, the model type, the resolved path and whether it is local; plus, when known,
    `hub_id` (given with --base-model, or recovered from a Hub cache snapshot folder
    `…/models--ORG--NAME/snapshots/REV`, whose REV is then the revision) and `license` (from the
    model's README.md front matter or config.json). `path`: the local folder the weights were read
    from, when the caller knows it (a downloaded Hub model's snapshot)."""
    from llmprune.io.identity import hub_cache_dir, hub_snapshot_id, read_license
    from llmprune.io.load import is_local_model, resolve_model_path

    if path is None:
        try:
            path = resolve_model_path(name)
        except UserError:
            path = name
    local = is_local_model(name)
    if Path(str(path)).expanduser().is_dir():     # absolute: the card may read the folder again later
        path = Path(str(path)).expanduser().absolute()
    entry: dict[str, Any] = {"id": name, "revision": revision, "model_type": model_type, "path": str(path),
                             "local": local}
    snapshot = hub_snapshot_id(path) if Path(str(path)).expanduser().is_dir() else None
    if hub_id:
        entry["hub_id"] = hub_id
    elif snapshot is not None:
        entry["hub_id"] = snapshot[0]
    if snapshot is not None and not entry["revision"] and (not hub_id or hub_id == snapshot[0]):
        entry["revision"] = snapshot[1]
    model_dir = Path(str(path)).expanduser()
    if not model_dir.is_dir() and not local:        # a Hub id: its snapshot, if the cache has it
        model_dir = hub_cache_dir(name, revision)
    license_info = read_license(model_dir)
    if license_info:
        entry.update(license_info)
    return entry


def base_model_hub_id(entry: dict[str, Any]) -> str | None:
    """The Hub id recorded for, or recoverable from, a `base_model` / `finetuned` entry: `hub_id`, else a
    Hub cache snapshot folder in `path` or `id` (sidecars written before `hub_id` existed). None
    otherwise (then `id` itself may be a Hub id: the card decides)."""
    from llmprune.io.identity import hub_snapshot_id

    if not isinstance(entry, dict):
        return None
    if isinstance(entry.get("hub_id"), str) and entry["hub_id"]:
        return entry["hub_id"]
    for key in ("path", "id"):
        value = entry.get(key)
        if isinstance(value, str) and "models--" in value:
            snapshot = hub_snapshot_id(value)
            if snapshot is not None:
                return snapshot[0]
    return None


def compress_sidecar(report, base_model: dict[str, Any], **extra) -> dict[str, Any]:
    """The sidecar of a compress run, from its `CompressReport`."""
    from llmprune.report import target_sparsity

    modules = {name: {"shape": list(r.shape), "target": r.target, "achieved": round(r.achieved, 6)}
               for name, r in report.final_modules.items()}
    pruned = {n: r for n, r in report.final_modules.items() if r.target is not None}
    nm = {r.target for r in pruned.values() if isinstance(r.target, str)}
    if not pruned:
        pattern = None
    elif nm and len(nm) == 1 and len(pruned) == sum(isinstance(r.target, str) for r in pruned.values()):
        pattern = nm.pop()
    elif not nm:
        pattern = "unstructured"
    else:
        pattern = "mixed"
    numel = sum(r.shape[0] * r.shape[1] for r in pruned.values())
    mean_target = (sum(target_sparsity(r.target) * r.shape[0] * r.shape[1] for r in pruned.values()) / numel
                   if numel else None)
    allocations = [r.params.get("allocation") for r in report.stages if r.kind == "prune"]
    return {
        "kind": "compress",
        "base_model": base_model,
        "recipe": report.recipe.to_dict(),
        "calibration": report.calibration,
        "stages": [r.to_dict() for r in report.stages],
        "parameters": {"before": report.parameters_before, "after": report.parameters_after},
        "sparsity": {
            "target": round(mean_target, 6) if mean_target is not None else None,
            "pattern": pattern,
            "allocation": allocations[-1] if len(set(allocations)) == 1 else ("mixed" if allocations else None),
            "achieved": round(report.sparsity, 6),
            "layers": report.layer_sparsity or None,
            "modules": modules,
        },
        "wall_time_s": round(report.wall_time_s, 3),
        "peak_memory": report.peak_memory,
        "device": report.device,
        "notes": report.notes,
        **extra,
    }


# ---- reading -------------------------------------------------------------------------------------

def read_sidecar(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / SIDECAR_NAME
    if not path.is_file():
        raise UserError(f"{directory} is not an llmprune output (no {SIDECAR_NAME}); run `llmprune compress` or "
                        f"`llmprune delta` first")
    from llmprune.io.files import read_json

    return read_json(path, SIDECAR_NAME, "it was edited or damaged; rewrite it or rerun the command that made it")


def stages(sidecar: dict[str, Any]) -> list[dict[str, Any]]:
    """The stage records, oldest first (format-1 files: one synthesized prune record)."""
    if isinstance(sidecar.get("stages"), list):
        return [s for s in sidecar["stages"] if isinstance(s, dict)]
    recipe_stages = ((sidecar.get("recipe") or {}).get("stages") or []) if isinstance(sidecar.get("recipe"), dict) else []
    sparsity = sidecar.get("sparsity") if isinstance(sidecar.get("sparsity"), dict) else None
    if sidecar.get("kind") != "compress" or not sparsity:
        return []
    method = recipe_stages[-1].get("method") if recipe_stages and isinstance(recipe_stages[-1], dict) else None
    return [{"index": 0, "method": method, "kind": "prune", "params": recipe_stages[-1] if recipe_stages else {},
             "target": sparsity.get("pattern") if ":" in str(sparsity.get("pattern")) else sparsity.get("target"),
             "achieved": sparsity.get("achieved"), "modules": sparsity.get("modules") or {}}]


def stage_label(record: dict[str, Any]) -> str:
    """Short text of one stage: `wanda 2:4 (self_attn)`, `width mlp 0.8`, `layer-drop 2 (bi)`."""
    method = str(record.get("method") or "?")
    params = record.get("params") if isinstance(record.get("params"), dict) else {}
    kind = record.get("kind")
    if kind == "prune" or "sparsity" in params:
        target = params.get("sparsity", record.get("target"))
        text = f"{method} {target}"
        if params.get("allocation") not in (None, "uniform"):
            text += f" {params['allocation']}"
        if params.get("targets"):
            text += f" ({params['targets']})"
        return text
    if kind == "width":
        parts = [f"{k.split('_')[0]} {params[k]}" for k in ("mlp_keep", "heads_keep") if params.get(k)]
        return f"width {' '.join(parts)}".strip()
    if kind == "layer-drop":
        removed = (record.get("removed") or {}).get("layers")
        n = len(removed) if isinstance(removed, list) else params.get("num_layers") or params.get("layer_fraction")
        return f"layer-drop {n} ({params.get('criterion', 'bi')})"
    if kind == "expert-drop":
        criterion = params.get("criterion")
        if criterion == "merge" and params.get("merge_mode"):
            criterion = f"merge {params['merge_mode']}"
        return f"expert-drop {params.get('experts_keep') or params.get('expert_ratio')} ({criterion})"
    if kind == "heal":
        return f"heal {params.get('mode')} {params.get('steps')} steps"
    return method


def describe(sidecar: dict[str, Any]) -> str | None:
    """The whole recipe in one line, stage by stage: `layer-drop 2 (bi) → width mlp 0.8 → wanda 2:4`."""
    records = stages(sidecar)
    return " → ".join(stage_label(r) for r in records) if records else None


def parameters(sidecar: dict[str, Any]) -> dict[str, int] | None:
    """{before, after} parameter counts when the run recorded them (structured stages change them)."""
    value = sidecar.get("parameters")
    if isinstance(value, dict) and isinstance(value.get("before"), int) and isinstance(value.get("after"), int):
        return value
    return None


def is_structured(sidecar: dict[str, Any]) -> bool:
    value = parameters(sidecar)
    return bool(value) and value["after"] != value["before"]


def removed_fraction(sidecar: dict[str, Any]) -> float | None:
    """Fraction of the base model's parameters that are gone or zero after all stages (structured
    removal and zeros together), or None when the sidecar does not say."""
    counts = parameters(sidecar)
    records = stages(sidecar)
    if not counts or not records:
        return None
    zeros = (records[-1].get("zeros") or {}).get("after")
    if not isinstance(zeros, int):
        return None
    return round(1 - (counts["after"] - zeros) / counts["before"], 6)


def eval_summary(directory: str | os.PathLike) -> dict[str, Any]:
    """What `llmprune eval` records about how an llmprune output was made (empty for other models)."""
    if not (Path(directory) / SIDECAR_NAME).is_file():
        return {}
    sidecar = read_sidecar(directory)
    sparsity = sidecar.get("sparsity") if isinstance(sidecar.get("sparsity"), dict) else {}
    records = stages(sidecar)
    structured = is_structured(sidecar)
    single_prune = len(records) == 1 and records[0].get("kind") == "prune"
    params = records[-1].get("params") if single_prune and isinstance(records[-1].get("params"), dict) else {}
    out = {"target": sparsity.get("target"), "pattern": sparsity.get("pattern"),
           "method": records[-1].get("method") if single_prune else describe(sidecar),
           "recipe": describe(sidecar), "source": str(Path(directory) / SIDECAR_NAME),
           "allocation": params.get("allocation") or sparsity.get("allocation"),
           "targets": params.get("targets"), "ignore": params.get("ignore")}
    if structured:
        out["parameters"] = parameters(sidecar)
        out["removed"] = removed_fraction(sidecar)
    return out
