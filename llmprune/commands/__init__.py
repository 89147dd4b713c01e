"""One module per CLI command: `register(subparsers)` adds the parser and sets `func=run`."""


def add_model_args(parser) -> None:
    """How MODEL is loaded and where output goes; shared by compress, eval and sweep."""
    parser.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    parser.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of MODEL")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow custom modelling code from MODEL's repo")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
