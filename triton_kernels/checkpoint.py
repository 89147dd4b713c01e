"""Packed 2:4 checkpoints: `save_sparse24` writes one, `load_pretrained` reads it back,
`unpack_sparse24` turns one back into a plain dense checkpoint, and `check_sparse24_possible`
says before any work whether a model/recipe can be saved packed at all.

On disk, a packed checkpoint is a Hugging Face model directory (config.json, tokenizer files,
safetensors shards + index, written by `llmprune.io.checkpoint`) with the tensor names that
`save_pretrained` would use, except that every packed linear `<name>` is stored under
compressed-tensors' `sparse-24-bitmask` tensor names instead of `<name>.weight`:

    <name>.compressed   [out, in/2]  kept values (weight dtype)
    <name>.bitmask      [out, in/8]  uint8, bit j of byte b <-> column 8b + j
    <name>.shape        [2]          int64 (out, in)
    <name>.bias         (unchanged, if any)

The groups of 4 run along in_features of the [out, in] weight, also for GPT-2's Conv1D (whose
dense weight is stored [in, out]). config.json's `model_type` is `llmprune_sparse24` (the real
one is kept under the `llmprune_sparse24` key): transformers does not know that type, so
`AutoModelForCausalLM.from_pretrained` refuses the directory instead of silently running random
linears. Nothing goes into quantization_config (see io/save.py for why); the packing facts go into
the `pack` section of llmprune.json, which the caller writes. `load_pretrained` builds the model
on the meta device, swaps in SparseLinear24 modules and assigns the stored tensors: the dense
weights of packed linears never exist.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from llmprune.errors import UserError
from llmprune.io.checkpoint import (DEFAULT_MAX_SHARD_SIZE, DTYPE_BYTES, CheckpointReader, ShardWriter, dtype_code,
                                    mark_packed_config, packed_checkpoint_info, save_model_files,
                                    state_dict_to_save, unmarked_config_dict)

from .format import check_packed, pack_24, unpack_24
from .module import DEFAULT_SKIP, SparseLinear24, candidate_linears, is_packable_type, output_heads, skip_reason, weight_oi

FORMAT = "sparse24"
SUFFIXES = (".compressed", ".bitmask", ".shape")
# Copied next to the weights by unpack (everything else of a model directory is regenerated).
_SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "added_tokens.json", "*.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.json",
               "chat_template.jinja", "*.tiktoken", "*.py", "recipe.yaml")


def _packed_entries(module: nn.Module, name: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype code) of the three tensors a packed linear is stored as."""
    if isinstance(module, SparseLinear24):
        out_f, in_f, dtype = module.out_features, module.in_features, module.values.dtype
    else:
        out_f, in_f = weight_oi(module).shape
        dtype = module.weight.dtype
    return [(f"{name}.compressed", (out_f, in_f // 2), dtype_code(dtype)),
            (f"{name}.bitmask", (out_f, in_f // 8), "U8"),
            (f"{name}.shape", (2,), "I64")]


def save_sparse24(model: nn.Module, tokenizer, directory: str | os.PathLike,
                  max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE, skip: tuple[str, ...] = DEFAULT_SKIP) -> dict:
    """Write `model` as a packed 2:4 checkpoint into `directory` (which should be the temporary
    directory of `llmprune.io.save.output_dir`). Every nn.Linear / Conv1D whose [out, in] weight is
    2:4 along in_features (lm_head excluded) and every SparseLinear24 is stored packed; every other
    tensor as `save_pretrained` would write it. The model is not modified. Returns the `pack`
    section for llmprune.json."""
    state = state_dict_to_save(model)
    packed: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    for name, module, reason in candidate_linears(model, skip):
        key = f"{name}.weight"
        if reason is None and (key not in state or state[key].data_ptr() != module.weight.data_ptr()):
            reason = "weight saved under another name"   # renamed or dropped by save_pretrained's rules
        if reason is None:
            packed[name] = module
        else:
            skipped[name] = reason
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear24):
            packed[name] = module
    if not packed:
        raise UserError("the model has no 2:4 sparse linear layers to pack (every group of 4 weights along "
                        "in_features needs at least two zeros); prune it with a 2:4 recipe first")

    sources = {f"{n}.values" if isinstance(m, SparseLinear24) else f"{n}.weight": n for n, m in packed.items()}
    plan, producers = [], []
    bytes_dense = bytes_packed = 0
    for key, tensor in state.items():
        name = sources.get(key)
        if name is None:
            if key.endswith(".bitmask") and key[: -len(".bitmask")] in packed:
                continue  # a SparseLinear24's bitmask: written with its values below
            plan.append((key, tuple(tensor.shape), dtype_code(tensor.dtype)))
            producers.append(lambda tensor=tensor: [tensor])
            continue
        module = packed[name]
        entries = _packed_entries(module, name)
        plan.extend(entries)
        producers.append(lambda module=module: list(_pack_module(module)))
        (out_f, half_in), code = entries[0][1], entries[0][2]
        in_f = half_in * 2
        esize = DTYPE_BYTES[code]
        bytes_dense += out_f * in_f * esize
        bytes_packed += out_f * in_f // 2 * esize + out_f * in_f // 8

    directory = Path(directory)
    writer = ShardWriter(directory, max_shard_size, plan=plan)
    names = iter(p[0] for p in plan)
    with writer, torch.no_grad():
        for produce in producers:
            for tensor in produce():    # one module's tensors at a time
                writer.add(next(names), tensor)
        writer.close()
    save_model_files(model, tokenizer, directory)
    mark_packed_config(directory)
    info = {"format": FORMAT, "modules": sorted(packed), "bytes_dense": bytes_dense, "bytes_packed": bytes_packed,
            "layout": "compressed-tensors sparse-24-bitmask tensors: <name>.compressed, .bitmask, .shape; "
                      "config.json model_type llmprune_sparse24 (original under the llmprune_sparse24 key)"}
    if skipped:
        info["dense_linears"] = skipped
    return info


def _pack_module(module: nn.Module):
    """values, bitmask, shape of one packable module (packed now, on the module's device)."""
    if isinstance(module, SparseLinear24):
        values, bitmask = module.values, module.bitmask
    else:
        values, bitmask = pack_24(weight_oi(module).detach())
    yield values
    yield bitmask
    yield torch.tensor(list(values.shape[:1]) + [values.shape[1] * 2], dtype=torch.int64)


def check_sparse24_possible(model: nn.Module, targets) -> dict[str, str]:
    """Before any work: can the result of pruning `targets` be saved packed? `model` may live on
    the meta device. `targets`: a Recipe (its last pruning stage decides the final pattern), a Stage,
    or a {name: module} mapping of the linears that will be 2:4. Raises UserError when the pattern is
    not packable or none of the targeted linears could be packed; returns {name: reason} for the
    targeted linears that will be written dense."""
    from llmprune.arch import TargetSelector, head_targets, prunable_linears
    from llmprune.moe.families import is_moe

    if is_moe(model):
        raise UserError("--save-format sparse24 does not support mixture-of-experts models yet (save_pretrained "
                        "writes their fused experts as per-expert keys that load_pretrained does not map back); "
                        "use --save-format dense")
    if hasattr(targets, "stages"):
        pruning = [s for s in targets.stages if s.pattern is not None]
        if not pruning:
            raise UserError("--save-format sparse24 stores 2:4 weights, and the recipe has no pruning stage; "
                            "use --save-format dense")
        targets = pruning[-1]
    if hasattr(targets, "pattern"):
        pattern = targets.pattern
        if not pattern.is_nm or pattern.m != 4 or pattern.n < 2:
            raise UserError(f"--save-format sparse24 stores 2:4 weights (at least 2 zeros in every 4 inputs); "
                            f"the final stage prunes {pattern}: use --sparsity 2:4 or --save-format dense")
        selector = TargetSelector(targets.get("targets"), targets.get("ignore"))
        targets = {**prunable_linears(model, selector), **head_targets(model, selector)}
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads = output_heads(model)
    dense = {}
    for name, module in targets.items():
        if not is_packable_type(module):
            dense[name] = f"{type(module).__name__} is not a linear layer"
        else:
            reason = skip_reason(name, module, out_emb, check_values=False, heads=heads)
            if reason is not None:
                dense[name] = reason
    if targets and len(dense) == len(targets):
        reasons = sorted(set(dense.values()))
        raise UserError(f"--save-format sparse24: none of the {len(targets)} targeted linears can be stored packed "
                        f"({'; '.join(reasons)}); use --save-format dense")
    if not targets:
        raise UserError("--save-format sparse24: the recipe targets no linear layer")
    return dense


def is_packed_checkpoint(directory: str | os.PathLike) -> bool:
    return packed_checkpoint_info(directory) is not None


def _check_device(device) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r} was requested but no CUDA GPU is visible; load with device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA GPU(s) visible")
    return dev


def _config(path: Path, trust_remote_code: bool):
    """The original model's config of a packed checkpoint (model_type and auto_map restored)."""
    from transformers import CONFIG_MAPPING

    data = unmarked_config_dict(path)
    model_type = data.get("model_type")
    auto_map = data.get("auto_map") or {}
    try:
        if "AutoConfig" in auto_map and trust_remote_code:
            from transformers.dynamic_module_utils import get_class_from_dynamic_module

            return get_class_from_dynamic_module(auto_map["AutoConfig"], str(path)).from_dict(data)
        if model_type not in CONFIG_MAPPING:
            hint = " (pass trust_remote_code=True)" if "AutoConfig" in auto_map else ""
            raise UserError(f"{path}: transformers does not know model type {model_type!r}{hint}")
        return CONFIG_MAPPING[model_type].from_dict(data)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot read {path / 'config.json'}: {str(exc).splitlines()[0]}") from None


def _meta_model(path: Path, trust_remote_code: bool):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = _config(path, trust_remote_code)
    # Parameters on the meta device (no memory); buffers such as rotary inv_freq are computed.
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def _model_names(model: nn.Module) -> dict[str, str]:
    """Stored (save_pretrained) tensor name -> the model's state-dict name, for the names that
    transformers renames on save (e.g. GPT-NeoX's lm_head.weight is stored as embed_out.weight)."""
    from transformers.core_model_loading import revert_weight_conversion

    state = model.state_dict()
    by_id = {id(t): k for k, t in state.items()}
    out = {}
    for stored, tensor in revert_weight_conversion(model, dict(state)).items():
        if id(tensor) in by_id:        # a renaming; weights merged/split by a converter are not
            out[stored] = by_id[id(tensor)]
    return out


def _module_shape(module: nn.Module) -> tuple[int, int]:
    return tuple(weight_oi(module).shape)


def packed_names(reader: CheckpointReader) -> list[str]:
    return [n[: -len(".bitmask")] for n in reader.names
            if n.endswith(".bitmask") and n[: -len(".bitmask")] + ".compressed" in reader]


def load_pretrained(directory: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, trust_remote_code: bool = False) -> nn.Module:
    """Rebuild a model saved by `save_sparse24` / `llmprune pack` with SparseLinear24 modules,
    without ever materialising the dense weights of packed linears. Returns the model in eval mode."""
    from transformers import GenerationConfig

    dev = _check_device(device)
    path = Path(directory).expanduser()
    if not path.is_dir() or not (path / "config.json").is_file():
        raise UserError(f"{directory} is not a model directory (no config.json); give the output of `llmprune pack`")
    reader = CheckpointReader(path)
    names = packed_names(reader)
    if not names:
        raise UserError(f"{directory} is not a packed 2:4 checkpoint (no <name>.bitmask tensors); load it with "
                        "transformers' from_pretrained, or pack it with `llmprune pack DIR --output DIR2`")
    model = _meta_model(path, trust_remote_code)
    model_type = model.config.model_type

    for name in names:
        shape = tuple(int(v) for v in reader.get(f"{name}.shape").tolist())
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise UserError(f"{directory}: packed tensor {name} matches no module of {model_type}") from None
        if not is_packable_type(old) or _module_shape(old) != shape:
            raise UserError(f"{directory}: packed {name} {shape[0]}x{shape[1]} does not match the model's {old}")
        new = SparseLinear24(shape[1], shape[0], bias=old.bias is not None, device="meta")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)

    renamed = _model_names(model)
    state = {}
    for key in reader.names:
        if key.endswith(".shape") and key[: -len(".shape")] in names:
            continue
        if key.endswith(".compressed") and key[: -len(".compressed")] in names:
            target = key[: -len(".compressed")] + ".values"
        else:
            target = renamed.get(key, key)
        state[target] = reader.get(key)
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
    for name in names:
        module = model.get_submodule(name)
        try:
            check_packed(module.values, module.bitmask)
        except ValueError as exc:
            raise UserError(f"{directory}: packed weight {name}: {exc}") from None
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    if dtype is not None:
        model.to(dtype)
    model.to(dev)
    model.eval()
    return model


def unpack_sparse24(directory: str | os.PathLike, output: str | os.PathLike,
                    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE, trust_remote_code: bool = False) -> dict:
    """Write the dense checkpoint a packed one stands for into the (empty, temporary) `output`:
    `<name>.weight` = unpack(values, bitmask) (transposed back for Conv1D), every other tensor and
    file as stored, config.json with its original model_type. Streams one tensor at a time.
    Returns {"modules": n, "files": [...]}."""
    path, output = Path(directory).expanduser(), Path(output)
    reader = CheckpointReader(path)
    names = set(packed_names(reader))
    if not names:
        raise UserError(f"{directory} is not a packed 2:4 checkpoint (no <name>.bitmask tensors)")
    model = _meta_model(path, trust_remote_code)   # which packed modules are Conv1D ([in, out] storage)
    transposed = set()
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise UserError(f"{directory}: packed tensor {name} matches no module of "
                            f"{model.config.model_type}") from None
        if type(module).__name__ == "Conv1D":
            transposed.add(name)
    plan, jobs = [], []
    for key in reader.names:
        base, _, suffix = key.rpartition(".")
        if base in names and suffix in ("bitmask", "shape"):
            continue
        if base in names and suffix == "compressed":
            info = reader.info(key)
            out_f, in_f = info.shape[0], info.shape[1] * 2
            shape = (in_f, out_f) if base in transposed else (out_f, in_f)
            plan.append((f"{base}.weight", shape, info.dtype))
            jobs.append((base, True))
        else:
            info = reader.info(key)
            plan.append((key, info.shape, info.dtype))
            jobs.append((key, False))
    writer = ShardWriter(output, max_shard_size, plan=plan)
    with writer:
        for (key, is_packed), (out_name, _, _) in zip(jobs, plan):
            if is_packed:
                weight = unpack_24(reader.get(f"{key}.compressed"), reader.get(f"{key}.bitmask"))
                writer.add(out_name, weight.t() if key in transposed else weight)
            else:
                writer.add(out_name, reader.get(key))
        files = writer.close()
    (output / "config.json").write_text(json.dumps(unmarked_config_dict(path), indent=2, sort_keys=True) + "\n")
    for pattern in _SIDE_FILES:
        for file in sorted(path.glob(pattern)):
            if file.is_file() and not (output / file.name).exists():
                shutil.copy2(file, output / file.name)
    return {"modules": len(names), "files": files}
