"""The one study executor: a plan of `Job`s, one "finished" rule, run here in-process or as subprocesses.

`litgpt-ext sweep --action local` (subprocesses), `litgpt-ext reproduce` and `litgpt-ext sft-grid`
(in-process: torch and lightning are imported once) all run their jobs through `Executor.run`; the
same jobs become SLURM arrays through `litgpt_ext.study.sweep.write_plan`. A job is a litgpt-ext
command with one YAML config; it is skipped when `finished(job)` holds, so a plan can be run again
after any interruption and continues where it stopped.

Interrupts: a subprocess runs in its own process group (a terminal's Ctrl-C reaches the executor
only), and the executor forwards SIGINT/SIGTERM/SIGUSR1 to it as a preemption: the job saves a
checkpoint and exits 99, the executor waits for it, prints one line (what was saved, the command to
continue) and exits 99; a second Ctrl-C is forwarded too (the job stops without saving) and the
executor exits 130. In-process jobs get the signal directly (the CLI installs the same handlers).
A failed job gives one line (the job, its exit status, its log) and exit 1, never a traceback.

`workers > 1` (subprocess mode; a sweep's `local.workers`) runs that many jobs at once, each as
soon as its dependencies have finished, each forked from one process that imported torch,
lightning and litgpt once (multiprocessing's forkserver; `_forked_job`); a signal goes to every
running job, and no job starts after a signal or a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml

PREEMPTED = 99  # litgpt_ext.preempt.PREEMPT_EXIT_CODE (not imported: this module stays light)
INTERRUPTED = 130  # a second Ctrl-C: stopped without saving
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

    def done(self) -> bool:
        return finished(self)


def finished(job: Job) -> bool:
    """The one "finished" rule of every study: a job that names what it `creates` (a sweep's prep and
    synth jobs) has it; an SFT run has sft_metrics.json and a complete final/
    (`litgpt_ext.sft.run.finished`); a soup has soup.json; a base segment (`info.pause`) has a
    checkpoint at or past its pause step; any other training run has a complete final/."""
    from litgpt_ext import checkpoint as ckpt

    if job.info.get("creates") is not None:  # a sweep's prep and synth jobs: the file they write last
        return Path(job.info["creates"]).exists()
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
    """Subprocess jobs run at once, each as soon as the jobs it depends on have finished. With > 1 they
    fork from one server process that imported torch, lightning and litgpt once (multiprocessing's
    forkserver) instead of starting a new interpreter: each job skips the imports (~7 CPU-seconds
    here) and still runs in its own process and process group"""
    threads: Optional[int] = None
    """torch threads of each job (OMP_NUM_THREADS of a subprocess; None: torch's default)"""
    _done: int = 0
    _ran_seconds: float = 0.0
    _ran: int = 0
    _t0: float = field(default_factory=time.perf_counter)

    def run(self, jobs: list[Job], log_name: Optional[str] = None, config_dir: Optional[Path] = None) -> list[str]:
        """Run every unfinished job in order (a dependency in `jobs` must have finished first); the
        names of those that ran. `log_name` and `config_dir` override the executor's for these jobs."""
        cdir = Path(config_dir or self.config_dir)
        cdir.mkdir(parents=True, exist_ok=True)
        done_names = {j.name for j in jobs if j.done()}
        todo = [j for j in jobs if j.name not in done_names or self.rerun_finished]
        total = self.total or len(jobs)
        self._done += len(jobs) - len(todo)
        if self.workers > 1 and self.mode == "subprocess" and not self.rerun_finished:
            return self._run_parallel(todo, {j.name for j in jobs}, done_names, cdir, log_name or self.log_name, total)
        ran = []
        for j in todo:
            missing = [d for d in j.depends if d not in done_names and any(d == o.name for o in jobs)]
            if j.name in done_names and not missing:  # rerun_finished: its command checks the config, fast
                rc, sig = (self._subprocess if self.mode == "subprocess" else self._inprocess)(
                    j, self._write(j, cdir), j.out_dir / (log_name or self.log_name))
                self._check(j, rc, sig, j.out_dir / (log_name or self.log_name))
                self._done += 1
                continue
            if missing:
                self._stop(1, f"{j.name} depends on {missing}, which did not finish")
            self._progress(j, total)
            path = self._write(j, cdir)
            log = j.out_dir / (log_name or self.log_name)
            t = time.perf_counter()
            rc, sig = (self._subprocess if self.mode == "subprocess" else self._inprocess)(j, path, log)
            self._ran_seconds += time.perf_counter() - t
            self._ran += 1
            self._timed(j, path, time.perf_counter() - t)
            self._check(j, rc, sig, log)
            done_names.add(j.name)
            ran.append(j.name)
            self._done += 1
        return ran

    # ------------------------------------------------------------------------------------ running

    @staticmethod
    def _write(job: Job, cdir: Path) -> Path:
        path = cdir / f"{job.name}.yaml"
        path.write_text(yaml.safe_dump(job.config, sort_keys=False))
        job.out_dir.mkdir(parents=True, exist_ok=True)
        return path

    def spawn(self, job: Job, path: Path, fh) -> "subprocess.Popen | _Forked":
        """The job as a subprocess in its own process group, its output into `fh`."""
        if self.workers > 1:
            proc = _forkserver().Process(target=_forked_job, args=(job.command, str(path), fh.name, self.threads),
                                         name=job.name)
            proc.start()
            return _Forked(proc)
        cmd = [self.python, "-m", "litgpt_ext", job.command, "--config", str(path)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.threads:
            env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, env=env)

    def _subprocess(self, job: Job, path: Path, log: Path) -> tuple[int, Optional[int]]:
        got: list[int] = []

        def forward(signum, frame):  # the job decides: first signal = save and exit 99, second Ctrl-C = 130
            got.append(signum)
            _signal(child.pid, signum)

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
        from litgpt_ext.cli import main as cli_main

        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        rc = 0
        with open(log, "a") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
            try:
                cli_main([job.command, "--config", str(path)])
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if isinstance(e.code, str):
                    print(e.code)
                    if "interrupted" in e.code:
                        rc = INTERRUPTED
            except KeyboardInterrupt:
                rc = INTERRUPTED
        return rc, None

    def _run_parallel(self, todo: list[Job], planned: set[str], done_names: set[str], cdir: Path, log_name: str,
                      total: int) -> list[str]:
        """`run` with up to `workers` subprocesses at once: a job starts, in plan order, once every job
        of the plan it depends on has finished. A signal is forwarded to every running job; after a
        signal or a failure no job starts, the running ones are waited for, and the first outcome that
        is not a success decides the exit (as `_check` words it for one job)."""
        pending, running, ran, got, outcomes = list(todo), {}, [], [], []

        def forward(signum, frame):
            got.append(signum)
            for child, *_ in running.values():
                _signal(child.pid, signum)

        old = {s: signal.signal(s, forward) for s in FORWARDED}
        try:
            while pending or running:
                while not got and not outcomes and len(running) < self.workers:
                    j = next((j for j in pending if all(d in done_names or d not in planned for d in j.depends)), None)
                    if j is None:
                        break
                    pending.remove(j)
                    self._progress(j, total, started=len(running))
                    path, log = self._write(j, cdir), j.out_dir / log_name
                    fh = open(log, "a")
                    running[j.name] = (self.spawn(j, path, fh), fh, j, path, log, time.perf_counter())
                if not running:
                    if pending and not got and not outcomes:  # nothing runs and nothing can start
                        j = pending[0]
                        self._stop(1, f"{j.name} depends on {[d for d in j.depends if d not in done_names]}, which did not finish")
                    break
                time.sleep(0.2)
                for name, (child, fh, j, path, log, t) in list(running.items()):
                    rc = child.poll()
                    if rc is None:
                        continue
                    fh.close()
                    del running[name]
                    self._ran_seconds += time.perf_counter() - t
                    self._ran += 1
                    self._timed(j, path, time.perf_counter() - t)
                    if rc == 0 and not got:
                        done_names.add(name)
                        ran.append(name)
                        self._done += 1
                    else:
                        outcomes.append((j, rc, log))
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        for j, rc, log in sorted(outcomes, key=lambda o: o[1] == 0):  # the first non-zero exit speaks
            self._check(j, rc, got[0] if got else None, log)
        return ran

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

    def _progress(self, job: Job, total: int, started: int = 0) -> None:
        """`started`: jobs running beside this one (workers > 1), counted before it and in the ETA."""
        el = time.perf_counter() - self._t0
        eta = self._ran_seconds / self._ran * (total - self._done) / self.workers if self._ran else None
        what = (f" (fork @{job.info['start']}, {job.info['mix']})" if job.stage == "midtrain"
                else f" (until step {job.info['pause']})" if job.info.get("pause") is not None else "")
        print(f"[{self.label} {self._done + started + 1}/{total}] {job.stage} {job.name}{what} | elapsed {el / 60:.1f} min"
              + (f" | ETA {eta / 60:.1f} min" if eta is not None else ""), flush=True)

    def _timed(self, job: Job, path: Path, seconds: float) -> None:
        if self.timings is None:
            return
        self.timings.parent.mkdir(parents=True, exist_ok=True)
        with open(self.timings, "a") as f:
            f.write(json.dumps({"stage": job.command, "what": f"--config {path}", "seconds": round(seconds, 2)}) + "\n")


def _signal(pid: int, signum: int) -> None:
    """The job's process group (the job's own process while a forked job has not made its group yet)."""
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


PRELOAD = ["litgpt_ext.cli", "litgpt_ext.train.loop", "litgpt_ext.sft.run", "litgpt_ext.prep.synth_replay"]


def _forkserver():
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def stop_forkserver() -> None:
    """Stop (and reap) the fork server if one runs, so that the CPU time of the jobs it forked counts as
    this process's children's (`/usr/bin/time`, `resource.RUSAGE_CHILDREN`)."""
    import multiprocessing.forkserver as fs

    stop = getattr(fs._forkserver, "_stop", None)  # CPython's own stop (3.8+), used by its tests
    if stop is not None:
        stop()


class _Forked:
    """A job forked from the preloaded server, with the part of Popen's interface the executor uses."""

    def __init__(self, proc):
        self.proc = proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> Optional[int]:
        return self.proc.exitcode

    def wait(self) -> int:
        self.proc.join()
        return self.proc.exitcode


def _forked_job(command: str, path: str, log: str, threads: Optional[int]) -> None:
    """In the forked process: its own session (a terminal's Ctrl-C reaches the executor only, which
    forwards it), output into the job's log, the CLI as `python -m litgpt_ext <command> --config <path>`."""
    os.setsid()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    if threads:
        import torch

        os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        torch.set_num_threads(threads)
    from litgpt_ext.cli import main

    main([command, "--config", path])


def _last_line(log: Path) -> str:
    try:
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return "(no log)"
    if not lines:
        return "(empty)"
    errors = [x for x in lines if "error" in x.lower()]  # the cause, not a trailing hint
    return (errors or lines)[-1].strip()[-300:]
