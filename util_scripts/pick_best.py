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

After SFT (the paper's measure): `--sft runs/sft --sft_set demo_math` scores each source checkpoint
by its SFT validation loss (mean over seeds at the best LR; lower is better) and takes its general
loss after SFT (`sft:demo_math/val:general`):

    python util_scripts/pick_best.py --runs runs/mid-a --sft runs/sft --sft_set demo_math --baseline_loss 3.2
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from litgpt_ext.eval.results import markdown_table, pick_best, read_runs  # noqa: E402
from litgpt_ext.sft.grid import SFT_PREFIX, pick_lr, to_records  # noqa: E402
from litgpt_ext.sft.metrics import find_sft_metrics, read_sft_metrics  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="*", type=Path, default=[], help="run directories")
    p.add_argument("--domain_task", default=None, help="lm-eval task that measures the domain, e.g. demo_math_mc")
    p.add_argument("--domain_metric", default="acc", help="metric of --domain_task (default acc)")
    p.add_argument("--general_set", default="general", help="val_metrics.csv set measuring general ability")
    p.add_argument("--general_task", default=None, help="use this lm-eval task instead of a val set")
    p.add_argument("--general_metric", default="loss", help="metric of --general_task (default loss)")
    p.add_argument("--budget", type=float, default=0.05, help="allowed relative general-loss increase (0.05 = +5%%)")
    p.add_argument("--baseline_loss", type=float, default=None, help="general loss of the baseline model")
    p.add_argument("--json", type=Path, default=None, help="write the choice and all candidates here")
    p.add_argument("--sft", nargs="+", type=Path, default=[], help="folders holding SFT runs' sft_metrics.json")
    p.add_argument("--sft_set", default=None, help="with --sft: score checkpoints by this SFT set's val loss "
                   "and use its general loss after SFT (sets --domain_task/--domain_metric/--general_task)")
    args = p.parse_args(argv)
    records = read_runs(args.runs) if args.runs else []
    if args.sft:
        records += to_records(pick_lr([read_sft_metrics(f) for f in find_sft_metrics(args.sft)]))
    if args.sft_set:
        if not args.sft:
            p.error("--sft_set needs --sft folders")
        args.domain_task, args.domain_metric = SFT_PREFIX + args.sft_set, "loss"
        args.general_task, args.general_metric = f"{SFT_PREFIX}{args.sft_set}/val:{args.general_set}", "loss"
    if args.domain_task is None:
        p.error("give --domain_task (or --sft with --sft_set)")
    if not records:
        p.error("give --runs and/or --sft")
    if args.budget < 0:
        p.error(f"--budget must be >= 0, got {args.budget}")

    best, cands = pick_best(
        records, domain_task=args.domain_task, domain_metric=args.domain_metric,
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
