"""Subprocess jobs `workers` at a time, each forked from one server process that imported torch,
lightning and litgpt once (multiprocessing's forkserver): each job skips the imports (~7 CPU-s on
2 cores) and still runs in its own process and process group, its output in its log. `run_forked`
is `Executor.run` for `mode="subprocess", workers > 1` (a sweep's `local.workers`); the in-process
counterpart, for reproduce and sft-grid, is `litgpt_ext.study.pool`."""

from __future__ import annotations

import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

from litgpt_ext.study.pool import SIGNALS as FORWARDED
from litgpt_ext.study.pool import signal_group


def spawn_forked(command: str, path: Path, fh, threads: Optional[int]) -> "_Forked":
    """The job forked from the preloaded server, its output into `fh`'s file."""
    ctx = _forkserver()
    cpu = ctx.Value("d", -1.0, lock=False)  # the job's CPU seconds, written by the job as it exits
    proc = ctx.Process(target=_forked_job, args=(command, str(path), fh.name, threads, cpu), name=Path(path).stem)
    proc.start()
    return _Forked(proc, cpu)


def run_forked(ex: Any, todo: list, planned: set[str], done_names: set[str], cdir: Path, log_name: str,
               total: int) -> list[str]:
    """`run` with up to `workers` subprocesses at once: a job starts, in plan order, once every job
    of the plan it depends on has finished. A signal is forwarded to every running job; after a
    signal or a failure no job starts, the running ones are waited for, and the first outcome that
    is not a success decides the exit (as `_check` words it for one job)."""
    pending, running, ran, got, outcomes = list(todo), {}, [], [], []

    def forward(signum, frame):
        got.append(signum)
        for child, *_ in running.values():
            signal_group(child.pid, signum)

    old = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        while pending or running:
            while not got and not outcomes and len(running) < ex.workers:
                j = next((j for j in pending if all(d in done_names or d not in planned for d in j.depends)), None)
                if j is None:
                    break
                pending.remove(j)
                ex._progress(j, total, running=len(running))
                path, log = ex._write(j, cdir), j.out_dir / log_name
                fh = open(log, "a")
                running[j.name] = (ex.spawn(j, path, fh), fh, j, path, log, time.perf_counter())
            if not running:
                if pending and not got and not outcomes:  # nothing runs and nothing can start
                    j = pending[0]
                    ex._stop(1, f"{j.name} depends on {[d for d in j.depends if d not in done_names]}, which did not finish")
                break
            time.sleep(0.2)
            for name, (child, fh, j, path, log, t) in list(running.items()):
                rc = child.poll()
                if rc is None:
                    continue
                fh.close()
                del running[name]
                ex._finished(j, path, time.perf_counter() - t, child.cpu_seconds)
                if rc == 0 and not got:
                    done_names.add(name)
                    ran.append(name)
                    ex._done += 1
                else:
                    outcomes.append((j, rc, log))
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    for j, rc, log in sorted(outcomes, key=lambda o: o[1] == 0):  # the first non-zero exit speaks
        ex._check(j, rc, got[0] if got else None, log)
    return ran


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

    def __init__(self, proc, cpu):
        self.proc, self._cpu = proc, cpu

    @property
    def cpu_seconds(self) -> Optional[float]:
        """User + system CPU seconds of the job and its reaped children (DataLoader workers), as the job
        reported them when it exited; None when it could not (killed, or `os._exit` on a second Ctrl-C).
        The job is the fork server's child, not ours, so `wait4`/`RUSAGE_CHILDREN` here cannot see it."""
        return self._cpu.value if self._cpu.value >= 0 else None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> Optional[int]:
        return self.proc.exitcode

    def wait(self) -> int:
        self.proc.join()
        return self.proc.exitcode


def _forked_job(command: str, path: str, log: str, threads: Optional[int], cpu) -> None:
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

    try:
        main([command, "--config", path])
    finally:  # a forked process's rusage starts at zero: this is the job's own CPU, not the server's imports
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.value = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
