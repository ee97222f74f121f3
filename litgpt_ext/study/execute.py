"""Running a sweep: `litgpt-ext sweep` (plan, write, local, report) and the local runner.

The plan itself is `litgpt_ext.study.sweep`; the spec is `litgpt_ext.study.spec`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal, Optional

from litgpt_ext.study.spec import load_spec
from litgpt_ext.study.sweep import Job, plan_sweep, plan_table, write_plan


def run_local(jobs: list[Job], config_dir: Path, python: str = sys.executable) -> list[str]:
    """Run the plan here, one job at a time in dependency order; finished runs are skipped."""
    write_plan(jobs, config_dir)
    done_names, ran = set(), []
    todo = [j for j in jobs if not j.done()]
    done_names |= {j.name for j in jobs if j.done()}
    t0 = time.perf_counter()
    for k, j in enumerate(todo, 1):
        missing = [d for d in j.depends if d not in done_names]
        if missing:
            raise RuntimeError(f"sweep: {j.name} depends on {missing}, which did not finish")
        elapsed = time.perf_counter() - t0
        eta = elapsed / (k - 1) * (len(todo) - k + 1) if k > 1 else float("nan")
        print(f"[sweep {k}/{len(todo)}] {j.stage} {j.name} (elapsed {elapsed / 60:.1f} min"
              + (f", ETA {eta / 60:.1f} min)" if k > 1 else ")"), flush=True)
        j.out_dir.mkdir(parents=True, exist_ok=True)
        cmd = [python, "-m", "litgpt_ext", j.command, "--config", str(config_dir / f"{j.name}.yaml")]
        with open(j.out_dir / "sweep.log", "a") as log:
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if rc != 0:
            raise RuntimeError(f"sweep: {j.name} failed (exit {rc}); log: {j.out_dir / 'sweep.log'}")
        done_names.add(j.name)
        ran.append(j.name)
    return ran


def sweep(spec: Path, action: Literal["plan", "write", "local", "report"] = "plan",
          config_dir: Optional[Path] = None) -> list[dict]:
    """Expand a sweep spec into runs: print the plan, write configs + SLURM submit script, run locally,
    or report the finished runs (REPORT.md: results after SFT and the findings, as `reproduce` writes it).

    Args:
        spec: The sweep YAML (see `litgpt_ext.study.spec`).
        action: plan (print the table; a dry run), write (configs, CONFIG_LISTs, submit.sh), local (run here),
            report (<out_root>/report/REPORT.md from the SFT runs that finished).
        config_dir: Where generated configs go (default: <out_root>/configs).
    """
    if action not in ("plan", "write", "local", "report"):
        raise ValueError(f"action must be plan, write, local or report, got {action!r}")
    s = load_spec(spec)
    jobs = plan_sweep(s)
    root = Path(s.out_root or Path("runs/sweeps") / s.name)
    cdir = Path(config_dir or root / "configs")
    print(plan_table(jobs))
    if action == "write":
        submit = write_plan(jobs, cdir)
        print(f"\nwrote {len(jobs)} configs, CONFIG_LISTs and {submit}; submit with: bash {submit}")
    elif action == "local":
        run_local(jobs, cdir)
    elif action == "report":
        from litgpt_ext.study.sweep_report import sweep_report

        print(f"\nwrote {sweep_report(s, jobs, root / 'report')}")
    return [{"name": j.name, "stage": j.stage, "out_dir": str(j.out_dir), "depends": j.depends, **j.info} for j in jobs]
