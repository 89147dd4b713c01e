"""Compress a checkpoint that need not fit in memory: decoder layers streamed from and to disk.

The model is a skeleton (`build_skeleton`): built without allocating weights, so its decoder layers
sit on the meta device, while embeddings, final norm and head are read from the checkpoint and stay
in memory (non-persistent buffers such as rotary tables are computed as usual). `StreamedLayers`
is the layer store (`llmprune.calibration.streaming`) for it:

- `open(i)` reads layer i's tensors (`CheckpointReader`: one tensor at a time) from the input
  checkpoint (first stage) or the previous stage's output in the work folder, in the working dtype,
  with its keep-masks when an earlier stage left some; `close` frees it again;
- when a stage is done with a layer, the kind's `edit_layer` hook runs on it (width slices, depth
  renumbers or drops), and it is written: the last stage writes it straight into the output shards
  (`ShardWriter`, the names and order `save_model` would write, cast back to the checkpoint dtype),
  earlier stages into their folder of the work directory (`llmprune.io.workdir`); then the journal
  is replaced (which layers are done, the writer's state, the stage record so far, the activations
  feeding the next layer): a killed run resumes from there and writes the same bytes.
So peak host memory is about the embeddings and head, one or two layers and the calibration
activations; those spill to disk (`SpilledActivations`) when they would not fit the budget.

Under torchrun every rank runs this with its own share of the batches; rank 0 writes.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from llmprune import distributed
from llmprune.arch import decoder_layers, head_targets, is_linear, spec_for, weight_2d, TargetSelector
from llmprune.calibration.streaming import LayerStore, layer_linear_zeros
from llmprune.errors import UserError
from llmprune.io.checkpoint import CheckpointReader, ShardWriter, dtype_code
from llmprune.io.files import format_bytes
from llmprune.io.workdir import WorkDir, fsync_path, trim_heap
from llmprune.masks import sparsity_of
from llmprune.report import ModuleResult, StageRecord

RUNTIME_BYTES = 600 << 20          # the interpreter, torch and transformers themselves (measured ~0.5 GiB)
UNLIMITED_SHARD = 1 << 62


# ---- the model skeleton ---------------------------------------------------------------------------

def build_skeleton(config, dtype: torch.dtype, path: str, trust_remote_code: bool = False,
                   revision: str | None = None) -> nn.Module:
    """The model of `config` with every parameter on the meta device (non-persistent buffers real),
    tied as `from_pretrained` ties it, with the checkpoint's generation config."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, GenerationConfig

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        try:
            model.generation_config = GenerationConfig.from_pretrained(path, revision=revision)
        except (OSError, ValueError):
            pass                                # no generation_config.json: the default from the config stays
    model.eval()
    return model


def saved_names(model: nn.Module) -> dict[str, str] | None:
    """{state_dict name: checkpoint name} of every tensor `state_dict_to_save` writes, in its order; None
    when a weight conversion merges or splits tensors (no one-to-one names)."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = model.state_dict()
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(key, None)
    state = remove_tied_weights_from_state_dict(state, model)
    source = {id(t): n for n, t in state.items()}
    out = {}
    for name, tensor in revert_weight_conversion(model, state).items():
        if id(tensor) not in source:
            return None
        out[source[id(tensor)]] = name
    return out


def _layer_key(name: str, prefix: str) -> tuple[int, str] | None:
    """'model.layers.3.mlp.up_proj.weight' -> (3, 'mlp.up_proj.weight'); None outside the layers."""
    if not name.startswith(prefix + "."):
        return None
    index, _, local = name[len(prefix) + 1:].partition(".")
    return (int(index), local) if index.isdigit() else None


@dataclass
class SaveLayout:
    """Where `save_model` puts each tensor: the tensors before the decoder layers, each layer's tensors
    in order, the tensors after them ({module name: checkpoint name} for the ones outside layers)."""
    before: dict[str, str]
    layers: dict[int, list[str]]
    after: dict[str, str]


def save_layout(model: nn.Module) -> SaveLayout | str:
    """The layout, or why layer-by-layer writing cannot reproduce `save_model`'s file."""
    names = saved_names(model)
    if names is None:
        return f"{model.config.model_type} checkpoints merge or split tensors on load (a weight conversion)"
    prefix = spec_for(model).layers
    before, after, layers = {}, {}, {}
    last = -1
    for module_name, saved in names.items():
        key = _layer_key(module_name, prefix)
        if key is None:
            (after if layers else before)[module_name] = saved
            continue
        if after or saved != module_name:
            return f"{model.config.model_type} checkpoints do not store decoder layers one after another under their own names"
        index, local = key
        if index < last:
            return f"{model.config.model_type} checkpoints do not store decoder layers in order"
        last = index
        layers.setdefault(index, []).append(local)
    return SaveLayout(before=before, layers=layers, after=after)


