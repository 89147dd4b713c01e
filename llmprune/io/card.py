"""The model card (`README.md`) of an llmprune output directory.

Every number in the card is read from a file in the directory: `llmprune.json` (what was run and
what it achieved) and, when `llmprune eval --output DIR/eval` was run, `eval/results.json`.
A section without data is left out rather than filled with a placeholder.

Hub metadata: the Hub documents four values for `base_model_relation` (adapter, merge, quantized,
finetune). A pruned checkpoint is none of the first three, and "finetune" would claim training that
did not happen, so compress and pack outputs set `base_model` without a relation (the `pruned` tag
says what it is); a delta merge of several fine-tunes is a `merge` of the base and the fine-tunes.

A card that llmprune wrote carries `CARD_MARKER`; a README.md without it was written by hand and is
never overwritten silently (see `is_generated_card`).
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import yaml

from llmprune.errors import UserError
from llmprune.io import sidecar as sidecar_io
from llmprune.io.save import RECIPE_NAME, read_sidecar

CARD_NAME = "README.md"
MARKER_PREFIX = "<!-- llmprune-card:"  # stable: how a generated card is recognised
CARD_MARKER = (MARKER_PREFIX + " written by `llmprune card` / `llmprune push` from llmprune.json and "
               "eval/results.json; delete this line to keep manual edits from being replaced -->")
EVAL_RESULTS = Path("eval") / "results.json"
EVAL_REPORT_DIR = Path("eval") / "report"

# Hub `base_model_relation` values we emit, per output kind (None: leave the relation out).
RELATION = {"compress": None, "pack": None, "delta-merge": "merge", "delta-single": None}

_HUB_ID = re.compile(r"^[\w\-.]{1,96}/[\w\-.]{1,96}$")
# Eval suites (evals/*.yaml) that measure what perplexity hides.
_KNOWLEDGE_SUITES = ("knowledge", "reasoning", "reasoning_gen", "reasoning_mc")
# Recipe methods that change weights by training; if none is present the card says no retraining.
_TRAINING_METHODS = ("heal", "finetune", "fine-tune", "distill", "train", "lora")


# ----------------------------------------------------------------------------------------------
# reading the directory


def load_eval_results(directory: str | os.PathLike) -> dict[str, Any] | None:
    """`DIR/eval/results.json` as written by `llmprune eval --output DIR/eval`, or None."""
    path = Path(directory) / EVAL_RESULTS
    if not path.is_file():
        return None
    from llmprune.io.files import read_json

    return read_json(path, "eval results", "rerun `llmprune eval` or remove it")


def is_generated_card(path: str | os.PathLike) -> bool:
    """True when the README.md at `path` was written by llmprune (or does not exist)."""
    path = Path(path)
    if not path.exists():
        return True
    try:
        return MARKER_PREFIX in path.read_text(errors="replace")
    except OSError:
        return False


def write_card(directory: str | os.PathLike, text: str) -> Path:
    """Write README.md atomically (temp file in DIR, then rename), so a crash never leaves half a card
    and a README.md that is a symlink (a Hub cache snapshot) is replaced, never written through."""
    from llmprune.io.files import write_text_atomic

    directory = Path(directory)
    write_text_atomic(directory / CARD_NAME, text)
    return directory / CARD_NAME


# ----------------------------------------------------------------------------------------------
# formatting helpers


def _pct(x: Any, digits: int = 2) -> str:
    return f"{100 * float(x):.{digits}f}%" if _is_num(x) else str(x)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def _num(x: Any) -> str:
    if not _is_num(x):
        return "n/a" if x is None else str(x)
    x = float(x)
    if x == int(x) and abs(x) < 1e6:
        return str(int(x))
    if abs(x) >= 100:
        return f"{x:.1f}"
    if abs(x) >= 1:
        return f"{x:.3f}"
    return f"{x:.4f}"


def _bytes(n: Any) -> str:
    from llmprune.io.files import format_bytes

    return format_bytes(n) if _is_num(n) else str(n)


def _table(header: list[str], rows: list[list[str]]) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _numel(shape: Any) -> int | None:
    if isinstance(shape, (list, tuple)) and shape and all(isinstance(d, int) for d in shape):
        return math.prod(shape)
    return None


def _module_type(name: str) -> str:
    """`model.layers.3.self_attn.q_proj` -> `q_proj`; a trailing `.weight` is dropped first."""
    parts = [p for p in name.split(".") if p]
    if parts and parts[-1] in ("weight", "bias"):
        parts = parts[:-1]
    # Expert linears (`...experts.7.up_proj`) group with their type; the index is not the type.
    return parts[-1] if parts else name


def is_hub_model_id(model_id: Any) -> bool:
    """Whether `model_id` looks like a Hub repo `namespace/name` (not a local path, not the embedded
    `llmprune-tiny`). A local model recorded as a relative `dir/sub` path cannot be told apart from a
    Hub id offline, so the compression core should record local models by their absolute path."""
    if not isinstance(model_id, str) or not model_id:
        return False
    if model_id.startswith(("/", ".", "~")) or "\\" in model_id:
        return False
    if not _HUB_ID.fullmatch(model_id) or "--" in model_id or ".." in model_id:
        return False
    return True


def _hub_id(entry: dict[str, Any], sidecar: dict[str, Any]) -> str | None:
    """The Hub id of a model entry of the sidecar, or None when it is (or may be) a local directory."""
    model_id = entry.get("id")
    if entry.get("local") or not is_hub_model_id(model_id):   # compress records "local": true
        return None
    if Path(model_id).expanduser().exists():  # a relative local path seen from here
        return None
    packed_from = sidecar.get("packed_from")
    if isinstance(packed_from, dict) and sidecar.get("kind") == "pack" and packed_from.get("kind") is None:
        return None  # `pack` of a directory without llmprune.json records that directory as the base
    return model_id


def _model_link(model_id: Any, revision: Any = None) -> str:
    if is_hub_model_id(model_id) and not Path(model_id).expanduser().exists():
        text = f"[{model_id}](https://huggingface.co/{model_id})"
    elif isinstance(model_id, str) and (model_id.startswith(("/", "~", ".")) or os.sep in model_id.strip("/")):
        # A local path says nothing useful to a reader of a published card beyond its name.
        text = f"`{Path(model_id).name}` (a local model directory)"
    else:
        text = f"`{model_id}`"
    if isinstance(revision, str) and revision:
        text += f" at revision `{revision}`"
    return text


def _find_methods(obj: Any) -> list[str]:
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


def _tag(text: str) -> str:
    return re.sub(r"[^\w.\-]+", "-", str(text).strip().lower()).strip("-")


def _pipeline_tag(directory: Path) -> str | None:
    """text-generation when config.json declares a causal-LM architecture (the file backs the claim)."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    archs = config.get("architectures") or []
    if any(isinstance(a, str) and a.endswith("ForCausalLM") for a in archs):
        return "text-generation"
    return None


