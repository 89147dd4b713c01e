"""`llmprune` command line: a thin shell that dispatches to `llmprune/commands/<name>.py`.

Each command module defines `register(subparsers)` which adds its parser and sets
`func=run` (a function `run(args) -> int`). Imports of torch/transformers happen inside `run`, so
`llmprune --help` and argument errors are instant.

Errors: `UserError` is printed as one line and exits 2; known failures of files and environment
(disk full, a corrupt safetensors file, a missing package; see `llmprune/io/errors.py`) become a
`UserError` too; anything else is an internal error, printed as one line (with `--debug`, before or
after the command name, for the full traceback) and exits 1. Ctrl-C exits 130 and SIGTERM 143, both
after the atomic output folders removed their temporary files.

A command module may define `SUBCOMMANDS = {"apply": build_apply_parser}`: `llmprune delta apply ...`
is then parsed by that parser (its own --help), not by the command's.
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
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


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """`--debug` after the command name too; SUPPRESS keeps a top-level `llmprune --debug CMD` intact."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show full tracebacks on errors")


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
    for command in sub.choices.values():
        add_debug_flag(command)
    return parser


def _nested_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, list[str], list[str]] | None:
    """(parser, leading global options, rest) for `llmprune [--debug] CMD SUB ...` when CMD has SUB."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 1
    if i + 1 >= len(argv) or argv[i] not in COMMAND_MODULES:
        return None
    try:
        module = importlib.import_module(f"llmprune.commands.{argv[i]}")
    except ModuleNotFoundError:
        return None
    build = getattr(module, "SUBCOMMANDS", {}).get(argv[i + 1])
    if build is None:
        return None
    sub_parser = build(_Parser, f"llmprune {argv[i]} {argv[i + 1]}")
    add_debug_flag(sub_parser)
    return sub_parser, argv[:i], argv[i + 2:]


class _Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, schedulers, container stops) unwinds like Ctrl-C, so temp folders are removed."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()


def _quiet_libraries() -> None:
    """--quiet: no progress bars from the libraries either (weight loading, downloads, datasets, lm-eval)."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TQDM_DISABLE"] = "1"     # tqdm's own default (read when tqdm is first imported): lm-eval's bars
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    nested = _nested_parser(argv)
    if nested is not None:
        sub_parser, leading, rest = nested
        args = sub_parser.parse_args(rest)
        args.debug = getattr(args, "debug", False) or "--debug" in leading
    else:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
    debug = args.debug or os.environ.get("LLMPRUNE_DEBUG") == "1"
    if getattr(args, "quiet", False):
        _quiet_libraries()
    previous = None
    if _in_main_thread():             # signal handlers can only be set there
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        if debug:
            raise
        print(f"llmprune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, _Terminated)
        hint = getattr(exc, "llmprune_hint", None) or "nothing was written"
        print(f"llmprune: {'terminated (SIGTERM)' if terminated else 'interrupted'}; {hint}", file=sys.stderr)
        return 143 if terminated else 130
    except Exception as exc:  # an internal error: still one line unless --debug
        if debug:
            raise
        from llmprune.io.errors import explain

        try:
            known = explain(exc)
        except UserError as named:      # explain() found the precise culprit
            known = named
        if known is not None:
            print(f"llmprune: error: {known}", file=sys.stderr)
            return 2
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"llmprune: internal error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)