def streamed_problem(model: nn.Module, recipe, save_format: str) -> str | None:
    """Why this run cannot stream its decoder layers from disk (None: it can). `model` is the skeleton."""
    from llmprune.stages import kind_for

    if save_format != "dense":
        return f"--save-format {save_format} packs the whole model at the end"
    for i, stage in enumerate(recipe.stages):
        kind = kind_for(stage.method)
        if not kind.streams:
            return f"stage {i} ({stage.method}) needs the whole model in memory"
        if kind.name == "prune" and stage.get("allocation") == "global":
            return f"stage {i} uses allocation global, which ranks every weight of the model at once"
        if kind.name == "prune" and stage.get("allocation") == "search":
            return f"stage {i} uses allocation search, which passes over the layers twice and keeps their dense weights"
    layout = save_layout(model)
    if isinstance(layout, str):
        return layout
    last = recipe.stages[-1]
    if kind_for(last.method).name == "prune":
        selector = TargetSelector(last.get("targets"), last.get("ignore"))
        early = [n for n in head_targets(model, selector) if any(k.startswith(n + ".") for k in layout.before)]
        if early:
            return (f"the last stage prunes {early[0]}, which the checkpoint stores before the decoder layers "
                    "(the output is written as it goes)")
    return None


# ---- tensors in and out of modules --------------------------------------------------------------

def _slots(root: nn.Module) -> dict[str, list[tuple[nn.Module, str, bool]]]:
    """state_dict name -> every (module, attribute, is parameter) holding that tensor (tied ones too)."""
    holders: dict[int, list[tuple[nn.Module, str, bool]]] = {}
    for _, module in root.named_modules(remove_duplicate=False):
        for attr, p in module._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append((module, attr, True))
        for attr, b in module._buffers.items():
            if b is not None and attr not in module._non_persistent_buffers_set:
                holders.setdefault(id(b), []).append((module, attr, False))
    out = {}
    for name, tensor in root.state_dict(keep_vars=True).items():
        out[name] = holders.get(id(tensor), [])
    return out


def _assign(slots: list[tuple[nn.Module, str, bool]], value: torch.Tensor) -> None:
    """Put `value` in every slot (one Parameter object shared by tied slots)."""
    if not slots:
        return
    module, attr, is_param = slots[0]
    if is_param:
        old = module._parameters[attr]
        value = nn.Parameter(value, requires_grad=old.requires_grad)
    for module, attr, is_param in slots:
        (module._parameters if is_param else module._buffers)[attr] = value


def _release(layer: nn.Module) -> None:
    """Back to the meta device (non-persistent buffers, which the skeleton computed, back to the CPU)."""
    for _, module in layer.named_modules():
        for attr, p in list(module._parameters.items()):
            if p is not None and not p.is_meta:
                module._parameters[attr] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                        requires_grad=p.requires_grad)
        for attr, b in list(module._buffers.items()):
            if b is None or b.is_meta:
                continue
            if attr in module._non_persistent_buffers_set:
                module._buffers[attr] = b.cpu()
            else:
                module._buffers[attr] = torch.empty(b.shape, dtype=b.dtype, device="meta")