# ----------------------------------------------------------------------------------------------
# sections


def _kind(sidecar: dict[str, Any]) -> str:
    kind = sidecar.get("kind")
    if kind not in ("compress", "delta", "pack"):
        raise UserError(f"llmprune.json has kind {kind!r}; expected compress, delta or pack "
                        f"(is this an output of a newer llmprune?)")
    if kind == "delta":
        return "delta-merge" if len(sidecar.get("finetuned") or []) > 1 else "delta-single"
    if kind == "compress" and sidecar.get("save_format") == "sparse24":
        return "pack"  # `compress --save-format sparse24` writes the same packed checkpoint as `pack`
    return kind


def _pattern(sidecar: dict[str, Any]) -> str | None:
    sparsity = sidecar.get("sparsity") or {}
    for value in (sparsity.get("pattern"), sparsity.get("target")):
        if isinstance(value, str) and re.fullmatch(r"\d+:\d+", value.strip()):
            return value.strip()
    if isinstance(sparsity.get("pattern"), str):
        return sparsity["pattern"]
    return None


def front_matter(directory: Path, sidecar: dict[str, Any]) -> dict[str, Any]:
    kind = _kind(sidecar)
    base = sidecar.get("base_model") or {}
    meta: dict[str, Any] = {}
    base_ids: list[str] = []
    if _hub_id(base, sidecar):
        base_ids.append(base["id"])
    if kind.startswith("delta"):
        ft_ids = [ft["id"] for ft in sidecar.get("finetuned") or [] if _hub_id(ft, sidecar)]
        # One fine-tune: the output is that fine-tune with a sparsified delta, so it descends from it.
        base_ids = ft_ids if kind == "delta-single" else base_ids + ft_ids
    if base_ids:
        meta["base_model"] = base_ids[0] if len(base_ids) == 1 else base_ids
        if RELATION[kind] and len(base_ids) > 1:
            meta["base_model_relation"] = RELATION[kind]
    if kind != "pack":  # packed weights need llmprune.load_pretrained, not transformers
        meta["library_name"] = "transformers"
    pipeline = _pipeline_tag(directory)
    if pipeline:
        meta["pipeline_tag"] = pipeline

    tags = ["llmprune"]
    if kind in ("compress", "pack"):
        tags += ["pruned"] + (["sparse"] if _pattern(sidecar) or kind == "pack" else [])
        if sidecar_io.is_structured(sidecar):
            tags.append("structured-pruning")
        pattern = _pattern(sidecar)
        if pattern and ":" in pattern:
            # "2of4", not "2:4": the Hub reads `prefix:value` tags (license:, base_model:) specially.
            tags.append(f"{pattern.replace(':', 'of')}-sparse")
        elif pattern:
            tags.append(f"{_tag(pattern)}-sparsity")
        if (sidecar.get("sparsity") or {}).get("allocation") not in (None, "uniform"):
            tags.append(_tag(sidecar["sparsity"]["allocation"]))
        tags += [_tag(m) for m in _find_methods(sidecar.get("recipe"))]
        if kind == "pack":
            tags.append(_tag((sidecar.get("pack") or {}).get("format") or "packed"))
    else:
        tags.append("delta-sparsification")
        method = (sidecar.get("delta") or {}).get("method")
        if method:
            tags.append(_tag(method))
        if kind == "delta-merge":
            tags.append("merge")
    meta["tags"] = list(dict.fromkeys(t for t in tags if t))
    return meta


