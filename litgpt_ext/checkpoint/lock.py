"""The one-writer lock of a run folder (`.run.lock`: host, pid, SLURM job, heartbeat)."""

from __future__ import annotations

import atexit
import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

from litgpt_ext.checkpoint.layout import LOCK_FILE


class RunLockedError(FileExistsError):
    """Another live process is writing this run."""


def _job_id() -> Optional[str]:
    job = os.environ.get("SLURM_JOB_ID")
    if job and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ.get('SLURM_ARRAY_JOB_ID', job)}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return job


def _proc_start(pid: int) -> Optional[str]:
    """The process's start time (jiffies since boot) to tell a reused pid apart; None off Linux."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int, start: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _proc_start(pid)
    return start is None or now is None or now == start


_HELD: dict[Path, "RunLock"] = {}


class RunLock:
    """One writer per out_dir: `out_dir/.run.lock` holds the writer's host, pid and SLURM job id.

    Taken with O_EXCL; a heartbeat thread touches it every `heartbeat_s`. A lock is stale (and taken
    over, logged) when its pid is dead on this host, when it belongs to this same SLURM job id (an
    earlier incarnation of a requeued job), or when its heartbeat is older than `stale_after_s`
    (its node died). Re-entrant within one process (the loop's fork holds the same lock).
    """

    def __init__(self, out_dir: Union[str, Path], stale_after_s: float = 600.0, heartbeat_s: float = 30.0,
                 log: Callable[[str], None] = print) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_FILE
        self.stale_after_s, self.heartbeat_s, self.log = stale_after_s, heartbeat_s, log
        self.token = secrets.token_hex(8)
        self.depth = 0
        self._stop = threading.Event()

    def _record(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "job_id": _job_id(),
                "proc_start": _proc_start(os.getpid()), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "token": self.token}

    def _read(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # half-written by a process killed while taking it: judged by its age

    def _stale(self, rec: dict) -> Optional[str]:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "released"
        if rec.get("host") == socket.gethostname() and isinstance(rec.get("pid"), int):
            if rec["pid"] == os.getpid():
                return "it was left by this process"  # held locks are re-entered before this check
            if not _pid_alive(rec["pid"], rec.get("proc_start")):
                return f"pid {rec['pid']} on this host is gone"
            return None
        if rec.get("job_id") and rec.get("job_id") == _job_id():
            return f"it belongs to an earlier run of this SLURM job {rec['job_id']} (requeued)"
        if age > self.stale_after_s:
            return f"no heartbeat for {age:.0f}s (> {self.stale_after_s:.0f}s)"
        return None

    @staticmethod
    def describe(rec: dict) -> str:
        job = f", SLURM job {rec['job_id']}" if rec.get("job_id") else ", not a SLURM job"
        return f"host {rec.get('host', '?')}, pid {rec.get('pid', '?')}{job}, since {rec.get('started', '?')}"

    def _write_new(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self._record(), f)
        return True

    def acquire(self) -> "RunLock":
        key = self.path.resolve() if self.path.exists() else self.out_dir.resolve() / LOCK_FILE
        held = _HELD.get(key)
        if held is not None:  # re-entrant in this process
            held.depth += 1
            return held
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if self._write_new():
                break
            rec = self._read()
            if rec is None:
                continue  # released meanwhile: try again
            why = self._stale(rec)
            if why is None:
                age = time.time() - self.path.stat().st_mtime
                raise RunLockedError(
                    f"{str(self.out_dir)!r} is being written by another training run ({self.describe(rec)};"
                    f" heartbeat {age:.0f}s ago). Two writers would mix two trainings' checkpoints. Wait for it"
                    f" or stop it; if it is dead on another node, its lock is taken over once its heartbeat is"
                    f" older than {self.stale_after_s:.0f}s (or delete {self.path})."
                )
            if self._take_over(rec, why):
                break
        else:
            raise RunLockedError(f"could not take the lock {self.path}: it keeps changing hands")
        self.depth = 1
        _HELD[self.path.resolve()] = self
        atexit.register(self.release)
        threading.Thread(target=self._heartbeat, daemon=True, name="run-lock-heartbeat").start()
        return self

    def _take_over(self, rec: dict, why: str) -> bool:
        """Replace a stale lock; a short-lived O_EXCL mutex serializes two processes taking it over."""
        mutex = self.path.with_name(LOCK_FILE + ".takeover")
        try:
            fd = os.open(mutex, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                if time.time() - mutex.stat().st_mtime > 60:  # left by a process killed mid-takeover
                    mutex.unlink()
            except FileNotFoundError:
                pass
            time.sleep(0.2)
            return False
        os.close(fd)
        try:
            if self._read() != rec:  # changed hands meanwhile: judge again
                return False
            tmp = self.path.with_name(f"{LOCK_FILE}.{self.token}")
            tmp.write_text(json.dumps(self._record()))
            os.replace(tmp, self.path)
            self.log(f"run lock: took over the stale lock of {self.out_dir} ({self.describe(rec)}): {why}")
            return True
        finally:
            mutex.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if (self._read() or {}).get("token") == self.token:
                    os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        if self.depth == 0:
            return
        self.depth -= 1
        if self.depth:
            return
        self._stop.set()
        _HELD.pop(self.path.resolve(), None)
        if (self._read() or {}).get("token") == self.token:  # never remove another writer's lock
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        self._held = self.acquire()  # this object, or the one this process already holds
        return self._held

    def __exit__(self, *exc) -> None:
        self._held.release()


def run_lock(out_dir: Union[str, Path], **kw: Any) -> RunLock:
    """`with run_lock(out_dir):` — hold the run's writer lock (see RunLock)."""
    return RunLock(out_dir, **kw)


def hold_run_lock(fabric: Any, out_dir: Path) -> Optional[RunLock]:
    """Rank 0 takes the run lock; if another writer holds it, every rank raises the same error
    (the other ranks would otherwise wait for rank 0 forever)."""
    lock, err = None, None
    if fabric.global_rank == 0:
        try:
            lock = RunLock(out_dir, log=fabric.print).acquire()
        except RunLockedError as e:
            err = str(e)
    if fabric.world_size > 1:
        err = fabric.broadcast(err, src=0)
    if err:
        raise RunLockedError(err)
    return lock
