"""llmprune: post-training compression for LLMs that tells you what it cost.

Public API (imported lazily so `import llmprune` stays cheap):
    llmprune.compress(model, tokenizer, recipe, calib=...)  -> (model, report)
    llmprune.Recipe, llmprune.load_recipe(name_or_path)
    llmprune.load_pretrained(dir)                          -> model with packed 2:4 modules
    llmprune.load_model(name_or_path, *, dtype="auto", device="cpu", revision=None,
                        trust_remote_code=False)           -> (model, tokenizer); also "llmprune-tiny"
"""
from __future__ import annotations

__version__ = "0.1.0"

# Installed, `triton_kernels/`, `recipes/` and `evals/` live inside this package (setup.py maps them).
# Imported straight from a source checkout (e.g. `python -m llmprune` run in the repository root,
# which shadows the installed copy) they are the checkout's top-level folders: look there too.
_CHECKOUT_MAPPED = ("triton_kernels", "recipes", "evals")


def _add_checkout_root() -> None:
    from pathlib import Path

    here = Path(__file__).resolve().parent
    root = here.parent
    if not (here / "evals").is_dir() and all((root / name / "__init__.py").is_file() for name in _CHECKOUT_MAPPED):
        __path__.append(str(root))


_add_checkout_root()

_LAZY = {
    "compress": ("llmprune.api", "compress"),
    "Recipe": ("llmprune.recipe", "Recipe"),
    "Stage": ("llmprune.recipe", "Stage"),
    "load_recipe": ("llmprune.recipe", "load_recipe"),
    "load_pretrained": ("llmprune.kernels", "load_pretrained"),
    "load_model": ("llmprune.io.load", "load"),
    "UserError": ("llmprune.errors", "UserError"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'llmprune' has no attribute {name!r}")


__all__ = list(_LAZY) + ["__version__"]
