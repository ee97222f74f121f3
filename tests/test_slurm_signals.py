"""Signals to a real `litgpt-ext pretrain` process group, as SLURM sends them (no SLURM needed):
a signal during start-up, SIGTERM to every process including DataLoader workers, Ctrl-C twice."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT
from tests.test_slurm_real import _config

pytestmark = pytest.mark.slow


def _start(cfg, *args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for k in [k for k in env if k.startswith("SLURM_")]:
        del env[k]
    return subprocess.Popen([sys.executable, "-m", "litgpt_ext", "pretrain", "--config", str(cfg), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _until_step(proc) -> str:
    seen = ""
    for line in proc.stdout:
        seen += line
        if re.match(r"step \d+/", line):
            return seen
    raise AssertionError(f"no training step\n{seen[-3000:]}")


def _caught_signals(pid: int) -> int:
    """The signals `pid` has a handler for (SigCgt in /proc/<pid>/status; 0 if it is gone)."""
    try:
        status = open(f"/proc/{pid}/status").read()
    except OSError:
        return 0
    return int(re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.M).group(1), 16)


def _wait_for_handler(proc, sig, timeout=120.0) -> None:
    """Handshake instead of a sleep: return once `proc` handles `sig` (preempt.install() ran)."""
    deadline = time.monotonic() + timeout
    while not _caught_signals(proc.pid) & (1 << (sig - 1)):
        assert proc.poll() is None and time.monotonic() < deadline, f"no handler for {sig!r}"
        time.sleep(0.01)


def test_signal_during_startup_is_kept_and_honoured(tmp_path):
    cfg = _config(tmp_path, 10**6, num_workers=0)
    proc = _start(cfg)
    _wait_for_handler(proc, signal.SIGUSR1)  # installed before torch/lightning are imported
    os.killpg(proc.pid, signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 99, out[-3000:]
    first_step = re.search(r"^step \d+/", out, re.M)
    assert first_step is None or out.index("got SIGUSR1") < first_step.start(), out[-3000:]  # came in start-up
    assert "checkpoint saved at step 1;" in out and (tmp_path / "out" / "step-00000001").is_dir(), out[-3000:]


def test_sigterm_to_the_whole_group_with_dataloader_workers_checkpoints(tmp_path):
    cfg = _config(tmp_path, 10**6, num_workers=2)
    proc = _start(cfg)
    seen = _until_step(proc)
    os.killpg(proc.pid, signal.SIGTERM)  # main process and both workers, as at a SLURM time limit
    out, _ = proc.communicate(timeout=300)
    out = seen + out
    assert proc.returncode == 99, out[-3000:]
    step = int(re.search(r"checkpoint saved at step (\d+);", out).group(1))
    assert (tmp_path / "out" / f"step-{step:08d}").is_dir() and "Traceback" not in out


def test_ctrl_c_saves_and_a_second_one_stops_without_a_traceback(tmp_path):
    cfg = _config(tmp_path, 10**6, num_workers=1)
    proc = _start(cfg)
    seen = _until_step(proc)
    os.killpg(proc.pid, signal.SIGINT)  # a terminal sends it to the foreground group
    out, _ = proc.communicate(timeout=300)
    out = seen + out
    assert proc.returncode == 99 and "Ctrl-C again to stop without saving" in out, out[-3000:]
    assert "Traceback" not in out
    proc = _start(cfg, "--resume", "auto")
    seen = _until_step(proc)
    os.killpg(proc.pid, signal.SIGINT)
    for line in proc.stdout:
        seen += line
        if "got SIGINT" in line:
            break
    os.killpg(proc.pid, signal.SIGINT)  # may come after the save (exit 99) on a fast machine
    out, _ = proc.communicate(timeout=300)
    out = seen + out
    assert "Traceback" not in out, out[-3000:]
    assert proc.returncode == 99 or (proc.returncode == 130 and "stopped without saving" in out), out
    with pytest.raises(ProcessLookupError):  # the DataLoader worker went with the main process
        os.killpg(proc.pid, 0)
