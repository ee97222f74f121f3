#!/usr/bin/env python
"""Plot task scores and validation losses against step, one line per run, into one PNG.

    python util_scripts/plot_results.py out/pretrain out/midtrain-math --out results.png

One panel per (task, metric) from `<run>/<checkpoint>/eval/*.json` and one per validation set
from `<run>/val_metrics.csv` (runs without it simply contribute no loss lines).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from litgpt_ext.eval.results import VAL_PREFIX, read_runs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run directories")
    p.add_argument("--out", type=Path, default=Path("results.png"), help="PNG to write")
    p.add_argument("--metrics", default="acc,exact_match,bits_per_byte,loss",
                   help="metrics to plot, comma-separated, or 'all'")
    p.add_argument("--tasks", default=None, help="only these tasks (comma-separated; val sets as val:<set>)")
    p.add_argument("--cols", type=int, default=3, help="panels per row")
    p.add_argument("--dpi", type=int, default=120)
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_runs(args.runs) if r.step is not None]
    if args.metrics != "all":
        keep = {m.strip() for m in args.metrics.split(",")}
        records = [r for r in records if r.metric.split(",")[0] in keep]
    if args.tasks:
        keep_t = {t.strip() for t in args.tasks.split(",")}
        records = [r for r in records if r.task in keep_t]
    panels = sorted({(r.task, r.metric) for r in records}, key=lambda c: (c[0].startswith(VAL_PREFIX), c))
    if not panels:
        print(f"plot_results: nothing to plot in {[str(r) for r in args.runs]}", file=sys.stderr)
        return 1
    runs = sorted({r.run for r in records})
    ncols = min(args.cols, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.2 * nrows), squeeze=False)
    for ax, (task, metric) in zip(axes.flat, panels):
        for run in runs:
            pts = sorted((r.step, r.value, r.stderr) for r in records if r.run == run and r.task == task and r.metric == metric)
            if not pts:
                continue
            xs, ys, es = zip(*pts)
            line, = ax.plot(xs, ys, marker="o", ms=3, label=run)
            if any(e for e in es):
                lo = [y - (e or 0) for y, e in zip(ys, es)]
                hi = [y + (e or 0) for y, e in zip(ys, es)]
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
        ax.set_title(f"{task} {metric}", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(len(runs), 4), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=args.dpi)
    print(f"plot_results: {len(panels)} panel(s), {len(runs)} run(s) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
