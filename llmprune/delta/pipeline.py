"""`llmprune delta`: sparsify (and merge) fine-tune deltas tensor by tensor, streaming from safetensors.

For every tensor of the (first) fine-tune, in checkpoint order:
  base value      the base tensor of the same name; for an untied `lm_head` over a tied base, the
                  base input embedding (methods.md §0.4); rows beyond the base vocabulary have none
  excluded        embeddings, lm_head (the architecture registry's names for the family; a regex
                  for families it does not know), norms, router gates (+ --exclude): one fine-tune ->
                  copied verbatim; several -> merged densely (no drop) with the same weights/consensus/λ
  pruned          Δ_i = θ_ft_i − θ_base (float32), Δ̂_i = factor · keep_i ⊙ Δ_i, merged, θ = θ_base + λ·mixed
  extra vocab     rows ≥ V_base exist only in the fine-tune: copied verbatim (DAREx behaviour)
Only a few tensors are in memory at any time; the output shards are written as tensors finish.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmprune.delta.streaming import copy_model_files, local_model_dir, positive_zero
from llmprune.io import tensor_names
from llmprune.io.checkpoint import CheckpointReader, ShardWriter
from llmprune.errors import UserError
from llmprune.io.files import peak_rss_bytes

# method -> (mask strategy, consensus, normalize, default rescale); mergekit's registry (§4.4),
# with DARE's own rescale 1/(1-p) instead of mergekit's L1 matching.
METHODS = {
    "dare": ("random", "linear", False, "inverse"),
    "magnitude": ("magnitude", "linear", False, "none"),
    "ties": ("magnitude", "ties", True, "none"),
    "dare-ties": ("random", "ties", False, "inverse"),
}

# Never pruned unless --no-default-exclude (§4.5.6): embeddings and lm_head (`tensor_names.head_patterns`:
# from the architecture registry when the family is known) and these, which the registry does not list:
NORM_AND_ROUTER_EXCLUDE = (
    r"norm|(^|\.)ln_",                           # RMSNorm/LayerNorm weights and biases
    r"\.gate\.(weight|bias)$|router|expert_gate|e_score_correction_bias",  # MoE routers (not gate_proj)
)


def default_exclude(family=None) -> list[str]:
    """The default exclusion regexes for a model family (None: a family the registry does not know)."""
    return tensor_names.head_patterns(family) + list(NORM_AND_ROUTER_EXCLUDE)
# Config fields that must agree for a delta to mean anything.
ARCH_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "intermediate_size", "head_dim", "num_local_experts", "num_experts", "n_routed_experts")


@dataclass
class DeltaSpec:
    method: str = "dare"
    drop_rate: float = 0.9
    rescale: "object" = None  # sparsify.Rescale; None -> the method's default
    weights: list[float] | None = None
    lam: float = 1.0
    seed: int = 0
    exclude: list[str] = field(default_factory=list)  # extra regexes
    default_exclude: bool = True
    family: "object" = None   # llmprune.arch.Family of the base (set by run_delta; None: unknown family)

    @property
    def strategy(self) -> str:
        return METHODS[self.method][0]

    @property
    def consensus(self) -> str:
        return METHODS[self.method][1]

    @property
    def normalize(self) -> bool:
        return METHODS[self.method][2]

    def patterns(self) -> list[str]:
        return (default_exclude(self.family) if self.default_exclude else []) + list(self.exclude)


def validate_spec(spec: DeltaSpec, n_finetuned: int) -> DeltaSpec:
    """Check user-facing values and fill defaults. Returns the spec with rescale/weights resolved."""
    from llmprune.delta.sparsify import Rescale

    if spec.method not in METHODS:
        raise UserError(f"unknown --method {spec.method}; choose one of {', '.join(METHODS)}")
    if not 0.0 <= spec.drop_rate < 1.0:
        raise UserError(f"--drop-rate must be in [0, 1), got {spec.drop_rate}")
    if spec.rescale is None:
        spec.rescale = Rescale(METHODS[spec.method][3])
    if spec.weights is None:
        spec.weights = [1.0] * n_finetuned
    if len(spec.weights) != n_finetuned:
        raise UserError(f"--weights has {len(spec.weights)} values for {n_finetuned} fine-tune(s); give one per fine-tune")
    if spec.rescale.kind == "auto" and n_finetuned != 1:
        raise UserError("--rescale auto (DAREx-q) compares against one fine-tune's logits; with several "
                        "fine-tunes use --rescale inverse, l1, none or q=VALUE")
    for pattern in spec.patterns():
        try:
            re.compile(pattern)
        except re.error as exc:
            raise UserError(f"--exclude {pattern!r} is not a valid regular expression ({exc})") from None
    return spec


@dataclass
class TensorJob:
    name: str
    shape: tuple[int, ...]
    dtype: str                   # safetensors code of the output (= first fine-tune)
    ft_names: list[str]          # the tensor to read from each fine-tune
    base_name: str | None        # the base tensor holding the base value (None: no base, copied)
    shared_rows: int | None      # rows with a base value when vocab sizes differ (None: same shape)
    prune: bool                  # sparsify the delta (False: excluded / no base / not floating point)


def _arch(config) -> dict:
    data = config.to_dict()
    return {k: data[k] for k in ARCH_FIELDS if data.get(k) is not None}


def check_configs(base_name: str, base_config, finetuned: list[tuple[str, object]]) -> None:
    base_arch = _arch(base_config)
    for name, config in finetuned:
        arch = _arch(config)
        diffs = [f"{k} {base_arch[k]} vs {arch[k]}" for k in base_arch if k in arch and arch[k] != base_arch[k]]
        if diffs:
            raise UserError(f"{name} is not a fine-tune of {base_name}: {', '.join(diffs)}; a delta needs the "
                            "same architecture and sizes")


def _role(name: str, family) -> str | None:
    return tensor_names.role(name, family) if name.endswith(".weight") else None


def _tied_embedding(reader: CheckpointReader, family=None) -> str | None:
    return next((n for n in reader.names if _role(n, family) == "token_embedding"), None)


def _source_name(reader: CheckpointReader, name: str, family=None) -> str | None:
    """The tensor of `reader` that holds `name`'s value (a tied lm_head is the input embedding)."""
    if name in reader:
        return name
    if _role(name, family) == "lm_head":
        return _tied_embedding(reader, family)
    return None