def _title_and_summary(directory: Path, sidecar: dict[str, Any], repo_id: str | None) -> str:
    kind = _kind(sidecar)
    base = sidecar.get("base_model") or {}
    name = repo_id.split("/")[-1] if repo_id else directory.resolve().name
    lines = [f"# {name}", ""]
    sparsity = sidecar.get("sparsity") or {}
    methods = _find_methods(sidecar.get("recipe"))
    method_text = " + ".join(methods) if methods else None
    if kind == "compress":
        parts = [f"A pruned version of {_model_link(base.get('id'), base.get('revision'))}, made with "
                 f"llmprune `compress`"]
        recipe_text = sidecar_io.describe(sidecar) or method_text
        if recipe_text:
            parts.append(f" ({recipe_text})")
        parts.append(".")
        counts = sidecar_io.parameters(sidecar)
        if counts and counts["after"] != counts["before"]:
            parts.append(f" It is a smaller plain checkpoint: {counts['after']:,} parameters, "
                         f"{_pct(1 - counts['after'] / counts['before'])} fewer than the base model's "
                         f"{counts['before']:,}.")
        if _is_num(sparsity.get("achieved")) and sparsity.get("pattern"):
            pattern = _pattern(sidecar)
            parts.append(f" {_pct(sparsity['achieved'])} of the weights of the pruned layers are zero"
                         + (f" ({pattern} pattern)" if pattern and ":" in pattern else "") + ".")
        lines.append("".join(parts))
    elif kind == "pack":
        pack = sidecar.get("pack") or {}
        writer = "`llmprune pack`" if sidecar.get("kind") == "pack" else "`llmprune compress --save-format sparse24`"
        lines.append(f"A packed {pack.get('format', 'sparse24')} checkpoint of a pruned "
                     f"{_model_link(base.get('id'), base.get('revision'))}, written by {writer}. "
                     "The pruned linear layers are stored as kept values plus a bitmask; load it with "
                     "`llmprune.load_pretrained` (transformers alone cannot read these weights).")
    else:
        fts = sidecar.get("finetuned") or []
        delta = sidecar.get("delta") or {}
        method = delta.get("method", "delta pruning")
        if kind == "delta-single":
            ft = fts[0] if fts else {}
            lines.append(f"{_model_link(ft.get('id'), ft.get('revision'))} with its fine-tuning delta "
                         f"(its difference from {_model_link(base.get('id'), base.get('revision'))}) "
                         f"sparsified by `{method}` in llmprune `delta`: the weights are the base model plus "
                         "the sparsified delta, stored as a normal dense checkpoint.")
        else:
            links = ", ".join(_model_link(ft.get("id"), ft.get("revision")) for ft in fts)
            lines.append(f"A merge of {len(fts)} fine-tunes of {_model_link(base.get('id'), base.get('revision'))} "
                         f"({links}): each fine-tuning delta was sparsified and the deltas were combined "
                         f"with `{method}` in llmprune `delta`, then added to the base model.")
        if _is_num(delta.get("achieved_density")):
            lines.append("")
            lines.append(f"Achieved delta density: {_pct(delta['achieved_density'])} of the delta entries "
                         f"were kept (drop rate {delta.get('drop_rate')}).")
    return "\n".join(lines)


