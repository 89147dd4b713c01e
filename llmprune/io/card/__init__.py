"""The model card (`README.md`) of an llmprune output directory.

Every number in the card is read from a file in the directory: `llmprune.json` (what was run and
what it achieved) and, when `llmprune eval --output DIR/eval` was run, `eval/results.json` (checked
against the weights in DIR by their fingerprint; see `eval_table`). A section without data is left
out rather than filled with a placeholder. A card that llmprune wrote carries `CARD_MARKER`; a
README.md without it was written by hand and is never overwritten silently (`is_generated_card`).

Modules, one job each:
    files       README.md / eval results on disk, the marker, the front matter parser
    format      numbers, percentages, tables, tensor type names
    models      the base model and fine-tunes: Hub id (recorded, --base-model, or a Hub cache
                snapshot folder), links, license
    metadata    the YAML front matter and the facts it rests on (output kind, zero patterns)
    summary     title and summary, how to use, limitations
    sections    stages, sparsity, delta, packed format, calibration, recipe, reproduce/run facts
    eval_table  the evaluation section and the fingerprint check of eval/results.json
    render      the whole card
"""
from llmprune.io.card.files import (  # noqa: F401  (the package's entry points)
    CARD_MARKER, CARD_NAME, EVAL_RESULTS, is_generated_card, load_eval_results, parse_front_matter, write_card,
)
from llmprune.io.card.render import eval_status, render_card, render_card_checked  # noqa: F401
