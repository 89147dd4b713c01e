"""`llmprune` command line: a thin shell that dispatches to `llmprune/commands/<name>.py`.

Each command module defines `register(subparsers)` which adds its parser and sets
`func=run` (a function `run(args) -> int`). Imports of torch/transformers happen inside `run`, so
`llmprune --help` and argument errors are instant.

Errors: `UserError` is printed as one line and exits 2; anything else is an internal error, printed
as one line too (with `--debug` for the full traceback) and exits 1.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from llmprune.errors import UserError

# Order is the order shown in --help. A module that is missing (not yet written) is skipped.
COMMAND_MODULES = [
    "compress",
    "heal",
    "eval",
    "report",
    "sweep",
    "delta",
    "pack",
    "push",
    "card",
    "recipes",
]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's own convention)
        self.exit(2, f"llmprune: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llmprune", description="Post-training compression for LLMs.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    from llmprune import __version__

    parser.add_argument("--version", action="version", version=f"llmprune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"llmprune.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"llmprune.commands.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get("LLMPRUNE_DEBUG") == "1"
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        if debug:
            raise
        print(f"llmprune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmprune: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as exc:  # an internal error: still one line unless --debug
        if debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"llmprune: internal error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
