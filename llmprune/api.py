"""Python API: `compress(model, tokenizer, recipe, calib=...) -> (model, CompressReport)`.

The CLI is a thin shell over this. The model is edited in place (the caller owns it: the CLI
loads a fresh copy from disk, so the input checkpoint is never touched).
"""
from __future__ import annotations

import copy
import resource
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from llmprune.allocation import global_magnitude_sparsities, owl_layer_sparsities, owl_outlier_ratio
from llmprune.arch import (TargetSelector, decoder_layers, get_module, head_targets, layer_linears, prunable_linears,
                           set_weight_2d, spec_for, weight_2d)
from llmprune.calibration.data import calibration_windows, describe_source, load_texts
from llmprune.calibration.engine import LayerStep, capture_layer_inputs, layerwise
from llmprune.calibration.observers import LayerObserver
from llmprune.errors import UserError
from llmprune.io.load import resolve_device
from llmprune.masks import Pattern, sparsity_of
from llmprune.methods import LinearStats, MethodSpec, get_method
from llmprune.recipe import Recipe, Stage, load_recipe


@dataclass
class ModuleResult:
    shape: tuple[int, int]
    target: str            # "0.5", "0.5731" (OWL/global) or "2:4"
    achieved: float
    seconds: float


@dataclass
class CompressReport:
    recipe: Recipe
    modules: dict[str, ModuleResult] = field(default_factory=dict)
    layer_sparsity: dict[str, float] = field(default_factory=dict)   # per decoder layer (OWL)
    calibration: dict | None = None
    wall_time_s: float = 0.0
    peak_memory: dict = field(default_factory=dict)
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)

    @property
    def sparsity(self) -> float:
        """Achieved sparsity over all targeted matrices (zeros / elements)."""
        total = sum(r.shape[0] * r.shape[1] for r in self.modules.values())
        zeros = sum(r.achieved * r.shape[0] * r.shape[1] for r in self.modules.values())
        return zeros / total if total else 0.0

    def sidecar(self) -> dict:
        stage = self.recipe.stages[-1]
        return {
            "recipe": self.recipe.to_dict(),
            "calibration": self.calibration,
            "sparsity": {
                "target": stage.pattern.sparsity,
                "pattern": "unstructured" if not stage.pattern.is_nm else str(stage.pattern),
                "allocation": stage.allocation,
                "achieved": round(self.sparsity, 6),
                "layers": self.layer_sparsity or None,
                "modules": {n: {"shape": list(r.shape), "target": r.target, "achieved": round(r.achieved, 6)}
                            for n, r in self.modules.items()},
            },
            "wall_time_s": round(self.wall_time_s, 3),
            "peak_memory": self.peak_memory,
            "device": self.device,
            "notes": self.notes,
        }

    def summary_table(self) -> str:
        """Per module type: target vs achieved sparsity, then time and memory."""
        groups: dict[str, list[tuple[str, ModuleResult]]] = {}
        for name, r in self.modules.items():
            groups.setdefault(name.rsplit(".", 1)[-1], []).append((name, r))
        rows = [("module", "count", "target", "achieved")]
        for kind, items in groups.items():
            targets = sorted({r.target for _, r in items})
            target = targets[0] if len(targets) == 1 else f"{min(float(t) for t in targets):.3f}..{max(float(t) for t in targets):.3f}"
            numel = sum(r.shape[0] * r.shape[1] for _, r in items)
            achieved = sum(r.achieved * r.shape[0] * r.shape[1] for _, r in items) / numel
            rows.append((kind, str(len(items)), target, f"{achieved:.4f}"))
        rows.append(("all targeted", str(len(self.modules)), str(self.recipe.stages[-1].pattern), f"{self.sparsity:.4f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        mem = self.peak_memory
        schedules = {"true-sequential" if s.true_sequential else "two-pass"
                     for s in self.recipe.stages if s.true_sequential is not None}
        lines.append(f"wall time {self.wall_time_s:.1f}s" + "".join(f" · {x}" for x in sorted(schedules))
                     + f" · peak CPU RSS {mem.get('cpu_rss_bytes', 0) / 2**30:.2f} GiB"
                     + (f" · peak CUDA {mem['cuda_bytes'] / 2**30:.2f} GiB" if mem.get("cuda_bytes") else ""))
        return "\n".join(lines)


@dataclass
class CalibrationSet:
    """Calibration token windows and the spec that describes them in the sidecar."""
    ids: torch.Tensor      # [n_samples, seqlen] token ids
    spec: dict


def calibration_set(config, tokenizer, recipe: Recipe, calib=None) -> CalibrationSet:
    """Draw the recipe's calibration windows (or wrap a given id tensor). Needs only the config."""
    if isinstance(calib, CalibrationSet):
        return calib
    ids, spec = _calibration_ids(config, tokenizer, recipe, calib)
    return CalibrationSet(ids, spec)


def _calibration_ids(config, tokenizer, recipe: Recipe, calib) -> tuple[torch.Tensor, dict]:
    c = recipe.calibration
    if isinstance(calib, torch.Tensor):
        if calib.dim() != 2 or calib.dtype not in (torch.long, torch.int32, torch.int64):
            raise UserError("calib tensor must be integer token ids of shape [n_samples, seqlen]")
        return calib.long(), {"source": "tensor", "samples": calib.shape[0], "seqlen": calib.shape[1],
                              "tokens": calib.numel()}
    if tokenizer is None:
        raise UserError("calibration from text needs a tokenizer; pass tokenizer= or a token-id tensor as calib=")
    source = calib or c.data
    seqlen = c.seqlen
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    note = None
    if max_pos and seqlen > max_pos:
        note = f"calibration seqlen {seqlen} exceeds the model's {max_pos} positions; using {max_pos}"
        seqlen = max_pos
    ids = calibration_windows(tokenizer, load_texts(source, "train"), c.samples, seqlen, c.seed)
    spec = {"source": describe_source(source), "split": "train", "samples": c.samples, "seqlen": seqlen,
            "seed": c.seed, "tokens": ids.numel()}
    if note:
        spec["note"] = note
    return ids, spec


def _check_targets(stage: Stage, targets: dict, heads: dict, method: MethodSpec, where: str) -> None:
    if not targets and not heads:
        raise UserError(f"{where}: no linear layer matches targets={stage.targets!r} ignore={stage.ignore!r}")
    pattern = stage.pattern
    for name, module in {**targets, **heads}.items():
        if isinstance(module, nn.Embedding) and method.needs:
            raise UserError(f"{where}: embeddings ({name}) can only be pruned with method magnitude")
        if pattern.is_nm and weight_2d(module).shape[1] % pattern.m:
            raise UserError(f"{where}: {name} has {weight_2d(module).shape[1]} inputs, not a multiple of "
                            f"{pattern.m}, so it cannot be {pattern}; exclude it with --ignore")


def _prune_module(name: str, module: nn.Module, stats: LinearStats | None, pattern: Pattern, method: MethodSpec,
                  params: dict, device: str, report: CompressReport) -> None:
    t0 = time.perf_counter()
    weight = weight_2d(module).to(device=device, dtype=torch.float32).clone()   # [out, in] working copy
    pruned = method.fn(weight, stats if stats is not None else LinearStats(), pattern, **params)
    set_weight_2d(module, pruned.to(weight_2d(module).device))
    report.modules[name] = ModuleResult(shape=tuple(weight.shape), target=str(pattern),
                                        achieved=sparsity_of(weight_2d(module)), seconds=time.perf_counter() - t0)


def _owl_sparsities(model, captured, stage: Stage, selector, device, prefix, progress) -> dict[str, float]:
    """First (dense) pass: OWL outlier ratio per decoder layer -> per-layer sparsity."""
    ratios: list[float] = []

    def step(s):
        linears = {n: m for n, m in layer_linears(s.layer, s.name).items() if selector.wants(n)}
        if not linears:
            ratios.append(float("nan"))
            return
        obs = LayerObserver(linears, {"input_sq_norm"})
        with obs.hooked(stop_early=True):
            s.forward_all(obs)
        ratios.append(owl_outlier_ratio([weight_2d(m) for m in linears.values()],
                                        [obs.stats[n].input_sq_norm for n in linears], stage.owl_m))

    with tqdm(total=len(decoder_layers(model)), desc="OWL outlier scan", disable=not progress, unit="layer") as bar:
        layerwise(model, captured, device, prefix, step, bar)
    valid = [r for r in ratios if r == r]
    per_layer = iter(owl_layer_sparsities(valid, stage.pattern.sparsity, stage.owl_lambda))
    return {f"{prefix}.{i}": next(per_layer) for i, r in enumerate(ratios) if r == r}


def _default_schedule(model, method: MethodSpec, calib_ids, device: str) -> tuple[bool, str | None]:
    """The method's default schedule, unless true-sequential would not fit: it keeps every calibration
    batch's activations of one layer alive at once, so fall back to two passes if that estimate
    exceeds half of the free memory of the compute device."""
    if not method.true_sequential or calib_ids is None:
        return False, None
    layer = decoder_layers(model)[0]
    hidden = model.get_input_embeddings().weight.shape[1]
    per_token = 2 * hidden + sum(weight_2d(m).shape[0] for m in layer_linears(layer, "").values())
    itemsize = next(layer.parameters()).element_size()
    need = calib_ids.numel() * per_token * itemsize
    free = free_memory_bytes(device)
    if free is None or need <= free / 2:
        return True, None
    return False, (f"two-pass calibration: true-sequential would hold ~{need / 2**30:.1f} GiB of activations per "
                   f"layer and {device} has {free / 2**30:.1f} GiB free (force it with true_sequential: true / "
                   f"--true-sequential, or use fewer calibration tokens)")


def free_memory_bytes(device: str) -> int | None:
    """Free memory of the compute device: CUDA free memory, or the host's MemAvailable."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_recipe(model, recipe: Recipe) -> None:
    """Check every stage's targets against the model's modules (works on a meta-device model)."""
    spec_for(model)
    for i, stage in enumerate(recipe.stages):
        selector = TargetSelector(stage.targets, stage.ignore)
        _check_targets(stage, prunable_linears(model, selector), head_targets(model, selector),
                       get_method(stage.method), where=f"stage {i} ({stage.method})")


def _run_stage(model, tokenizer, stage: Stage, calib_ids, device, report: CompressReport, progress: bool,
               where: str) -> None:
    spec = spec_for(model)
    method = get_method(stage.method)
    selector = TargetSelector(stage.targets, stage.ignore)
    targets = prunable_linears(model, selector)
    heads = head_targets(model, selector)
    _check_targets(stage, targets, heads, method, where)
    pattern = stage.pattern
    batch_size = report.recipe.calibration.batch_size
    if method.needs and stage.true_sequential is None:     # record the resolved schedule in the recipe as run
        stage.true_sequential, note = _default_schedule(model, method, calib_ids, device)
        if note:
            report.notes.append(f"{where}: {note}")

    # Per-matrix pattern: uniform, OWL per layer, or global magnitude.
    module_pattern: dict[str, Pattern] = {name: pattern for name in targets}
    if stage.allocation == "global":
        for name, s in global_magnitude_sparsities({**targets, **heads}, pattern.sparsity, stage.min_density).items():
            module_pattern[name] = Pattern(sparsity=s)
    needs_data = bool(method.needs) or stage.allocation == "owl"
    if needs_data and calib_ids is None:
        raise UserError(f"{where}: method {stage.method} needs calibration data")

    if stage.allocation == "owl":
        captured = capture_layer_inputs(model, calib_ids, batch_size)
        layer_sparsity = _owl_sparsities(model, captured, stage, selector, device, spec.layers, progress)
        report.layer_sparsity.update({k: round(v, 6) for k, v in layer_sparsity.items()})
        for name in targets:   # "model.layers.3.mlp.up_proj" -> its layer "model.layers.3"
            layer_index = name[len(spec.layers) + 1:].split(".", 1)[0]
            module_pattern[name] = Pattern(sparsity=layer_sparsity[f"{spec.layers}.{layer_index}"])

    def prune_layer(step) -> None:
        linears = {n: m for n, m in layer_linears(step.layer, step.name).items() if n in targets}
        if not linears:
            return

        def prune(name: str, stats: LinearStats | None) -> None:
            if method.needs and stats is None:
                raise UserError(f"{where}: {name} received no input during calibration, so {stage.method} has no "
                                f"statistics for it; exclude it with --ignore")
            _prune_module(name, linears[name], stats, module_pattern[name], method, stage.params, device, report)

        if not method.needs:
            for name in linears:
                prune(name, None)
            return
        obs = LayerObserver(linears, method.needs)
        if stage.true_sequential:
            step.forward_lockstep(obs, prune)     # prunes every linear and propagates, in one pass
            return
        with obs.hooked(stop_early=True):
            step.forward_all(obs)
        obs.seal_all()
        for name in linears:
            prune(name, obs.stats.pop(name, None))

    n_layers = len(decoder_layers(model))
    desc = f"{stage.method} {pattern}" + (" (owl)" if stage.allocation == "owl" else "")
    with tqdm(total=n_layers, desc=desc, disable=not progress, unit="layer") as bar:
        if method.needs:
            captured = capture_layer_inputs(model, calib_ids, batch_size)
            layerwise(model, captured, device, spec.layers, prune_layer, bar)
        else:   # data-free: no forward passes at all
            for i, layer in enumerate(decoder_layers(model)):
                prune_layer(LayerStep(index=i, name=f"{spec.layers}.{i}", layer=layer))
                bar.update(1)
            captured = None

    for name, module in heads.items():   # lm_head / embeddings, only when targeted explicitly
        stats = None
        if method.needs and not isinstance(module, nn.Embedding):
            stats = _head_stats(model, module, captured, method.needs, device)
        _prune_module(name, module, stats, module_pattern.get(name, pattern), method, stage.params, device, report)


@torch.no_grad()
def _head_stats(model, head: nn.Module, captured, needs, device) -> LinearStats:
    """Statistics for lm_head: the final norm applied to the last decoder layer's (pruned) outputs."""
    norm = get_module(model, spec_for(model).final_norm)
    norm_device = next(norm.parameters()).device
    head_device = weight_2d(head).device
    obs = LayerObserver({"head": head}, needs)
    with obs.hooked():
        for b, hidden in enumerate(captured.hidden):
            obs.start_batch(b)
            x = norm(hidden.to(norm_device))
            head(x.to(head_device))
            obs.end_batch(b)
    obs.seal_all()
    return obs.stats["head"]


def compress(model: nn.Module, tokenizer=None, recipe: Recipe | dict | str = "wanda-50", calib=None, *,
             device: str = "auto", progress: bool = True) -> tuple[nn.Module, CompressReport]:
    """Prune `model` in place following `recipe`; return it with a report.

    calib: None (the recipe's calibration source), a source spec ("c4", "wikitext2", "stdlib", a
    .txt/.jsonl/.parquet path), a LongTensor [n_samples, seqlen] of token ids, or a CalibrationSet.
    """
    t0 = time.perf_counter()
    recipe = copy.deepcopy(load_recipe(recipe))     # the report's copy records defaults resolved while running
    spec_for(model)                                   # unsupported family -> clear error now
    device = resolve_device(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    report = CompressReport(recipe=recipe, device=device)
    needs_data = any(get_method(s.method).needs or s.allocation == "owl" for s in recipe.stages)
    calib_ids = None
    if needs_data:
        calib_set = calibration_set(model.config, tokenizer, recipe, calib)
        calib_ids, report.calibration = calib_set.ids, calib_set.spec
        if "note" in report.calibration:
            report.notes.append(report.calibration["note"])
    use_cache = getattr(model.config, "use_cache", None)
    was_training = model.training
    model.eval()
    try:
        for i, stage in enumerate(recipe.stages):
            _run_stage(model, tokenizer, stage, calib_ids, device, report, progress,
                       where=f"stage {i} ({stage.method})")
    finally:
        model.train(was_training)
        if use_cache is not None:
            model.config.use_cache = use_cache
    report.wall_time_s = time.perf_counter() - t0
    report.peak_memory = {"cpu_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.startswith("cuda"):
        report.peak_memory["cuda_bytes"] = torch.cuda.max_memory_allocated()
    return model, report
