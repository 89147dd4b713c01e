"""Layer-by-layer calibration: capture the first decoder layer's inputs, then for each layer
onload -> observe -> prune -> re-run (propagating the *pruned* outputs) -> offload.

Only the current decoder layer lives on the compute device; the hidden states of all calibration
windows stay on the offload device (CPU by default).

Capturing inputs works for any family without per-model code: every decoder layer's `forward` is
temporarily replaced by a recorder that stores the exact positional and keyword arguments the
model passes it (attention masks, position embeddings, per-layer-type masks as in Gemma 2/3, ...)
and returns its input unchanged; the last recorder stops the forward before the final norm and
lm_head. So the model builds all its masks and rotary tables itself, exactly as in inference.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from llmprune.arch import decoder_layers


class _StopForward(Exception):
    pass


@dataclass
class LayerCall:
    """How the model calls one decoder layer for one calibration batch (minus the hidden states)."""
    args: tuple
    kwargs: dict


@dataclass
class CapturedInputs:
    hidden: list[torch.Tensor]            # per batch: [batch, seqlen, hidden] on the offload device
    calls: list[list[LayerCall]]          # [batch][layer]


def to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int,
                         offload: str = "cpu") -> CapturedInputs:
    """Run the model's own forward up to the decoder layers, recording what each layer receives."""
    layers = decoder_layers(model)
    n_layers = len(layers)
    hidden: list[torch.Tensor] = []
    calls: list[list[LayerCall]] = []
    current: list[LayerCall] = []

    def recorder(index: int):
        def forward(*args, **kwargs):
            hidden_states = args[0] if args else kwargs.pop("hidden_states")
            if index == 0:
                hidden.append(hidden_states.detach().to(offload))
            kwargs = {k: v for k, v in kwargs.items() if k not in ("use_cache", "output_attentions")}
            current.append(LayerCall(args=tuple(args[1:]), kwargs=kwargs))
            if index == n_layers - 1:
                raise _StopForward
            return hidden_states
        return forward

    embed_device = model.get_input_embeddings().weight.device
    saved = [layer.forward for layer in layers]
    try:
        for i, layer in enumerate(layers):
            layer.forward = recorder(i)
        for start in range(0, input_ids.shape[0], batch_size):
            current = []
            batch = input_ids[start:start + batch_size].to(embed_device)
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
            if len(current) != n_layers:
                raise RuntimeError(f"captured {len(current)} of {n_layers} decoder layer calls")
            calls.append(current)
    finally:
        for layer, forward in zip(layers, saved):
            layer.forward = forward
            if "forward" in layer.__dict__:
                del layer.forward
    return CapturedInputs(hidden=hidden, calls=calls)


def run_layer(layer: nn.Module, hidden_states: torch.Tensor, call: LayerCall, device) -> torch.Tensor:
    out = layer(hidden_states.to(device), *to_device(call.args, device), **to_device(call.kwargs, device))
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class LayerStep:
    """What the per-layer callback gets: the layer (already on the device) and a way to run it."""
    index: int
    name: str
    layer: nn.Module
    forward_all: Callable[..., None]       # forward_all(before_batch=None): run every batch (outputs dropped)


@torch.no_grad()
def layerwise(model: nn.Module, captured: CapturedInputs, device: str, layer_prefix: str,
              step: Callable[[LayerStep], None], progress: Iterator | None = None,
              offload: str = "cpu") -> list[float]:
    """For each decoder layer: onload, call `step` (observe + prune), propagate outputs, offload.

    `captured.hidden` is updated in place with each layer's outputs (after `step` edited it), so the
    next layer calibrates on the *pruned* model's activations. Returns seconds per layer.
    """
    layers = decoder_layers(model)
    seconds = []
    for i, layer in enumerate(layers):
        t0 = time.perf_counter()
        original_device = next(layer.parameters()).device
        layer.to(device)

        def forward_all(before_batch=None, layer=layer, i=i):
            for b, hidden_states in enumerate(captured.hidden):
                if before_batch is not None:
                    before_batch()
                run_layer(layer, hidden_states, captured.calls[b][i], device)

        step(LayerStep(index=i, name=f"{layer_prefix}.{i}", layer=layer, forward_all=forward_all))
        for b, hidden_states in enumerate(captured.hidden):
            captured.hidden[b] = run_layer(layer, hidden_states, captured.calls[b][i], device).to(offload)
        layer.to(original_device)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        seconds.append(time.perf_counter() - t0)
        if progress is not None:
            progress.update(1)
    return seconds
