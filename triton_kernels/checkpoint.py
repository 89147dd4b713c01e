"""Packed 2:4 checkpoints: `save_sparse24` writes one, `load_pretrained` reads it back.

On disk, a packed checkpoint is a normal HF model directory (config.json, tokenizer files,
safetensors shards + index) in which every packed linear `<name>` is stored under
compressed-tensors' `sparse-24-bitmask` tensor names instead of `<name>.weight`:

    <name>.compressed   [out, in/2]  kept values (weight dtype)
    <name>.bitmask      [out, in/8]  uint8, bit j of byte b <-> column 8b + j
    <name>.shape        [2]          int64 (out, in)
    <name>.bias         (unchanged, if any)

Nothing is written into config.json's quantization_config (see io/save.py for why); the packing
facts go into the `pack` section of llmprune.json, which the caller writes. `load_pretrained`
builds the model from its config with parameters on the meta device, swaps in SparseLinear24
modules, and assigns the stored tensors: the dense weights of packed linears never exist.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from llmprune.errors import UserError

from .format import check_packed, pack_24
from .module import DEFAULT_SKIP, SparseLinear24, candidate_linears

FORMAT = "sparse24"
SUFFIXES = (".compressed", ".bitmask", ".shape")
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)


def _plan_tensors(model: nn.Module, skip: tuple[str, ...]):
    """-> (entries, pack_info). entries: list of (name, nbytes, make) where make() returns the
    CPU tensors to write for that entry as {name: tensor}; nothing is materialised yet."""
    packed_modules: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    for name, linear, reason in candidate_linears(model, skip):
        if reason is None:
            packed_modules[name] = linear
        else:
            skipped[name] = reason
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear24):
            packed_modules[name] = module
    if not packed_modules:
        raise UserError("the model has no 2:4 sparse linear layers to pack (every group of 4 weights along "
                        "in_features needs at least two zeros); prune it with a 2:4 recipe first")

    entries = []
    bytes_dense = bytes_packed = 0
    for name, module in packed_modules.items():
        out_f, in_f = module.out_features, module.in_features
        if isinstance(module, SparseLinear24):
            esize = module.values.element_size()

            def make(module=module, name=name):
                return {f"{name}.compressed": module.values, f"{name}.bitmask": module.bitmask}
        else:
            esize = module.weight.element_size()

            def make(module=module, name=name):
                values, bitmask = pack_24(module.weight.detach())
                return {f"{name}.compressed": values, f"{name}.bitmask": bitmask}
        nbytes = out_f * in_f // 2 * esize + out_f * in_f // 8
        entries.append((f"{name}.compressed", nbytes, make))
        entries.append((f"{name}.shape", 16, lambda o=out_f, i=in_f, name=name: {
            f"{name}.shape": torch.tensor([o, i], dtype=torch.int64)}))
        bytes_dense += out_f * in_f * esize
        bytes_packed += nbytes

    skip_prefixes = {f"{name}.weight" for name in packed_modules}
    seen: dict[tuple, str] = {}
    for key, tensor in model.state_dict().items():
        if key in skip_prefixes or key.endswith((".values", ".bitmask")) and key.rsplit(".", 1)[0] in packed_modules:
            continue
        if tensor.is_meta:
            raise UserError(f"tensor {key} is not materialised (meta device); load the model fully before packing")
        skey = _storage_key(tensor)
        if skey in seen:  # tied weights (e.g. lm_head = embed_tokens): written once, re-tied at load
            continue
        seen[skey] = key
        entries.append((key, tensor.numel() * tensor.element_size(),
                        lambda key=key, tensor=tensor: {key: tensor}))
    info = {"format": FORMAT, "modules": sorted(packed_modules), "bytes_dense": bytes_dense,
            "bytes_packed": bytes_packed,
            "layout": "compressed-tensors sparse-24-bitmask tensors: <name>.compressed, .bitmask, .shape"}
    if skipped:
        info["dense_linears"] = skipped
    return entries, info


def _parse_size(size: str | int) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = size.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * factor)
    return int(s)


def save_sparse24(model: nn.Module, tokenizer, directory: str | os.PathLike,
                  max_shard_size: str | int = "5GB", skip: tuple[str, ...] = DEFAULT_SKIP) -> dict:
    """Write `model` as a packed 2:4 checkpoint into `directory` (which should be the temporary
    directory of `llmprune.io.save.output_dir`). Every nn.Linear whose weight is 2:4 along
    in_features (lm_head excluded) and every SparseLinear24 is stored packed; the rest as is.
    The model is not modified. Returns the `pack` section for llmprune.json."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    directory = Path(directory)
    entries, info = _plan_tensors(model, skip)
    limit = _parse_size(max_shard_size)
    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry[1] > limit:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry[1]
    names = ([SINGLE_NAME] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    total = 0
    with torch.no_grad():
        for shard, fname in zip(shards, tqdm(names, desc="writing packed shards", disable=len(names) == 1)):
            tensors = {}
            for _, _, make in shard:
                for key, t in make().items():
                    t = t.detach().to("cpu")
                    if t.is_floating_point():
                        t = t + 0  # a copy with -0.0 -> +0.0; the model itself is not touched
                    tensors[key] = t.contiguous()
            for key, t in tensors.items():
                weight_map[key] = fname
                total += t.numel() * t.element_size()
            save_file(tensors, str(directory / fname), metadata={"format": "pt", "llmprune": FORMAT})
            del tensors
    if len(shards) > 1:
        (directory / INDEX_NAME).write_text(json.dumps(
            {"metadata": {"total_size": total, "format": FORMAT}, "weight_map": weight_map}, indent=2) + "\n")
    model.config.save_pretrained(directory)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(directory)
        except Exception:  # an invalid generation config must not lose the weights; HF warns too
            pass
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return info


def _weight_files(directory: Path) -> list[Path]:
    index = directory / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / f for f in sorted(set(weight_map.values()))]
    return sorted(directory.glob("*.safetensors"))


