"""Load a model and tokenizer from a Hub id, a local `save_pretrained` dir, or the embedded default.

All failure modes a user can cause (missing path, not a model dir, offline Hub, remote code not
allowed, a damaged or mismatched weight file, missing tokenizer files) become one-line `UserError`s.
Messages name no CLI flags: the same functions serve `llmprune.load_model` in Python.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from llmprune.errors import UserError

# A small Llama trained on Python stdlib sources, shipped inside the package so that the
# tool works with no network at all (README quick start, CI smoke runs).
EMBEDDED_MODELS = {"llmprune-tiny": Path(__file__).resolve().parent.parent / "assets" / "tiny-llama"}

# Files from which transformers can build a tokenizer (tokenizer_config.json alone is not enough).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt",
                   "tiktoken.model", "sentencepiece.bpe.model")

DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_model_path(name: str, revision: str | None = None) -> str:
    """Map an embedded name to its directory, check local paths; Hub ids pass through.

    A Hub id is only accepted when the Hub is reachable or the model is in the Hub cache (then the
    process switches to offline mode, so nothing waits on network retries).
    """
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
    from llmprune.io.network import hub_or_cache, why_offline

    if not hub_or_cache() and not _in_hub_cache(name, revision):
        raise UserError(f"{name} is not a local directory (no such path here), and {why_offline()} to fetch it "
                        "as a Hub id (it is not in the Hub cache either); check the path, or run where the Hub "
                        "is reachable")
    return name  # a Hub id


def _in_hub_cache(repo_id: str, revision: str | None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)
    except Exception:  # an invalid repo id, an unreadable cache: not cached
        return False


def model_input_path(name: str) -> str:
    """The local folder behind MODEL when there is one (embedded name mapped), else `name` itself;
    for the 'output must not overwrite an input' check."""
    return str(EMBEDDED_MODELS.get(name, name))


def is_local_model(name: str) -> bool:
    """True for a local directory or the embedded model (not a Hub id)."""
    return name in EMBEDDED_MODELS or Path(name).expanduser().is_dir()


def _spell(option: str, value: str) -> str:
    """How the user wrote a setting: `--dtype int8` on the command line, `dtype='int8'` in Python."""
    return f"{option} {value}" if option.startswith("--") else f"{option}={value!r}"


def torch_dtype(name: str, option: str = "dtype"):
    """`option` is how the caller spells the setting in messages (the CLI passes "--dtype")."""
    import torch

    if name == "auto":
        return "auto"
    if name not in DTYPES:
        raise UserError(f"unknown {_spell(option, name)}; choose one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (else bf16 work is upcast to fp32)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_device(name: str, option: str = "device") -> str:
    """`option` is how the caller spells the setting in messages (the CLI passes "--device")."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{_spell(option, name)} was given but no CUDA GPU is visible; use {_spell(option, 'cpu')}")
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"unknown {_spell(option, name)}; choose cpu, cuda, cuda:N or auto")
    return name


def _hub_error(name: str, exc: Exception) -> UserError:
    text = f"{type(exc).__name__}: {exc}"
    if "trust_remote_code" in text:
        return UserError(f"{name} needs custom code from its repository; allow remote code "
                         "(trust-remote-code) only if you trust it")
    if "does not appear to have a file named" in text or "no file named" in text.lower():
        return UserError(f"{name} has no loadable weights/tokenizer files ({str(exc).splitlines()[0]})")
    if any(k in text for k in ("offline", "Connection", "resolve", "Max retries", "couldn't connect",
                               "Cannot find the requested files", "LocalEntryNotFound")):
        from llmprune.io.network import why_offline

        return UserError(f"could not fetch {name} from the Hugging Face Hub ({why_offline()}, or files are missing "
                         "from the Hub cache); give a local directory or connect to the network")
    if "is not a valid model identifier" in text or "Repository Not Found" in text or "404" in text:
        return UserError(f"{name} is neither a local directory nor a model on the Hugging Face Hub")
    return UserError(f"could not load {name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")


