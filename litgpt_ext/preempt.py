"""Preemption: a signal asks the training loop to checkpoint at the next step boundary and exit 99.

Signals: SIGUSR1 (SLURM's `--signal=USR1@N` warning, `scancel --signal=USR1`), SIGTERM (the time
limit, `scontrol requeue`, a preempting job) and SIGINT (Ctrl-C; a second Ctrl-C stops at once,
exit 130, without a checkpoint and without a traceback).

The handlers are installed by the CLI before the heavy imports (`install()`), so a signal that
arrives while torch/lightning load or the model is built is remembered and honoured at the first
step boundary instead of killing the process. DataLoader workers ignore these signals
(`ignore_in_worker`, their `worker_init_fn`): SLURM signals every process of a step, and a worker
that dies takes the run down before the main process can save.

After the preemption checkpoint every rank exits with PREEMPT_EXIT_CODE. Under
`srun --kill-on-bad-exit=1` the first rank to exit gets the others killed (status 143), so rank 0
also writes the file named by $LITGPT_EXT_PREEMPT_MARKER once the checkpoint is complete on all
ranks: training_scripts/small_model_pretrain.sh requeues when that file exists, whatever srun says.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from pathlib import Path
from typing import Optional

PREEMPT_EXIT_CODE = 99
"""Exit status after a preemption signal: a checkpoint was saved, requeue the job with `resume: auto`."""
MARKER_ENV = "LITGPT_EXT_PREEMPT_MARKER"
SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class PreemptFlag:
    """Remembers the first preemption signal; the loop polls `signum` at every step boundary."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._old: dict = {}
        self._pid: Optional[int] = None

    @property
    def installed(self) -> bool:
        return bool(self._old)

    def install(self) -> "PreemptFlag":
        if self._old or threading.current_thread() is not threading.main_thread():
            return self  # handlers can only be set from the main thread; keep the default behaviour
        self._pid = os.getpid()
        for sig in SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            # a forked DataLoader worker inherits this handler until its worker_init_fn sets SIG_IGN;
            # a signal in that window belongs to the main process, which got it too
            return
        if signum == signal.SIGINT and self.signum is not None:
            os.write(2, b"litgpt-ext: second Ctrl-C: stopped without saving (exit 130)\n")
            stop_now(130)
        if self.signum is None:
            self.signum = signum
            name = signal.Signals(signum).name
            hint = " (Ctrl-C again to stop without saving)" if signum == signal.SIGINT else ""
            msg = f"litgpt-ext: got {name}: saving a checkpoint at the next step boundary, then exit {PREEMPT_EXIT_CODE}{hint}\n"
            os.write(2, msg.encode())  # not print: a handler may interrupt a write to the same stream

    def restore(self) -> None:
        """Put back the previous handlers and forget the signal (the run is over)."""
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
        self.signum = None


_FLAG = PreemptFlag()


def stop_now(code: int) -> None:
    """Exit at once, with no traceback from any process or thread. Checkpoints are atomic: the last stands.

    os._exit, not KeyboardInterrupt: unwinding through a DataLoader prints tracebacks from its
    threads. The DataLoader workers go first (SIGKILL, then reaped): a worker that outlived the
    main process would report from its fd-sharing thread (multiprocessing.resource_sharer) when the
    main end of a tensor hand-over closes (ConnectionResetError), and would linger until its
    watchdog noticed. torch's SIGCHLD handler would turn those deaths into "DataLoader worker exited
    unexpectedly", so it is put back to the default first; and fds 1 and 2 point at /dev/null, so
    that nothing the main process's other threads still write lands after the last message."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        children = multiprocessing.active_children()
        for child in children:
            child.kill()
        for child in children:
            child.join(timeout=5)
    finally:
        os._exit(code)


def install() -> PreemptFlag:
    """Install the process-wide handlers (idempotent); the CLI calls this first thing."""
    return _FLAG.install()


def shared_flag() -> PreemptFlag:
    """The process-wide flag, with its handlers installed (a signal since `install()` is kept)."""
    return _FLAG.install()


def ignore_in_worker(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: the main process decides; a worker must survive the signal."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def exit_preempted(fabric, step: int, signum: Optional[int], code: int = PREEMPT_EXIT_CODE) -> None:
    """Called on every rank after the preemption checkpoint: mark it, then exit `code`."""
    name = signal.Signals(signum).name if signum else "signal"
    fabric.barrier()  # every rank has finished writing its part of the checkpoint
    marker = os.environ.get(MARKER_ENV)
    if marker and fabric.global_rank == 0:
        Path(marker).parent.mkdir(parents=True, exist_ok=True)
        Path(marker).write_text(f"step {step}\n")
    fabric.print(f"Preempted ({name}): checkpoint saved at step {step}; exit {code}")
    raise SystemExit(code)
