"""Where a model's decoder layers live while a recipe runs: the layer store.

Stage kinds never move layers themselves: the engine (`layerwise`) and the kinds' own passes ask the
model's store to `open(i, device)` a layer and `close` it afterwards; `done=True` means the stage
will not touch that layer again. `api.compress` attaches a store to the model for the run
(`attach`); without one, `layer_store(model)` is the in-memory store.

- `LayerStore` (in memory, the Python API): every layer stays in the model; `open` moves it to the
  compute device and `close` moves it back; after the stage, `end_stage` applies the kind's edit
  hooks (`edit_layer` on every layer, then `edit_model`). Nothing else changes.
- `llmprune.io.streamed.StreamedLayers` (`llmprune compress`): the model is a skeleton whose decoder
  layers are on the meta device; a layer's tensors are read from disk when it is opened and freed
  when it is closed; a finished layer is edited and written straight into the stage's output, and
  the run is journalled after every layer so that it can resume. Activations may spill to disk
  (`SpilledActivations`). See that module.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import TYPE_CHECKING

import torch
from torch import nn

from llmprune.arch import decoder_layers

if TYPE_CHECKING:   # pragma: no cover
    from llmprune.stages import StageContext, StageKind

_STORES: "weakref.WeakKeyDictionary[nn.Module, LayerStore]" = weakref.WeakKeyDictionary()


def layer_store(model: nn.Module) -> "LayerStore":
    """The store attached to `model` (`attach`), else an in-memory one."""
    store = _STORES.get(model)
    if store is None:
        store = _STORES[model] = LayerStore(model)
    return store


@contextlib.contextmanager
def attach(model: nn.Module, store: "LayerStore"):
    """Use `store` for `model`'s decoder layers within the block."""
    previous = _STORES.get(model)
    _STORES[model] = store
    try:
        yield store
    finally:
        if previous is None:
            _STORES.pop(model, None)
        else:
            _STORES[model] = previous


def layer_linear_zeros(layer: nn.Module) -> tuple[int, int]:
    """(zeros, elements) over the weights of every linear of one decoder layer."""
    from llmprune.arch import is_linear

    zeros = total = 0
    for module in layer.modules():
        if is_linear(module):
            w = module.weight
            zeros += int((w == 0).sum().item())
            total += w.numel()
    return zeros, total


class LayerStore:
    """Decoder layers held in the model in memory (the model the caller passed to `compress`)."""

    def __init__(self, model: nn.Module):
        self._model = weakref.ref(model)          # the store must not keep its model alive
        self._home: dict[int, torch.device] = {}
        self._zeros_before = 0

    @property
    def model(self) -> nn.Module:
        return self._model()

    # -- layers
    def open(self, index: int, device: str) -> nn.Module:
        """Decoder layer `index`, with its weights, on `device`."""
        layer = decoder_layers(self.model)[index]
        first = next(layer.parameters(), None)
        self._home[index] = first.device if first is not None else torch.device("cpu")
        return layer.to(device)

    def close(self, index: int, layer: nn.Module, *, done: bool, hidden=None) -> None:
        """Put the layer back. `done`: the stage will not touch it again (a streamed store writes it);
        `hidden`: the calibration activations it produced (journalled by a streamed store)."""
        layer.to(self._home.pop(index, torch.device("cpu")))

    def resume_index(self) -> int:
        """Layers [0, resume_index) of the running stage are finished (a resumed run skips them)."""
        return 0

    def restore_activations(self, captured) -> None:
        raise RuntimeError("only a resumed streamed run restores activations")

    def new_activations(self, batch_ids: list[int]) -> list:
        """The container for captured hidden states, one entry per batch in `batch_ids`."""
        return []

    def activation_budget(self) -> int | None:
        """Bytes of host memory the calibration activations may use (None: whatever is free)."""
        return None

    # -- stages
    def begin_stage(self, ctx: "StageContext", kind: "StageKind") -> None:
        from llmprune.edits import linear_zeros

        self._zeros_before = linear_zeros(self.model)[0]

    def end_stage(self, ctx: "StageContext", kind: "StageKind") -> tuple[int, int, int]:
        """Apply the kind's edit hooks to every layer, then to the model; returns (zeros before the
        stage, zeros after, elements after) over the decoder linears."""
        from llmprune.edits import linear_zeros

        if kind.edit_layer is not None:
            for i, layer in enumerate(decoder_layers(self.model)):
                kind.edit_layer(ctx, i, layer)
        if kind.edit_model is not None:
            kind.edit_model(ctx)
        zeros, elements = linear_zeros(self.model)
        return self._zeros_before, zeros, elements

    def stage_done(self, ctx: "StageContext", record) -> None:
        """The stage's record is complete (a streamed store journals it)."""

    def completed(self, index: int):
        """A resumed run: (record, edits) of stage `index` if it finished before the interruption."""
        return None

    def resumed(self, index: int):
        """A resumed run: (partial record, edits) of stage `index` if it was interrupted mid-way."""
        return None

    def final_modules(self, masks) -> dict:
        from llmprune.api import final_modules

        return final_modules(self.model, masks)
