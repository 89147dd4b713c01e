"""How the target sparsity is spread over matrices.

- uniform: every targeted matrix gets the target.
- owl:     Outlier-Weighted Layerwise sparsity (Yin et al., 2024; luuyin/OWL `prune_wanda_outlier`).
           Per decoder layer l, over the Wanda scores |W|·‖X‖ of all its targeted linears:
           D_l = 100·#(score > M·mean(score))/numel;  r = (D − min D)/(max D − min D)·2λ;
           sparsity_l = 1 − (r_l − mean(r) + 1 − S). Layers with more outliers are pruned less; the mean
           over layers stays S; the ratio is shared by all linears of a layer (luuyin/OWL#9).
- global:  one |W| ranking across all targeted matrices (magnitude only), each matrix keeping at
           least `min_density` of its weights; exactly round(S·total) weights are pruned.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from llmprune.arch import decoder_layers, layer_linears, spec_for, weight_2d
from llmprune.masks import num_to_prune


def owl_outlier_ratio(weights: list[torch.Tensor], input_sq_norms: list[torch.Tensor], owl_m: float) -> float:
    """D_l in percent, for one layer: share of Wanda scores above owl_m × their mean."""
    scores = torch.cat([(w.float().abs() * n.to(w.device).sqrt().unsqueeze(0)).flatten()
                        for w, n in zip(weights, input_sq_norms)])
    return 100.0 * float((scores > owl_m * scores.mean()).sum().item()) / scores.numel()


def owl_layer_sparsities(outlier_ratios: list[float], target: float, owl_lambda: float) -> list[float]:
    ratios = torch.tensor(outlier_ratios, dtype=torch.float64)
    spread = ratios.max() - ratios.min()
    if spread == 0:
        return [target] * len(outlier_ratios)
    r = (ratios - ratios.min()) / spread * (2 * owl_lambda)
    density = r - r.mean() + (1 - target)
    sparsity = 1 - density
    # The reference sets non-positive sparsities to 0.01; keep every layer in (0, 1) likewise.
    return [min(max(float(s), 0.01), 0.99) for s in sparsity]


def global_magnitude_sparsities(modules: dict, target: float, min_density: float) -> dict[str, float]:
    """Per-matrix sparsity from one |W| threshold over all `modules`, capped by `min_density`."""
    abs_weights = {name: weight_2d(m).detach().abs().float().flatten() for name, m in modules.items()}
    caps = {name: int((1 - min_density) * w.numel()) for name, w in abs_weights.items()}
    total = sum(w.numel() for w in abs_weights.values())
    k = num_to_prune(total, target)

    def pruned_at(threshold: float) -> dict[str, int]:
        return {n: min(int((w <= threshold).sum().item()), caps[n]) for n, w in abs_weights.items()}

    lo, hi = -1.0, max(float(w.max().item()) for w in abs_weights.values())
    for _ in range(60):                    # bisection on the threshold: pruned count is monotone
        mid = (lo + hi) / 2
        if sum(pruned_at(mid).values()) <= k:
            lo = mid
        else:
            hi = mid
    counts = pruned_at(lo)
    leftover = k - sum(counts.values())    # ties between lo and hi: hand out one by one
    for name in sorted(abs_weights, key=lambda n: -abs_weights[n].numel()):
        if leftover <= 0:
            break
        room = min(caps[name] - counts[name], leftover)
        counts[name] += room
        leftover -= room
    return {n: counts[n] / abs_weights[n].numel() for n in abs_weights}


def owl_layer_sparsities_for_model(model, calib_ids: torch.Tensor, batch_size: int, selector, device: str,
                                   target: float, owl_m: float, owl_lambda: float,
                                   progress: bool = True) -> dict[str, float]:
    """OWL's first (dense) pass: the outlier ratio of every decoder layer's targeted linears, mapped to
    per-layer sparsities {layer name: sparsity} (layers with no targeted linear are left out)."""
    from llmprune.calibration.engine import capture_layer_inputs, layerwise
    from llmprune.calibration.observers import LayerObserver

    prefix = spec_for(model).layers
    ratios: list[float] = []

    def step(s):
        linears = {n: m for n, m in layer_linears(s.layer, s.name).items() if selector.wants(n)}
        if not linears:
            ratios.append(float("nan"))
            return
        obs = LayerObserver(linears, {"input_sq_norm"})
        with obs.hooked(stop_early=True):
            s.forward_all(obs)
        obs.seal_all()
        ratios.append(owl_outlier_ratio([weight_2d(m) for m in linears.values()],
                                        [obs.stats[n].input_sq_norm for n in linears], owl_m))

    captured = capture_layer_inputs(model, calib_ids, batch_size)
    with tqdm(total=len(decoder_layers(model)), desc="OWL outlier scan", disable=not progress, unit="layer") as bar:
        layerwise(model, captured, device, prefix, step, bar, final=False)   # a dense scan: prunes nothing
    valid = [r for r in ratios if r == r]
    per_layer = iter(owl_layer_sparsities(valid, target, owl_lambda))
    return {f"{prefix}.{i}": next(per_layer) for i, r in enumerate(ratios) if r == r}