def _usage(directory: Path, sidecar: dict[str, Any], repo_id: str | None) -> str:
    where = repo_id or directory.resolve().name
    if _kind(sidecar) == "pack":
        if repo_id:
            code = ("from huggingface_hub import snapshot_download\nimport llmprune\n\n"
                    f"path = snapshot_download({where!r})\nmodel = llmprune.load_pretrained(path)")
        else:
            code = f"import llmprune\n\nmodel = llmprune.load_pretrained({where!r})"
        return "## How to use\n\n```python\n" + code + "\n```\n\nThis needs `pip install llmprune` (with " \
               "`triton` and a CUDA GPU for the fast kernels)."
    has_tokenizer = any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                            "tokenizer.model"))
    code = "from transformers import AutoModelForCausalLM"
    code += ", AutoTokenizer\n\n" if has_tokenizer else "\n\n"
    code += f"model = AutoModelForCausalLM.from_pretrained({where!r})"
    if has_tokenizer:
        code += f"\ntokenizer = AutoTokenizer.from_pretrained({where!r})"
    return "## How to use\n\nA standard transformers checkpoint (safetensors):\n\n```python\n" + code + "\n```"


def _recipe_section(directory: Path, sidecar: dict[str, Any]) -> str | None:
    recipe = sidecar.get("recipe")
    if recipe is not None:
        text = recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False).rstrip()
    elif (directory / RECIPE_NAME).is_file():
        text = (directory / RECIPE_NAME).read_text().rstrip()
    else:
        return None
    return "## Recipe as run\n\n```yaml\n" + text + "\n```"


def _stages_section(sidecar: dict[str, Any]) -> str | None:
    """One row per recipe stage: what it removed, parameters before -> after, zeros after."""
    records = sidecar_io.stages(sidecar)
    if sidecar.get("kind") != "compress" or not records or not sidecar_io.parameters(sidecar):
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
                     _pct(zeros.get("fraction_after")) if _is_num(zeros.get("fraction_after")) else "n/a"])
    return "\n".join(["## Stages", "", "The recipe's stages in the order they ran (from `stages` in `llmprune.json`); "
                      "zeros are counted over the decoder layers' linear weights.", "",
                      _table(["stage", "method", "removed", "parameters", "zeros after"], rows)])


def _sparsity_section(sidecar: dict[str, Any]) -> str | None:
    sparsity = sidecar.get("sparsity")
    if not isinstance(sparsity, dict) or not sparsity.get("pattern"):
        return None
    out = ["## Sparsity: target vs achieved", ""]
    facts = []
    for key, label in (("target", "target"), ("pattern", "pattern"), ("allocation", "layer allocation"),
                       ("achieved", "achieved (pruned layers)")):
        if key in sparsity and sparsity[key] is not None:
            value = sparsity[key]
            facts.append(f"- {label}: {_pct(value) if _is_num(value) else f'`{value}`'}")
    out += facts
    modules = sparsity.get("modules")
    if isinstance(modules, dict) and modules:
        groups: dict[str, list[dict]] = {}
        for name, info in modules.items():
            if isinstance(info, dict):
                groups.setdefault(_module_type(name), []).append(info)
        rows = []
        for mtype, infos in groups.items():
            infos = [i for i in infos if i.get("target") is not None]     # pruned matrices only
            if not infos:
                continue
            sizes = [_numel(i.get("shape")) for i in infos]
            weights = [s if s else 1 for s in sizes]
            params = sum(s for s in sizes if s) if all(sizes) else None

            def mean(key: str) -> Any:
                vals = [(i.get(key), w) for i, w in zip(infos, weights)]
                if not all(_is_num(v) for v, _ in vals):
                    distinct = {str(v) for v, _ in vals}
                    return distinct.pop() if len(distinct) == 1 else "mixed"
                return sum(float(v) * w for v, w in vals) / sum(weights)

            achieved = [float(i["achieved"]) for i in infos if _is_num(i.get("achieved"))]
            targets = [float(i["target"]) for i in infos if _is_num(i.get("target"))]
            target = mean("target")
            target_text = _pct(target) if _is_num(target) else str(target)
            if targets and max(targets) - min(targets) > 1e-9:
                target_text += f" ({_pct(min(targets))}–{_pct(max(targets))})"
            rows.append([f"`{mtype}`", len(infos), f"{params:,}" if params else "n/a", target_text,
                         _pct(mean("achieved")),
                         f"{_pct(min(achieved))}–{_pct(max(achieved))}" if achieved else "n/a"])
        out += ["", "Per module type (parameter-weighted over all layers; from `sparsity.modules` in "
                "`llmprune.json`):", "",
                _table(["module", "count", "parameters", "target", "achieved", "achieved min–max"], rows)]
    return "\n".join(out) if len(out) > 2 else None


