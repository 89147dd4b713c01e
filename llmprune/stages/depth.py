"""The `layer-drop` stage kind: remove whole decoder layers, for a shallower plain checkpoint.

Criteria (methods.md §1), all on the calibration windows, with the residual stream read at the
decoder layers themselves (the captured layer inputs and outputs, never `output_hidden_states`,
whose last entry is after the final norm):
- `bi` (default; ShortGPT, Men et al. 2024): block influence 1 − cos(x_in, x_out) per layer,
  averaged over every calibration token; the n lowest go (need not be contiguous).
- `angular` (Gromov et al. 2025): angular distance arccos(cos)/π between the residual stream at the
  final token entering layer ℓ and entering layer ℓ+n, averaged over windows; the contiguous block
  ℓ*..ℓ*+n−1 with the smallest distance goes.
- `ppl` (SLEB-style greedy, Song et al. 2024): remove the layer whose removal raises the calibration
  loss least, re-score, repeat. The `bi` selection is scored too and kept if it is better, so `ppl`
  is never worse than `bi` on calibration loss.
Layer 0 is kept unless `keep_first: false`. The kept layers go into `ctx.edits`; the edit hooks give
each layer its new index (`_edit_layer`) and then renumber `layer_idx`, set the layer count and
re-index every per-layer config field (`_edit_model`: `edits.drop_layers`).
"""
from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from llmprune.arch import decoder_layers, get_module, spec_for
from llmprune.calibration.engine import CapturedInputs, capture_layer_inputs, free_memory_bytes, run_layer
from llmprune.calibration.streaming import layer_store
from llmprune.edits import check_can_drop_layers, drop_layers
from llmprune.errors import UserError
from llmprune.params import Range
from llmprune.report import StageRecord
from llmprune.stages import StageContext, stage_kind


def _validate(params: dict, where: str) -> dict:
    if (params.get("num_layers") is None) == (params.get("layer_fraction") is None):
        raise UserError(f"{where}: give exactly one of num_layers (layers to remove) or layer_fraction "
                        f"(fraction of layers to remove)")
    return params


def layers_to_drop(num_layers_total: int, params: dict, where: str) -> int:
    n = params.get("num_layers")
    if n is None:
        n = int(round(params["layer_fraction"] * num_layers_total))
        if n < 1:
            raise UserError(f"{where}: layer_fraction {params['layer_fraction']} of {num_layers_total} layers "
                            f"removes none; use at least {1 / num_layers_total:.3f}")
    available = num_layers_total - 1          # at least one layer stays (layer 0, unless keep_first is off)
    if n > available:
        raise UserError(f"{where}: cannot remove {n} of {num_layers_total} layers (at most {available})")
    return n


def _check_model(model: nn.Module, params: dict, where: str) -> None:
    check_can_drop_layers(model.config, spec_for(model), where)
    layers_to_drop(len(decoder_layers(model)), params, where)


def _edit_layer(ctx: StageContext, index: int, layer: nn.Module) -> int | None:
    """The layer's index once the dropped ones are gone (None: it is dropped)."""
    keep = ctx.edits["keep"]
    return keep.index(index) if index in keep else None


def _edit_model(ctx: StageContext) -> None:
    drop_layers(ctx.model, ctx.edits["keep"], ctx.masks)


@stage_kind("layer-drop", validate=_validate, check_model=_check_model, edit_layer=_edit_layer,
            edit_model=_edit_model, streams=True, summary="remove whole decoder layers: a shallower plain checkpoint")
def layer_drop(ctx: StageContext, *,
               num_layers: Annotated[int, Range(1)] | None = None,
               layer_fraction: Annotated[float, Range(0, 1, low_open=True, high_open=True)] | None = None,
               criterion: Literal["bi", "angular", "ppl"] = "bi",
               keep_first: bool = True) -> StageRecord:
    """Remove `num_layers` (or `layer_fraction` of the) decoder layers chosen by `criterion`."""
    model = ctx.model
    n_layers = len(decoder_layers(model))
    n = layers_to_drop(n_layers, {"num_layers": num_layers, "layer_fraction": layer_fraction,
                                  "keep_first": keep_first}, ctx.where)
    candidates = [i for i in range(n_layers) if i or not keep_first]
    record = ctx.new_record(target={"layers": n})
    captured = capture_layer_inputs(model, ctx.calib_ids(), ctx.calibration.batch_size)
    runner = _Runner(model, captured, ctx.device, ctx.calib_ids(), ctx.progress)
    if criterion == "angular":
        distance = runner.angular_distances()                       # [L+1, L+1]
        starts = [s for s in candidates if s + n <= n_layers and all(i in candidates for i in range(s, s + n))]
        best = min(starts, key=lambda s: float(distance[s, s + n]))
        drop = list(range(best, best + n))
        record.scores = {"angular_distance": {str(s): round(float(distance[s, s + n]), 6) for s in starts}}
    else:
        bi = runner.block_influence()                               # [L]
        bi_drop = sorted(sorted(candidates, key=lambda i: float(bi[i]))[:n])
        record.scores = {"block_influence": [round(float(v), 6) for v in bi]}
        drop = bi_drop
        if criterion == "ppl":
            greedy, losses = runner.greedy_by_loss(candidates, n)
            loss_bi = runner.loss(set(bi_drop))
            record.scores.update(greedy_losses=[round(x, 6) for x in losses], loss_bi=round(loss_bi, 6),
                                 loss_dense=round(runner.loss(set()), 6))
            drop = sorted(greedy)
            if loss_bi < losses[-1]:
                drop = bi_drop
                record.notes.append(f"{ctx.where}: the bi selection has lower calibration loss than the greedy "
                                    f"one ({loss_bi:.4f} < {losses[-1]:.4f}); used it")
            record.scores["loss_chosen"] = round(min(loss_bi, losses[-1]), 6)
    ctx.edits["keep"] = [i for i in range(n_layers) if i not in drop]   # the edit hooks drop the others
    record.removed = {"layers": drop}
    record.achieved = {"layers": len(drop)}
    return record