def plan_jobs(base: CheckpointReader, finetuned: list[CheckpointReader], finetuned_ids: list[str],
              spec: DeltaSpec) -> tuple[list[TensorJob], list[str]]:
    """Decide what happens to every output tensor; every incompatibility is raised here, before work.

    Returns the jobs and a list of notes for the user (tensors copied for lack of a base, ...).
    """
    patterns = [re.compile(p) for p in spec.patterns()]
    jobs, notes = [], []
    first = finetuned[0]
    for name in first.names:
        info = first.info(name)
        ft_names = [name]
        for reader, ft_id in zip(finetuned[1:], finetuned_ids[1:]):
            source = _source_name(reader, name, spec.family)
            if source is None:
                raise UserError(f"{ft_id} has no tensor {name} (which {finetuned_ids[0]} has); merged fine-tunes "
                                "must share one architecture")
            if reader.info(source).shape != info.shape:
                raise UserError(f"{name} has shape {list(reader.info(source).shape)} in {ft_id} but "
                                f"{list(info.shape)} in {finetuned_ids[0]}; merge fine-tunes that share one "
                                "tokenizer / vocabulary size")
            ft_names.append(source)
        base_name = _source_name(base, name, spec.family)
        shared_rows = None
        if base_name is not None:
            base_shape = base.info(base_name).shape
            if base_shape != info.shape:
                vocab_like = _role(name, spec.family) in ("token_embedding", "lm_head")
                if vocab_like and len(base_shape) == len(info.shape) and base_shape[1:] == info.shape[1:]:
                    shared_rows = min(base_shape[0], info.shape[0])
                    new_rows = max(0, info.shape[0] - base_shape[0])
                    source = "" if len(finetuned) == 1 else f" from {finetuned_ids[0]}"
                    notes.append(f"{name}: vocabulary {base_shape[0]} -> {info.shape[0]}; delta on the first "
                                 f"{shared_rows} rows, {new_rows} new rows copied{source}")
                else:
                    raise UserError(f"{name} has shape {list(info.shape)} in {finetuned_ids[0]} but "
                                    f"{list(base_shape)} in the base; not a fine-tune of this base")
        else:
            notes.append(f"{name}: not in the base; copied from the fine-tune")
        floating = info.dtype in ("F64", "F32", "F16", "BF16")
        excluded = any(p.search(name) for p in patterns)
        jobs.append(TensorJob(name, info.shape, info.dtype, ft_names, base_name, shared_rows,
                              prune=base_name is not None and floating and not excluded))
    for reader, ft_id in zip(finetuned[1:], finetuned_ids[1:]):
        ignored = [n for n in reader.names if n not in first.tensors and _role(n, spec.family) != "token_embedding"]
        if ignored:
            notes.append(f"{ft_id}: {len(ignored)} tensor(s) not in {finetuned_ids[0]} ignored (e.g. {ignored[0]})")
    if not any(job.prune for job in jobs):
        raise UserError("no tensor is left to prune after --exclude; loosen the patterns")
    return jobs, notes


