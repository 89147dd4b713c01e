"""The whole card: front matter, marker line and sections, in order."""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from llmprune.errors import UserError
from llmprune.io.card import eval_table, sections, summary
from llmprune.io.card.files import CARD_MARKER, EVAL_RESULTS, load_eval_results
from llmprune.io.card.metadata import front_matter, kind
from llmprune.io.card.models import with_base_model
from llmprune.io.sidecar import read_sidecar


def render_card(directory: str | os.PathLike, repo_id: str | None = None, base_model: str | None = None) -> str:
    """The full README.md text for an llmprune output directory (raises UserError if it is not one, or
    if its eval/results.json was measured on other weights). `base_model`: the Hub id the recorded base
    model stands for (`--base-model`), replacing what llmprune.json says."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory")
    sidecar = with_base_model(read_sidecar(directory), base_model)
    kind(sidecar)  # validates the kind up front
    results = load_eval_results(directory)
    status = eval_table.verify_eval_results(directory, results)
    meta = front_matter(directory, sidecar)
    parts = [
        summary.title_and_summary(directory, sidecar, repo_id),
        summary.usage(directory, sidecar, repo_id),
        sections.stages_section(sidecar),
        sections.heal_section(sidecar),
        sections.sparsity_section(sidecar),
        sections.delta_section(sidecar),
        sections.pack_section(sidecar),
        sections.calibration_section(sidecar),
        sections.recipe_section(directory, sidecar),
        eval_table.eval_section(results, status),
        eval_table.report_links(directory),
        summary.limitations(directory, sidecar, results),
        sections.provenance(sidecar),
    ]
    body = "\n\n".join(s for s in parts if s)
    head = "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"
    return f"{head}{CARD_MARKER}\n\n{body}\n"


def render_card_checked(directory: str | os.PathLike, repo_id: str | None = None,
                        base_model: str | None = None) -> str:
    """`render_card`, with a sidecar or eval results of the wrong layout (hand-edited, another tool's)
    reported as one line naming the files instead of an internal error."""
    from llmprune.io.errors import _first_line

    try:
        return render_card(directory, repo_id=repo_id, base_model=base_model)
    except (AttributeError, TypeError, KeyError, IndexError) as exc:
        files = [Path(directory) / "llmprune.json"]
        if (Path(directory) / EVAL_RESULTS).is_file():
            files.append(Path(directory) / EVAL_RESULTS)
        raise UserError(f"{' or '.join(map(str, files))} does not have the layout llmprune writes "
                        f"({type(exc).__name__}: {_first_line(exc)}); rerun the command that wrote it") from exc


def eval_status(directory: str | os.PathLike) -> str | None:
    """verified / unverified / None (no results) for DIR/eval/results.json; raises on a mismatch."""
    return eval_table.verify_eval_results(directory, load_eval_results(directory))