def load_config(name: str, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoConfig

    from llmprune.io.checkpoint import PACKED_MODEL_TYPE, refuse_packed

    path = resolve_model_path(name, revision)
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


def has_tokenizer_files(path: str | os.PathLike) -> bool:
    return any((Path(path) / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(name: str, trust_remote_code: bool = False, revision: str | None = None, required: bool = True):
    """The tokenizer of `name`. With `required=False`, None when a local folder has no tokenizer files."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name, revision)
    if Path(path).is_dir() and not has_tokenizer_files(path):
        if not required:
            return None
        raise UserError(f"{name} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); copy them from "
                        "the model it was made from into that folder")
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as exc:
        if "instantiate the backend tokenizer" in str(exc):
            if not required:
                return None
            raise UserError(f"{name}: transformers cannot build a tokenizer from its files (no tokenizer.json, and "
                            "the slow tokenizer needs sentencepiece or tiktoken); copy tokenizer.json from the "
                            "model it was made from, or pip install sentencepiece") from None
        error = _hub_error(name, exc)
        if not required and "no loadable" in str(error):
            return None
        raise error from None


def check_local_weights(path: str, config, trust_remote_code: bool = False) -> None:
    """Before loading: every safetensors file readable, every stored tensor of the config's shape."""
    from llmprune.io.errors import check_safetensors, check_weight_shapes, local_weight_files

    files = local_weight_files(path)
    if not files:
        return
    check_safetensors(files)
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # an unusual config: leave the shape check to transformers
        return
    check_weight_shapes(path, skeleton)


def load_model(name: str, dtype: str = "auto", trust_remote_code: bool = False, revision: str | None = None):
    """Load a causal LM on CPU (the engine moves one layer at a time to the compute device)."""
    from transformers import AutoModelForCausalLM

    from llmprune.io.checkpoint import refuse_packed
    from llmprune.io.errors import explain

    path = resolve_model_path(name, revision)
    refuse_packed(path, name)
    local = Path(path).is_dir()
    if local:                                 # a damaged shard or a mismatched tensor: one line naming it
        check_local_weights(path, load_config(name, trust_remote_code, revision), trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code, revision=revision,
            low_cpu_mem_usage=True,
        )
    except UserError:
        raise
    except (OSError, ValueError) as exc:
        known = explain(exc, path if local else None)
        raise (known or _hub_error(name, exc)) from None
    except Exception as exc:
        known = explain(exc, path if local else None)
        if known is None:
            raise
        raise known from None
    model.eval()
    return model


def load(name_or_path: str, *, dtype: str = "auto", device: str = "cpu", revision: str | None = None,
         trust_remote_code: bool = False):
    """`(model, tokenizer)` from a local `save_pretrained` folder, a Hub id or the embedded `llmprune-tiny`.

    Public as `llmprune.load_model`. The tokenizer is None when a local folder has none.
    """
    device = resolve_device(device)
    torch_dtype(dtype)
    tokenizer = load_tokenizer(name_or_path, trust_remote_code, revision, required=False)
    model = load_model(name_or_path, dtype, trust_remote_code, revision)
    return model.to(device), tokenizer


_SNAPSHOT = re.compile(r"[0-9a-f]{40}")


def snapshot_revision(directory: str | os.PathLike | None) -> str | None:
    """The Hub commit of a cache snapshot folder (.../snapshots/<sha>), None for a plain local folder."""
    if not directory:
        return None
    parts = Path(directory).expanduser().resolve().parts
    if len(parts) >= 2 and parts[-2] == "snapshots" and _SNAPSHOT.fullmatch(parts[-1]):
        return parts[-1]
    return None


def model_revision(model) -> str | None:
    """The Hub commit the weights came from: what transformers recorded, else the cache snapshot folder."""
    config = getattr(model, "config", None)
    return getattr(config, "_commit_hash", None) or snapshot_revision(getattr(config, "_name_or_path", None))
