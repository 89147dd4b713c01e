"""`llmprune push DIR REPO_ID`: upload an llmprune output with its model card in one commit."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "push", help="push an output directory to the Hugging Face Hub with an honest model card",
        description="Create REPO_ID if missing and upload DIR (model, tokenizer, llmprune.json, eval results) "
                    "in one commit, with a README.md model card generated from llmprune.json and "
                    "DIR/eval/results.json. The token comes from HF_TOKEN or `hf auth login`. "
                    "A hand-written README.md (without the llmprune marker line) is uploaded as it is.")
    parser.add_argument("directory", metavar="DIR", help="output of `llmprune compress`, `delta` or `pack`")
    parser.add_argument("repo_id", metavar="REPO_ID", help="NAMESPACE/NAME (a bare NAME goes to your account)")
    parser.add_argument("--private", action="store_true",
                        help="create the repository as private (an existing repository keeps its visibility)")
    parser.add_argument("--revision", metavar="BRANCH", default=None,
                        help="branch to commit to (created if missing; default: main)")
    parser.add_argument("--commit-message", metavar="MSG", default=None, help="commit message")
    parser.add_argument("--base-model", metavar="HUB_ID", default=None,
                        help="the Hub id of the base model for the card, when llmprune.json names a local copy of it")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the files (with sizes) and the card that would be pushed; no network")
    parser.add_argument("--quiet", action="store_true", help="no upload progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from llmprune.io.card.eval_table import UNVERIFIED, unverified_warning
    from llmprune.io.hub import check_repo_id, push_output, summary_table

    check_repo_id(args.repo_id)
    if args.base_model is not None:
        check_repo_id(args.base_model, "--base-model")
    result = push_output(args.directory, args.repo_id, private=args.private, revision=args.revision,
                         commit_message=args.commit_message, dry_run=args.dry_run, base_model=args.base_model)
    if result.eval_status == UNVERIFIED:
        print(f"llmprune: warning: {unverified_warning(args.directory)}", file=sys.stderr)
    where = result.repo_id + (f" (branch {result.revision})" if result.revision else "")
    card_note = "generated" if result.card_generated else "hand-written README.md, uploaded as it is"
    if result.dry_run:
        print(f"Dry run: nothing was sent. A push to {where} would upload {len(result.files)} files in one commit:")
        print(summary_table(result))
        print("A real push also deletes weight files in the repository that this directory does not have "
              "(so stale shards cannot shadow the new weights).")
        print(f"\n----- README.md ({card_note}) -----")
        print(result.card, end="" if result.card.endswith("\n") else "\n")
        print("----- end of README.md -----")
        return 0
    print(f"Pushed {len(result.files)} files to {where} in one commit:")
    print(summary_table(result))
    if result.deleted:
        print("Deleted stale weight files: " + ", ".join(result.deleted))
    if result.commit_url:
        print(f"Commit: {result.commit_url}")
    from pathlib import Path

    readme = Path(args.directory).expanduser() / "README.md"
    print(f"Model card: {card_note}" + (f"; written to {readme}" if result.card_generated else ""))
    return 0