class _Runner:
    """Forward passes over the captured calibration inputs, layer by layer, on the compute device."""

    def __init__(self, model: nn.Module, captured: CapturedInputs, device: str, ids: torch.Tensor, progress: bool):
        self.model, self.captured, self.device, self.ids, self.progress = model, captured, device, ids, progress
        self.layers = decoder_layers(model)
        self.calls = [[batch[i] for batch in captured.calls] for i in range(len(self.layers))]   # [layer][batch]

    @torch.no_grad()
    def _layer(self, i: int, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        store = layer_store(self.model)             # in memory, or read from disk for this pass
        layer = store.open(i, self.device)
        out = [run_layer(layer, h, self.calls[i][b], self.device).to(h.device) for b, h in enumerate(hidden)]
        store.close(i, layer, done=False)
        return out

    @torch.no_grad()
    def block_influence(self) -> torch.Tensor:
        """BI_i = 1 − mean over tokens of cos(x_in, x_out) for every layer (dense model)."""
        hidden = list(self.captured.hidden)
        bi = torch.zeros(len(self.layers), dtype=torch.float64)
        for i in tqdm(range(len(self.layers)), desc="block influence", disable=not self.progress, unit="layer"):
            out = self._layer(i, hidden)
            cos = torch.cat([torch.nn.functional.cosine_similarity(h.float(), o.float(), dim=-1).flatten()
                             for h, o in zip(hidden, out)])
            bi[i] = 1 - cos.double().nan_to_num(0.5).mean()
            hidden = out
        return bi

    @torch.no_grad()
    def angular_distances(self) -> torch.Tensor:
        """d[a, b] = mean over windows of arccos(cos(x^a_T, x^b_T))/π, x^ℓ_T the residual stream at the
        last token entering layer ℓ (ℓ = L: the last layer's output)."""
        hidden = list(self.captured.hidden)
        last = [torch.cat([h[:, -1].float().cpu() for h in hidden])]        # [windows, hidden] per position
        for i in tqdm(range(len(self.layers)), desc="angular distance", disable=not self.progress, unit="layer"):
            hidden = self._layer(i, hidden)
            last.append(torch.cat([h[:, -1].float().cpu() for h in hidden]))
        states = torch.stack(last).double()                                 # [L+1, windows, hidden]
        unit = states / states.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        cos = torch.einsum("awh,bwh->abw", unit, unit).clamp(-1, 1)
        return (torch.arccos(cos) / math.pi).mean(-1)

    @torch.no_grad()
    def _loss_from(self, start: int, hidden: list[torch.Tensor], skip: set[int]) -> float:
        """Mean next-token NLL over the calibration windows, running layers >= start not in `skip`."""
        for i in range(start, len(self.layers)):
            if i not in skip:
                hidden = self._layer(i, hidden)
        fam = spec_for(self.model)
        norm, head = get_module(self.model, fam.final_norm), self.model.get_output_embeddings()
        total, count, row = 0.0, 0, 0
        for h in hidden:
            ids = self.ids[row:row + h.shape[0]]
            row += h.shape[0]
            logits = head(norm(h.to(next(norm.parameters()).device))).float()          # [b, seq, vocab]
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1),
                                                    ids[:, 1:].flatten().to(logits.device), reduction="sum")
            total += float(nll)
            count += ids[:, 1:].numel()
        return total / count

    def loss(self, skip: set[int]) -> float:
        return self._loss_from(0, list(self.captured.hidden), skip)

    def greedy_by_loss(self, candidates: list[int], n: int) -> tuple[list[int], list[float]]:
        """SLEB: remove, one at a time, the layer whose removal gives the lowest calibration loss."""
        chosen: list[int] = []
        losses: list[float] = []
        hidden_bytes = sum(h.numel() * h.element_size() for h in self.captured.hidden)
        free = free_memory_bytes("cpu")
        cache_inputs = free is None or hidden_bytes * len(self.layers) <= free / 2
        rounds = tqdm(range(n), desc="layer-drop ppl search", disable=not self.progress, unit="layer")
        for _ in rounds:
            skip = set(chosen)
            inputs = self._inputs_per_layer(skip) if cache_inputs else None
            best, best_loss = None, float("inf")
            for c in candidates:
                if c in skip:
                    continue
                if inputs is not None:
                    value = self._loss_from(c + 1, inputs[c], skip)       # layer c skipped: its input goes on
                else:
                    value = self.loss(skip | {c})
                if value < best_loss:
                    best, best_loss = c, value
            chosen.append(best)
            losses.append(best_loss)
        return chosen, losses

    @torch.no_grad()
    def _inputs_per_layer(self, skip: set[int]) -> list[list[torch.Tensor]]:
        """The residual stream entering every layer of the model with `skip` removed."""
        hidden = list(self.captured.hidden)
        inputs = []
        for i in range(len(self.layers)):
            inputs.append(hidden)
            if i not in skip:
                hidden = self._layer(i, hidden)
        return inputs
