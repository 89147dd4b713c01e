"""DAREx-q without labels: one global q minimising the top-5 logit MSE (Deng et al., ICLR 2025).

`θ_q = θ_base + λ·w · (keep ⊙ Δ) / q` with the same seeded masks the streaming run uses. The
objective is DAREx's `top_k_mse_loss(logits_pruned, logits_ft, k=5)`: the fine-tune's top-5
logits at every position against the pruned model's logits at those same vocabulary ids, mean
squared error. q is searched coarse-to-fine on `[1 − p, 1]` as in DAREx `find_optimal_param`:
a grid of 10 steps with early stop after more than 3 non-improvements, then a grid of step/10
around the best.

Unlike the rest of `llmprune delta`, this loads the whole fine-tune (float32) and keeps the base
values and the dropped deltas of the pruned tensors: about three float32 copies of the model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from llmprune.errors import UserError

TOP_K = 5


@dataclass
class QSearch:
    q: float
    loss: float
    loss_at_inverse: float  # the objective at q = 1 − p (plain DARE / inverse rescale)
    trace: list[tuple[float, float]] = field(default_factory=list)  # (q, loss) in evaluation order


def _grid(lo: float, hi: float, step: float) -> list[float]:
    n = int(math.floor((hi - lo) / step + 1e-9))
    return [lo + i * step for i in range(n + 1)]


def find_q(objective: Callable[[float], float], lower: float, upper: float, steps: int = 10,
           decay: float = 0.1, patience: int = 3) -> tuple[float, list[tuple[float, float]]]:
    """Coarse-to-fine minimisation of `objective` over q in [lower, upper]."""
    scores: dict[float, float] = {}
    trace: list[tuple[float, float]] = []

    def score(q: float) -> float:
        key = round(q, 9)
        if key not in scores:
            scores[key] = float(objective(key))
            trace.append((key, scores[key]))
        return scores[key]

    def sweep(points: list[float]) -> None:
        best, misses = math.inf, 0
        for q in points:
            s = score(q)
            if s <= best:
                best, misses = s, 0
            else:
                misses += 1
                if misses > patience:
                    break

    step = (upper - lower) / steps
    if step <= 0:
        return lower, [(lower, score(lower))]
    sweep(_grid(lower, upper, step))
    centre = min(scores, key=scores.get)
    fine_lo = max(lower, centre - step * (1 - decay))
    fine_hi = min(upper, centre + step)
    sweep(_grid(fine_lo, fine_hi, step * decay))
    best = min(scores, key=lambda q: (scores[q], q))
    return best, trace


def top_k_mse_sums(logits, ref_values, ref_indices) -> tuple[float, int]:
    """Sum of squared differences at the reference top-k ids, and the number of terms."""
    pruned = logits.gather(-1, ref_indices)
    return float(((pruned.float() - ref_values) ** 2).sum()), ref_values.numel()


def search_q(base_reader, finetuned_dir, jobs, spec, windows, trust_remote_code: bool = False,
             batch_size: int = 4, progress: bool = True) -> QSearch:
    """Find q for a single fine-tune. `jobs` are the pipeline's TensorJobs, `windows` [n, seqlen] ids."""
    import torch
    from transformers import AutoModelForCausalLM
    from tqdm.auto import tqdm

    from llmprune.delta.sparsify import Rescale, sparsify, tensor_seed

    try:
        model = AutoModelForCausalLM.from_pretrained(str(finetuned_dir), dtype=torch.float32,
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"--rescale auto could not load the fine-tune as a causal LM ({str(exc).splitlines()[0]}); "
                        "pass --rescale q=VALUE instead") from None
    model.eval()
    batches = list(windows.split(batch_size))
    with torch.no_grad():
        refs = []
        for batch in batches:
            values, indices = model(batch).logits.topk(TOP_K, dim=-1)
            refs.append((values.float(), indices))

    params = dict(model.named_parameters())
    scale = (1.0 if spec.normalize else spec.weights[0]) * spec.lam  # as in pipeline.compute_tensor
    entries = []  # (parameter, rows, base rows float32, scale·keep⊙Δ)
    for job in jobs:
        if not job.prune:
            continue
        param = params.get(job.name)
        if param is None or tuple(param.shape) != tuple(job.shape):
            raise UserError(f"--rescale auto cannot map checkpoint tensor {job.name} onto the loaded model; "
                            "pass --rescale q=VALUE instead")
        rows = job.shared_rows  # None: base and fine-tune have the same shape
        base = base_reader.get(job.base_name)
        base = (base if rows is None else base[:rows]).float()
        target = param.data if rows is None else param.data[:rows]
        delta = target - base
        keep, _ = sparsify(delta, spec.strategy, spec.drop_rate, Rescale("none"),
                           tensor_seed(spec.seed, job.name, 0))
        delta.mul_(keep).mul_(scale)
        entries.append((target, base, delta))

    def objective(q: float) -> float:
        with torch.no_grad():
            for target, base, kept in entries:
                torch.add(base, kept, alpha=1.0 / q, out=target)
            total, count = 0.0, 0
            for batch, (values, indices) in zip(batches, refs):
                s, n = top_k_mse_sums(model(batch).logits, values, indices)
                total, count = total + s, count + n
        return total / count

    lower = 1.0 - spec.drop_rate
    bar = tqdm(desc="DAREx-q search", unit="eval", disable=not progress)

    def counted(q: float) -> float:
        loss = objective(q)
        bar.update(1)
        bar.set_postfix(q=f"{q:.4f}", loss=f"{loss:.4g}")
        return loss

    q, trace = find_q(counted, lower, 1.0)
    bar.close()
    losses = dict(trace)
    at_inverse = losses.get(round(lower, 9))
    if at_inverse is None:
        at_inverse = objective(lower)
    del model, entries
    return QSearch(q=q, loss=losses[q], loss_at_inverse=at_inverse, trace=trace)
