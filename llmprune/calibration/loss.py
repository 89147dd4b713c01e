"""Calibration loss from a decoder layer on: what the allocation search measures.

`forward_layers` runs captured hidden states through decoder layers `start..stop-1` (onloading one layer
at a time, like the engine); `head_loss` is the mean next-token cross-entropy of the calibration windows
given the last decoder layer's outputs. It runs the model's own forward with every decoder layer replaced
by a pass-through (the last one returns the given outputs), so the final norm, the head, logit
soft-capping and the loss are the family's own code, not a copy of it. One window per call keeps the
logits of a large vocabulary small.
"""
from __future__ import annotations

import torch
from torch import nn

from llmprune.arch import decoder_layers
from llmprune.calibration.engine import LayerCall, run_layer


@torch.no_grad()
def forward_layers(model: nn.Module, hidden: list[torch.Tensor], calls: list[list[LayerCall]], start: int,
                   stop: int, device: str, offload: str = "cpu") -> list[torch.Tensor]:
    """Per batch, the outputs of layer stop-1 given `hidden` [batch, seqlen, hidden] entering layer `start`.
    `calls[b][i]`: how the model calls layer i in batch b (from `capture_layer_inputs`)."""
    layers = decoder_layers(model)
    out = list(hidden)
    for i in range(start, stop):
        layer = layers[i]
        original = next(layer.parameters()).device
        layer.to(device)
        out = [run_layer(layer, h, calls[b][i], device).to(offload) for b, h in enumerate(out)]
        layer.to(original)
    return out


@torch.no_grad()
def head_loss(model: nn.Module, input_ids: list[torch.Tensor], final_hidden: list[torch.Tensor]) -> float:
    """Mean next-token NLL (nats per predicted token) of `input_ids` (per batch [batch, seqlen]) given the
    last decoder layer's outputs `final_hidden` (per batch [batch, seqlen, hidden])."""
    layers = decoder_layers(model)
    last = len(layers) - 1
    current: list[torch.Tensor] = []

    def passthrough(index: int):
        def forward(*args, **kwargs):
            hidden_states = args[0] if args else kwargs["hidden_states"]
            return current[0].to(hidden_states.device) if index == last else hidden_states
        return forward

    embed_device = model.get_input_embeddings().weight.device
    total, tokens = 0.0, 0
    try:
        for i, layer in enumerate(layers):
            layer.forward = passthrough(i)
        for ids, hidden in zip(input_ids, final_hidden):
            for j in range(ids.shape[0]):
                current[:] = [hidden[j:j + 1]]
                window = ids[j:j + 1].to(embed_device)
                loss = model(input_ids=window, labels=window, use_cache=False).loss
                total += float(loss) * (window.shape[1] - 1)
                tokens += window.shape[1] - 1
    finally:
        for layer in layers:
            if "forward" in layer.__dict__:
                del layer.forward
    return total / max(tokens, 1)