def _delta_section(sidecar: dict[str, Any]) -> str | None:
    delta = sidecar.get("delta")
    if not isinstance(delta, dict):
        return None
    out = ["## Delta sparsification", ""]
    for key in ("method", "drop_rate", "rescale", "q", "lambda", "seed", "achieved_density"):
        if delta.get(key) is not None:
            value = delta[key]
            out.append(f"- {key}: {_pct(value) if key == 'achieved_density' and _is_num(value) else f'`{value}`'}")
    q_search = delta.get("q_search")
    if isinstance(q_search, dict) and _is_num(q_search.get("loss")):
        line = f"- rescale `q` chosen by search ({q_search.get('objective', 'DAREx-q')}): loss {_num(q_search['loss'])}"
        if _is_num(q_search.get("loss_at_inverse")):
            line += f" vs {_num(q_search['loss_at_inverse'])} with DARE's 1/(1-p)"
        out.append(line)
    sparse = delta.get("sparse_delta")
    if isinstance(sparse, dict) and sparse.get("dir"):
        line = f"- the sparse delta alone is in `{sparse['dir']}/`"
        if _is_num(sparse.get("bytes")) and _is_num(sparse.get("finetuned_bytes")) and sparse["finetuned_bytes"]:
            line += (f": {_bytes(sparse['bytes'])} against {_bytes(sparse['finetuned_bytes'])} for the full "
                     f"fine-tune ({_pct(sparse['bytes'] / sparse['finetuned_bytes'], 1)})")
        out.append(line + "; `llmprune delta apply BASE DELTA_DIR --output DIR` rebuilds these weights from it")
    fts = sidecar.get("finetuned") or []
    if fts:
        out += ["", _table(["fine-tune", "revision", "weight"],
                           [[_model_link(ft.get("id")), f"`{ft['revision']}`" if ft.get("revision") else "n/a",
                             f"{ft['weight']:g}" if _is_num(ft.get("weight")) else "n/a"] for ft in fts])]
    notes = delta.get("notes")
    if isinstance(notes, list) and notes:
        out += ["", "Notes recorded during the run:", ""] + [f"- {n}" for n in notes if isinstance(n, str)]
    excluded = delta.get("excluded")
    if isinstance(excluded, list) and excluded:
        types = sorted({_module_type(n) for n in excluded if isinstance(n, str)})
        out += ["", f"Copied from the fine-tune without sparsification ({len(excluded)} tensors): "
                + ", ".join(f"`{t}`" for t in types)]
    tensors = delta.get("tensors")
    if isinstance(tensors, dict) and tensors:
        groups: dict[str, list[tuple[float, int]]] = {}
        for name, info in tensors.items():
            if isinstance(info, dict) and _is_num(info.get("density")):
                groups.setdefault(_module_type(name), []).append((float(info["density"]),
                                                                 _numel(info.get("shape")) or 1))
        rows = [[f"`{m}`", len(v), _pct(sum(d * n for d, n in v) / sum(n for _, n in v)),
                 f"{_pct(min(d for d, _ in v))}–{_pct(max(d for d, _ in v))}"] for m, v in groups.items()]
        if rows:
            out += ["", "Kept delta density per tensor type (parameter-weighted; from `delta.tensors`):", "",
                    _table(["tensor", "count", "density", "min–max"], rows)]
    return "\n".join(out)


