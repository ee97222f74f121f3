"""training_scripts/small_model_pretrain.sh under a real one-node SLURM: time-limit SIGUSR1 ->
checkpoint -> exit 99 -> requeue -> resume -> finish, for 1 task (with a DataLoader worker) and for
2 tasks (srun, gloo), and `scancel --signal=USR1`.

The cluster: a cluster that already answers is used if it is this host alone (a local test
cluster); one that spans other nodes is not, and the test is skipped with the reason. Where none
answers, and only when LITGPT_EXT_REQUIRE_SLURM_TEST=1 asks for it (.ci/run sets it), this test
installs Debian's slurm-wlm + munge with apt (as root) where `sbatch` is absent and starts a one-node
cluster configured for tests (no cgroups: processes are tracked by process group;
`AuthInfo=cred_expire=10` so that a requeued job waits 10 s instead of the default 120 s before it
may start again). It stops the daemons it started. Without that variable it installs nothing,
writes no system file and skips, saying why.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from litgpt_ext.data.shard_io import write_token_shard
from tests.conftest import ROOT

pytestmark = pytest.mark.slow
SCRIPT = ROOT / "training_scripts" / "small_model_pretrain.sh"
CONF = Path("/etc/slurm/slurm.conf")
OURS = "# litgpt_ext test cluster (tests/test_slurm_real.py)"
RUN = Path("/run/slurm")
VOCAB = 64


def _sh(*cmd, check=True, timeout=60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check, timeout=timeout, **kw)


def _cluster_up() -> bool:
    try:
        return "UP" in _sh("scontrol", "ping", check=False, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False


def _node_ready(node: str) -> bool:
    state = _sh("sinfo", "-h", "-n", node, "-o", "%T", check=False).stdout.strip()
    if state.startswith(("drain", "down")):
        _sh("scontrol", "update", f"nodename={node}", "state=resume", check=False)
    return state in ("idle", "mixed", "allocated")


def _pid_alive(pidfile: Path) -> bool:
    try:
        os.kill(int(pidfile.read_text()), 0)
        return True
    except (OSError, ValueError):
        return False


def _install_and_start() -> list[Path]:
    """apt-get slurm-wlm + munge, write our slurm.conf, start munged/slurmctld/slurmd; pid files started."""
    if shutil.which("sbatch") is None:
        _sh("apt-get", "update", "-q", timeout=600)
        _sh("apt-get", "install", "-y", "-q", "--no-install-recommends", "munge", "slurmctld", "slurmd",
            "slurm-client", timeout=900, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    node = socket.gethostname().split(".")[0]
    key = Path("/etc/munge/munge.key")
    if not key.exists() or key.stat().st_size == 0:
        key.write_bytes(os.urandom(1024))
    shutil.chown(key, "munge", "munge")
    key.chmod(0o400)
    for d, owner, mode in (("/run/munge", "munge", 0o755), ("/var/lib/munge", "munge", 0o700),
                           ("/var/log/munge", "munge", 0o700), (str(RUN), "slurm", 0o755),
                           ("/var/lib/slurm/slurmctld", "slurm", 0o755), ("/var/log/slurm", "slurm", 0o755),
                           ("/var/lib/slurm/slurmd", "root", 0o755)):
        Path(d).mkdir(parents=True, exist_ok=True)
        shutil.chown(d, owner, owner)
        os.chmod(d, mode)
    started = []
    if not _pid_alive(Path("/run/munge/munged.pid")):
        _sh("runuser", "-u", "munge", "--", "/usr/sbin/munged", "--pid-file=/run/munge/munged.pid")
        started.append(Path("/run/munge/munged.pid"))
    out = _sh("slurmd", "-C").stdout
    cpus = int(re.search(r"CPUs=(\d+)", out).group(1))
    mem = int(int(re.search(r"RealMemory=(\d+)", out).group(1)) * 0.9)
    CONF.write_text(f"""{OURS}
