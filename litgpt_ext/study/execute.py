"""Running a sweep: `litgpt-ext sweep` (plan, write, local, report).

The plan is `litgpt_ext.study.sweep`, the spec `litgpt_ext.study.spec`, the checks a plan passes
before anything runs `litgpt_ext.study.plan_checks`, and the runner the one study executor
(`litgpt_ext.study.executor`, here with each job as a subprocess).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Literal, Optional

from litgpt_ext.study.executor import Executor, Job
from litgpt_ext.study.forked import stop_forkserver
from litgpt_ext.study.spec import LocalSpec, load_spec
from litgpt_ext.study.sweep import plan_sweep, plan_table, write_plan


def run_local(jobs: list[Job], config_dir: Path, python: str = sys.executable,
              resume_command: Optional[str] = None, local: Optional[LocalSpec] = None) -> list[str]:
    """Run the plan here, `local.workers` jobs at a time (a process each, `local.threads` torch threads)
    in dependency order; finished runs are skipped. Returns the names of the jobs that ran."""
    local = local or LocalSpec()
    write_plan(jobs, config_dir)
    ex = Executor(label="sweep", resume_command=resume_command or "the same `litgpt-ext sweep ... --action local`",
                  config_dir=config_dir, mode="subprocess", log_name="sweep.log", python=python,
                  workers=local.workers, threads=local.threads,
                  timings=config_dir / "timings.jsonl")
    try:
        return ex.run(jobs)
    finally:
        if local.workers > 1:
            stop_forkserver()


def sweep(spec: Path, action: Literal["plan", "write", "local", "report"] = "plan",
          config_dir: Optional[Path] = None) -> list[dict]:
    """Expand a sweep spec into runs: print the plan, write configs + SLURM submit script, run locally,
    or report the finished runs (REPORT.md: results after SFT and the findings, as `reproduce` writes it).

    Before plan, write and local, the plan is checked against the data and the commands' parsers
    (an unknown domain, a domain without shards, a bad override is refused now, not when its job starts).
    `local` runs the spec's `local:` workers and threads, and ends with the report when the spec has a
    `report:` section (one command for a whole study).

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
    if action != "report":
        from litgpt_ext.study.plan_checks import check_plan

        check_plan(jobs, here=action == "local")
    print(plan_table(jobs))
    if action == "write":
        submit = write_plan(jobs, cdir)
        print(f"\nwrote {len(jobs)} configs, CONFIG_LISTs and {submit}; submit with: bash {submit}")
    elif action == "local":
        again = f"litgpt-ext sweep --spec {shlex.quote(str(spec))} --action local" + (
            f" --config_dir {shlex.quote(str(config_dir))}" if config_dir else "")
        ran = run_local(jobs, cdir, resume_command=again, local=s.local)
        print(f"\nsweep: ran {len(ran)} job(s); {len(jobs) - len(ran)} had finished before")
    if action == "report" or (action == "local" and s.report is not None):
        _report(s, jobs, root / "report")
    return [{"name": j.name, "stage": j.stage, "out_dir": str(j.out_dir), "depends": j.depends, **j.info} for j in jobs]


def _report(s, jobs: list[Job], out: Path) -> None:
    if s.report is not None and s.report.kind == "methods":
        from litgpt_ext.study.methods_report import methods_report

        print(f"\nwrote {methods_report(s, jobs, out)}")
    else:
        from litgpt_ext.study.sweep_report import sweep_report

        print(f"\nwrote {sweep_report(s, jobs, out)}")