def _bytes_of(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict(keep_vars=True).values())


def _write_file(directory: Path, stem: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """One safetensors file `stem.safetensors`, exact bits (no -0.0 normalisation), on disk (fsynced)."""
    plan = [(n, tuple(t.shape), dtype_code(t.dtype)) for n, t in tensors.items()]
    writer = ShardWriter(directory, UNLIMITED_SHARD, stem=stem, plan=plan, metadata=metadata, positive_zero=False)
    with writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor.detach())
        files = writer.close()
    for f in files:
        fsync_path(directory / f)


def _pack_mask(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.cpu().numpy().reshape(-1)))


def _unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    n = int(np.prod(shape))
    return torch.from_numpy(np.unpackbits(packed.numpy())[:n].reshape(shape).astype(bool))


def record_to_json(record: StageRecord) -> dict:
    return dataclasses.asdict(record)


def record_from_json(data: dict) -> StageRecord:
    data = dict(data)
    data["modules"] = {n: ModuleResult(shape=tuple(m["shape"]), target=m["target"], achieved=m["achieved"],
                                       seconds=m["seconds"]) for n, m in data.get("modules", {}).items()}
    return StageRecord(**data)


def _modules_to_json(results: dict[str, ModuleResult]) -> dict:
    return {n: dataclasses.asdict(r) for n, r in results.items()}


def _modules_from_json(data: dict) -> dict[str, ModuleResult]:
    return {n: ModuleResult(shape=tuple(m["shape"]), target=m["target"], achieved=m["achieved"], seconds=m["seconds"])
            for n, m in data.items()}


def layer_final_modules(layer: nn.Module, prefix: str, masks) -> dict[str, ModuleResult]:
    """`api.final_modules` for one decoder layer."""
    out = {}
    for name, module in layer.named_modules():
        if name and is_linear(module):
            weight = weight_2d(module)
            out[f"{prefix}.{name}"] = ModuleResult(shape=tuple(weight.shape), target=masks.targets.get(module),
                                                   achieved=sparsity_of(weight))
    return out


# ---- activations on disk ---------------------------------------------------------------------------

def _save_tensor(tensor: torch.Tensor, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"hidden": tensor.detach().contiguous().cpu()}, str(path))


def _load_tensor(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(path))["hidden"]


class SpilledActivations:
    """Calibration activations kept on disk, one file per batch (named by its global index). Reads come
    from the current folder; writes go to a new one, so a layer's outputs never overwrite its inputs;
    `advance()` makes the outputs current. Used as `CapturedInputs.hidden` (a list of tensors)."""

    def __init__(self, root: Path, tag: str, batch_ids: list[int]):
        self.root, self.tag, self.batch_ids = root, tag, list(batch_ids)
        self._gen = 0
        self._count = 0
        self.current = self._new_dir()
        self._next: Path | None = None

    def _new_dir(self) -> Path:
        directory = self.root / f"{self.tag}-{self._gen:05d}"
        self._gen += 1
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        return directory

    def file(self, directory: Path, position: int) -> Path:
        return directory / f"b{self.batch_ids[position]:05d}.safetensors"

    def __len__(self) -> int:
        return self._count

    def append(self, tensor: torch.Tensor) -> None:
        _save_tensor(tensor, self.file(self.current, self._count))
        self._count += 1

    def __getitem__(self, b):
        if isinstance(b, slice):
            return [self[i] for i in range(*b.indices(len(self)))]
        return _load_tensor(self.file(self.current, b))

    def __setitem__(self, b, value) -> None:
        if isinstance(b, slice):
            for i, v in zip(range(*b.indices(len(self))), value, strict=True):
                self[i] = v
            return
        if self._next is None:
            self._next = self._new_dir()
        _save_tensor(value, self.file(self._next, b))

    def __iter__(self):
        for b in range(len(self)):
            yield self[b]

    def advance(self) -> Path | None:
        """The outputs written since the last call become the inputs; returns the old folder."""
        if self._next is None:
            return None
        old, self.current, self._next = self.current, self._next, None
        return old

    def adopt(self, directory: Path) -> Path:
        """Continue from a journalled folder of activations; returns the folder it replaces."""
        old, self.current = self.current, directory
        self._count = len(self.batch_ids)
        return old


