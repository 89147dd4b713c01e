"""PNG plots for the report: score vs sparsity (LLM-KICK style), dense as a dashed line.

  suites.png          retained % (raw) per suite vs sparsity, one line per method, 100% dashed
  suite_<name>.png    one panel per task: primary metric vs sparsity per method; the dense value
                      dashed, the chance level dotted; perplexity-like metrics on a log axis
"""
from __future__ import annotations

import math
from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _methods(rows) -> list[str]:
    return [m for m in dict.fromkeys(r.method for r in rows) if m != "dense"] or ["dense"]


def plot_report(rows, summaries: list[dict], out_dir: Path) -> list[str]:
    if not rows:
        return []
    plt = _plt()
    files: list[str] = []
    methods = _methods(rows)
    suites = list(dict.fromkeys(r.suite for r in rows))

    # 1) suite retention vs sparsity
    ncol = min(3, len(suites))
    nrow = math.ceil(len(suites) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.4 * nrow), squeeze=False)
    for ax, suite in zip(axes.flat, suites):
        for method in methods:
            pts = sorted((s["sparsity"], s["retained"]) for s in summaries
                         if s["suite"] == suite and s["method"] in (method, "dense") and s["retained"] is not None)
            if pts:
                ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.axhline(100, ls="--", color="grey", lw=1, label="dense")
        if not any(s["suite"] == suite and s["retained"] is not None and s["method"] != "dense" for s in summaries):
            ax.text(0.5, 0.35, "no retention: dense score is 0\nor at chance (floor)", ha="center",
                    transform=ax.transAxes, fontsize=8, color="dimgrey")
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        ax.set_title(suite)
        ax.set_xlabel("sparsity / parameters removed (%)")
        ax.set_ylabel("retained % of dense")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(suites):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Retention vs sparsity (macro mean over tasks)")
    fig.tight_layout()
    path = out_dir / "suites.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files.append(str(path))

    # 2) per suite, per task metric vs sparsity
    for suite in suites:
        tasks = list(dict.fromkeys(r.task for r in rows if r.suite == suite))
        ncol = min(4, len(tasks))
        nrow = math.ceil(len(tasks) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 3.0 * nrow), squeeze=False)
        for ax, task in zip(axes.flat, tasks):
            trs = [r for r in rows if r.task == task]
            dense_value = next((r.dense_value for r in trs if r.dense_value is not None), None)
            for method in methods:
                pts = sorted((r.sparsity, r.value) for r in trs
                             if r.method in (method, "dense") and r.value is not None)
                if pts:
                    ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], marker="o", label=method)
            if dense_value is not None:
                ax.axhline(dense_value, ls="--", color="grey", lw=1, label="dense")
            chance = trs[0].chance
            if chance is not None and trs[0].higher_is_better:
                ax.axhline(chance, ls=":", color="red", lw=1, label="chance")
            vals = [r.value for r in trs if r.value is not None] + ([dense_value] if dense_value else [])
            # log axis only when perplexities span more than a decade (else it has no labelled ticks)
            if not trs[0].higher_is_better and vals and min(vals) > 0 and max(vals) / min(vals) > 10:
                from matplotlib.ticker import NullFormatter

                ax.set_yscale("log")
                ax.yaxis.set_minor_formatter(NullFormatter())   # minor log ticks crowd the axis
            else:
                ax.ticklabel_format(axis="y", useOffset=False)
            floor = any(r.floor for r in trs)
            ax.set_title(f"{task}" + (" (floor: dense at chance)" if floor else ""), fontsize=9,
                         color="dimgrey" if floor else "black")
            ax.set_xlabel("sparsity / parameters removed (%)", fontsize=8)
            ax.set_ylabel(trs[0].metric.split(",")[0] + ("" if trs[0].higher_is_better else " (lower=better)"),
                          fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(tasks):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        fig.suptitle(f"{suite}: score vs sparsity")
        fig.tight_layout()
        path = out_dir / f"suite_{suite}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(str(path))
    return files
