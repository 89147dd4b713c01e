"""What a compress run did: one record per stage, and the model's final state.

`StageRecord` is filled by the stage kind (what it targeted and removed, per-module results) and
by `stages.run_stage` (parameters and zeros before/after, time). `CompressReport` holds them in
order; `summary_table()` is what the CLI prints and `io.sidecar` writes it to `llmprune.json`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmprune.masks import Pattern


@dataclass
class ModuleResult:
    shape: tuple[int, int]
    target: float | str      # sparsity (0.5, an OWL/search per-layer value) or "N:M"
    achieved: float
    seconds: float = 0.0


def pattern_target(pattern: Pattern) -> float | str:
    """How a target is recorded: a number for unstructured sparsity, "N:M" for N:M."""
    return str(pattern) if pattern.is_nm else round(pattern.sparsity, 6)


def target_sparsity(target: float | str | None) -> float | None:
    """The zero fraction a recorded target means ("N:M" = N zeros per M)."""
    if target is None:
        return None
    if isinstance(target, str) and ":" in target:
        n, m = (int(x) for x in target.split(":"))
        return n / m
    return float(target)


@dataclass
class StageRecord:
    index: int = 0
    method: str = ""
    kind: str = ""
    params: dict = field(default_factory=dict)
    target: Any = None              # what the stage aimed at (e.g. 0.5, "2:4", {"layers": 2})
    achieved: Any = None            # the same quantity, measured
    removed: dict = field(default_factory=dict)   # e.g. {"layers": [3, 4]}, {"mlp": {"before": 688, "after": 512}}
    parameters_before: int = 0
    parameters_after: int = 0
    zeros_before: int = 0           # zeros over the decoder layers' linear weights
    zeros_after: int = 0
    linear_elements: int = 0        # elements of those weights after the stage
    modules: dict[str, ModuleResult] = field(default_factory=dict)
    layers: dict[str, float] = field(default_factory=dict)   # per decoder layer (OWL / search sparsity)
    scores: dict = field(default_factory=dict)               # criterion scores, for the record
    schedule: str | None = None     # calibration schedule that ran (prune stages)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    measured: dict = field(default_factory=dict)   # kind-specific results, written at the record's top level
                                                    # (heal: loss_before/after, trainable_parameters, data)
    summary_lines: list[str] = field(default_factory=list)   # printed under the summary table

    @property
    def sparsity(self) -> float:
        """Zeros over the targeted matrices of this stage (prune stages)."""
        total = sum(r.shape[0] * r.shape[1] for r in self.modules.values())
        zeros = sum(r.achieved * r.shape[0] * r.shape[1] for r in self.modules.values())
        return zeros / total if total else 0.0

    def removed_text(self) -> str:
        parts = []
        for key, value in self.removed.items():
            if key == "layers":
                parts.append(f"layers {', '.join(map(str, value))}")
            elif isinstance(value, dict) and "before" in value:
                parts.append(f"{key} {value['before']} -> {value['after']} per layer")
            else:
                parts.append(f"{key} {value}")
        if self.modules:
            parts.append(f"{self.target} on {len(self.modules)} matrices")
        return "; ".join(parts) or "-"

    def to_dict(self) -> dict:
        out = {
            "index": self.index, "method": self.method, "kind": self.kind, "params": self.params,
            "target": self.target, "achieved": self.achieved, "removed": self.removed,
            "parameters": {"before": self.parameters_before, "after": self.parameters_after},
            "zeros": {"before": self.zeros_before, "after": self.zeros_after, "linear_elements": self.linear_elements,
                      "fraction_after": round(self.zeros_after / self.linear_elements, 6) if self.linear_elements else 0.0},
            "seconds": round(self.seconds, 3),
        }
        if self.modules:
            out["modules"] = {n: {"shape": list(r.shape), "target": r.target, "achieved": round(r.achieved, 6)}
                              for n, r in self.modules.items()}
        if self.layers:
            out["layers"] = self.layers
        if self.scores:
            out["scores"] = self.scores
        if self.schedule:
            out["schedule"] = self.schedule
        if self.notes:
            out["notes"] = self.notes
        for key, value in self.measured.items():     # never over a common key (e.g. the stage's seconds)
            out.setdefault(key, value)
        return out


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


@dataclass
class CompressReport:
    recipe: Any                                    # recipe.Recipe as run (defaults resolved)
    stages: list[StageRecord] = field(default_factory=list)
    calibration: dict | None = None
    wall_time_s: float = 0.0
    peak_memory: dict = field(default_factory=dict)
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)
    final_modules: dict[str, ModuleResult] = field(default_factory=dict)   # every decoder linear at the end
    parameters_before: int = 0
    parameters_after: int = 0

    @property
    def modules(self) -> dict[str, ModuleResult]:
        """Per pruned matrix, its last prune stage's result (names are those of the final model)."""
        out: dict[str, ModuleResult] = {}
        for record in self.stages:
            out.update(record.modules)
        return out

    @property
    def layer_sparsity(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for record in self.stages:
            out.update(record.layers)
        return out

    @property
    def sparsity(self) -> float:
        """Zeros over every linear weight of the decoder layers of the final model."""
        total = sum(r.shape[0] * r.shape[1] for r in self.final_modules.values())
        zeros = sum(r.achieved * r.shape[0] * r.shape[1] for r in self.final_modules.values())
        return zeros / total if total else 0.0

    def summary_table(self) -> str:
        rows = [("stage", "method", "removed", "parameters", "zeros in decoder linears")]
        for r in self.stages:
            before = r.zeros_before / max(r.linear_elements, 1) if r.parameters_before == r.parameters_after else None
            zeros = (f"{before:.1%} -> " if before is not None else "") + \
                    f"{r.zeros_after / max(r.linear_elements, 1):.1%}"
            rows.append((str(r.index), r.method, r.removed_text(),
                         f"{_human(r.parameters_before)} -> {_human(r.parameters_after)}", zeros))
        lines = _table(rows)
        for r in self.stages:
            if r.modules:
                lines += ["", f"stage {r.index} ({r.method}) per module type:"] + _module_table(r)
            if isinstance(r.scores.get("kept"), dict):      # expert-drop: kept experts per MoE layer
                lines += ["", f"stage {r.index} ({r.method}) per MoE layer:"] + _kept_experts_table(r)
            if r.summary_lines:
                lines += ["", f"stage {r.index} ({r.method}):"] + [f"  {line}" for line in r.summary_lines]
        lines.append("")
        removed = 1 - self.parameters_after / self.parameters_before if self.parameters_before else 0.0
        mem = self.peak_memory
        schedules = sorted({r.schedule for r in self.stages if r.schedule})
        lines.append(f"parameters {_human(self.parameters_before)} -> {_human(self.parameters_after)} "
                     f"({removed:.1%} removed) · zeros {self.sparsity:.1%} of decoder linear weights")
        lines.append(f"wall time {self.wall_time_s:.1f}s" + "".join(f" · {x}" for x in schedules)
                     + f" · peak CPU RSS {mem.get('cpu_rss_bytes', 0) / 2**30:.2f} GiB"
                     + (f" · peak CUDA {mem['cuda_bytes'] / 2**30:.2f} GiB" if mem.get("cuda_bytes") else ""))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _module_table(record: StageRecord) -> list[str]:
    """Per module type (last name component; an expert slice `...gate_up_proj[5]` counts as `gate_up_proj`):
    target vs achieved sparsity."""
    groups: dict[str, list[ModuleResult]] = {}
    for name, r in record.modules.items():
        groups.setdefault(name.rsplit(".", 1)[-1].split("[", 1)[0], []).append(r)
    rows = [("module", "count", "target", "achieved")]
    for kind, items in groups.items():
        targets = sorted({str(r.target) for r in items})
        if len(targets) == 1:
            target = targets[0]
        else:
            values = [target_sparsity(r.target) for r in items]
            target = f"{min(values):.3f}..{max(values):.3f}"
        numel = sum(r.shape[0] * r.shape[1] for r in items)
        achieved = sum(r.achieved * r.shape[0] * r.shape[1] for r in items) / numel
        rows.append((kind, str(len(items)), target, f"{achieved:.4f}"))
    rows.append(("all targeted", str(len(record.modules)), str(record.target), f"{record.sparsity:.4f}"))
    return _table(rows)


def _kept_experts_table(record: StageRecord) -> list[str]:
    """Per MoE layer: the kept experts (original numbering) and the share of routed calibration tokens
    the removed experts received before the drop."""
    removed = record.scores.get("routed_share_removed") or {}
    rows = [("layer", "kept experts", "routed share of removed experts")]
    for layer, kept in record.scores["kept"].items():
        share = removed.get(layer)
        rows.append((str(layer), " ".join(map(str, kept)), f"{share:.1%}" if share is not None else "-"))
    return _table(rows)