class ResidentActivations(list):
    """Calibration activations in memory (a list), with the global batch index of each entry."""

    def __init__(self, batch_ids: list[int]):
        super().__init__()
        self.batch_ids = list(batch_ids)


def _test_stop(stage: int, layer: int) -> None:
    """Tests of kill/resume: LLMPRUNE_TEST_STOP_AFTER=STAGE:LAYER kills this process (SIGKILL, as kill -9
    would) right after that layer is journalled; STAGE:LAYER:interrupt raises KeyboardInterrupt (Ctrl-C)."""
    spec = os.environ.get("LLMPRUNE_TEST_STOP_AFTER")
    if not spec:
        return
    parts = spec.split(":")
    if parts[:2] != [str(stage), str(layer)]:
        return
    if parts[2:] == ["interrupt"]:
        raise KeyboardInterrupt
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


# ---- the store --------------------------------------------------------------------------------------

@dataclass
class StreamPlan:
    """What the CLI decided for a streamed run."""
    source: Path                          # the input checkpoint folder
    work: WorkDir
    n_stages: int
    fingerprint: dict
    save_dtype: torch.dtype | None        # the checkpoint's dtype when working in float32 (else None)
    max_shard_size: int
    budget: int | None                    # host bytes (--max-memory); None: what is free
    activation_bytes: int                 # the calibration activations of one layer, all batches
    journal: dict | None = None           # a resumed run's journal


