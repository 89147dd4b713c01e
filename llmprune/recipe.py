"""Recipes: the one object behind the CLI flags, the Python API and YAML files.

    description: drop 2 layers, narrow the MLP, then Wanda 2:4
    calibration: {data: c4, samples: 128, seqlen: 2048, seed: 0}
    stages:
      - method: layer-drop     # a structured stage kind
        num_layers: 2
      - method: width
        mlp_keep: 0.8
      - method: wanda          # a pruning method: the `prune` stage kind
        sparsity: 2:4          # or 0.5 (unstructured)
        allocation: uniform    # uniform | owl | global | search

`method:` names the stage; its other keys are the keyword-only parameters of the stage kind
(`llmprune.stages`) and, for pruning methods, of the method (`llmprune.methods`). `llmprune recipes`
lists every key. Every key and value is validated before a model is loaded; an error names the
file, the stage and the key.
Named recipes live in `recipes/` (installed as `llmprune.recipes`) and are found by file stem.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from llmprune.errors import UserError
from llmprune.masks import Pattern, parse_pattern

CALIB_KEYS = ("data", "samples", "seqlen", "seed", "batch_size")


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.1 reads `2:4` as the base-60 integer 124; in a recipe it is always an N:M pattern, so
    scalars with a colon are never resolved as numbers here (the int/float resolvers lose their
    base-60 forms)."""


_BASE60_FREE = {
    "tag:yaml.org,2002:int": r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$",
    "tag:yaml.org,2002:float": (r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9_]+(?:[eE][-+][0-9]+)?"
                                r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
}
_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _BASE60_FREE]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _tag, _regexp in _BASE60_FREE.items():
    _RecipeLoader.add_implicit_resolver(_tag, re.compile(_regexp), list("-+0123456789."))

TOP_KEYS = ("name", "description", "calibration", "stages")


DEFAULT_SEQLEN = 2048


@dataclass
class Calibration:
    data: str = "c4"
    samples: int = 128
    seqlen: int | None = None   # None: DEFAULT_SEQLEN, or the model's positions if it has fewer
    seed: int = 0
    batch_size: int = 8         # calibration windows per forward call (memory vs speed only)

    def validate(self, where: str = "calibration") -> "Calibration":
        for key in ("samples", "seqlen", "batch_size"):
            value = getattr(self, key)
            if key == "seqlen" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"{where}: '{key}' must be a positive integer, got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise UserError(f"{where}: 'seed' must be an integer, got {self.seed!r}")
        if not isinstance(self.data, str) or not self.data:
            raise UserError(f"{where}: 'data' must be c4, wikitext2, stdlib or a file path")
        return self

    def window(self, config) -> tuple[int, str | None]:
        """(tokens per window for this model, a note when an asked-for length had to be cut)."""
        max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if self.seqlen is None:
            return (min(DEFAULT_SEQLEN, max_pos) if max_pos else DEFAULT_SEQLEN), None
        if max_pos and self.seqlen > max_pos:
            return max_pos, f"calibration seqlen {self.seqlen} exceeds the model's {max_pos} positions; using {max_pos}"
        return self.seqlen, None


@dataclass
class Stage:
    """One recipe stage: `method` and the keys given for it (validated, coerced)."""
    method: str
    params: dict = field(default_factory=dict)

    @classmethod
    def build(cls, method: Any, params: dict, where: str) -> "Stage":
        from llmprune.stages import kind_for, validate_stage

        if not isinstance(method, str) or not method:
            raise UserError(f"{where}: 'method' must be a method name like wanda or width, got {method!r}")
        try:
            kind_for(method)
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
        return cls(method=method, params=validate_stage(method, params, f"{where} ({method})"))

    @property
    def kind(self) -> str:
        from llmprune.stages import kind_for

        return kind_for(self.method).name

    def get(self, key: str, default: Any = None) -> Any:
        """A parameter as the stage will run it (given, or the stage kind's default)."""
        from llmprune.stages import resolved_params

        return resolved_params(self.method, self.params).get(key, default)

    @property
    def pattern(self) -> Pattern | None:
        """The target pattern of a prune stage (None for other kinds)."""
        sparsity = self.params.get("sparsity")
        return parse_pattern(sparsity) if sparsity is not None else None

    @property
    def true_sequential(self) -> bool | None:
        return self.params.get("true_sequential")

    def needs_calibration(self) -> bool:
        from llmprune.stages import kind_for, resolved_params

        return kind_for(self.method).needs_calibration({"method": self.method,
                                                        **resolved_params(self.method, self.params)})

    def to_dict(self) -> dict:
        return {"method": self.method, **self.params}


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
            if "method" not in raw:
                raise UserError(f"{at} is missing 'method'")
            stages.append(Stage.build(raw["method"], {k: v for k, v in raw.items() if k != "method"}, at))
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
    def from_cli(cls, method: str, sparsity=None, **kwargs) -> "Recipe":
        """One-stage recipe from CLI-style arguments (`None` values mean 'default')."""
        stage: dict = {"method": method}
        if sparsity is not None:
            stage["sparsity"] = sparsity
        calib = {}
        for key, value in kwargs.items():
            if value is None:
                continue
            if key in CALIB_KEYS:
                calib[key] = value
            else:
                stage[key] = value
        return cls.from_dict({"stages": [stage], "calibration": calib}, where="arguments")

    def needs_calibration(self) -> bool:
        return any(stage.needs_calibration() for stage in self.stages)

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
        data = yaml.load(path.read_text(), Loader=_RecipeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"recipe {path} is not valid YAML{at}") from None
    recipe = Recipe.from_dict(data, where=f"recipe {path.name}")
    recipe.name = recipe.name or path.stem
    return recipe
