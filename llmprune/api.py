"""Python API: `compress(model, tokenizer, recipe, calib=...) -> (model, CompressReport)`.

The CLI is a thin shell over this. The model is edited in place (the caller owns it: the CLI
loads a fresh copy from disk, so the input checkpoint is never touched). Each recipe stage runs
through `llmprune.stages.run_stage`; after the last one the config is checked against every
tensor (`edits.verify_config`), so what is saved loads with `from_pretrained`.

`layers=` hands the run a layer store (`llmprune.calibration.streaming`): the CLI passes one that
streams decoder layers from and to disk and journals the run (`llmprune.io.streamed`); a resumed run
replays the stages it had finished (their edits, on the skeleton) and continues the interrupted one.
"""
from __future__ import annotations

import copy
import time
from typing import Callable

import torch
from torch import nn

from llmprune.arch import Matrix, decoder_matrices, spec_for, weight_2d
from llmprune.calibration.sets import CalibrationSet, calibration_set
from llmprune.edits import MaskState, parameter_count, verify_config
from llmprune.errors import UserError
from llmprune.io.files import peak_rss_bytes
from llmprune.io.load import resolve_device
from llmprune.masks import sparsity_of
from llmprune.recipe import Recipe, load_recipe
from llmprune.report import CompressReport, ModuleResult
from llmprune.stages import StageContext, kind_for, replay_stage, run_stage

__all__ = ["compress", "check_recipe", "calibration_set", "CalibrationSet", "CompressReport"]


def check_recipe(model: nn.Module, recipe: Recipe) -> None:
    """Check every stage against the model's modules (works on a meta-device model)."""
    spec_for(model)
    for i, stage in enumerate(recipe.stages):
        kind = kind_for(stage.method)
        if kind.check_model is not None:
            kind.check_model(model, {"method": stage.method, **stage.params}, f"stage {i} ({stage.method})")


def compress(model: nn.Module, tokenizer=None, recipe: Recipe | dict | str = "wanda-50", calib=None, *,
             device: str = "auto", progress: bool = True, teacher=None,
             layers=None) -> tuple[nn.Module, CompressReport]:
    """Run `recipe`'s stages on `model` in place; return it with a report.

    calib: None (the recipe's calibration source), a source spec ("c4", "wikitext2", "stdlib", a
    .txt/.jsonl/.parquet path), a LongTensor [n_samples, seqlen] of token ids, or a CalibrationSet.
    teacher: the unpruned model for a `heal` stage in distill mode (a module, or a callable that
    returns one); by default a copy of `model` taken before the first stage.
    layers: a layer store for `model` (default: its layers stay in memory).
    """
    from llmprune.calibration.streaming import LayerStore, attach

    with attach(model, layers if layers is not None else LayerStore(model)) as store:
        return _compress(model, tokenizer, recipe, calib, device, progress, teacher, store)


def _compress(model, tokenizer, recipe, calib, device, progress, teacher, store) -> tuple[nn.Module, CompressReport]:
    t0 = time.perf_counter()
    recipe = copy.deepcopy(load_recipe(recipe))     # the report's copy records what ran
    spec_for(model)                                   # unsupported family -> clear error now
    check_recipe(model, recipe)
    device = resolve_device(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    report = CompressReport(recipe=recipe, device=device, parameters_before=parameter_count(model))
    calib_set = None
    if recipe.needs_calibration():
        calib_set = calibration_set(model.config, tokenizer, recipe, calib)
        report.calibration = calib_set.spec
        if "note" in calib_set.spec:
            report.notes.append(calib_set.spec["note"])
    masks = MaskState()
    teacher = teacher_loader(model, recipe, teacher)     # before the first stage edits the model
    use_cache = getattr(model.config, "use_cache", None)
    was_training = model.training
    model.eval()
    try:
        for i, stage in enumerate(recipe.stages):
            ctx = StageContext(model=model, tokenizer=tokenizer, calibration=recipe.calibration, calib=calib_set,
                               device=device, progress=progress, masks=masks, index=i,
                               where=f"stage {i} ({stage.method})", teacher=teacher)
            finished = store.completed(i)         # a resumed run: this stage was done before the interruption
            if finished is not None:
                record, ctx.edits = finished
                replay_stage(ctx, stage.method)
            else:
                interrupted = store.resumed(i)
                if interrupted is not None:
                    ctx.resumed, ctx.edits = interrupted
                record = run_stage(ctx, stage.method, stage.params)
                store.stage_done(ctx, record)
            # The recipe as run: every parameter the stage used, defaults and runtime choices resolved.
            stage.params = {k: v for k, v in record.params.items() if v is not None}
            report.stages.append(record)
        verify_config(model)
    finally:
        model.train(was_training)
        if use_cache is not None:
            model.config.use_cache = use_cache
    report.final_modules = store.final_modules(masks)
    report.parameters_after = parameter_count(model)
    report.notes += [n for r in report.stages for n in r.notes]
    report.wall_time_s = time.perf_counter() - t0
    report.peak_memory = {"cpu_rss_bytes": peak_rss_bytes()}
    if device.startswith("cuda"):
        report.peak_memory["cuda_bytes"] = torch.cuda.max_memory_allocated()
    return model, report


def teacher_loader(model: nn.Module, recipe: Recipe, teacher) -> Callable[[], nn.Module] | None:
    """What a distill `heal` stage calls for the unpruned model: `teacher` (a module, or a callable that
    returns one, called once, when the stage runs), or without one a copy of `model` taken now, but only
    when a stage distills (the copy holds a second model in memory for the whole run)."""
    if teacher is None:
        if not any(kind_for(s.method).name == "heal" and s.params.get("mode") == "distill" for s in recipe.stages):
            return None
        teacher = copy.deepcopy(model).eval()
    if isinstance(teacher, nn.Module):
        return lambda: teacher
    if not callable(teacher):
        raise UserError(f"teacher must be a model or a function that returns one, got {type(teacher).__name__}")
    loaded: list[nn.Module] = []

    def load() -> nn.Module:
        if not loaded:
            loaded.append(teacher())
        return loaded[0]
    return load


def final_modules(model: nn.Module, masks: MaskState) -> dict[str, ModuleResult]:
    """Every matrix of the final model's decoder layers (linears, routers, each expert's slices of the
    fused 3-D expert parameters, `arch.decoder_matrices`) and any pruned head: shape, the pattern it was
    pruned to (None: not pruned), achieved sparsity."""
    candidates = dict(decoder_matrices(model))
    candidates.update({n: m for n, m in model.named_modules() if m in masks.targets and n not in candidates})
    out = {}
    for name, target in candidates.items():
        weight = weight_2d(target)
        key = target.key if isinstance(target, Matrix) else target
        out[name] = ModuleResult(shape=tuple(weight.shape), target=masks.targets.get(key),
                                 achieved=sparsity_of(weight))
    return out
