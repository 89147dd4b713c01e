"""Load a model and tokenizer from a Hub id, a local `save_pretrained` dir, or the embedded default.

All failure modes a user can cause (missing path, not a model dir, offline Hub, remote code
without --trust-remote-code) become one-line `UserError`s.
"""
from __future__ import annotations

import os
from pathlib import Path

from llmprune.errors import UserError

# A small Llama trained on Python stdlib sources, shipped inside the package so that the
# tool works with no network at all (README quick start, CI smoke runs).
EMBEDDED_MODELS = {"llmprune-tiny": Path(__file__).resolve().parent.parent / "assets" / "tiny-llama"}

DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_model_path(name: str) -> str:
    """Map an embedded name to its directory, check local paths; Hub ids pass through."""
    if name in EMBEDDED_MODELS:
        path = EMBEDDED_MODELS[name]
        if not (path / "config.json").is_file():
            raise UserError(f"embedded model {name} is missing from the installation ({path}); reinstall llmprune")
        return str(path)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"model path {name} is a file; give a `save_pretrained` directory or a Hub id")
        if not (path / "config.json").is_file():
            raise UserError(f"{name} has no config.json; give a `save_pretrained` directory or a Hub id")
        return str(path)
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep + os.sep in name
    if looks_local:
        raise UserError(f"model path {name} does not exist")
    return name  # a Hub id


def is_local_model(name: str) -> bool:
    """True for a local directory or the embedded model (not a Hub id)."""
    return name in EMBEDDED_MODELS or Path(name).expanduser().is_dir()


def torch_dtype(name: str):
    import torch

    if name == "auto":
        return "auto"
    if name not in DTYPES:
        raise UserError(f"unknown --dtype {name}; choose one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was given but no CUDA GPU is visible; use --device cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"unknown --device {name}; choose cpu, cuda, cuda:N or auto")
    return name


def _hub_error(name: str, exc: Exception) -> UserError:
    text = f"{type(exc).__name__}: {exc}"
    if "trust_remote_code" in text:
        return UserError(f"{name} needs custom code from its repository; pass --trust-remote-code if you trust it")
    if "does not appear to have a file named" in text or "no file named" in text.lower():
        return UserError(f"{name} has no loadable weights/tokenizer files ({str(exc).splitlines()[0]})")
    if any(k in text for k in ("offline", "Connection", "resolve", "Max retries", "couldn't connect",
                               "Cannot find the requested files", "LocalEntryNotFound")):
        return UserError(f"could not fetch {name} from the Hugging Face Hub (offline or not cached); "
                         "give a local directory or connect to the network")
    if "is not a valid model identifier" in text or "Repository Not Found" in text or "404" in text:
        return UserError(f"{name} is neither a local directory nor a model on the Hugging Face Hub")
    return UserError(f"could not load {name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")


def load_config(name: str, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoConfig

    from llmprune.io.checkpoint import PACKED_MODEL_TYPE, refuse_packed

    path = resolve_model_path(name)
    refuse_packed(path, name)                 # packed 2:4 weights: one line, not random linears
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    except UserError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        if PACKED_MODEL_TYPE in str(exc):     # a packed checkpoint on the Hub
            raise UserError(f"{name} is a packed 2:4 checkpoint; this command needs its dense source "
                            "(evaluate it with `llmprune eval`, or load it with llmprune.load_pretrained)") from None
        if isinstance(exc, (ValueError, KeyError)) and "model_type" in str(exc):
            raise UserError(f"{name}: transformers does not know this model type ({str(exc).splitlines()[0]})") from None
        raise _hub_error(name, exc) from None


def load_tokenizer(name: str, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as exc:
        raise _hub_error(name, exc) from None


def load_model(name: str, dtype: str = "auto", trust_remote_code: bool = False, revision: str | None = None):
    """Load a causal LM on CPU (the engine moves one layer at a time to the compute device)."""
    from transformers import AutoModelForCausalLM

    from llmprune.io.checkpoint import check_local_weights, refuse_packed

    path = resolve_model_path(name)
    refuse_packed(path, name)
    check_local_weights(path)                 # a truncated/corrupt shard: one line naming the file
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code, revision=revision,
            low_cpu_mem_usage=True,
        )
    except UserError:
        raise
    except (OSError, ValueError) as exc:
        raise _hub_error(name, exc) from None
    model.eval()
    return model


def model_revision(model) -> str | None:
    """The Hub commit the weights came from, when transformers recorded it."""
    return getattr(model.config, "_commit_hash", None)