def _pack_section(sidecar: dict[str, Any]) -> str | None:
    pack = sidecar.get("pack")
    if not isinstance(pack, dict):
        return None
    out = ["## Packed format", ""]
    if pack.get("format"):
        out.append(f"- format: `{pack['format']}`")
    modules = pack.get("modules")
    if isinstance(modules, (list, dict)):
        out.append(f"- packed modules: {len(modules)}")
    dense, packed = pack.get("bytes_dense"), pack.get("bytes_packed")
    if _is_num(dense) and _is_num(packed) and dense:
        out.append(f"- bytes of the packed layers: {_bytes(packed)} instead of {_bytes(dense)} dense "
                   f"({_pct(packed / dense, 1)})")
    return "\n".join(out) if len(out) > 2 else None


def _calibration_section(sidecar: dict[str, Any]) -> str | None:
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
    return "## Calibration data\n\n" + _table(["", "value"], rows) if rows else None


def _ret(x: Any) -> str:
    return f"{float(x):.1f}%" if _is_num(x) else "n/a"


def _achieved_sparsity(results: dict[str, Any]) -> Any:
    sparsity = results.get("sparsity")
    return sparsity.get("achieved") if isinstance(sparsity, dict) else sparsity


def _eval_section(results: dict[str, Any] | None) -> str | None:
    """Tables from `eval/results.json` as `llmprune eval` writes it (see llmprune/eval/harness.py):
    retained % and chance-adjusted retained % are the ones `--baseline` computed, not recomputed here."""
    if not results:
        return None
    baseline = results.get("baseline") if isinstance(results.get("baseline"), dict) else None
    b_tasks = (baseline or {}).get("tasks") or {}
    b_suites = (baseline or {}).get("suites") or {}
    b_ppl = (baseline or {}).get("perplexity") or {}
    out = ["## Evaluation", "", "Measured with `llmprune eval` (all numbers from `eval/results.json`)."]
    if baseline:
        who = f" (`{Path(str(baseline['model'])).name}`)" if baseline.get("model") else ""
        out[-1] += (f" *Dense* is the unpruned model{who} evaluated the same way; *retained* is this model's score "
                    "as a % of the dense score (dense/pruned for perplexity), *above chance* the same after "
                    "subtracting the chance level.")
    achieved = _achieved_sparsity(results)
    if _is_num(achieved):
        out += ["", f"Sparsity counted from the evaluated weights (exact zeros in the prunable linear layers): "
                    f"{_pct(achieved)}."]
    tables = 0

    ppl = results.get("perplexity")
    if isinstance(ppl, dict) and ppl:
        rows = []
        for dataset, value in ppl.items():
            info = b_ppl.get(dataset) if isinstance(b_ppl.get(dataset), dict) else {}
            dense = info.get("dense_value")
            if baseline:
                change = f"{100 * (value / dense - 1):+.1f}%" if _is_num(value) and _is_num(dense) and dense else "n/a"
                rows.append([dataset, _num(dense), _num(value), change])
            else:
                rows.append([dataset, _num(value)])
        header = ["dataset", "dense", "this model", "change"] if baseline else ["dataset", "perplexity"]
        out += ["", "Perplexity (lower is better):", "", _table(header, rows)]
        tables += 1

    suites = results.get("suites")
    if isinstance(suites, dict):
        rows = []
        for suite, info in suites.items():
            score = info.get("score") if isinstance(info, dict) else info
            if not _is_num(score):  # e.g. a perplexity-only suite: nothing to average
                continue
            if baseline:
                b = b_suites.get(suite) if isinstance(b_suites.get(suite), dict) else {}
                worst = f"{b['worst_task']} ({_ret(b.get('worst_retained'))})" if b.get("worst_task") else "n/a"
                rows.append([suite, _num(score), _ret(b.get("retained")), _ret(b.get("retained_adj")), worst])
            else:
                rows.append([suite, _num(score)])
        if rows:
            header = (["suite", "score", "retained", "above chance", "worst task (retained)"] if baseline
                      else ["suite", "score"])
            out += ["", "Suites (score: mean of the tasks' primary metrics):", "", _table(header, rows)]
            tables += 1

    tasks = results.get("tasks")
    if isinstance(tasks, dict):
        rows = []
        floors = False
        for task, info in tasks.items():
            if not isinstance(info, dict) or info.get("kind") == "perplexity":
                continue  # perplexities are in their own table
            value, stderr, chance = info.get("value"), info.get("stderr"), info.get("chance")
            shown = _num(value) + (f" ± {_num(stderr)}" if _is_num(stderr) else "")
            row = [task, info.get("suite", ""), info.get("metric", "")]
            if baseline:
                b = b_tasks.get(task) if isinstance(b_tasks.get(task), dict) else {}
                retained = _ret(b.get("retained"))
                ci = b.get("ci95")
                if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_is_num(c) for c in ci):
                    retained += f" [{ci[0]:.1f}, {ci[1]:.1f}]"
                adjusted = _ret(b.get("retained_adj"))
                if b.get("floor"):
                    adjusted, floors = "floor", True
                row += [_num(b.get("dense_value")), shown, retained, adjusted]
            else:
                row += [shown]
            row += [_num(chance) if _is_num(chance) else "", _num(info.get("n")) if info.get("n") is not None else ""]
            rows.append(row)
        if rows:
            header = ["task", "suite", "metric"]
            header += (["dense", "this model", "retained [95% CI]", "above chance"] if baseline else ["value"])
            header += ["chance", "n"]
            note = "Tasks (± is the standard error"
            note += "; the CI is a paired bootstrap over items" if baseline else ""
            note += "; *floor*: the dense model is within 5 points of chance, so the task cannot show a loss" \
                if floors else ""
            out += ["", note + "):", "", _table(header, rows)]
            tables += 1
    return "\n".join(out) if tables or _is_num(achieved) else None


