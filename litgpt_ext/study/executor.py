"""The one study executor: a plan of `Job`s, one "finished" rule, run here in-process or as subprocesses.

`litgpt-ext sweep --action local` (subprocesses), `litgpt-ext reproduce` and `litgpt-ext sft-grid`
(in-process: torch and lightning are imported once) all run their jobs through `Executor.run`; the
same jobs become SLURM arrays through `litgpt_ext.study.sweep.write_plan`. A job is a litgpt-ext
command with one YAML config; it is skipped when `finished(job)` holds, so a plan can be run again
after any interruption and continues where it stopped. In-process jobs can run `workers` at a time in
worker processes (`litgpt_ext.study.pool`: each imports torch once, one torch thread by default on
two cores), each as soon as its dependencies have finished; `run(..., then=f)` lets a plan grow as
it runs (`reproduce`'s SFT seeds once their LR sweep has picked the LR). Subprocess jobs (a sweep's
`local.workers`) run `workers` at a time too, each forked from one process that imported torch,
lightning and litgpt once (`litgpt_ext.study.forked`). Each job's wall and CPU seconds go to
`timings` (JSONL).

Interrupts: a subprocess runs in its own process group (a terminal's Ctrl-C reaches the executor
only), and the executor forwards SIGINT/SIGTERM/SIGUSR1 to it as a preemption: the job saves a
checkpoint and exits 99, the executor waits for it, prints one line (what was saved, the command to
continue) and exits 99; a second Ctrl-C is forwarded too (the job stops without saving) and the
executor exits 130. In-process jobs get the signal directly (the CLI installs the same handlers);
workers get it forwarded, as subprocesses do.
A failed job gives one line (the job, its exit status, its log) and exit 1, never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import yaml

from litgpt_ext.study.pool import INTERRUPTED, run_cli, signal_group

PREEMPTED = 99  # litgpt_ext.preempt.PREEMPT_EXIT_CODE (not imported: this module stays light)
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


@dataclass
class Job:
    name: str
    stage: str
    command: str  # litgpt-ext command
    config: dict
    out_dir: Path
    depends: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    log_name: Optional[str] = None
    """Its log in out_dir (default: the `run` call's, else the executor's)"""
    config_dir: Optional[Path] = None
    """Where its YAML goes (default: the `run` call's, else the executor's)"""

    def done(self) -> bool:
        return finished(self)


def finished(job: Job) -> bool:
    """The one "finished" rule of every study: a job that names what it `creates` (a sweep's prep and
    synth jobs) has it; an SFT run has sft_metrics.json and a complete final/
    (`litgpt_ext.sft.run.finished`); a soup has soup.json; a base segment (`info.pause`) has a
    checkpoint at or past its pause step; any other training run has a complete final/."""
    if job.info.get("creates") is not None:  # a sweep's prep and synth jobs: the file they write last
        return Path(job.info["creates"]).exists()
    from litgpt_ext import checkpoint as ckpt

    if job.command == "sft":
        from litgpt_ext.sft.metrics import FILE_NAME

        return (job.out_dir / FILE_NAME).is_file() and ckpt.is_complete(job.out_dir / "final")
    if job.command == "soup":
        return (job.out_dir / "soup.json").is_file()
    pause = job.info.get("pause")
    if pause is not None:
        return any(step >= pause for step, _ in ckpt.list_checkpoints(job.out_dir, final=True))
    return ckpt.is_complete(job.out_dir / "final")


class StudyStopped(SystemExit):
    """The executor's one-line exit (99 preempted, 130 interrupted, 1 a job failed): SystemExit, so
    the CLI prints no traceback; `code` is the exit status, `message` the line already printed."""

    def __init__(self, code: int, message: str):
        super().__init__(code)
        self.message = message


@dataclass
class Executor:
    """Run jobs in dependency order, skipping finished ones; `mode` picks in-process or subprocesses."""

    label: str
    """The command the user ran (progress lines and the "continue with" hint say it)"""
    resume_command: str
    """What to run to continue after an interrupt (e.g. `litgpt-ext sweep --spec s.yaml --action local`)"""
    config_dir: Path
    """Where each job's YAML goes (`<config_dir>/<job>.yaml`)"""
    mode: Literal["inprocess", "subprocess"] = "subprocess"
    log_name: str = "sweep.log"
    """Each job's output goes to `<out_dir>/<log_name>` (appended: a resumed job's log continues)"""
    timings: Optional[Path] = None
    """A JSONL file that gets each job's wall time ({stage, what, seconds})"""
    python: str = sys.executable
    total: Optional[int] = None
    """Jobs in the whole study (the progress count; default: the jobs of each `run` call)"""
    rerun_finished: bool = False
    """Run finished jobs too and let their command decide (`sft` says "nothing to do" for the same
    config and refuses another one): a changed grid is refused instead of silently skipped"""
    workers: int = 1
    """Jobs at a time, each as soon as its dependencies have finished: in-process jobs in that many worker
    processes (`litgpt_ext.study.pool`), subprocess jobs forked from one preloaded server process
    (`litgpt_ext.study.forked`: each skips the ~7 CPU-s of imports, still in its own process group)"""
    threads: Optional[int] = None
    """torch threads of each job (in-process default: the machine's cores divided among the workers;
    subprocess default: torch's own)"""
    _done: int = 0
    _ran_seconds: float = 0.0
    _ran: int = 0
    _t0: float = field(default_factory=time.perf_counter)
    _pool: Any = None

    def run(self, jobs: list[Job], log_name: Optional[str] = None, config_dir: Optional[Path] = None,
            then: Optional[Callable[[Job], list[Job]]] = None) -> list[str]:
        """Run every unfinished job, each after its dependencies in `jobs` (which must finish first); the
        names of those that ran. `log_name` and `config_dir` override the executor's for these jobs.
        `then(job)` is called once for every job that finishes here or had finished before, and the jobs
        it returns join this run (an adaptive plan: the SFT seeds at the LR its sweep picked)."""
        cdir = Path(config_dir or self.config_dir)
        cdir.mkdir(parents=True, exist_ok=True)
        names: set[str] = set()
        done_names: set[str] = set()
        todo = self._admit(jobs, names, done_names, then)
        total = self.total or len(jobs)
        if self.workers > 1 and self.mode == "inprocess" and not self.rerun_finished:
            return self._run_pool(todo, names, done_names, then, cdir, log_name, total)
        if self.workers > 1 and self.mode == "subprocess" and not self.rerun_finished:
            from litgpt_ext.study.forked import run_forked

            return run_forked(self, todo, names, done_names, cdir, log_name or self.log_name, total)
        ran = []
        while todo:
            j = todo.pop(0)
            missing = [d for d in j.depends if d not in done_names and d in names]
            log = j.out_dir / (j.log_name or log_name or self.log_name)
            if j.name in done_names and not missing:  # rerun_finished: its command checks the config, fast
                rc, sig = (self._subprocess if self.mode == "subprocess" else self._inprocess)(j, self._write(j, cdir), log)
                self._check(j, rc, sig, log)
                self._done += 1
                continue
            if missing:
                self._stop(1, f"{j.name} depends on {missing}, which did not finish")
            self._progress(j, total)
            path = self._write(j, cdir)
            t, cpu = time.perf_counter(), _cpu_seconds(self.mode)
            rc, sig = (self._subprocess if self.mode == "subprocess" else self._inprocess)(j, path, log)
            self._finished(j, path, time.perf_counter() - t, _cpu_seconds(self.mode) - cpu)
            self._check(j, rc, sig, log)
            done_names.add(j.name)
            ran.append(j.name)
            self._done += 1
            todo += self._admit(then(j) if then else [], names, done_names, then)
        return ran

    def _admit(self, jobs: list[Job], names: set[str], done_names: set[str], then) -> list[Job]:
        """The jobs still to run, in order; a finished one counts as done (and, unless rerun_finished,
        is skipped), and what `then` returns for it is admitted too."""
        todo = []
        for j in jobs:
            names.add(j.name)
            if not j.done():
                todo.append(j)
                continue
            done_names.add(j.name)
            if self.rerun_finished:
                todo.append(j)
            else:
                self._done += 1
            todo += self._admit(then(j) if then else [], names, done_names, then)
        return todo

    def _run_pool(self, todo: list[Job], names: set[str], done_names: set[str], then, cdir: Path,
                  log_name: Optional[str], total: int) -> list[str]:
        """`run` on the worker pool: a job starts on an idle worker once its dependencies are done (the
        first such job in plan order); a failure or a signal stops new starts, the running jobs end
        (a forwarded signal makes them save and exit 99), then one line says what happened."""
        from litgpt_ext.study.pool import WorkerPool

        if self._pool is None:
            threads = self.threads or max(1, (os.cpu_count() or 1) // self.workers)
            self._pool = WorkerPool(self.workers, threads)
        pool, running, ran, failed, got = self._pool, {}, [], [], []

        def forward(signum, frame):  # the job decides: first signal = save and exit 99, second Ctrl-C = 130
            got.append(signum)
            pool.signal_busy(signum)

        old = {s: signal.signal(s, forward) for s in FORWARDED} if _main_thread() else {}
        try:
            while todo or running:
                while not (failed or got) and pool.idle():
                    j = next((j for j in todo if all(d in done_names or d not in names for d in j.depends)), None)
                    if j is None:
                        break
                    todo.remove(j)
                    self._progress(j, total, running=len(running))
                    path, log = self._write(j, cdir), j.out_dir / (j.log_name or log_name or self.log_name)
                    w = pool.idle()[0]
                    pool.submit(w, j.command, path, log)
                    running[w] = (j, path, log, time.perf_counter())
                if not running:
                    if todo and not (failed or got):
                        j = todo[0]
                        self._stop(1, f"{j.name} depends on {[d for d in j.depends if d not in done_names]}, which did"
                                      " not finish")
                    break
                for w, rc, cpu in pool.wait():
                    j, path, log, t = running.pop(w)
                    self._finished(j, path, time.perf_counter() - t, cpu)
                    if rc != 0 or got:
                        failed.append((j, rc, log))
                        continue
                    done_names.add(j.name)
                    ran.append(j.name)
                    self._done += 1
                    todo += self._admit(then(j) if then else [], names, done_names, then)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        if failed or got:
            j, rc, log = next(((j, rc, log) for j, rc, log in failed if rc != 0), failed[-1] if failed else (None, 0, None))
            if j is None:  # a signal between jobs: nothing was running
                self._stop(PREEMPTED, f"interrupted ({signal.Signals(got[0]).name}): no job was running; finished jobs"
                                      f" are kept; continue with: {self.resume_command}")
            self._check(j, rc, got[0] if got else None, log)
        return ran

    def close(self) -> None:
        """Stop the worker processes (a later `run` starts new ones)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    # ------------------------------------------------------------------------------------ running

    @staticmethod
    def _write(job: Job, cdir: Path) -> Path:
        if job.config_dir is not None:
            cdir = Path(job.config_dir)
            cdir.mkdir(parents=True, exist_ok=True)
        path = cdir / f"{job.name}.yaml"
        path.write_text(yaml.safe_dump(job.config, sort_keys=False))
        job.out_dir.mkdir(parents=True, exist_ok=True)
        return path

    def spawn(self, job: Job, path: Path, fh):
        """The job as a subprocess in its own process group, its output into `fh` (forked from the
        preloaded server when workers > 1)."""
        if self.workers > 1:
            from litgpt_ext.study.forked import spawn_forked

            return spawn_forked(job.command, path, fh, self.threads)
        cmd = [self.python, "-m", "litgpt_ext", job.command, "--config", str(path)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.threads:
            env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, env=env)

    def _subprocess(self, job: Job, path: Path, log: Path) -> tuple[int, Optional[int]]:
        got: list[int] = []

        def forward(signum, frame):  # the job decides: first signal = save and exit 99, second Ctrl-C = 130
            got.append(signum)
            signal_group(child.pid, signum)

        with open(log, "a") as fh:
            child = self.spawn(job, path, fh)
            old = {s: signal.signal(s, forward) for s in FORWARDED}
            try:
                while True:
                    try:
                        rc = child.wait()
                        break
                    except KeyboardInterrupt:  # a handler other than ours raised: keep waiting for the job
                        continue
            finally:
                for s, h in old.items():
                    signal.signal(s, h)
        return rc, (got[0] if got else None)

    def _inprocess(self, job: Job, path: Path, log: Path) -> tuple[int, Optional[int]]:
        """The job's CLI installs the preemption handlers itself (a preemptible command exits 99)."""
        with open(log, "a") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh), _log_handlers_to(fh):
            rc = run_cli(job.command, path)
        return rc, None

    # ------------------------------------------------------------------------------------ outcomes

    def _check(self, job: Job, rc: int, sig: Optional[int], log: Path) -> None:
        if rc == 0 and sig is None:
            return
        name = signal.Signals(sig).name if sig else None
        cont = f"continue with: {self.resume_command}"
        if rc == PREEMPTED or (rc == 0 and sig is not None):
            self._stop(PREEMPTED, f"interrupted ({name or 'preempted'}): {job.name} saved a checkpoint and stopped"
                                  f" (its log: {log}); finished jobs are kept; {cont}")
        if sig is not None or rc == INTERRUPTED:
            self._stop(INTERRUPTED, f"interrupted ({name or 'Ctrl-C'}): {job.name} stopped without saving (exit {rc});"
                                    f" it continues from its last checkpoint; its log: {log}; {cont}")
        self._stop(1, f"{job.stage} job {job.name} failed (exit {rc}); its log: {log} (it says: {_last_line(log)});"
                      f" fix it, then {cont}")

    def _stop(self, code: int, message: str) -> None:
        line = f"litgpt-ext {self.label}: {message}"
        print(line, file=sys.stderr, flush=True)
        raise StudyStopped(code, line)

    def _progress(self, job: Job, total: int, running: int = 0) -> None:
        el = time.perf_counter() - self._t0
        eta = self._ran_seconds / self._ran * (total - self._done) / max(1, self.workers) if self._ran else None
        what = (f" (fork @{job.info['start']}, {job.info['mix']})" if job.stage == "midtrain"
                else f" (until step {job.info['pause']})" if job.info.get("pause") is not None else "")
        print(f"[{self.label} {self._done + running + 1}/{total}] {job.stage} {job.name}{what} | elapsed {el / 60:.1f} min"
              + (f" | ETA {eta / 60:.1f} min" if eta is not None else ""), flush=True)

    def _finished(self, job: Job, path: Path, seconds: float, cpu_seconds: Optional[float]) -> None:
        self._ran_seconds += seconds
        self._ran += 1
        if self.timings is None:
            return
        self.timings.parent.mkdir(parents=True, exist_ok=True)
        with open(self.timings, "a") as f:
            f.write(json.dumps({"stage": job.command, "what": f"--config {path}", "seconds": round(seconds, 2),
                                "cpu_seconds": None if cpu_seconds is None else round(cpu_seconds, 2)}) + "\n")

@contextlib.contextmanager
def _log_handlers_to(stream):
    """Point lightning's own log handlers at `stream` for one in-process job: they bind sys.stderr when
    lightning is first imported, i.e. inside an earlier job's redirect, whose file is closed by now
    (without this, each of their lines in a later job is a "--- Logging error ---" traceback)."""
    swapped = [(h, h.stream) for name in ("lightning.fabric", "lightning.pytorch")
               for h in logging.getLogger(name).handlers if type(h) is logging.StreamHandler]
    for h, _ in swapped:  # not setStream: it flushes the old stream, which may be closed
        h.stream = stream
    try:
        yield
    finally:
        for h, old in swapped:
            h.stream = old


def _cpu_seconds(mode: str) -> float:
    """CPU seconds (user + system) of this process, or of its finished children for subprocess jobs."""
    if mode == "subprocess":
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime
    return time.process_time()


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _last_line(log: Path) -> str:
    try:
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return "(no log)"
    if not lines:
        return "(empty)"
    errors = [x for x in lines if "error" in x.lower()]  # the cause, not a trailing hint
    return (errors or lines)[-1].strip()[-300:]
