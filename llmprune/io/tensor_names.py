"""Which checkpoint tensors (or modules) are a model's embeddings and output head.

The architecture registry (`llmprune.arch`, per family: `embeddings`, `lm_head`) decides when the
family is known; the regexes below are only the fallback for families the registry does not have.
Used by delta pruning (what is excluded by default, which tensor a tied head reads), the 2:4 packer
(the head stays dense) and the model card (how a tensor is described).

Checkpoint names are module paths plus `.weight` / `.bias`; some checkpoints store them without the
base-model prefix (GPT-2's `wte.weight` for `transformer.wte`), so both spellings match. The plain
name `lm_head` is always a head too. Where transformers renames a module's tensors in saved checkpoints
(GPT-NeoX's module `lm_head` is saved as `embed_out`), the registry's `checkpoint_names` gives both.
"""
from __future__ import annotations

import re
from typing import Any

# Fallback for families the registry does not know.
EMBED_RE = re.compile(r"(embed_tokens|wte|word_embeddings|embed_in|tok_embeddings)\.weight$")
LM_HEAD_RE = re.compile(r"(^|\.)(lm_head|embed_out)\.weight$")
_FALLBACK_EMBEDDINGS = r"embed|(^|\.)(wte|wpe|word_embeddings|tok_embeddings)\."
_FALLBACK_HEAD = r"(^|\.)(lm_head|embed_out)\.|^output\.weight$"
CONVENTIONAL_HEAD = "lm_head"


def family(model_type_or_config: Any):
    """The registry entry of a model type (a string, a config or a model), or None when unknown."""
    from llmprune.arch import ARCHITECTURES

    config = getattr(model_type_or_config, "config", model_type_or_config)
    model_type = config if isinstance(config, str) else getattr(config, "model_type", None)
    if model_type is None and isinstance(config, dict):
        model_type = config.get("model_type")
    return ARCHITECTURES.get(model_type) if isinstance(model_type, str) else None


def _spellings(path: str) -> tuple[str, ...]:
    """`transformer.wte` -> ("transformer.wte", "wte"): with and without the base-model prefix."""
    head, _, rest = path.partition(".")
    return (path, rest) if rest else (path,)


def _path_regex(path: str) -> str:
    head, _, rest = path.partition(".")
    body = f"(?:{re.escape(head)}\\.)?{re.escape(rest)}" if rest else re.escape(path)
    return f"^{body}\\.(weight|bias)$"


def _strip_param(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name[: -len(".bias")] if name.endswith(".bias") else name


def role(name: str, fam=None) -> str | None:
    """"token_embedding" (the input token table), "embedding" (other input tables: positions),
    "lm_head", or None, for a tensor or module name."""
    if fam is not None:
        module = _strip_param(name)
        if module == CONVENTIONAL_HEAD or any(module in _spellings(n) for n in fam.saved_names(fam.lm_head)):
            return "lm_head"
        for i, path in enumerate(fam.embeddings):
            if module in _spellings(path):
                return "token_embedding" if i == 0 else "embedding"
        return None
    weight = name if name.endswith((".weight", ".bias")) else name + ".weight"
    if LM_HEAD_RE.search(weight):
        return "lm_head"
    if EMBED_RE.search(weight):
        return "token_embedding"
    if re.search(_FALLBACK_EMBEDDINGS, weight):
        return "embedding"
    return None


def head_patterns(fam=None) -> list[str]:
    """Regexes of the embedding and output-head tensors: the family's exact names from the registry,
    else the generic fallback."""
    if fam is None:
        return [_FALLBACK_EMBEDDINGS, _FALLBACK_HEAD]
    heads = tuple(dict.fromkeys((*fam.saved_names(fam.lm_head), CONVENTIONAL_HEAD)))
    return [_path_regex(p) for p in (*fam.embeddings, *heads)]


def head_module_names(model) -> set[str]:
    """Full module names of the output head of `model`: the registry's for its family, `lm_head`, and any
    module that is the model's output embedding."""
    fam = family(model)
    names = {CONVENTIONAL_HEAD} | ({fam.lm_head} if fam is not None else set())
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    if out_emb is not None:
        names |= {n for n, m in model.named_modules() if m is out_emb}
    return names
