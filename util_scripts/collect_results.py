#!/usr/bin/env python
"""Collect lm-eval results and validation losses of several runs into a CSV and a Markdown table.

    python util_scripts/collect_results.py out/pretrain out/midtrain-math --out results.csv --markdown results.md

Reads `<run>/<checkpoint>/eval/*.json` (from `litgpt-ext evaluate` / eval_chkpts.sh) and
`<run>/val_metrics.csv`. The CSV is long format (one row per run, checkpoint, task, metric); the
Markdown table has one row per checkpoint and one column per task metric.

`--sft DIR ...` adds SFT results (every `sft_metrics.json` under the folders): per source
checkpoint, the LR with the lowest mean SFT validation loss over seeds (the paper's protocol),
as columns `sft:<set> loss` and `sft:<set>/val:<name> loss` ("mean ± std over seeds") on the
source checkpoint's row; `--sft_table` also writes the per-LR grid.

    python util_scripts/collect_results.py runs/base runs/mid --sft runs/sft --sft_table sft_grid.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from litgpt_ext.eval.results import markdown_table, pivot, read_runs, write_csv  # noqa: E402
from litgpt_ext.sft.grid import grid_rows, pick_lr, to_records  # noqa: E402
from litgpt_ext.sft.metrics import find_sft_metrics, read_sft_metrics  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", type=Path, help="run directories (holding step-*/ and final/)")
    p.add_argument("--out", type=Path, default=Path("results.csv"), help="long-format CSV to write")
    p.add_argument("--markdown", type=Path, default=None, help="also write a Markdown table here")
    p.add_argument("--metrics", default="acc,exact_match,bits_per_byte,loss",
                   help="metrics shown in the Markdown table, comma-separated, or 'all' (the CSV has all)")
    p.add_argument("--no_val", action="store_true", help="leave out val_metrics.csv losses")
    p.add_argument("--sft", nargs="+", type=Path, default=[], help="folders holding SFT runs' sft_metrics.json")
    p.add_argument("--sft_table", type=Path, default=None, help="write the SFT LR x seed grid (Markdown) here")
    args = p.parse_args(argv)
    if not args.runs and not args.sft:
        p.error("give run directories and/or --sft folders")

    records = read_runs(args.runs, with_val=not args.no_val) if args.runs else []
    if args.sft:
        best = pick_lr([read_sft_metrics(f) for f in find_sft_metrics(args.sft)])
        if not best:
            print(f"collect_results: no sft_metrics.json under {[str(r) for r in args.sft]}", file=sys.stderr)
            return 1
        records += to_records(best)
        grid = markdown_table(*grid_rows(best))
        if args.sft_table:
            args.sft_table.parent.mkdir(parents=True, exist_ok=True)
            args.sft_table.write_text(grid)
        print(grid, end="")
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
    print(f"collect_results: {len(records)} records from {len(args.runs)} run(s)"
          + (f" and SFT results under {len(args.sft)} folder(s)" if args.sft else "") + f" -> {args.out}"
          + (f", {args.markdown}" if args.markdown else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
