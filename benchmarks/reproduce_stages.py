"""Where `make reproduce`'s time goes: wall and CPU seconds per stage of a study, from its timings.jsonl.

By default a shrunk study at the preset's model size (one pretraining seed, the base run, math_mid
and math_cpt, SFT of the base on code, math and prose and of the arms on math at 2 LRs x 2 SFT
seeds, similarity, CKA, the report) on an existing demo corpus; `--full` runs the preset itself
(`midtrain_configs/reproduce/cpu.yaml`). The process's own CPU time and its children's (the worker
processes) are added up, so the total is comparable between `--workers 1` and `--workers 2`.

    PYTHONPATH=$PWD python benchmarks/reproduce_stages.py --out /tmp/stages [--workers 2] [--threads 1] [--full]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHRUNK = dict(total_steps=200, pretrain_seeds=(42,), base_tasks=("math", "code", "prose"), sft_lrs=(1e-3, 3e-3),
              sft_seeds=(1, 2), similarity_docs=300, cka_docs=50, bootstrap=1000,
              arms=[{"name": "math_mid", "domain": "math", "start": 66, "weight": 0.12, "role": "mid", "tasks": ["math"]},
                    {"name": "math_cpt", "domain": "math", "start": 184, "weight": 1.0, "role": "cpt", "tasks": ["math"]}])


def stage_table(out: Path) -> list[tuple[str, int, float, float]]:
    """(stage, jobs, wall s, CPU s) summed over `out/timings.jsonl`."""
    rows: dict[str, list] = {}
    for line in (out / "timings.jsonl").read_text().splitlines():
        d = json.loads(line)
        r = rows.setdefault(d["stage"], [0, 0.0, 0.0])
        r[0] += 1
        r[1] += d["seconds"]
        r[2] += d.get("cpu_seconds", 0.0)
    return [(k, n, w, c) for k, (n, w, c) in rows.items()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="the study's out_dir (deleted first)")
    ap.add_argument("--demo_dir", type=Path, default=ROOT / "data" / "demo")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--full", action="store_true", help="the preset (cpu.yaml) instead of the shrunk study")
    args = ap.parse_args(argv)
    from litgpt_ext.study.reproduce import load_config, reproduce

    shutil.rmtree(args.out, ignore_errors=True)
    if args.full:
        cfg = load_config(ROOT / "midtrain_configs" / "reproduce" / "cpu.yaml")
        kw = {k: getattr(cfg, k) for k in ("total_steps", "pretrain_seeds", "arms", "base_tasks", "sft_lrs", "sft_seeds",
                                           "similarity_docs", "sft_task_args", "bootstrap", "sft_lr_extend",
                                           "cka_docs", "sft_lr_sweep", "general_before")}
        kw.update(pretrain_config=cfg.pretrain_config, sft_config=cfg.sft_config)
    else:
        kw = dict(SHRUNK, pretrain_config=ROOT / "midtrain_configs/reproduce/pretrain_cpu.yaml",
                  sft_config=ROOT / "midtrain_configs/reproduce/sft_cpu.yaml")
    t = time.perf_counter()
    reproduce(out_dir=args.out, demo_dir=args.demo_dir, workers=args.workers, threads=args.threads, **kw)
    wall = time.perf_counter() - t
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
    print("\n| stage | jobs | wall s | CPU s |\n|---|---:|---:|---:|")
    for stage, n, w, c in stage_table(args.out):
        print(f"| {stage} | {n} | {w:.0f} | {c:.0f} |")
    print(f"| **total** (this process and its workers) | | **{wall:.0f}** | **{cpu:.0f}** |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
