"""Helpers shared by the tests that drive the CLI in-process and read the model cards it writes."""
import os
from pathlib import Path


def cli(root: Path, *args: str) -> int:
    """`llmprune ARGS` in-process, run from `root` (relative paths resolve there); the exit code."""
    from llmprune.cli import main

    cwd = os.getcwd()
    os.chdir(root)
    try:
        return main(list(args))
    finally:
        os.chdir(cwd)


def table_rows(card: str, first_cell: str) -> list[list[str]]:
    """The cells of every markdown table row of `card` whose first cell is `first_cell`."""
    rows = []
    for line in card.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            rows.append(cells)
    return rows


def cli_workspace(root: Path, arch: str = "llama") -> Path:
    """`root/model` (a saved tiny `arch` model with its tokenizer) and `root/calib.txt` (60k characters of
    stdlib text): what the CLI tests compress from."""
    from tiny_models import sample_text, save_tiny

    save_tiny(root / "model", arch)
    (root / "calib.txt").write_text(sample_text()[:60_000])
    return root
