"""The card's sections built from `llmprune.json`: stages, sparsity, delta, packed format, calibration
data, the recipe as run, and how to reproduce the run."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from llmprune.io import sidecar as sidecar_io
from llmprune.io.card.format import is_num, module_type, num, numel, pct, size, table
from llmprune.io.card.metadata import kind, patterns
from llmprune.io.card.models import model_link
from llmprune.io.save import RECIPE_NAME


def recipe_section(directory: Path, sidecar: dict[str, Any]) -> str | None:
    recipe = sidecar.get("recipe")
    if recipe is not None:
        text = recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False).rstrip()
    elif (directory / RECIPE_NAME).is_file():
        text = (directory / RECIPE_NAME).read_text().rstrip()
    else:
        return None
    return "## Recipe as run\n\n```yaml\n" + text + "\n```"


def stages_section(sidecar: dict[str, Any]) -> str | None:
    """One row per recipe stage: what it removed, parameters before -> after, zeros after, time."""
    records = sidecar_io.stages(sidecar)
    if sidecar.get("kind") not in ("compress", "pack") or not records or not sidecar_io.parameters(sidecar):
        return None
    rows = []
    for r in records:
        params = r.get("parameters") or {}
        zeros = r.get("zeros") or {}
        removed = r.get("removed") or {}
        what = []
        if isinstance(removed.get("layers"), list):
            what.append(f"decoder layers {', '.join(map(str, removed['layers']))}")
        for key, value in removed.items():
            if isinstance(value, dict) and "before" in value:
                what.append(f"{key.replace('_', ' ')} {value['before']} → {value['after']} per layer")
        if r.get("modules"):
            what.append(f"zeros: {r.get('target')} on {len(r['modules'])} matrices")
        rows.append([r.get("index"), f"`{sidecar_io.stage_label(r)}`", "; ".join(what) or "—",
                     f"{params.get('before', 0):,} → {params.get('after', 0):,}" if params else "n/a",
                     pct(zeros.get("fraction_after")) if is_num(zeros.get("fraction_after")) else "n/a",
                     f"{float(r['seconds']):.1f}" if is_num(r.get("seconds")) else "n/a"])
    return "\n".join(["## Stages", "", "The recipe's stages in the order they ran (from `stages` in `llmprune.json`); "
                      "zeros are counted over the decoder layers' linear weights; time is each stage's own "
                      "compute, without loading and saving.", "",
                      table(["stage", "method", "removed", "parameters", "zeros after", "time (s)"], rows)])


def _source_name(value: Any) -> Any:
    if isinstance(value, str) and (value.startswith(("/", "~")) or os.sep in value):
        return f"{Path(value).name} (a local file)"
    return value


def heal_section(sidecar: dict[str, Any]) -> str | None:
    """The recovery runs (`heal` stages, recipe or `llmprune heal`): what was trained, on what, and the
    held-out loss before and after."""
    import math

    records = [r for r in sidecar_io.stages(sidecar) if r.get("kind") == "heal" and is_num(r.get("loss_before"))
               and is_num(r.get("loss_after"))]
    if not records:
        return None
    trained = {"perp": "norms and biases (PERP)", "lora": "masked LoRA, merged through the mask",
               "all": "all weights, pruned ones held at zero"}
    rows = []
    for r in records:
        data = r.get("data") if isinstance(r.get("data"), dict) else {}
        what = trained.get(str(r.get("train") or r.get("mode")), str(r.get("train")))
        if r.get("mode") == "distill":
            distill = r.get("distill") or {}
            how = "on its own responses" if distill.get("self_generated") else "KL on text"
            what = f"distilled from the unpruned model ({how}); trained: {what}"
        if r.get("rank"):
            what += f", rank {r['rank']}"
        text = "n/a"
        if data:
            text = f"{_source_name(data.get('source'))}, {data.get('windows')} × {data.get('seqlen')} tokens"
        if data.get("disjoint_from_calibration"):
            text += ", disjoint from the calibration windows"
        loss = f"{float(r['loss_before']):.4f} → {float(r['loss_after']):.4f}"
        ppl = f"{math.exp(float(r['loss_before'])):.2f} → {math.exp(float(r['loss_after'])):.2f}"
        params = (f"{int(r['trainable_parameters']):,} ({pct(r['trainable_parameters'] / r['total_parameters'], 3)})"
                  if is_num(r.get("trainable_parameters")) and is_num(r.get("total_parameters"))
                  and r["total_parameters"] else "n/a")
        seconds = r.get("train_seconds", r.get("seconds"))
        rows.append([r.get("index"), r.get("mode"), what, r.get("steps"), r.get("lr"), text, loss, ppl, params,
                     f"{float(seconds):.1f}" if is_num(seconds) else "n/a"])
    eval_windows = {r.get("eval_windows") for r in records}
    return "\n".join([
        "## Recovery (heal)", "",
        "Short training runs after pruning that keep every pruned weight at zero. The loss is the mean next-token "
        f"loss (nats) on {', '.join(str(w) for w in sorted(eval_windows, key=str))} held-out windows of the heal "
        "text, measured before and after each run.", "",
        table(["stage", "mode", "trained", "steps", "lr", "data", "held-out loss", "perplexity",
               "trainable parameters", "training time (s)"], rows)])


def sparsity_section(sidecar: dict[str, Any]) -> str | None:
    sparsity = sidecar.get("sparsity")
    found = patterns(sidecar)
    if not isinstance(sparsity, dict) or not found:
        return None
    out = ["## Sparsity: target vs achieved", ""]
    facts = []
    if is_num(sparsity.get("target")):
        facts.append(f"- target: {pct(sparsity['target'])}" + (" (mean over the pruned matrices)" if len(found) > 1 else ""))
    elif isinstance(sparsity.get("target"), str):
        facts.append(f"- target: `{sparsity['target']}`")
    facts.append(f"- pattern: `{found[0]}`" if len(found) == 1 else
                 "- patterns: " + ", ".join(f"`{p}`" for p in found) + " (one per stage; see Stages)")
    allocation = sparsity.get("allocation")
    if allocation is not None:
        facts.append(f"- layer allocation: `{allocation}`")
    if sparsity.get("achieved") is not None:
        facts.append(f"- achieved (pruned layers): {pct(sparsity['achieved']) if is_num(sparsity['achieved']) else sparsity['achieved']}")
    out += facts
    modules = sparsity.get("modules")
    if isinstance(modules, dict) and modules:
        groups: dict[str, list[dict]] = {}
        for name, info in modules.items():
            if isinstance(info, dict):
                groups.setdefault(module_type(name), []).append(info)
        rows = []
        for mtype, infos in groups.items():
            infos = [i for i in infos if i.get("target") is not None]     # pruned matrices only
            if not infos:
                continue
            sizes = [numel(i.get("shape")) for i in infos]
            weights = [s if s else 1 for s in sizes]
            params = sum(s for s in sizes if s) if all(sizes) else None

            def mean(key: str) -> Any:
                vals = [(i.get(key), w) for i, w in zip(infos, weights)]
                if not all(is_num(v) for v, _ in vals):
                    distinct = {str(v) for v, _ in vals}
                    return distinct.pop() if len(distinct) == 1 else "mixed"
                return sum(float(v) * w for v, w in vals) / sum(weights)

            achieved = [float(i["achieved"]) for i in infos if is_num(i.get("achieved"))]
            targets = [float(i["target"]) for i in infos if is_num(i.get("target"))]
            target = mean("target")
            target_text = pct(target) if is_num(target) else str(target)
            if targets and max(targets) - min(targets) > 1e-9:
                target_text += f" ({pct(min(targets))}–{pct(max(targets))})"
            rows.append([f"`{mtype}`", len(infos), f"{params:,}" if params else "n/a", target_text,
                         pct(mean("achieved")),
                         f"{pct(min(achieved))}–{pct(max(achieved))}" if achieved else "n/a"])
        out += ["", "Per module type (parameter-weighted over all layers; from `sparsity.modules` in "
                "`llmprune.json`):", "",
                table(["module", "count", "parameters", "target", "achieved", "achieved min–max"], rows)]
    return "\n".join(out) if len(out) > 2 else None


def _tensor_types(names: list[str], model_type: Any) -> str:
    """`embed_tokens` (input embedding), `lm_head` (output head), `norm`, ... for a list of tensors:
    the registry says which are embeddings and heads when the family is known."""
    from llmprune.io.tensor_names import family, role

    fam = family(model_type) if isinstance(model_type, str) else None
    labels = {"token_embedding": "input embedding", "embedding": "input embedding", "lm_head": "output head"}
    seen: dict[str, str | None] = {}
    for name in names:
        if isinstance(name, str):
            seen.setdefault(module_type(name), labels.get(role(name, fam)))
    ordered = sorted(seen.items(), key=lambda kv: (kv[1] is None, kv[0]))
    return ", ".join(f"`{t}` ({label})" if label else f"`{t}`" for t, label in ordered)


def _not_sparsified(sidecar: dict[str, Any], delta: dict[str, Any]) -> list[str]:
    """What happened to the tensors whose delta was not sparsified: copied from the fine-tune (one
    fine-tune) or merged densely with the same weights/consensus/λ (several)."""
    model_type = (sidecar.get("base_model") or {}).get("model_type")
    merge = kind(sidecar) == "delta-merge"
    method = delta.get("method") or "the merge method"
    out = []
    copied, merged = delta.get("copied"), delta.get("merged_dense")
    excluded = [n for n in delta.get("excluded") or [] if isinstance(n, str)]
    if isinstance(copied, list) or isinstance(merged, list):
        if merged:
            out.append(f"Merged without dropping any delta entry ({len(merged)} tensors; the same weights, "
                       f"`{method}` consensus and λ as the rest): {_tensor_types(merged, model_type)}")
        if copied:
            source = "the first fine-tune" if merge else "the fine-tune"
            out.append(f"Copied from {source} without sparsification ({len(copied)} tensors"
                       + ("; the base model has no value for them" if merge else "") + f"): "
                       f"{_tensor_types(copied, model_type)}")
    elif excluded:
        if merge:   # sidecars written before `copied` / `merged_dense` existed
            out.append(f"Not sparsified ({len(excluded)} tensors): merged densely with the same weights, `{method}` "
                       "consensus and λ, or copied from the first fine-tune where the base model has no such "
                       f"tensor: {_tensor_types(excluded, model_type)}")
        else:
            out.append(f"Copied from the fine-tune without sparsification ({len(excluded)} tensors): "
                       f"{_tensor_types(excluded, model_type)}")
    return out


def delta_section(sidecar: dict[str, Any]) -> str | None:
    delta = sidecar.get("delta")
    if not isinstance(delta, dict):
        return None
    out = ["## Delta sparsification", ""]
    for key in ("method", "drop_rate", "rescale", "q", "lambda", "seed", "achieved_density"):
        if delta.get(key) is not None:
            value = delta[key]
            out.append(f"- {key}: {pct(value) if key == 'achieved_density' and is_num(value) else f'`{value}`'}")
    q_search = delta.get("q_search")
    if isinstance(q_search, dict) and is_num(q_search.get("loss")):
        line = f"- rescale `q` chosen by search ({q_search.get('objective', 'DAREx-q')}): loss {num(q_search['loss'])}"
        if is_num(q_search.get("loss_at_inverse")):
            line += f" vs {num(q_search['loss_at_inverse'])} with DARE's 1/(1-p)"
        out.append(line)
    sparse = delta.get("sparse_delta")
    if isinstance(sparse, dict) and sparse.get("dir"):
        line = f"- the sparse delta alone is in `{sparse['dir']}/`"
        if is_num(sparse.get("bytes")) and is_num(sparse.get("finetuned_bytes")) and sparse["finetuned_bytes"]:
            line += (f": {size(sparse['bytes'])} against {size(sparse['finetuned_bytes'])} for the full "
                     f"fine-tune ({pct(sparse['bytes'] / sparse['finetuned_bytes'], 1)})")
        out.append(line + "; `llmprune delta apply BASE DELTA_DIR --output DIR` rebuilds these weights from it")
    fts = sidecar.get("finetuned") or []
    if fts:
        out += ["", table(["fine-tune", "revision", "weight"],
                          [[model_link({k: v for k, v in ft.items() if k != "revision"}, sidecar),
                            f"`{ft['revision']}`" if ft.get("revision") else "n/a",
                            f"{ft['weight']:g}" if is_num(ft.get("weight")) else "n/a"] for ft in fts])]
    notes = delta.get("notes")
    if isinstance(notes, list) and notes:
        out += ["", "Notes recorded during the run:", ""] + [f"- {n}" for n in notes if isinstance(n, str)]
    for line in _not_sparsified(sidecar, delta):
        out += ["", line]
    tensors = delta.get("tensors")
    if isinstance(tensors, dict) and tensors:
        groups: dict[str, list[tuple[float, int]]] = {}
        for name, info in tensors.items():
            if isinstance(info, dict) and is_num(info.get("density")):
                groups.setdefault(module_type(name), []).append((float(info["density"]),
                                                                numel(info.get("shape")) or 1))
        rows = [[f"`{m}`", len(v), pct(sum(d * n for d, n in v) / sum(n for _, n in v)),
                 f"{pct(min(d for d, _ in v))}–{pct(max(d for d, _ in v))}"] for m, v in groups.items()]
        if rows:
            out += ["", "Kept delta density per tensor type (parameter-weighted; from `delta.tensors`):", "",
                    table(["tensor", "count", "density", "min–max"], rows)]
    return "\n".join(out)


def pack_section(sidecar: dict[str, Any]) -> str | None:
    pack = sidecar.get("pack")
    if not isinstance(pack, dict):
        return None
    out = ["## Packed format", ""]
    if pack.get("format"):
        out.append(f"- format: `{pack['format']}`")
    modules = pack.get("modules")
    if isinstance(modules, (list, dict)):
        out.append(f"- packed modules: {len(modules)}")
    dense_linears = pack.get("dense_linears")
    if isinstance(dense_linears, dict) and dense_linears:
        reasons = sorted({str(v) for v in dense_linears.values()})
        out.append(f"- left dense: {len(dense_linears)} ({', '.join(reasons)})")
    dense, packed = pack.get("bytes_dense"), pack.get("bytes_packed")
    if is_num(dense) and is_num(packed) and dense:
        out.append(f"- bytes of the packed layers: {size(packed)} instead of {size(dense)} dense "
                   f"({pct(packed / dense, 1)})")
    return "\n".join(out) if len(out) > 2 else None


def calibration_section(sidecar: dict[str, Any]) -> str | None:
    calib = sidecar.get("calibration")
    if not isinstance(calib, dict) or not calib:
        return None
    rows = []
    for key in ("source", "split", "samples", "seqlen", "seed", "tokens"):
        if calib.get(key) is None:
            continue
        value = calib[key]
        if key == "source" and isinstance(value, str) and (value.startswith(("/", "~")) or os.sep in value):
            value = f"{Path(value).name} (a local file)"
        rows.append([key, f"{value:,}" if isinstance(value, int) and key in ("tokens",) else value])
    for key, value in calib.items():  # anything else the core recorded, verbatim
        if key not in ("source", "split", "samples", "seqlen", "seed", "tokens") and isinstance(value, (str, int, float)):
            rows.append([key, value])
    return "## Calibration data\n\n" + table(["", "value"], rows) if rows else None


def _wall_time_label(sidecar: dict[str, Any]) -> str:
    """Which run the recorded wall time covers: the command that wrote this directory, never an eval."""
    if sidecar.get("kind") == "pack":
        return "wall time of `llmprune pack` (packing only; the pruning run is not included)"
    if sidecar.get("kind") == "delta":
        what = "rebuild by `llmprune delta apply`" if sidecar.get("rebuilt_from") else "`llmprune delta` run"
        return f"wall time of the {what} (reading, sparsifying, writing)"
    if sidecar.get("unpacked_from"):
        return "wall time of `llmprune pack --unpack`"
    return "wall time of the `llmprune compress` run (loading, calibration, every stage, saving; evaluation not included)"


def provenance(sidecar: dict[str, Any]) -> str | None:
    out = []
    command = sidecar.get("command")
    packed_from = sidecar.get("packed_from") if isinstance(sidecar.get("packed_from"), dict) else {}
    first = packed_from.get("command")
    if isinstance(first, str) and first.strip() and isinstance(command, str) and command.strip():
        out += ["## Reproduce", "", "The exact commands that produced this directory (from `llmprune.json`): "
                "the pruned model, then its packing.", "", "```bash", first.strip(), command.strip(), "```"]
    elif isinstance(command, str) and command.strip():
        out += ["## Reproduce", "", "The exact command that produced this directory (from `llmprune.json`):", "",
                "```bash", command.strip(), "```"]
    notes = [n for n in sidecar.get("notes") or [] if isinstance(n, str)]
    if notes:
        out += ["", "## Notes recorded during the run", ""] + [f"- {n}" for n in notes]
    facts = []
    for key in ("dtype", "device"):
        if isinstance(sidecar.get(key), str):
            facts.append([key, f"`{sidecar[key]}`"])
    if is_num(sidecar.get("wall_time_s")):
        facts.append([_wall_time_label(sidecar), f"{float(sidecar['wall_time_s']):.1f} s"])
    peak = sidecar.get("peak_memory") or {}
    if isinstance(peak, dict):
        if is_num(peak.get("cpu_rss_bytes")):
            facts.append(["peak CPU memory (RSS)", size(peak["cpu_rss_bytes"])])
        if is_num(peak.get("cuda_bytes")) and peak["cuda_bytes"]:
            facts.append(["peak GPU memory", size(peak["cuda_bytes"])])
    versions = sidecar.get("versions") or {}
    if isinstance(versions, dict):
        facts += [[name, f"`{v}`"] for name, v in versions.items()]
    if sidecar.get("llmprune_version") and "llmprune" not in (versions or {}):
        facts.insert(0, ["llmprune", f"`{sidecar['llmprune_version']}`"])
    if facts:
        out += ["", "## Run and versions", "", table(["", ""], facts)]
    return "\n".join(out).strip() or None