ClusterName=litgptexttest
SlurmctldHost={node}(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
# a requeued job may start again after cred_expire seconds (default 120)
AuthInfo=cred_expire=10
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile={RUN}/slurmctld.pid
SlurmdPidFile={RUN}/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU={mem // cpus}
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
JobRequeue=1
KillWait=30
MinJobAge=600
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
""")
    Path("/etc/slurm/cgroup.conf").exists() or Path("/etc/slurm/cgroup.conf").write_text("CgroupPlugin=autodetect\n")
    if not _pid_alive(RUN / "slurmctld.pid"):
        _sh("/usr/sbin/slurmctld")
        started.append(RUN / "slurmctld.pid")
    _wait(_cluster_up, 60, "slurmctld to answer")
    if not _pid_alive(RUN / "slurmd.pid"):
        _sh("/usr/sbin/slurmd")
        started.append(RUN / "slurmd.pid")
    _wait(lambda: _node_ready(node), 90, f"node {node} to be idle")
    return started


def _wait(pred, timeout: float, what: str, poll: float = 1.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _skip(reason: str):
    """Skip, except in CI (.ci/run sets LITGPT_EXT_REQUIRE_SLURM_TEST=1), where this test must run."""
    if os.environ.get("LITGPT_EXT_REQUIRE_SLURM_TEST") == "1":
        pytest.fail(f"the real-SLURM test must run here (LITGPT_EXT_REQUIRE_SLURM_TEST=1) but: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def cluster():
    """A local one-node SLURM; yields nothing, stops the daemons it started."""
    node = socket.gethostname().split(".")[0]
    started: list[Path] = []
    if _cluster_up():
        nodes = _sh("sinfo", "-h", "-o", "%N", check=False).stdout.split()
        if nodes != [node]:
            _skip(f"sbatch talks to an existing cluster (nodes {nodes}); this test only uses a local one-node cluster")
    else:
        if os.environ.get("LITGPT_EXT_REQUIRE_SLURM_TEST") != "1":
            pytest.skip("no SLURM cluster answers; this test installs and starts a local one-node SLURM (apt-get,"
                        " /etc/slurm, daemons) only when LITGPT_EXT_REQUIRE_SLURM_TEST=1 asks for it (CI sets it)")
        if os.geteuid() != 0:
            _skip("no SLURM cluster answers and installing/starting one needs root")
        if shutil.which("sbatch") is None and shutil.which("apt-get") is None:
            _skip("no sbatch and no apt-get to install slurm-wlm")
        if CONF.exists() and OURS not in CONF.read_text():
            _skip(f"{CONF} exists but is not this test's: not overwriting someone's SLURM config")
        started = _install_and_start()
    yield
    for pidfile in reversed(started):  # slurmd, slurmctld, munged: only those this fixture started
        try:
            os.kill(int(pidfile.read_text()), 15)
        except (OSError, ValueError):
            pass


def _pattern_shard(path: Path, stride: int, n_docs: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    docs = [(rng.integers(VOCAB) + stride * np.arange(40)) % VOCAB for _ in range(n_docs)]
    write_token_shard(path, docs, chunk_tokens=400)


def _config(root: Path, steps: int, num_workers: int) -> Path:
    _pattern_shard(root / "data" / "1", 1, 80, 0)
    cfg = {
        "model_config": {"name": "tiny", "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32,
                         "vocab_size": VOCAB, "padded_vocab_size": VOCAB},
        "out_dir": str(root / "out"),
        "precision": "32-true",
        "data": {"class_path": "litgpt_ext.data.ShardedMixedDataset",
                 "init_args": {"data_path": str(root / "data"), "num_workers": num_workers, "seed": 1}},
        "train": {"max_iters": steps, "global_batch_size": 4, "micro_batch_size": 2, "log_interval": 1,
                  "save_interval": None, "min_lr": 1e-4, "lr_warmup_steps": 10, "max_seq_length": 16},
        "eval": {"interval": 10**9, "initial_validation": False, "final_validation": False},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-3}},
        "logger_name": "csv",
    }
    (root / "logs").mkdir(exist_ok=True)
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _job(jid: str) -> dict:
    out = _sh("scontrol", "show", "job", "-o", jid, check=False).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def _submit(root: Path, cfg: Path, *sbatch_args: str) -> tuple[str, Path]:
    # the documented CPU-partition overrides of the script's GPU/CPU/memory header
    env = {**os.environ, "PYTHON": sys.executable, "REPO_DIR": str(root), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    log = root / "logs" / "job.out"
    jid = _sh("sbatch", "--parsable", f"--chdir={root}", f"--output={log}", "--gpus-per-node=0",
              "--cpus-per-task=1", "--mem=2G", *sbatch_args, str(SCRIPT), str(cfg), env=env).stdout.strip()
    return jid.split(";")[0], log


def _read(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else ""


def _trainers(cfg: Path) -> list[int]:
    """pids of this run's trainer processes (one per rank; not srun, not DataLoader workers)."""
    procs = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().split(b"\0")
            ppid = int(re.search(r"PPid:\s+(\d+)", (p / "status").read_text()).group(1))
        except (OSError, AttributeError):
            continue
        if b"litgpt_ext" in cmd and b"pretrain" in cmd and str(cfg).encode() in cmd and b"srun" not in cmd[0]:
            procs[int(p.name)] = ppid
    return [pid for pid, ppid in procs.items() if ppid not in procs]


def _usr1_pending(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    bit = 1 << (signal.SIGUSR1 - 1)
    return any(int(m, 16) & bit for m in re.findall(r"(?:SigPnd|ShdPnd):\s+([0-9a-f]+)", status))


def _signal_while_stopped(cfg: Path, log: Path, ntasks: int, after: int, send) -> None:
    """Once the run has trained a step past `after` log lines, stop its ranks (SIGSTOP), call `send()`,
    wait until SLURM's SIGUSR1 is pending in every rank, then let them go (SIGCONT). Whatever the
    machine's speed, the signal lands in the middle of training, never after the budget is done."""
    def training():
        lines = _read(log).splitlines()[after:]
        pids = _trainers(cfg)
        return len(pids) == ntasks and any(re.match(r"step \d+/", ln) for ln in lines) and pids
    pids = _wait(training, 300, f"training to start\n{_read(log)[-2000:]}", poll=0.1)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        send()
        # slurmstepd may send SIGCONT with the signal itself: then the trainers report it in the log
        _wait(lambda: all(_usr1_pending(p) for p in pids) or "got SIGUSR1" in "\n".join(_read(log).splitlines()[after:]),
              150, f"SIGUSR1 to reach the trainers\n{_read(log)[-2000:]}")
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def _seconds(runtime: str) -> int:
    days, _, hms = runtime.rpartition("-")
    parts = [int(x) for x in hms.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    return int(days or 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


def _time_limit_soon(jid: str) -> None:
    """Move the time limit so that 80-140 s remain: SLURM sends --signal=USR1@150 at its next check."""
    elapsed = _seconds(_job(jid)["RunTime"])
    _sh("scontrol", "update", f"JobId={jid}", f"TimeLimit={(elapsed + 80 + 59) // 60}")


def _finish(jid: str, log: Path, restarts: int, timeout: float = 600) -> str:
    """Wait for the job to complete after `restarts` requeues; return the log."""
    def done():
        j = _job(jid)
        return j.get("JobState") in ("COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY") and j
    j = _wait(done, timeout, f"job {jid} to end\n{_read(log)[-3000:]}", poll=2)
    text = _read(log)
    assert j["JobState"] == "COMPLETED" and j["ExitCode"] == "0:0", f"{j}\n{text[-4000:]}"
    assert int(j["Restarts"]) == restarts, f"{j}\n{text[-4000:]}"
    return text


def _requeued(jid: str, log: Path, n: int, timeout: float = 300) -> None:
    """Wait for requeue #n to be done (the job pends or runs again), then give it a 10-minute limit:
    the next start gets no time-limit signal. (An update while the requeue completes is lost.)"""
    def back():
        j = _job(jid)
        return int(j.get("Restarts", 0)) >= n and j.get("JobState") in ("PENDING", "RUNNING")
    _wait(back, timeout, f"requeue #{n} of {jid}\n{_read(log)[-3000:]}")
    _sh("scontrol", "update", f"JobId={jid}", "TimeLimit=10")
    assert _job(jid)["TimeLimit"] == "00:10:00", _job(jid)


def _check_resumes(text: str, out: Path, steps: int, segments: int) -> None:
    saved = [int(s) for s in re.findall(r"checkpoint saved at step (\d+)", text)]
    resumed = [int(s) for s in re.findall(r"Resumed from \S+ at step (\d+)", text)]
    assert len(saved) == segments - 1 and resumed == saved, text[-4000:]
    assert 0 < saved[0] and saved == sorted(saved) and saved[-1] < steps, saved
    assert text.count("requeueing") == segments - 1, text[-4000:]
    assert f"Done: budget at step {steps}" in text, text[-4000:]
    assert (out / "final" / "lit_model.pth").is_file()


STEPS = 300  # the ranks are stopped at their first logged step, so any speed is fine


def test_one_task_time_limit_then_scancel_usr1(cluster, tmp_path):
    """1 task with a DataLoader worker: the time-limit USR1 reaches the trainer (srun), the
    requeued job resumes, `scancel --signal=USR1` preempts it again, the third start finishes."""
    cfg = _config(tmp_path, STEPS, num_workers=1)
    jid, log = _submit(tmp_path, cfg, "--time=10", "--signal=USR1@150")
    _signal_while_stopped(cfg, log, 1, 0, lambda: _time_limit_soon(jid))
    _requeued(jid, log, 1)
    n = len(_read(log).splitlines())
    _signal_while_stopped(cfg, log, 1, n, lambda: _sh("scancel", "--signal=USR1", jid))
    _requeued(jid, log, 2)
    text = _finish(jid, log, restarts=2)
    _check_resumes(text, tmp_path / "out", STEPS, segments=3)


def test_two_tasks_time_limit(cluster, tmp_path):
    """2 tasks (srun, gloo): both ranks save, the job is requeued (whatever srun's kill-on-bad-exit
    made of the second rank's status) and the second start finishes."""
    cfg = _config(tmp_path, STEPS, num_workers=0)
    jid, log = _submit(tmp_path, cfg, "--ntasks-per-node=2", "--time=10", "--signal=USR1@150")
    _signal_while_stopped(cfg, log, 2, 0, lambda: _time_limit_soon(jid))
    _requeued(jid, log, 1)
    text = _finish(jid, log, restarts=1)
    _check_resumes(text, tmp_path / "out", STEPS, segments=2)
    assert "x 2 ranks per step" in text, text[-3000:]


def _array_tasks(jid: str) -> list[dict]:
    out = _sh("scontrol", "show", "job", "-o", jid, check=False).stdout
    return [dict(kv.split("=", 1) for kv in line.split() if "=" in kv) for line in out.splitlines() if line.strip()]


SWEEP_STEPS, FORK = STEPS + 20, STEPS  # the first segment is as long as the preemption tests' runs


def test_sweep_plan_runs_on_slurm_with_per_run_dependencies(cluster, tmp_path):
    """`litgpt-ext sweep --action write` -> `bash submit.sh` on a real SLURM: the base run split at the
    fork step, an arm with two data seeds (one array) after exactly that segment, and their soup after
    both. The first segment is preempted (scancel --signal=USR1) and requeued: the arms still wait for it."""
    from litgpt_ext import checkpoint as ckpt
    from litgpt_ext.study.spec import load_spec
    from litgpt_ext.study.sweep import plan_sweep, write_plan

    base = _config(tmp_path, SWEEP_STEPS, num_workers=0)
    _pattern_shard(tmp_path / "data" / "c1", 3, 80, 1)
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "slurm", "base_config": str(base), "total_steps": SWEEP_STEPS, "out_root": str(tmp_path / "runs"),
        "seeds": [1], "arms": [{"name": "code", "domain": "code", "start": FORK, "weight": 0.5}],
        "arm_data_seeds": [7, 8], "soup_data_seeds": True,
        "base_overrides": {"data.init_args.mix_weights_str": "main:1.0"}}))
    jobs = plan_sweep(load_spec(spec))
    submit = write_plan(jobs, tmp_path / "cfg")
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "SCRIPT": str(SCRIPT),
           "SBATCH_OPTS": f"--chdir={tmp_path} --output={tmp_path}/logs/%x-%A_%a.out --gpus-per-node=0"
                          " --cpus-per-task=1 --mem=1G --time=10"}
    out = _sh("bash", str(submit), env=env, cwd=tmp_path).stdout
    ids = re.findall(r"^\w+: job (\d+) ", out, flags=re.M)
    assert len(ids) == 4, out  # the first segment, the rest of the base run, the arm's 2 data seeds, the soup
    seg_cfg = tmp_path / "cfg" / f"base_seed1_to{FORK}.yaml"
    seg_log = _wait(lambda: next(iter((tmp_path / "logs").glob(f"*_to{FORK}-{ids[0]}_1.out")), None), 300,
                    "the first segment to start")
    _signal_while_stopped(seg_cfg, seg_log, 1, 0, lambda: _sh("scancel", "--signal=USR1", f"{ids[0]}_1"))

    def logs() -> str:
        return "\n".join(f"== {p.name}\n{_read(p)[-1500:]}" for p in sorted((tmp_path / "logs").glob("*.out")))

    def ended():
        tasks = [t for j in ids for t in _array_tasks(j)]
        return len(tasks) == len(jobs) and all(t.get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING",
                                                                            "COMPLETING") for t in tasks) and tasks
    tasks = _wait(ended, 600, f"the sweep's jobs to end\n{logs()}", poll=2)
    assert all(t["JobState"] == "COMPLETED" and t["ExitCode"] == "0:0" for t in tasks), f"{tasks}\n{logs()}"
    seg, rest = (next(t for t in tasks if t["ArrayJobId"] == i) for i in ids[:2])
    arms = [t for t in tasks if t["ArrayJobId"] == ids[2]]
    soup = next(t for t in tasks if t["ArrayJobId"] == ids[3])
    assert int(seg["Restarts"]) == 1, seg  # preempted, requeued, resumed, paused at the fork step
    assert len(arms) == 2 and all(a["StartTime"] >= seg["EndTime"] for a in arms), (seg, arms)
    assert soup["StartTime"] >= max(a["EndTime"] for a in arms), (soup, arms)
    assert rest["StartTime"] >= seg["EndTime"], (seg, rest)
    sb = ckpt.load_training_state(tmp_path / "runs" / "base_seed1" / "final")
    for d in (7, 8):
        sa = ckpt.load_training_state(tmp_path / "runs" / f"code_seed1_data{d}" / "final")
        assert sb["step"] == sa["step"] == SWEEP_STEPS and sa["lr"] == pytest.approx(sb["lr"])
    steps = [s for s, _ in ckpt.list_checkpoints(tmp_path / "runs" / "base_seed1")]
    assert steps[-1] == FORK and len(steps) == 2, steps  # the preemption's checkpoint and the fork step
    assert len((tmp_path / "runs" / "base_seed1" / "phases.jsonl").read_text().splitlines()) == 1
    assert (tmp_path / "runs" / "soup_code_seed1" / "soup.json").is_file(), logs()
