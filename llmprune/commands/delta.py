"""`llmprune delta`: DARE / DAREx-q / magnitude delta pruning and TIES / linear merging of fine-tunes.

    llmprune delta BASE FINETUNED [FINETUNED ...] --method dare --drop-rate 0.9 --output DIR
    llmprune delta apply BASE DELTA_DIR --output DIR
"""
from __future__ import annotations

import argparse

DESCRIPTION = """\
Sparsify the delta θ_ft − θ_base of a fine-tune and save θ_base + Δ̂ as a normal checkpoint
(with the fine-tune's config and tokenizer, recipe.yaml and llmprune.json). With several
fine-tunes, their sparsified deltas are merged (linear with --weights, or TIES sign election for
ties / dare-ties) and scaled by --lambda.

methods (mask, merge, default rescale):
  dare       random drop with rate p, linear sum, rescale 1/(1-p)          (Yu et al. 2024)
  magnitude  drop the p·N smallest |Δ| per tensor, linear sum, no rescale
  ties       magnitude trim, sign election, disjoint mean                  (Yadav et al. 2023)
  dare-ties  random drop + 1/(1-p), sign election, sum                     (mergekit dare_ties)
rescale: inverse = 1/(1-p) (DARE paper); l1 = ‖Δ‖₁/‖kept‖₁ (mergekit's `rescale`); none;
  q=VALUE = 1/q (DAREx-q); auto = DAREx-q without labels: one global q in [1-p, 1] minimising
  the top-5 logit MSE between the fine-tune and the pruned model on --calib-data.

By default embeddings, lm_head, norms and MoE router gates are not pruned (copied from the
fine-tune; merged densely when there are several). A larger fine-tuned vocabulary keeps its
extra rows verbatim. Masks are seeded from --seed and the tensor name; arithmetic is float32.

Memory: tensors are streamed one at a time from the safetensors shards and the output shards
are written as they finish, so the peak is a few tensors (a 70B fine-tune fits a small
machine). Only --rescale auto loads whole models: the fine-tune in float32 plus the base values
and dropped deltas of the pruned tensors (about 3x the float32 model size).

`llmprune delta apply BASE DELTA_DIR --output DIR` rebuilds the model bit-exactly from the base
and the sparse delta written by --save-delta (DIR/sparse_delta); see `llmprune delta apply --help`.
"""

