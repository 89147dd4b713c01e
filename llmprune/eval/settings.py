"""What an evaluation run is configured with: `Settings` (from the eval flags) and lm-eval's own
`--model_args` / `--gen_kwargs` strings, checked before a model is loaded; and `settings_record`,
the `settings` block of results.json that `report` compares between runs; and `Context`, what a
run needs besides the model (built by harness.prepare, used by lm_eval_run)."""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from typing import Any

from llmprune.errors import UserError
from llmprune.eval.suites import Suite, TaskSpec


@dataclass
class Settings:
    seqlen: int = 2048
    max_length: int = 2048
    batch_size: int | str = 8
    limit: float | None = None
    ppl_data: list[str] | None = None          # None = each suite's own `perplexity` list
    data_dir: str | None = None
    include_path: list[str] = field(default_factory=list)
    seed: int = 0
    softmax_dtype: str = "float32"
    apply_chat_template: bool = False
    progress: bool = True
    num_fewshot: int | None = None             # lm-eval's --num_fewshot: overrides the suites' shots
    gen_kwargs: dict[str, Any] | None = None   # lm-eval's --gen_kwargs, for generate_until tasks
    model_args: dict[str, Any] = field(default_factory=dict)  # lm-eval's --model_args, given to HFLM

    def seeds(self) -> dict[str, int]:
        # lm-eval's defaults at seed 0 (python 0; numpy/torch/fewshot 1234), shifted together otherwise.
        return {"random": self.seed, "numpy": 1234 + self.seed, "torch": 1234 + self.seed,
                "fewshot": 1234 + self.seed}


def resolve_batch_size(batch_size: str | int, device) -> int | str:
    if isinstance(batch_size, int) or str(batch_size).isdigit():
        value = int(batch_size)
        if value < 1:
            raise UserError("--batch-size must be a positive integer or auto")
        return value
    if batch_size != "auto":
        raise UserError(f"--batch-size must be a positive integer or auto (got {batch_size})")
    # lm-eval's auto detection probes batch sizes until CUDA runs out of memory; a CPU has no such
    # signal (it would swap or get killed), so on CPU auto means a fixed modest batch.
    return "auto" if str(device).startswith("cuda") else 8


# lm-eval --model_args keys that llmprune sets itself, and the flag to use instead.
_OWN_MODEL_ARGS = {"pretrained": "MODEL", "tokenizer": "MODEL's tokenizer", "device": "--device", "dtype": "--dtype",
                   "revision": "--revision", "trust_remote_code": "--trust-remote-code",
                   "batch_size": "--batch-size", "max_batch_size": "--batch-size", "max_length": "--seqlen",
                   "softmax_dtype": "(always float32)"}


def parse_model_args(text: str | None) -> dict[str, Any]:
    """lm-eval's `--model_args k=v,k2=v2` (its own parser), checked against HFLM's parameters."""
    if not text:
        return {}
    import inspect

    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import simple_parse_args_string

    if any("=" not in part for part in text.split(",") if part.strip()):
        raise UserError(f"--model-args {text!r}: write key=value pairs separated by commas, e.g. add_bos_token=True")
    args = simple_parse_args_string(text)
    known = [n for n, p in inspect.signature(HFLM.__init__).parameters.items()
             if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    for key in args:
        if key in _OWN_MODEL_ARGS:
            raise UserError(f"--model-args {key}: llmprune sets it itself; use {_OWN_MODEL_ARGS[key]}")
        if key not in known:
            raise UserError(f"--model-args {key}: not a parameter of lm-eval's HF model; choose from "
                            f"{', '.join(k for k in known if k not in _OWN_MODEL_ARGS)}")
    return args


def parse_gen_kwargs(text: str | None) -> dict[str, Any] | None:
    """lm-eval's `--gen_kwargs k=v,...` (its own parser)."""
    if not text:
        return None
    from lm_eval.utils import simple_parse_args_string

    if any("=" not in part for part in text.split(",") if part.strip()):
        raise UserError(f"--gen-kwargs {text!r}: write key=value pairs separated by commas, e.g. temperature=0,max_gen_toks=256")
    return simple_parse_args_string(text) or None


def settings_record(settings: Settings, ppl_data: list[str], device: str) -> dict[str, Any]:
    """The `settings` block of results.json (what `report` and `--baseline` compare)."""
    return {"seqlen": settings.seqlen, "max_length": settings.max_length,
            "batch_size": settings.batch_size, "limit": settings.limit, "ppl_data": list(ppl_data),
            "data_dir": settings.data_dir, "include_path": settings.include_path,
            "softmax_dtype": settings.softmax_dtype, "apply_chat_template": settings.apply_chat_template,
            "num_fewshot": settings.num_fewshot, "gen_kwargs": settings.gen_kwargs,
            "model_args": settings.model_args, "device": device}


@dataclass
class Context:
    """What a run needs besides the model: built once, reused across sparsity levels."""
    lm: Any                                    # lm_eval HFLM wrapping the model object
    task_manager: Any | None
    specs: list[TaskSpec]
    suites: list[Suite]
    settings: Settings
    lm_eval_names: dict[str, str] = field(default_factory=dict)   # spec name -> name to load/read
    generated_dir: str | None = None

    def close(self) -> None:
        if self.generated_dir:
            shutil.rmtree(self.generated_dir, ignore_errors=True)
            self.generated_dir = None