@dataclass
class TensorResult:
    out: object          # the output tensor, in the output dtype
    density: float | None  # non-zero fraction of the applied delta (pruned tensors only)
    nnz: int = 0
    numel: int = 0


def _mergeable(job: TensorJob) -> bool:
    """Whether several fine-tunes' values of an unpruned tensor are merged (it has a base value and is
    floating point) rather than copied from the first fine-tune; as `compute_tensor` decides."""
    return job.base_name is not None and job.dtype in ("F64", "F32", "F16", "BF16")


def compute_tensor(job: TensorJob, base: CheckpointReader, finetuned: list[CheckpointReader],
                   spec: DeltaSpec, base_tensor=None) -> TensorResult:
    """The output tensor for one job. `base_tensor` may be passed when the caller already loaded it."""
    import torch

    from llmprune.delta.merge import merge_deltas
    from llmprune.delta.sparsify import sparsify, tensor_seed

    ft0 = finetuned[0].get(job.ft_names[0])
    single = len(finetuned) == 1
    if job.base_name is None or (single and not job.prune) or not ft0.is_floating_point():
        return TensorResult(positive_zero(ft0), None)
    if base_tensor is None:
        base_tensor = base.get(job.base_name)
    rows = job.shared_rows
    base_rows = base_tensor if rows is None else base_tensor[:rows]
    ft0_rows = ft0 if rows is None else ft0[:rows]
    base_f32 = base_rows.float()

    if single:  # one fine-tune, pruned
        delta = ft0_rows.float() - base_f32
        keep, factor = sparsify(delta, spec.strategy, spec.drop_rate, spec.rescale, tensor_seed(spec.seed, job.name, 0))
        # with TIES' normalisation a single model's weight cancels out
        scale = factor * (1.0 if spec.normalize else spec.weights[0]) * spec.lam
        nnz = int((keep & (delta != 0)).sum())
        if scale == 1.0:
            # No rescale: kept entries are the fine-tune's own values, dropped ones the base's (exact).
            shared = torch.where(keep, ft0_rows, base_rows.to(ft0.dtype))
        else:
            shared = (base_f32 + delta.mul_(keep).mul_(scale)).to(ft0.dtype)
        del delta, keep
    else:
        deltas = []
        for i, (reader, ft_name) in enumerate(zip(finetuned, job.ft_names)):
            ft = ft0_rows if i == 0 else (reader.get(ft_name) if rows is None else reader.get(ft_name)[:rows])
            delta = ft.float() - base_f32
            if job.prune:
                keep, factor = sparsify(delta, spec.strategy, spec.drop_rate, spec.rescale,
                                        tensor_seed(spec.seed, job.name, i))
                delta.mul_(keep).mul_(factor)
            deltas.append(delta)
        mixed = merge_deltas(deltas, spec.weights, spec.consensus, spec.normalize).mul_(spec.lam)
        del deltas
        nnz = int(torch.count_nonzero(mixed))
        shared = (base_f32 + mixed).to(ft0.dtype)
        del mixed
    if rows is not None and rows < ft0.shape[0]:
        out = ft0.clone()
        out[:rows] = shared  # rows beyond the base vocabulary stay the fine-tune's
    else:
        out = shared
    numel = base_rows.numel()
    return TensorResult(positive_zero(out), nnz / numel if job.prune else None, nnz, numel)