APPLY_DESCRIPTION = """\
Rebuild a model bit-exactly from BASE and a sparse delta written by `llmprune delta ... --save-delta`.
DELTA_DIR is that run's output directory (its `sparse_delta` folder is found) or the `sparse_delta`
folder itself. Every patched tensor of BASE is checked against the hash stored in the delta, so a
different base is refused.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("delta", help="DARE / DAREx / TIES delta pruning and merging of fine-tunes",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                              usage="%(prog)s BASE FINETUNED [FINETUNED ...] [options] --output DIR\n"
                                    "       %(prog)s apply BASE DELTA_DIR --output DIR")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="BASE then one or more FINETUNED (local dirs or Hub ids); or `apply BASE DELTA_DIR`")
    p.add_argument("--method", default="dare", choices=["dare", "magnitude", "ties", "dare-ties"],
                   help="delta sparsification / merge method (default: dare)")
    p.add_argument("--drop-rate", type=float, default=0.9, metavar="P",
                   help="fraction p of delta entries dropped per tensor, in [0, 1) (default: 0.9)")
    p.add_argument("--rescale", default=None, metavar="R",
                   help="inverse | l1 | none | q=VALUE | auto (default: inverse for dare/dare-ties, none otherwise)")
    p.add_argument("--weights", default=None, metavar="W1,W2",
                   help="one weight per fine-tune, comma separated (default: 1 each)")
    p.add_argument("--lambda", dest="lam", type=float, default=1.0, metavar="L",
                   help="scale of the merged delta: θ = θ_base + λ·Σ wᵢΔ̂ᵢ (default: 1.0)")
    p.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                   help="also keep tensors whose name matches REGEX unpruned (repeatable; added to the defaults)")
    p.add_argument("--no-default-exclude", action="store_true",
                   help="prune embeddings, lm_head, norms and router gates too (as the DARE reference code does)")
    p.add_argument("--calib-data", default="c4", metavar="SRC",
                   help="text for --rescale auto: c4, wikitext2, stdlib or a .txt/.jsonl/.parquet file; "
                        "prefer text of the fine-tune's domain (default: c4)")
    p.add_argument("--calib-samples", type=int, default=16, help="windows for --rescale auto (default: 16)")
    p.add_argument("--calib-seqlen", type=int, default=256, help="tokens per window (default: 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the drop masks and calibration windows (default: 0)")
    p.add_argument("--output", required=True, metavar="DIR", help="output directory (must not exist)")
    p.add_argument("--save-delta", action="store_true",
                   help="also write the sparse delta (indices + values) to DIR/sparse_delta and report its size")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="output shard size (default: 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code (auto search only)")
    add_quiet_args(p)
    p.set_defaults(func=run)


def add_quiet_args(p) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--no-progress", dest="quiet", action="store_true", help=argparse.SUPPRESS)  # the old spelling


def build_apply_parser(parser_class, prog: str) -> argparse.ArgumentParser:
    p = parser_class(prog=prog, description=APPLY_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", metavar="BASE", help="the base model the delta was made from (local dir or Hub id)")
    p.add_argument("delta_dir", metavar="DELTA_DIR",
                   help="output directory of `llmprune delta --save-delta`, or its sparse_delta folder")
    p.add_argument("--output", required=True, metavar="DIR", help="output directory (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    add_quiet_args(p)
    p.set_defaults(func=run_apply)
    return p


SUBCOMMANDS = {"apply": build_apply_parser}


def run_apply(args) -> int:
    from llmprune.delta import apply_delta_dir
    from llmprune.io.save import check_output_dir

    check_output_dir(args.output, args.overwrite, inputs=[args.base, args.delta_dir])
    result = apply_delta_dir(args.base, args.delta_dir, args.output, overwrite=args.overwrite,
                             progress=not args.quiet)
    print(f"\nrebuilt {result['tensors']} tensors from {args.base} + {args.delta_dir} -> {args.output} "
          f"({len(result['files'])} shard(s), {result['wall_time_s']:.1f}s)")
    return 0


def _weights(text: str | None) -> list[float] | None:
    from llmprune.errors import UserError

    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise UserError(f"--weights {text!r} must be comma-separated numbers, e.g. 0.6,0.4") from None


def run(args) -> int:
    from llmprune.errors import UserError
    from llmprune.io.save import check_output_dir

    models = list(args.models)
    if models[0] == "apply":
        raise UserError("write `apply` right after `delta`: llmprune delta apply BASE DELTA_DIR --output DIR")
    if len(models) < 2:
        raise UserError("give BASE and at least one FINETUNED model (or `apply BASE DELTA_DIR`)")
    check_output_dir(args.output, args.overwrite, inputs=models)
    from llmprune.delta.sparsify import parse_rescale

    rescale = None if args.rescale is None else parse_rescale(args.rescale)  # bad values fail before any work
    calib = None
    if rescale is not None and rescale.kind == "auto":
        from llmprune.calibration.data import check_source, describe_source

        check_source(args.calib_data)
        if args.calib_samples < 1 or args.calib_seqlen < 2:
            raise UserError("--calib-samples must be >= 1 and --calib-seqlen >= 2")
        calib = {"source": describe_source(args.calib_data), "split": "train", "samples": args.calib_samples,
                 "seqlen": args.calib_seqlen, "seed": args.seed}
    from llmprune.delta import prune_delta

    summary = prune_delta(models[0], models[1:], args.output, method=args.method, drop_rate=args.drop_rate,
                          rescale=args.rescale, weights=_weights(args.weights), lam=args.lam, seed=args.seed,
                          exclude=args.exclude, default_exclude=not args.no_default_exclude, calib=calib,
                          save_delta=args.save_delta, max_shard_size=args.max_shard_size,
                          overwrite=args.overwrite, trust_remote_code=args.trust_remote_code,
                          progress=not args.quiet)
    print_summary(summary, args.output)
    return 0


def print_summary(summary: dict, output: str) -> None:
    from llmprune.io.files import format_bytes

    for note in summary["notes"][:10]:
        print(f"note: {note}")
    rows = [("method", summary["method"]), ("drop rate", f"{summary['drop_rate']:g}"),
            ("rescale", summary["rescale"] + (f" (q={summary['q']:.4g})" if summary["q"] is not None else ""))]
    if "q_loss" in summary:
        rows.append(("top-5 logit MSE", f"{summary['q_loss']:.4g} at q (vs {summary['q_loss_at_inverse']:.4g} at 1-p)"))
    density = summary["achieved_density"]
    rows += [("tensors pruned / copied", f"{summary['pruned_tensors']} / {summary['copied_tensors']}"),
             ("achieved delta density", "-" if density is None else f"{density:.4f}")]
    if "delta_bytes" in summary:
        ratio = summary["delta_bytes"] / max(1, summary["finetuned_bytes"])
        rows.append(("sparse delta / fine-tune", f"{format_bytes(summary['delta_bytes'])} / "
                                                 f"{format_bytes(summary['finetuned_bytes'])} ({ratio:.1%})"))
    rows += [("wall time", f"{summary['wall_time_s']:.1f} s"), ("peak RSS", format_bytes(summary["peak_rss_bytes"])),
             ("output", f"{output} ({len(summary['output_files'])} shard(s))")]
    width = max(len(k) for k, _ in rows)
    print()
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
