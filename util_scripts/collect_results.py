#!/usr/bin/env python
"""Collect lm-eval results and validation losses of several runs into a CSV and a Markdown table.

    python util_scripts/collect_results.py out/pretrain out/midtrain-math --out results.csv --markdown results.md

Reads `<run>/<checkpoint>/eval/*.json` (from `litgpt-ext evaluate` / eval_chkpts.sh) and
`<run>/val_metrics.csv`. The CSV is long format (one row per run, checkpoint, task, metric); the
Markdown table has one row per checkpoint and one column per task metric.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from litgpt_ext.eval.results import markdown_table, pivot, read_runs, write_csv  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run directories (holding step-*/ and final/)")
    p.add_argument("--out", type=Path, default=Path("results.csv"), help="long-format CSV to write")
    p.add_argument("--markdown", type=Path, default=None, help="also write a Markdown table here")
    p.add_argument("--metrics", default="acc,exact_match,bits_per_byte,loss",
                   help="metrics shown in the Markdown table, comma-separated, or 'all' (the CSV has all)")
    p.add_argument("--no_val", action="store_true", help="leave out val_metrics.csv losses")
    args = p.parse_args(argv)

    records = read_runs(args.runs, with_val=not args.no_val)
    if not records:
        print(f"collect_results: no eval results or val_metrics.csv in {[str(r) for r in args.runs]}", file=sys.stderr)
        return 1
    write_csv(records, args.out)
    metrics = None if args.metrics == "all" else [m.strip() for m in args.metrics.split(",") if m.strip()]
    header, rows = pivot(records, metrics)
    table = markdown_table(header, rows)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    print(table, end="")
    print(f"collect_results: {len(records)} records from {len(args.runs)} run(s) -> {args.out}"
          + (f", {args.markdown}" if args.markdown else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
