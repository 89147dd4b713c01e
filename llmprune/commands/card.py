"""`llmprune card DIR`: write (or refresh) the model card README.md of an output directory."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "card", help="write/refresh the model card (README.md) of an output directory",
        description="Render README.md from DIR/llmprune.json and, when present, DIR/eval/results.json. "
                    "Only README.md is written. A README.md without llmprune's marker line was written by "
                    "hand and is kept unless --force. Eval results measured on other weights than DIR's are "
                    "refused; results from before llmprune recorded weight fingerprints are shown labelled "
                    "unverified.")
    parser.add_argument("directory", metavar="DIR", help="output of `llmprune compress`, `delta` or `pack`")
    parser.add_argument("--repo-id", metavar="REPO_ID", default=None,
                        help="Hub id to use in the card's usage snippet (default: the directory name)")
    parser.add_argument("--base-model", metavar="HUB_ID", default=None,
                        help="the Hub id of the base model, when llmprune.json names a local copy of it")
    parser.add_argument("--force", action="store_true", help="replace a hand-written README.md")
    parser.add_argument("--stdout", action="store_true", help="print the card instead of writing it")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from llmprune.errors import UserError
    from llmprune.io.card.eval_table import UNVERIFIED, unverified_warning
    from llmprune.io.card.files import CARD_NAME, is_generated_card, write_card
    from llmprune.io.card.render import eval_status, render_card_checked
    from llmprune.io.hub import check_repo_id

    repo_id = check_repo_id(args.repo_id) if args.repo_id else None
    base_model = check_repo_id(args.base_model, "--base-model") if args.base_model is not None else None
    directory = Path(args.directory).expanduser()
    text = render_card_checked(directory, repo_id=repo_id, base_model=base_model)
    if eval_status(directory) == UNVERIFIED:
        print(f"llmprune: warning: {unverified_warning(directory)}", file=sys.stderr)
    if args.stdout:
        print(text, end="")
        return 0
    readme = directory / CARD_NAME
    if not args.force and not is_generated_card(readme):
        raise UserError(f"{readme} was not written by llmprune (no marker line); pass --force to replace it, "
                        "or --stdout to print the generated card")
    path = write_card(directory, text)
    print(f"Wrote {path} ({len(text.encode('utf-8')):,} bytes)")
    return 0
