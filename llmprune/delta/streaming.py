"""Delta-specific helpers around the one safetensors IO layer (`llmprune.io.checkpoint`).

Reading (`CheckpointReader`) and writing (`ShardWriter`) live in `llmprune.io.checkpoint`; the
delta pipeline writes the output model with a planned writer (the output has exactly the
fine-tune's layout, known up front) and the sparse delta with an unplanned one (patch sizes are
only known when a tensor is done). This module keeps what only delta needs: copying a fine-tune's
config/tokenizer files, finding a model's local directory, and exact bit comparisons.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

# Files copied from the fine-tune next to the weights (config, generation config, tokenizer).
MODEL_FILE_PATTERNS = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "*.model", "vocab.json", "vocab.txt",
    "merges.txt", "chat_template.json", "chat_template.jinja", "*.tiktoken", "preprocessor_config.json",
)


def tensor_bytes(tensor) -> memoryview:
    """The raw little-endian bytes of a tensor as stored (no -0.0 normalisation; one copy at most)."""
    import torch

    flat = tensor.detach().reshape(-1).contiguous()
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return memoryview(flat.view(torch.uint8).numpy())


def copy_model_files(source: Path, target: Path) -> list[str]:
    """Copy config, generation config and tokenizer files (never weights) from `source` to `target`.

    A config with `auto_map` needs its modeling code next to it, so then the `*.py` files come too.
    """
    copied = []
    patterns = list(MODEL_FILE_PATTERNS)
    try:
        if "auto_map" in json.loads((Path(source) / "config.json").read_text()):
            patterns.append("*.py")
    except (OSError, ValueError):
        pass
    for pattern in patterns:
        for path in sorted(Path(source).glob(pattern)):
            if path.is_file() and not (target / path.name).exists():
                shutil.copy2(path, target / path.name)
                copied.append(path.name)
    return copied


def local_model_dir(name: str) -> Path:
    """A local directory holding the safetensors of `name` (a local path, embedded name or Hub id)."""
    from llmprune.io.load import _hub_error, resolve_model_path

    path = resolve_model_path(name)
    if Path(path).is_dir():
        return Path(path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, allow_patterns=["*.safetensors", "*.json", "*.model", "*.txt",
                                                            "*.jinja", "*.tiktoken"]))
    except Exception as exc:  # network / cache / not-found errors come in many types
        raise _hub_error(name, exc) from None


def positive_zero(tensor):
    """`-0.0` -> `+0.0` (x + 0.0 leaves every other value, NaN included, unchanged).

    Sparse loaders may read the sign bit of -0.0 as "non-zero" (vLLM #13198); `save_model` does the
    same normalisation for `save_pretrained` outputs.
    """
    return tensor + 0.0 if tensor.is_floating_point() else tensor


def bit_view(tensor):
    """The tensor's bits as integers of the same width, for exact (sign- and NaN-aware) comparison."""
    import torch

    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    if tensor.dtype == torch.bool:
        return tensor.to(torch.uint8)
    return tensor.view(ints[tensor.element_size()])
