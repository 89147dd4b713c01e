"""Recipes: the one object behind the CLI flags, the Python API and YAML files.

    description: Wanda at 50% unstructured
    calibration: {data: c4, samples: 128, seqlen: 2048, seed: 0}
    stages:
      - method: wanda
        sparsity: 0.5          # or "2:4" (N zeros per M inputs)
        allocation: uniform    # uniform | owl | global (global: magnitude only)
        # true_sequential: true | false; omitted = the method's default (sparsegpt: true if memory allows)
        # owl_m: 5, owl_lambda: 0.08, min_density: 0.05, targets: REGEX, ignore: REGEX,
        # plus the method's own parameters (e.g. sparsegpt: block_size, dampening)

Every key is validated before a model is loaded; an unknown key is an error that names it.
Named recipes live in `recipes/` (installed as `llmprune.recipes`) and are found by file stem.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from llmprune.errors import UserError
from llmprune.masks import Pattern, parse_pattern

ALLOCATIONS = ("uniform", "owl", "global")
STAGE_KEYS = ("method", "sparsity", "allocation", "owl_m", "owl_lambda", "min_density", "targets", "ignore",
              "true_sequential")
CALIB_KEYS = ("data", "samples", "seqlen", "seed", "batch_size")
TOP_KEYS = ("name", "description", "calibration", "stages")


@dataclass
class Calibration:
    data: str = "c4"
    samples: int = 128
    seqlen: int = 2048
    seed: int = 0
    batch_size: int = 8         # calibration windows per forward call (memory vs speed only)

    def validate(self, where: str = "calibration") -> "Calibration":
        for key in ("samples", "seqlen", "batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"{where}: '{key}' must be a positive integer, got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise UserError(f"{where}: 'seed' must be an integer, got {self.seed!r}")
        if not isinstance(self.data, str) or not self.data:
            raise UserError(f"{where}: 'data' must be c4, wikitext2, stdlib or a file path")
        return self


@dataclass
class Stage:
    method: str
    sparsity: Any
    allocation: str = "uniform"
    owl_m: float = 5.0          # outlier threshold: score > owl_m * mean (OWL's Hyper_m; README uses 5)
    owl_lambda: float = 0.08    # per-layer sparsities lie in [S - lambda, S + lambda]
    min_density: float = 0.0    # global allocation: every matrix keeps at least this fraction
    targets: str | None = None
    ignore: str | None = None
    # Calibration schedule inside a decoder layer. False: statistics of every linear come from the
    # dense layer, then one more pass propagates the pruned outputs (reference Wanda/SparseGPT).
    # True: [q,k,v] -> [o] -> [gate,up] -> [down] are pruned one after another, each calibrated on
    # the outputs of the already-pruned ones (SparseGPT's --true-sequential), in a single pass.
    # None: the method's default, if a layer's calibration activations fit in memory (api.py).
    true_sequential: bool | None = None
    params: dict = field(default_factory=dict)

    @property
    def pattern(self) -> Pattern:
        return parse_pattern(self.sparsity)

    def validate(self, where: str) -> "Stage":
        from llmprune.arch import TargetSelector
        from llmprune.methods import get_method

        spec = get_method(self.method)
        pattern = self.pattern
        if self.allocation not in ALLOCATIONS:
            raise UserError(f"{where}: allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if self.allocation != "uniform" and pattern.is_nm:
            raise UserError(f"{where}: allocation '{self.allocation}' needs unstructured sparsity, not {pattern}")
        if self.allocation == "global" and self.method != "magnitude":
            raise UserError(f"{where}: allocation 'global' ranks |W| across matrices and is only for method magnitude")
        for key in ("owl_m", "owl_lambda", "min_density"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"{where}: '{key}' must be a number, got {value!r}")
        if self.owl_m <= 0 or not (0 <= self.owl_lambda < 1):
            raise UserError(f"{where}: need owl_m > 0 and 0 <= owl_lambda < 1")
        if self.true_sequential is not None and not isinstance(self.true_sequential, bool):
            raise UserError(f"{where}: 'true_sequential' must be true or false, got {self.true_sequential!r}")
        if self.true_sequential is not None and not spec.needs:
            raise UserError(f"{where}: 'true_sequential' is a calibration schedule; method {self.method} "
                            f"uses no calibration data")
        if not (0 <= self.min_density < 1):
            raise UserError(f"{where}: min_density must be in [0, 1)")
        if self.allocation == "global" and self.min_density > 1 - pattern.sparsity:
            raise UserError(f"{where}: min_density {self.min_density} cannot be met at sparsity {pattern.sparsity}")
        TargetSelector(self.targets, self.ignore)
        self.params = spec.check_params(self.params, where, STAGE_KEYS)
        return self

    def to_dict(self) -> dict:
        out = {"method": self.method, "sparsity": self.sparsity, "allocation": self.allocation}
        if self.allocation == "owl":
            out.update(owl_m=self.owl_m, owl_lambda=self.owl_lambda)
        if self.allocation == "global":
            out["min_density"] = self.min_density
        for key in ("targets", "ignore"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.true_sequential is not None:
            out["true_sequential"] = self.true_sequential
        out.update(self.params)
        return out


@dataclass
class Recipe:
    stages: list[Stage]
    calibration: Calibration = field(default_factory=Calibration)
    name: str | None = None
    description: str = ""

    @classmethod
    def from_dict(cls, data: Any, where: str = "recipe") -> "Recipe":
        if not isinstance(data, dict):
            raise UserError(f"{where}: a recipe must be a mapping with 'stages' (got {type(data).__name__})")
        for key in data:
            if key not in TOP_KEYS:
                raise UserError(f"{where}: unknown key '{key}' (allowed: {', '.join(TOP_KEYS)})")
        stages_raw = data.get("stages")
        if not isinstance(stages_raw, list) or not stages_raw:
            raise UserError(f"{where}: 'stages' must be a non-empty list of {{method: ..., sparsity: ...}}")
        stages = []
        for i, raw in enumerate(stages_raw):
            at = f"{where}: stages[{i}]"
            if not isinstance(raw, dict):
                raise UserError(f"{at} must be a mapping like {{method: wanda, sparsity: 0.5}}")
            for required in ("method", "sparsity"):
                if required not in raw:
                    raise UserError(f"{at} is missing '{required}'")
            known = {k: raw[k] for k in STAGE_KEYS if k in raw}
            params = {k: v for k, v in raw.items() if k not in STAGE_KEYS}
            stages.append(Stage(**known, params=params).validate(at))
        calib_raw = data.get("calibration") or {}
        if not isinstance(calib_raw, dict):
            raise UserError(f"{where}: 'calibration' must be a mapping")
        for key in calib_raw:
            if key not in CALIB_KEYS:
                raise UserError(f"{where}: unknown calibration key '{key}' (allowed: {', '.join(CALIB_KEYS)})")
        calibration = Calibration(**calib_raw).validate(f"{where}: calibration")
        return cls(stages=stages, calibration=calibration, name=data.get("name"),
                   description=str(data.get("description") or ""))

    @classmethod
    def from_cli(cls, method: str, sparsity, allocation: str = "uniform", **kwargs) -> "Recipe":
        """One-stage recipe from CLI-style arguments (`None` values mean 'default')."""
        stage = {"method": method, "sparsity": sparsity, "allocation": allocation}
        calib = {}
        for key, value in kwargs.items():
            if value is None:
                continue
            if key in CALIB_KEYS:
                calib[key] = value
            else:
                stage[key] = value
        return cls.from_dict({"stages": [stage], "calibration": calib}, where="arguments")

    def to_dict(self) -> dict:
        out: dict = {}
        if self.name:
            out["name"] = self.name
        if self.description:
            out["description"] = self.description
        out["calibration"] = asdict(self.calibration)
        out["stages"] = [s.to_dict() for s in self.stages]
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def named_recipes() -> dict[str, Path]:
    files = resources.files("llmprune.recipes")
    return {Path(f.name).stem: Path(str(f)) for f in files.iterdir() if f.name.endswith((".yaml", ".yml"))}


def load_recipe(name_or_path: str | Path | dict | Recipe) -> Recipe:
    """A Recipe from an object, a dict, a YAML path, or the name of a shipped recipe."""
    if isinstance(name_or_path, Recipe):
        return name_or_path
    if isinstance(name_or_path, dict):
        return Recipe.from_dict(name_or_path)
    text = str(name_or_path)
    path = Path(text).expanduser()
    if not path.is_file():
        named = named_recipes()
        if text not in named:
            raise UserError(f"recipe '{text}' is neither a file nor a named recipe ({', '.join(sorted(named))})")
        path = named[text]
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"recipe {path} is not valid YAML{at}") from None
    recipe = Recipe.from_dict(data, where=f"recipe {path.name}")
    recipe.name = recipe.name or path.stem
    return recipe