def is_packed_checkpoint(directory: str | os.PathLike) -> bool:
    from safetensors import safe_open

    directory = Path(directory)
    for path in _weight_files(directory):
        with safe_open(str(path), framework="pt") as f:
            if any(k.endswith(".bitmask") for k in f.keys()):
                return True
    return False


def load_pretrained(directory: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, trust_remote_code: bool = False) -> nn.Module:
    """Rebuild a model saved by `save_sparse24` / `llmprune pack` with SparseLinear24 modules,
    without ever materialising the dense weights of packed linears. Returns the model in eval mode."""
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    path = Path(directory).expanduser()
    if not path.is_dir() or not (path / "config.json").is_file():
        raise UserError(f"{directory} is not a model directory (no config.json); give the output of `llmprune pack`")
    files = _weight_files(path)
    if not files:
        raise UserError(f"{directory} has no safetensors weights; give the output of `llmprune pack`")

    # Which linears are packed: every <name>.bitmask with its <name>.shape.
    shapes: dict[str, tuple[int, int]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key.endswith(".shape"):
                    shapes[key[: -len(".shape")]] = tuple(int(v) for v in f.get_tensor(key).tolist())
    if not shapes:
        raise UserError(f"{directory} is not a packed 2:4 checkpoint (no <name>.bitmask tensors); load it with "
                        "transformers' from_pretrained, or pack it with `llmprune pack DIR --output DIR2`")

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path / 'config.json'}: {str(exc).splitlines()[0]}") from None
    # Parameters on the meta device (no memory); buffers such as rotary inv_freq are computed.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)

    for name, (out_f, in_f) in shapes.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise UserError(f"{directory}: packed tensor {name} matches no module of {config.model_type}") from None
        if not isinstance(old, nn.Linear) or (old.out_features, old.in_features) != (out_f, in_f):
            raise UserError(f"{directory}: packed {name} {out_f}x{in_f} does not match the model's {old}")
        new = SparseLinear24(in_f, out_f, bias=old.bias is not None, device="meta")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)

    state = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key.endswith(".shape"):
                    continue
                target = key[: -len(".compressed")] + ".values" if key.endswith(".compressed") else key
                state[target] = f.get_tensor(key)
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise UserError(f"{directory}: tensors that match no parameter of the model: "
                        f"{', '.join(result.unexpected_keys[:5])}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing:
        raise UserError(f"{directory} is incomplete: no stored tensor for {', '.join(missing[:5])}"
                        f"{' ...' if len(missing) > 5 else ''}")
    for name in shapes:
        module = model.get_submodule(name)
        try:
            check_packed(module.values, module.bitmask)
        except ValueError as exc:
            raise UserError(f"{directory}: packed weight {name}: {exc}") from None
    gen_file = path / "generation_config.json"
    if gen_file.is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    if dtype is not None:
        model.to(dtype)
    model.to(device)
    model.eval()
    return model