def _report_links(directory: Path) -> str | None:
    report = directory / EVAL_REPORT_DIR
    if not report.is_dir():
        return None
    lines = []
    if (report / "report.md").is_file():
        lines.append(f"Full comparison report: [{EVAL_REPORT_DIR.as_posix()}/report.md]"
                     f"({EVAL_REPORT_DIR.as_posix()}/report.md).")
    for png in sorted(report.glob("*.png")):
        rel = png.relative_to(directory).as_posix()
        lines.append(f"![{png.stem}]({rel})")
    return "\n\n".join(lines) if lines else None


def _pruning_items(sidecar: dict[str, Any]) -> list[str]:
    items = []
    methods = [m.lower() for m in _find_methods(sidecar.get("recipe"))]
    if methods and not any(t in m for m in methods for t in _TRAINING_METHODS):
        items.append("One-shot post-training pruning: no weights were retrained to recover quality.")
    if sidecar.get("calibration") and not all(m == "magnitude" for m in methods):
        items.append("The pruning decisions depend on the calibration data listed above; text far from it "
                     "(other domains, languages, code) may lose more quality.")
    return items


def _limitations(directory: Path, sidecar: dict[str, Any], results: dict[str, Any] | None) -> str:
    kind = _kind(sidecar)
    items = []
    pattern = _pattern(sidecar)
    if kind == "compress":
        if pattern and pattern.strip() == "2:4":
            items.append("The 2:4 zeros are stored densely: this checkpoint has the size of the dense model and "
                         "runs at dense speed in transformers, vLLM (which removed its 2:4 kernels) and other "
                         "runtimes. A speed-up needs llmprune's kernels: `llmprune pack` then "
                         "`llmprune.load_pretrained`, on a CUDA GPU, mostly for small-batch decoding.")
        elif pattern and ":" in pattern:
            items.append(f"The {pattern} zeros are stored densely and no common runtime (nor llmprune, whose "
                         "kernels are 2:4 only) turns this pattern into a speed-up or a smaller file.")
        elif pattern:
            items.append("Unstructured sparsity gives no speed-up and no size reduction by itself: the zeros are "
                         "stored densely and transformers, vLLM and llama.cpp run it at dense speed.")
        if sidecar_io.is_structured(sidecar):
            items.append("Removed layers, heads or MLP neurons make the model smaller and faster on any runtime, "
                         "but the loss is not uniform: multi-step generative reasoning (arithmetic, code) and "
                         "closed-book knowledge degrade before perplexity does. A short recovery run "
                         "(`llmprune heal`) wins part of it back.")
        items += _pruning_items(sidecar)
    elif kind == "pack":
        items.append("Loading needs llmprune (`llmprune.load_pretrained`); `AutoModelForCausalLM.from_pretrained` "
                     "cannot read the packed weights, and other runtimes (vLLM, llama.cpp) do not support them.")
        items.append("The speed-up comes from llmprune's Triton kernels on CUDA GPUs and is largest for "
                     "small-batch decoding; large-batch prefill runs at about dense speed, and on CPU a "
                     "reference path is used.")
        items += _pruning_items(sidecar)
    else:
        items.append("The weights are dense: the checkpoint has the size of the base model and no speed-up; "
                     "only the delta was sparsified.")
        method = str((sidecar.get("delta") or {}).get("method") or "")
        if "dare" in method:
            items.append("Random delta dropping (DARE) degrades at very high drop rates or when the fine-tuning "
                         "delta is large; compare against the fine-tuned model(s) before relying on it.")
        else:
            items.append("Delta pruning degrades at very high drop rates; compare against the fine-tuned "
                         "model(s) before relying on it.")
    has_knowledge = bool(results) and any(
        isinstance(t, dict) and t.get("kind") != "perplexity" and t.get("value") is not None
        and str(t.get("suite", "")).lower().replace("-", "_") in _KNOWLEDGE_SUITES
        for t in (results.get("tasks") or {}).values())
    if not results:
        items.append("No evaluation results were published with this model; its quality relative to "
                     "the base model has not been measured here.")
    elif not has_knowledge:
        items.append("Perplexity and easy multiple-choice tasks hide much of the damage pruning does: "
                     "closed-book knowledge and multi-step reasoning degrade first, and this card has no "
                     "knowledge or reasoning evaluation.")
    else:
        items.append("Perplexity and easy multiple-choice tasks hide much of the damage pruning does; look at "
                     "the knowledge and reasoning rows above, not at perplexity alone.")
    if kind.startswith("delta"):
        items.append("The licenses, intended uses, biases and limitations of the base model and the fine-tunes "
                     "carry over unchanged.")
    else:
        items.append("The base model's license, intended use, biases and limitations carry over unchanged.")
    return "## Limitations\n\n" + "\n".join(f"- {i}" for i in items)


