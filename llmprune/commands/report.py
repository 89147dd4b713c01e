"""`llmprune report RESULTS_DIR [RESULTS_DIR ...] --output REPORT_DIR`."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("report", help="compare eval results against the dense baseline",
                       description="Retained % of the dense score per task and suite (raw and chance-adjusted), "
                                   "worst task, paired bootstrap 95% CIs, floor flags; writes report.md, "
                                   "report.csv (long format), report.json and PNG plots.")
    p.add_argument("results", nargs="+", help="results directories written by `llmprune eval` / `sweep`")
    p.add_argument("--baseline", default=None,
                   help="the dense results directory (default: the run with sparsity 0 among RESULTS)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs (default 1000)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--output", "-o", required=True, help="report directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars (accepted by every command)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from llmprune.errors import UserError
    from llmprune.eval.results import read_results
    from llmprune.eval.report import build_report, summary_table
    from llmprune.io.save import check_output_dir, output_dir

    if args.bootstrap < 0:
        raise UserError("--bootstrap must be >= 0")
    for d in args.results + ([args.baseline] if args.baseline else []):
        read_results(d)  # fail early, one line, if any input is not a results directory
    inputs = args.results + ([args.baseline] if args.baseline else [])   # --overwrite never deletes them
    check_output_dir(args.output, args.overwrite, inputs=inputs)
    with output_dir(args.output, args.overwrite, inputs=inputs) as tmp:
        data = build_report(args.results, tmp, baseline_dir=args.baseline, iters=args.bootstrap,
                            plots=not args.no_plots)
    print(summary_table(data))
    print(f"wrote {Path(args.output) / 'report.md'}")
    return 0
