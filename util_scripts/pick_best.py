#!/usr/bin/env python
"""Pick the best checkpoint for a domain under a forgetting budget on the general set.

    python util_scripts/pick_best.py --runs out/mid-a out/mid-b --domain_task demo_math_mc \\
        --general_set general --budget 0.05

"Best domain score with general loss within +5% of baseline": among all checkpoints of the runs,
those whose general validation loss (`<run>/val_metrics.csv`, set `--general_set`, at the
checkpoint's step) is <= baseline * (1 + budget) are eligible; the one with the best
`--domain_metric` on `--domain_task` wins. The baseline is `--baseline_loss`, else each run's
earliest general loss. `--general_task/--general_metric` use an lm-eval task (e.g.
demo_prose_ppl bits_per_byte) instead of the validation loss. Exit status 1 if none is eligible.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from litgpt_ext.eval.results import markdown_table, pick_best, read_runs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", type=Path, required=True, help="run directories")
    p.add_argument("--domain_task", required=True, help="lm-eval task that measures the domain, e.g. demo_math_mc")
    p.add_argument("--domain_metric", default="acc", help="metric of --domain_task (default acc)")
    p.add_argument("--general_set", default="general", help="val_metrics.csv set measuring general ability")
    p.add_argument("--general_task", default=None, help="use this lm-eval task instead of a val set")
    p.add_argument("--general_metric", default="loss", help="metric of --general_task (default loss)")
    p.add_argument("--budget", type=float, default=0.05, help="allowed relative general-loss increase (0.05 = +5%%)")
    p.add_argument("--baseline_loss", type=float, default=None, help="general loss of the baseline model")
    p.add_argument("--json", type=Path, default=None, help="write the choice and all candidates here")
    args = p.parse_args(argv)
    if args.budget < 0:
        p.error(f"--budget must be >= 0, got {args.budget}")

    best, cands = pick_best(
        read_runs(args.runs), domain_task=args.domain_task, domain_metric=args.domain_metric,
        general_set=args.general_set, general_task=args.general_task, general_metric=args.general_metric,
        budget=args.budget, baseline_loss=args.baseline_loss,
    )
    fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
    rows = [[c.run, c.checkpoint, "" if c.step is None else str(c.step), fmt(c.domain_score),
             fmt(c.general_loss), fmt(c.baseline_loss), "yes" if c.eligible else "no"] for c in cands]
    print(markdown_table(["run", "checkpoint", "step", f"{args.domain_task} {args.domain_metric}",
                          "general loss", "baseline", "within budget"], rows), end="")
    if args.json:
        args.json.write_text(json.dumps({"best": asdict(best) if best else None, "budget": args.budget,
                                         "candidates": [asdict(c) for c in cands]}, indent=2))
    if best is None:
        print(f"pick_best: no checkpoint within +{args.budget:.0%} of the baseline general loss", file=sys.stderr)
        return 1
    print(f"best: {best.run}/{best.checkpoint} (step {best.step}) {args.domain_metric}={best.domain_score:.4f}, "
          f"general loss {best.general_loss:.4f} <= {best.baseline_loss * (1 + args.budget):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