def _provenance(sidecar: dict[str, Any]) -> str | None:
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
    if _is_num(sidecar.get("wall_time_s")):
        facts.append(["wall time", f"{float(sidecar['wall_time_s']):.1f} s"])
    peak = sidecar.get("peak_memory") or {}
    if isinstance(peak, dict):
        if _is_num(peak.get("cpu_rss_bytes")):
            facts.append(["peak CPU memory (RSS)", _bytes(peak["cpu_rss_bytes"])])
        if _is_num(peak.get("cuda_bytes")) and peak["cuda_bytes"]:
            facts.append(["peak GPU memory", _bytes(peak["cuda_bytes"])])
    versions = sidecar.get("versions") or {}
    if isinstance(versions, dict):
        facts += [[name, f"`{v}`"] for name, v in versions.items()]
    if sidecar.get("llmprune_version") and "llmprune" not in (versions or {}):
        facts.insert(0, ["llmprune", f"`{sidecar['llmprune_version']}`"])
    if facts:
        out += ["", "## Run and versions", "", _table(["", ""], facts)]
    return "\n".join(out).strip() or None


# ----------------------------------------------------------------------------------------------
# the card


def render_card(directory: str | os.PathLike, repo_id: str | None = None) -> str:
    """The full README.md text for an llmprune output directory (raises UserError if it is not one)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory")
    sidecar = read_sidecar(directory)
    _kind(sidecar)  # validates the kind up front
    results = load_eval_results(directory)
    meta = front_matter(directory, sidecar)
    sections = [
        _title_and_summary(directory, sidecar, repo_id),
        _usage(directory, sidecar, repo_id),
        _stages_section(sidecar),
        _sparsity_section(sidecar),
        _delta_section(sidecar),
        _pack_section(sidecar),
        _calibration_section(sidecar),
        _recipe_section(directory, sidecar),
        _eval_section(results),
        _report_links(directory),
        _limitations(directory, sidecar, results),
        _provenance(sidecar),
    ]
    body = "\n\n".join(s for s in sections if s)
    head = "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"
    return f"{head}{CARD_MARKER}\n\n{body}\n"


def parse_front_matter(text: str) -> dict[str, Any]:
    """The YAML metadata block of a card (for tests and for checking a card before upload)."""
    if not text.startswith("---\n"):
        return {}
    end = text.find("\n---\n", 4)
    if end < 0:
        raise ValueError("unterminated YAML front matter")
    return yaml.safe_load(text[4:end]) or {}