class StreamedLayers(LayerStore):
    def __init__(self, model: nn.Module, plan: StreamPlan):
        super().__init__(model)
        self._keep_alive = model
        self.plan = plan
        self.prefix = spec_for(model).layers
        self.main = distributed.is_main()
        self.input = CheckpointReader(plan.source)
        names = saved_names(model)
        self.input_names = names                                # module name -> checkpoint name
        missing = [saved for saved in names.values() if saved not in self.input]
        if missing:
            raise UserError(f"{plan.source} has no tensor {missing[0]}, which this model needs (its checkpoint "
                            "does not use the names transformers saves); re-save it with save_pretrained")
        self.outside = {m: s for m, s in names.items() if _layer_key(m, self.prefix) is None}
        fresh = plan.journal is None
        self.j = plan.journal or {"fingerprint": plan.fingerprint, "attempt": 0, "stages": [], "current": None,
                                  "targets": {}, "final_modules": {}, "head_modules": {}, "writer": None}
        self.j["attempt"] = self.j.get("attempt", 0) + (0 if fresh else 1)
        self.ctx = self.kind = None
        self.done_upto = 0
        self.writer: ShardWriter | None = None
        self._act_count = 0
        self._stale_act: list[Path] = []
        self._targets_restored = False
        self.prev_zeros_after = self.j["stages"][-1]["record"]["zeros_after"] if self.j["stages"] else 0
        self._fit_memory(model)
        self._materialize_outside(model)

    # -- memory plan
    def _fit_memory(self, model: nn.Module) -> None:
        layers = decoder_layers(model)
        outside = _bytes_of(model) - sum(_bytes_of(layer) for layer in layers)
        layer = max(_bytes_of(layer) for layer in layers) if len(layers) else 0
        self.fixed_bytes = outside + 3 * layer + RUNTIME_BYTES      # a layer, its working copies, the runtime
        budget = self.plan.budget
        if budget is None:
            from llmprune.calibration.engine import free_memory_bytes

            budget = free_memory_bytes("cpu")
        if self.plan.budget is not None and self.plan.budget < self.fixed_bytes + (64 << 20):
            raise UserError(f"--max-memory {format_bytes(self.plan.budget)} is too small for this model: the weights "
                            f"outside the decoder layers ({format_bytes(outside)}), a decoder layer being worked on "
                            f"({format_bytes(layer)}, about three copies) and the runtime need about "
                            f"{format_bytes(self.fixed_bytes)}; give at least "
                            f"{format_bytes(self.fixed_bytes + (256 << 20))}")
        self.room = None if budget is None else max(budget - self.fixed_bytes, 0)
        self.spill = self.room is not None and self.plan.activation_bytes > self.room / 2
        forced = os.environ.get("LLMPRUNE_SPILL")       # always | never: override the decision (tests, debugging)
        if forced in ("always", "never"):
            self.spill = forced == "always"

    def activation_budget(self) -> int | None:
        return self.room

    # -- the tensors outside the decoder layers stay in memory
    def _materialize_outside(self, model: nn.Module) -> None:
        slots = _slots(model)
        source, names = self.input, self.input_names
        rest = self._rest_stage()
        if rest is not None:                      # an earlier stage (done before the interruption) edited them
            source = CheckpointReader(self._stage_dir(rest), stem="rest")
            names = {m: m for m in self.outside}
        for module_name in self.outside:
            meta = model.get_parameter_or_buffer(module_name)
            value = source.get(names[module_name])
            if tuple(value.shape) != tuple(meta.shape):
                raise UserError(f"{source.directory}: {names[module_name]} has shape {tuple(value.shape)}, the model's "
                                f"config implies {tuple(meta.shape)}; the checkpoint does not match its config.json")
            _assign(slots[module_name], value.to(meta.dtype))
        self._rest_masks = {}
        if rest is not None and self._stage_dir(rest).joinpath("masks-rest.safetensors").is_file():
            self._rest_masks = self._read_masks(self._stage_dir(rest), "masks-rest")

    def _rest_stage(self) -> int | None:
        """The last finished stage that wrote the tensors outside the layers to the work folder."""
        finished = len(self.j["stages"])
        last = self.plan.n_stages - 1
        candidates = [s for s in range(finished) if s < last]
        return candidates[-1] if candidates else None

    # -- folders
    def _stage_dir(self, index: int) -> Path:
        return self.plan.work.sub(f"stage-{index:05d}")

    def _out_dir(self) -> Path:
        return self.plan.work.sub("out")

    # -- resume bookkeeping
    def completed(self, index: int):
        if index < len(self.j["stages"]):
            entry = self.j["stages"][index]
            return record_from_json(entry["record"]), entry["edits"]
        return None

    def resumed(self, index: int):
        current = self.j.get("current")
        if current is not None and current["index"] == index and current["done"] > 0:
            record = record_from_json(current["record"]) if current.get("record") else None
            return record, current.get("edits") or {}
        return None

    def resume_index(self) -> int:
        return self.done_upto

    def _restore_targets(self, masks) -> None:
        if self._targets_restored:
            return
        self._targets_restored = True
        by_name = dict(self.model.named_modules())
        for name, target in self.j.get("targets", {}).items():
            if name in by_name:
                masks.targets[by_name[name]] = target
        for name, mask in self._rest_masks.items():
            masks.masks[by_name[name]] = mask

    # -- stages
    def begin_stage(self, ctx, kind) -> None:
        self.ctx, self.kind = ctx, kind
        self._restore_targets(ctx.masks)
        self.last = ctx.index == self.plan.n_stages - 1
        self.n_at_begin = len(decoder_layers(self.model))
        current = self.j.get("current")
        if current is None or current["index"] != ctx.index:
            current = {"index": ctx.index, "method": ctx.where, "layers": self.n_at_begin, "done": 0, "record": None,
                       "edits": {}, "zeros_in": {}, "zeros_out": {}, "activations": None, "writer": None,
                       "prefix_written": False}
            self.j["current"] = current
        current["method"] = ctx.where.split("(", 1)[-1].rstrip(")")
        self.cur = current
        self.done_upto = current["done"]
        if kind.edit_layer is not None:           # a resumed run: the layers finished before are edited already
            for i in range(self.done_upto):
                kind.edit_layer(ctx, i, decoder_layers(self.model)[i])
        if self.last:
            self.layout = save_layout(self.model)
            if isinstance(self.layout, str):
                raise RuntimeError(f"cannot write layer by layer: {self.layout}")
        if self.main:
            if self.last:
                if current["writer"] is not None:
                    self.writer = ShardWriter.resume(self._out_dir(), current["writer"])
                else:
                    shutil.rmtree(self._out_dir(), ignore_errors=True)
                    self.writer = ShardWriter(self._out_dir(), self.plan.max_shard_size)
                    current["prefix_written"] = False
            elif self.done_upto == 0:
                shutil.rmtree(self._stage_dir(ctx.index), ignore_errors=True)
                self._stage_dir(ctx.index).mkdir(parents=True)
        distributed.barrier()

    def open(self, index: int, device: str) -> nn.Module:
        layer = decoder_layers(self.model)[index]
        stage = self.ctx.index if self.ctx is not None else 0
        if stage == 0:
            reader, name_of = self.input, (lambda local: self.input_names[f"{self.prefix}.{index}.{local}"])
        else:
            reader = CheckpointReader(self._stage_dir(stage - 1), stem=f"layer-{index:05d}")
            name_of = (lambda local: f"{self.prefix}.{index}.{local}")
        slots = _slots(layer)
        for local, meta in layer.state_dict(keep_vars=True).items():
            value = reader.get(name_of(local))
            if tuple(value.shape) != tuple(meta.shape):
                raise RuntimeError(f"{self.prefix}.{index}.{local}: stored {tuple(value.shape)}, "
                                   f"the model expects {tuple(meta.shape)}")
            _assign(slots[local], value.to(meta.dtype))
        if stage > 0 and self.ctx is not None:
            masks_file = self._stage_dir(stage - 1) / f"masks-{index:05d}.safetensors"
            if masks_file.is_file():
                modules = dict(layer.named_modules())
                for local, mask in self._read_masks(self._stage_dir(stage - 1), f"masks-{index:05d}").items():
                    self.ctx.masks.masks[modules[local]] = mask
        layer.to(device)
        if stage == 0 and self.ctx is not None and str(index) not in self.cur["zeros_in"]:
            self.cur["zeros_in"][str(index)] = list(layer_linear_zeros(layer))
        return layer

    def close(self, index: int, layer: nn.Module, *, done: bool, hidden=None) -> None:
        if done and self.ctx is not None:
            self._finish(index, layer, hidden)
            return
        if isinstance(hidden, SpilledActivations):
            old = hidden.advance()
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        self._forget_masks(layer)
        _release(layer)
        trim_heap()

    def _forget_masks(self, layer: nn.Module) -> None:
        if self.ctx is not None:
            for module in layer.modules():
                self.ctx.masks.masks.pop(module, None)

    def _finish(self, index: int, layer: nn.Module, hidden) -> None:
        ctx, kind, cur = self.ctx, self.kind, self.cur
        if index != self.done_upto:
            raise RuntimeError(f"layer {index} finished out of order (layer {self.done_upto} is next)")
        new = kind.edit_layer(ctx, index, layer) if kind.edit_layer is not None else index
        if new is not None:
            cur["zeros_out"][str(new)] = list(layer_linear_zeros(layer))
            if self.last:
                self.j["final_modules"].update(_modules_to_json(
                    layer_final_modules(layer, f"{self.prefix}.{new}", ctx.masks)))
            if self.main:
                self._write_layer(index, new, layer)
        self._forget_masks(layer)
        if hidden is not None:
            cur["activations"] = self._commit_activations(hidden)
        self.done_upto = cur["done"] = index + 1
        cur["record"] = record_to_json(ctx.record) if ctx.record is not None else None
        cur["edits"] = ctx.edits
        if self.last and self.main:
            cur["writer"] = self.writer.state()
        distributed.barrier()
        if self.main:
            self._journal()
            for stale in self._stale_act:
                shutil.rmtree(stale, ignore_errors=True)
        self._stale_act = []
        _release(layer)
        trim_heap()
        _test_stop(ctx.index, index)

    def _write_layer(self, index: int, new: int, layer: nn.Module) -> None:
        state = layer.state_dict(keep_vars=True)
        if self.last:
            if not self.cur["prefix_written"]:
                self._write_outside(self.layout.before)
                self.cur["prefix_written"] = True
            for local in self.layout.layers[index]:
                self.writer.add(f"{self.prefix}.{new}.{local}", self._for_output(state[local]))
            return
        directory = self._stage_dir(self.ctx.index)
        _write_file(directory, f"layer-{new:05d}", {f"{self.prefix}.{new}.{k}": v for k, v in state.items()})
        masks = {name: self.ctx.masks.masks[m] for name, m in layer.named_modules() if m in self.ctx.masks.masks}
        if masks:
            self._write_masks(directory, f"masks-{new:05d}", masks)

    def _for_output(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        if self.plan.save_dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.plan.save_dtype)
        return tensor

    def _write_outside(self, entries: dict[str, str]) -> None:
        for module_name, saved in entries.items():
            self.writer.add(saved, self._for_output(self.model.get_parameter_or_buffer(module_name)))

    def _write_masks(self, directory: Path, stem: str, masks: dict[str, torch.Tensor]) -> None:
        _write_file(directory, stem, {n: _pack_mask(m) for n, m in masks.items()},
                    metadata={n: ",".join(map(str, m.shape)) for n, m in masks.items()})

    def _read_masks(self, directory: Path, stem: str) -> dict[str, torch.Tensor]:
        reader = CheckpointReader(directory, stem=stem)
        shapes = next(iter(reader.metadata.values()))
        return {n: _unpack_mask(reader.get(n), tuple(int(s) for s in shapes[n].split(","))) for n in reader.names}

    def end_stage(self, ctx, kind) -> tuple[int, int, int]:
        for i in range(self.done_upto, self.n_at_begin):      # layers the stage decided on at the end
            self._finish(i, self.open(i, "cpu"), None)
        if ctx.index == 0:                                     # zeros before: every input layer counted once
            for i in range(self.n_at_begin):
                if str(i) not in self.cur["zeros_in"]:
                    _release(self.open(i, "cpu"))
        if kind.edit_model is not None:
            kind.edit_model(ctx)
        if self.main:
            if self.last:
                if not self.cur["prefix_written"]:            # every layer was dropped? (not possible today)
                    self._write_outside(self.layout.before)
                    self.cur["prefix_written"] = True
                self._write_outside(self.layout.after)
                self.cur["writer"] = self.writer.state()
            else:
                directory = self._stage_dir(ctx.index)
                _write_file(directory, "rest", {m: self.model.get_parameter_or_buffer(m) for m in self.outside})
                by_module = {m: n for n, m in self.model.named_modules()}
                masks = {by_module[m]: mask for m, mask in ctx.masks.masks.items() if m in by_module}
                if masks:
                    self._write_masks(directory, "masks-rest", masks)
        if self.last:
            layer_names = set(self.j["final_modules"])
            heads = {n: m for n, m in self.model.named_modules() if m in ctx.masks.targets and n not in layer_names
                     and _layer_key(n, self.prefix) is None}
            self.j["head_modules"] = _modules_to_json({
                n: ModuleResult(shape=tuple(weight_2d(m).shape), target=ctx.masks.targets.get(m),
                                achieved=sparsity_of(weight_2d(m))) for n, m in heads.items()})
        distributed.barrier()
        if self.main:
            self._journal()
        zeros_before = self.prev_zeros_after if ctx.index > 0 else sum(z for z, _ in self.cur["zeros_in"].values())
        zeros_after = sum(z for z, _ in self.cur["zeros_out"].values())
        elements = sum(n for _, n in self.cur["zeros_out"].values())
        return zeros_before, zeros_after, elements

    def stage_done(self, ctx, record) -> None:
        self.j["stages"].append({"record": record_to_json(record), "edits": ctx.edits})
        if self.last:
            self.j["writer"] = self.cur["writer"]
        self.j["current"] = None
        self.prev_zeros_after = record.zeros_after
        distributed.barrier()
        if self.main:
            self._journal()
            if ctx.index > 0:                                  # the next stage reads this one's folder only
                shutil.rmtree(self._stage_dir(ctx.index - 1), ignore_errors=True)
            shutil.rmtree(self.plan.work.sub("act"), ignore_errors=True)   # the next stage captures its own
        self.ctx = self.kind = None
        self.done_upto = 0

    def final_modules(self, masks) -> dict:
        self._restore_targets(masks)
        return {**_modules_from_json(self.j["final_modules"]), **_modules_from_json(self.j["head_modules"])}

    # -- activations
    def new_activations(self, batch_ids: list[int]):
        self._act_count += 1
        if self.spill:
            return SpilledActivations(self.plan.work.sub("act"), f"r{self.j['attempt']}-{self._act_count}", batch_ids)
        return ResidentActivations(batch_ids)

    def _commit_activations(self, hidden) -> dict:
        """Make the activations feeding the next layer durable; returns their journal entry."""
        if isinstance(hidden, SpilledActivations):
            old = hidden.advance()
            if old is not None:
                self._stale_act.append(old)
            for b in range(len(hidden)):
                fsync_path(hidden.file(hidden.current, b))
            return {"dir": hidden.current.name}
        batch_ids = getattr(hidden, "batch_ids", None)
        if batch_ids is None:
            raise RuntimeError("activations without batch indices cannot be journalled")
        self._act_count += 1
        directory = self.plan.work.sub("act", f"r{self.j['attempt']}-{self._act_count}-j")
        directory.mkdir(parents=True, exist_ok=True)
        for b, tensor in zip(batch_ids, hidden):
            path = directory / f"b{b:05d}.safetensors"
            _save_tensor(tensor, path)
            fsync_path(path)
        previous = (self.cur.get("activations") or {}).get("dir")
        if previous:
            self._stale_act.append(self.plan.work.sub("act", previous))
        return {"dir": directory.name}

    def restore_activations(self, captured) -> None:
        entry = self.cur.get("activations")
        if entry is None:
            raise RuntimeError("the journal has no activations for the layer to resume at")
        directory = self.plan.work.sub("act", entry["dir"])
        hidden = captured.hidden
        if isinstance(hidden, SpilledActivations):
            shutil.rmtree(hidden.adopt(directory), ignore_errors=True)
        else:
            hidden[:] = [_load_tensor(directory / f"b{b:05d}.safetensors") for b in captured.batch_ids]

    # -- journal and output
    def _journal(self) -> None:
        names = {m: n for n, m in self.model.named_modules()}
        masks = self.ctx.masks if self.ctx is not None else None
        if masks is not None:
            self.j["targets"] = {names[m]: t for m, t in masks.targets.items() if m in names}
        self.plan.work.write_journal(self.j)

    def commit(self, directory: Path) -> list[str]:
        """Finish the output shards and link them into `directory` (the output's temporary folder);
        the work folder keeps its copy until the caller removes it."""
        if self.j.get("files") is None:
            writer = self.writer or ShardWriter.resume(self._out_dir(), self.j["writer"])
            self.j["files"] = writer.close()
            self.plan.work.write_journal(self.j)
        files = list(self.j["files"])
        index = self._out_dir() / "model.safetensors.index.json"
        if index.is_file():
            files.append(index.name)
        for name in files:
            try:
                os.link(self._out_dir() / name, Path(directory) / name)
            except OSError:
                shutil.copy2(self._out_dir() / name, Path(directory) / name)
        return files
