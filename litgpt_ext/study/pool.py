"""Worker processes of the study executor: each imports litgpt_ext, torch and lightning once, then
runs jobs (`litgpt-ext <command> --config <yaml>`) in-process, one at a time, with its own number of
torch threads.

Why workers and not torch threads: the study's models are 128 wide, so two torch threads on one job
scale poorly (and, on a machine shared with other work, OpenMP's spin-waiting makes them far
slower than one), while its jobs (base runs of several seeds, the arms forked from them, SFT cells)
are mostly independent. Two one-thread workers keep two cores busy. A job's output does not
depend on the process it runs in: it seeds itself and reads only its config (the golden study,
`util_scripts/golden_study.py`, checks this bit for bit against one process).

Signals: a worker runs in its own session, so a terminal's Ctrl-C reaches only the executor, and
ignores SIGINT/SIGTERM/SIGUSR1 between jobs; the executor forwards them to the busy workers
(`signal_busy`), where the job's own preemption handlers take them (save a checkpoint, exit 99; a
second Ctrl-C: stop at once, 130). Each job's stdout and stderr (file descriptors 1 and 2, so
library log handlers and C-level output too) go to its log file.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import time
from multiprocessing.connection import wait
from pathlib import Path
from typing import Optional

INTERRUPTED = 130  # a second Ctrl-C: stopped without saving
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def signal_group(pid: int, signum: int) -> None:
    """The job's process group (the job's own process while a forked job has not made its group yet)."""
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def run_cli(command: str, config: Path) -> int:
    """`litgpt-ext <command> --config <config>` in this process: its exit status (SystemExit's code;
    a message ending the run is printed; an interrupt is 130)."""
    from litgpt_ext.cli import main as cli_main

    try:
        cli_main([command, "--config", str(config)])
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code)
            return INTERRUPTED if "interrupted" in e.code else 1
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        return INTERRUPTED
    return 0


@contextlib.contextmanager
def _fds_to(log: Path):
    """Point file descriptors 1 and 2 (and sys.stdout/stderr, which write to them) at `log`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "ab") as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _worker(conn, threads: Optional[int]) -> None:
    os.setsid()
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(threads)
    import torch

    if threads:
        torch.set_num_threads(threads)
    import lightning  # noqa: F401  (its log handlers bind to this process's stderr: fd 2, the job's log)

    while True:
        try:
            msg = conn.recv()
        except EOFError:  # the executor is gone
            return
        if msg is None:
            return
        command, config, log = msg
        cpu = time.process_time()
        with _fds_to(Path(log)):
            rc = run_cli(command, Path(config))
        conn.send((rc, time.process_time() - cpu))


class WorkerPool:
    """`n` worker processes (spawned: nothing of the executor's state is inherited)."""

    def __init__(self, n: int, threads: Optional[int]):
        ctx = multiprocessing.get_context("spawn")
        self._conns, self._procs = [], []
        for _ in range(n):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(theirs, threads), name="litgpt-ext-worker")
            proc.start()
            theirs.close()
            self._conns.append(ours)
            self._procs.append(proc)
        self._busy: set[int] = set()

    def idle(self) -> list[int]:
        return [i for i in range(len(self._procs)) if i not in self._busy and self._procs[i].is_alive()]

    @property
    def busy(self) -> int:
        return len(self._busy)

    def submit(self, worker: int, command: str, config: Path, log: Path) -> None:
        self._conns[worker].send((command, str(config), str(log)))
        self._busy.add(worker)

    def wait(self) -> list[tuple[int, int, float]]:
        """Block until a busy worker reports (or dies); (worker, exit status, CPU seconds) of each."""
        by_handle = {}
        for i in self._busy:
            by_handle[self._conns[i]] = i
            by_handle[self._procs[i].sentinel] = i
        out = {}
        for h in wait(list(by_handle)):
            i = by_handle[h]
            if i in out:
                continue
            try:
                if self._conns[i].poll():
                    rc, cpu = self._conns[i].recv()
                    out[i] = (i, rc, cpu)
                    continue
            except (EOFError, OSError):
                pass
            self._procs[i].join(timeout=5)  # died in a job (a second Ctrl-C: os._exit(130); killed: -9)
            code = self._procs[i].exitcode
            out[i] = (i, code if code is not None and code >= 0 else 128 - (code or 0), 0.0)
        self._busy -= set(out)
        return list(out.values())

    def signal_busy(self, signum: int) -> None:
        for i in self._busy:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._procs[i].pid, signum)

    def close(self) -> None:
        for conn, proc in zip(self._conns, self._procs):
            with contextlib.suppress(OSError, BrokenPipeError):
                if proc.is_alive():
                    conn.send(None)
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()