def run_delta(base: str, finetuned: list[str], spec: DeltaSpec, output: Path, *, max_shard_bytes: int = 5 * 10**9,
              save_delta: bool = False, calib: dict | None = None, trust_remote_code: bool = False,
              progress: bool = True) -> dict:
    """Write the sparsified / merged model into the existing empty directory `output`.

    `calib` (for --rescale auto): {source, samples, seqlen, seed}. Returns the sidecar dict (not yet written)
    plus a `summary` entry for the CLI table.
    """
    from tqdm.auto import tqdm

    from llmprune import __version__
    from llmprune.delta.apply import DELTA_SUBDIR, SparseDeltaWriter
    from llmprune.delta.sparsify import Rescale
    from llmprune.io.load import load_config, snapshot_revision
    from llmprune.io.sidecar import base_model_entry

    start = time.time()
    spec = validate_spec(spec, len(finetuned))
    base_dir = local_model_dir(base)
    ft_dirs = [local_model_dir(f) for f in finetuned]
    base_config = load_config(str(base_dir), trust_remote_code=trust_remote_code)
    ft_configs = [load_config(str(d), trust_remote_code=trust_remote_code) for d in ft_dirs]
    check_configs(base, base_config, list(zip(finetuned, ft_configs)))
    spec.family = tensor_names.family(base_config)     # embeddings / lm_head by the registry's names
    base_reader = CheckpointReader(base_dir)
    ft_readers = [CheckpointReader(d) for d in ft_dirs]
    jobs, notes = plan_jobs(base_reader, ft_readers, finetuned, spec)

    q_search = None
    if spec.rescale.kind == "auto":
        q_search = _auto_q(base_reader, ft_dirs[0], jobs, spec, calib or {}, trust_remote_code, progress)
        spec.rescale = Rescale("q", q_search.q)

    plan = [(job.name, job.shape, job.dtype) for job in jobs]
    writer = ShardWriter(output, max_shard_bytes, plan=plan)
    delta_writer = SparseDeltaWriter(output / DELTA_SUBDIR, max_shard_bytes) if save_delta else None
    tensors, nnz_total, numel_total = {}, 0, 0
    for job in tqdm(jobs, desc=f"delta {spec.method}", unit="tensor", disable=not progress):
        base_tensor = base_reader.get(job.base_name) if job.base_name is not None else None
        result = compute_tensor(job, base_reader, ft_readers, spec, base_tensor=base_tensor)
        writer.add(job.name, result.out)
        if delta_writer is not None:
            delta_writer.add(job.name, result.out, job.base_name, base_tensor)
        if result.density is not None:
            tensors[job.name] = {"shape": list(job.shape), "density": round(result.density, 6)}
            nnz_total += result.nnz
            numel_total += result.numel
        del result, base_tensor
    files = writer.close()
    copy_model_files(ft_dirs[0], output)

    achieved = nnz_total / numel_total if numel_total else None
    rescale_text = str(spec.rescale) if q_search is None else "auto"
    recipe = {
        "delta": {"method": spec.method, "drop_rate": spec.drop_rate, "rescale": rescale_text,
                  "q": spec.rescale.q, "weights": spec.weights, "lambda": spec.lam, "seed": spec.seed,
                  "exclude": spec.patterns()},
        "base": base, "finetuned": list(finetuned),
    }
    if q_search is not None:
        recipe["delta"]["calibration"] = calib
    sidecar = {
        "kind": "delta",
        "llmprune_version": __version__,
        "base_model": base_model_entry(base, revision=snapshot_revision(base_dir),
                                       model_type=getattr(base_config, "model_type", None), path=base_dir),
        "finetuned": [{**base_model_entry(f, revision=snapshot_revision(d), model_type=getattr(c, "model_type", None),
                                          path=d), "weight": w}
                      for f, d, c, w in zip(finetuned, ft_dirs, ft_configs, spec.weights)],
        "recipe": recipe,
        "delta": {"method": spec.method, "drop_rate": spec.drop_rate, "rescale": rescale_text,
                  "q": spec.rescale.q, "lambda": spec.lam, "seed": spec.seed,
                  "achieved_density": None if achieved is None else round(achieved, 6),
                  "excluded": [j.name for j in jobs if not j.prune],
                  # what happened to the excluded tensors (compute_tensor): copied from the (first)
                  # fine-tune, or, with several fine-tunes, merged without dropping any delta entry
                  "copied": [j.name for j in jobs if not j.prune and (len(finetuned) == 1 or not _mergeable(j))],
                  "merged_dense": [j.name for j in jobs if not j.prune and len(finetuned) > 1 and _mergeable(j)],
                  "notes": notes, "tensors": tensors},
    }
    if q_search is not None:
        sidecar["delta"]["q_search"] = {"objective": "top-5 logit MSE vs the fine-tune", "loss": q_search.loss,
                                        "loss_at_inverse": q_search.loss_at_inverse,
                                        "trace": [[q, loss] for q, loss in q_search.trace]}
        sidecar["calibration"] = calib
    ft_bytes = ft_readers[0].total_bytes()
    summary = {"method": spec.method, "drop_rate": spec.drop_rate, "rescale": rescale_text, "q": spec.rescale.q,
               "pruned_tensors": len(tensors), "copied_tensors": len(jobs) - len(tensors),
               "achieved_density": achieved, "output_files": files, "finetuned_bytes": ft_bytes,
               "notes": notes}
    if delta_writer is not None:
        delta_sidecar = {k: v for k, v in sidecar.items() if k != "recipe"}
        summary["delta_bytes"] = delta_writer.close(ft_dirs[0], delta_sidecar, ft_bytes)
        sidecar["delta"]["sparse_delta"] = {"dir": DELTA_SUBDIR, "bytes": summary["delta_bytes"],
                                            "finetuned_bytes": ft_bytes}
    if q_search is not None:
        summary["q_loss"], summary["q_loss_at_inverse"] = q_search.loss, q_search.loss_at_inverse
    sidecar["wall_time_s"] = round(time.time() - start, 3)
    sidecar["peak_memory"] = {"cpu_rss_bytes": peak_rss_bytes(), "cuda_bytes": None}
    summary["wall_time_s"], summary["peak_rss_bytes"] = sidecar["wall_time_s"], peak_rss_bytes()
    return {"sidecar": sidecar, "recipe": recipe, "summary": summary}


def _auto_q(base_reader, ft_dir, jobs, spec, calib: dict, trust_remote_code: bool, progress: bool):
    from llmprune.calibration.data import calibration_windows, load_texts
    from llmprune.delta.darex import search_q
    from llmprune.io.load import load_tokenizer

    source = calib.get("source", "c4")
    tokenizer = load_tokenizer(str(ft_dir), trust_remote_code=trust_remote_code)
    texts = load_texts(source, "train")
    windows = calibration_windows(tokenizer, texts, calib.get("samples", 16), calib.get("seqlen", 256),
                                  seed=calib.get("seed", 0))
    return search_q(base_reader, ft_dir, jobs, spec, windows, trust_remote_code=trust_remote_code,
                    progress=progress)
