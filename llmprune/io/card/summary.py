"""The card's prose: title and summary, how to use the model, limitations."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from llmprune.io import sidecar as sidecar_io
from llmprune.io.card.format import is_num, pct
from llmprune.io.card.metadata import find_methods, kind, patterns
from llmprune.io.card.models import model_link

# Eval suites (evals/*.yaml) that measure what perplexity hides.
_KNOWLEDGE_SUITES = ("knowledge", "reasoning", "reasoning_gen", "reasoning_mc")
# Recipe methods that change weights by training; if none is present the card says no retraining.
_TRAINING_METHODS = ("heal", "finetune", "fine-tune", "distill", "train", "lora")


def _zeros_sentence(sidecar: dict[str, Any]) -> str | None:
    sparsity = sidecar.get("sparsity") or {}
    found = patterns(sidecar)
    if not is_num(sparsity.get("achieved")) or not found:
        return None
    if len(found) > 1:
        how = f" (stages left different patterns: {', '.join(found)}; see Stages)"
    else:
        how = f" ({found[0]} pattern)" if ":" in found[0] else ""
    return f" {pct(sparsity['achieved'])} of the weights of the pruned matrices are zero{how}."


def title_and_summary(directory: Path, sidecar: dict[str, Any], repo_id: str | None) -> str:
    out_kind = kind(sidecar)
    base = sidecar.get("base_model") or {}
    name = repo_id.split("/")[-1] if repo_id else directory.resolve().name
    lines = [f"# {name}", ""]
    methods = find_methods(sidecar.get("recipe"))
    recipe_text = sidecar_io.describe(sidecar) or (" + ".join(methods) if methods else None)
    if out_kind == "compress":
        parts = [f"A pruned version of {model_link(base, sidecar)}, made with llmprune `compress`"]
        if recipe_text:
            parts.append(f" ({recipe_text})")
        parts.append(".")
        counts = sidecar_io.parameters(sidecar)
        if counts and counts["after"] != counts["before"]:
            parts.append(f" It is a smaller plain checkpoint: {counts['after']:,} parameters, "
                         f"{pct(1 - counts['after'] / counts['before'])} fewer than the base model's "
                         f"{counts['before']:,}.")
        parts.append(_zeros_sentence(sidecar) or "")
        lines.append("".join(parts))
    elif out_kind == "pack":
        pack = sidecar.get("pack") or {}
        writer = "`llmprune pack`" if sidecar.get("kind") == "pack" else "`llmprune compress --save-format sparse24`"
        how = f" ({recipe_text})" if recipe_text else ""
        lines.append(f"A packed {pack.get('format', 'sparse24')} checkpoint of {model_link(base, sidecar)} pruned"
                     f"{how}, written by {writer}. The pruned linear layers are stored as kept values plus a "
                     "bitmask; load it with `llmprune.load_pretrained` (transformers alone cannot read these "
                     "weights).")
    else:
        fts = sidecar.get("finetuned") or []
        delta = sidecar.get("delta") or {}
        method = delta.get("method", "delta pruning")
        if out_kind == "delta-single":
            ft = fts[0] if fts else {}
            lines.append(f"{model_link(ft, sidecar)} with its fine-tuning delta (its difference from "
                         f"{model_link(base, sidecar)}) sparsified by `{method}` in llmprune `delta`: the weights "
                         "are the base model plus the sparsified delta, stored as a normal dense checkpoint.")
        else:
            links = ", ".join(model_link(ft, sidecar) for ft in fts)
            lines.append(f"A merge of {len(fts)} fine-tunes of {model_link(base, sidecar)} ({links}): each "
                         f"fine-tuning delta was sparsified and the deltas were combined with `{method}` in "
                         "llmprune `delta`, then added to the base model.")
        if is_num(delta.get("achieved_density")):
            lines.append("")
            lines.append(f"Achieved delta density: {pct(delta['achieved_density'])} of the delta entries "
                         f"were kept (drop rate {delta.get('drop_rate')}).")
    return "\n".join(lines)


def usage(directory: Path, sidecar: dict[str, Any], repo_id: str | None) -> str:
    where = repo_id or directory.resolve().name
    if kind(sidecar) == "pack":
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


def _pruning_items(sidecar: dict[str, Any]) -> list[str]:
    items = []
    methods = [m.lower() for m in find_methods(sidecar.get("recipe"))]
    if methods and not any(t in m for m in methods for t in _TRAINING_METHODS):
        items.append("One-shot post-training pruning: no weights were retrained to recover quality.")
    if sidecar.get("calibration") and not all(m == "magnitude" for m in methods):
        items.append("The pruning decisions depend on the calibration data listed above; text far from it "
                     "(other domains, languages, code) may lose more quality.")
    return items


def _zeros_items(sidecar: dict[str, Any]) -> list[str]:
    """What the stored zeros buy (nothing, mostly), per pattern the stages left."""
    items = []
    for found in patterns(sidecar):
        if found == "2:4":
            items.append("The 2:4 zeros are stored densely: this checkpoint has the size of the dense model and "
                         "runs at dense speed in transformers, vLLM (which removed its 2:4 kernels) and other "
                         "runtimes. A speed-up needs llmprune's kernels: `llmprune pack` then "
                         "`llmprune.load_pretrained`, on a CUDA GPU, mostly for small-batch decoding.")
        elif ":" in found:
            items.append(f"The {found} zeros are stored densely and no common runtime (nor llmprune, whose "
                         "kernels are 2:4 only) turns this pattern into a speed-up or a smaller file.")
        else:
            items.append("Unstructured sparsity gives no speed-up and no size reduction by itself: the zeros are "
                         "stored densely and transformers, vLLM and llama.cpp run it at dense speed.")
    if len(patterns(sidecar)) > 1 and "2:4" in patterns(sidecar):
        items.append("Only the matrices pruned 2:4 can be packed; the others stay dense in a packed checkpoint.")
    return items


def limitations(directory: Path, sidecar: dict[str, Any], results: dict[str, Any] | None) -> str:
    out_kind = kind(sidecar)
    items = []
    if out_kind == "compress":
        items += _zeros_items(sidecar)
        if sidecar_io.is_structured(sidecar):
            items.append("Removed layers, heads or MLP neurons make the model smaller and faster on any runtime "
                         "(removed MoE experts make it smaller; each token still runs top_k experts), "
                         "but the loss is not uniform: multi-step generative reasoning (arithmetic, code) and "
                         "closed-book knowledge degrade before perplexity does. A short recovery run "
                         "(`llmprune heal`) wins part of it back.")
        items += _pruning_items(sidecar)
    elif out_kind == "pack":
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
    if out_kind.startswith("delta"):
        items.append("The licenses, intended uses, biases and limitations of the base model and the fine-tunes "
                     "carry over unchanged.")
    else:
        items.append("The base model's license, intended use, biases and limitations carry over unchanged.")
    return "## Limitations\n\n" + "\n".join(f"- {i}" for i in items)

