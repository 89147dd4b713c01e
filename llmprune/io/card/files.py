"""The files of a card: README.md (written atomically, a hand-written one recognised), its YAML front
matter, and `eval/results.json` beside the model."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

CARD_NAME = "README.md"
MARKER_PREFIX = "<!-- llmprune-card:"  # stable: how a generated card is recognised
CARD_MARKER = (MARKER_PREFIX + " written by `llmprune card` / `llmprune push` from llmprune.json and "
               "eval/results.json; delete this line to keep manual edits from being replaced -->")
EVAL_RESULTS = Path("eval") / "results.json"
EVAL_REPORT_DIR = Path("eval") / "report"


def load_eval_results(directory: str | os.PathLike) -> dict[str, Any] | None:
    """`DIR/eval/results.json` as written by `llmprune eval --output DIR/eval`, or None."""
    path = Path(directory) / EVAL_RESULTS
    if not path.is_file():
        return None
    from llmprune.io.files import read_json

    return read_json(path, "eval results", "rerun `llmprune eval` or remove it")


def is_generated_card(path: str | os.PathLike) -> bool:
    """True when the README.md at `path` was written by llmprune (or does not exist)."""
    path = Path(path)
    if not path.exists():
        return True
    try:
        return MARKER_PREFIX in path.read_text(errors="replace")
    except OSError:
        return False


def write_card(directory: str | os.PathLike, text: str) -> Path:
    """Write README.md atomically (temp file in DIR, then rename), so a crash never leaves half a card
    and a README.md that is a symlink (a Hub cache snapshot) is replaced, never written through."""
    from llmprune.io.files import write_text_atomic

    directory = Path(directory)
    write_text_atomic(directory / CARD_NAME, text)
    return directory / CARD_NAME


def parse_front_matter(text: str) -> dict[str, Any]:
    """The YAML metadata block of a card (for tests and for checking a card before upload)."""
    if not text.startswith("---\n"):
        return {}
    end = text.find("\n---\n", 4)
    if end < 0:
        raise ValueError("unterminated YAML front matter")
    return yaml.safe_load(text[4:end]) or {}
