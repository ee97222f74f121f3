"""The study executor's worker processes (`Executor(workers=N)`, `litgpt_ext.study.pool`): real jobs on
real shards run after their dependencies, give the weights one process gives, take jobs added by
`then`, record CPU time, and a failure or a Ctrl-C ends in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from litgpt_ext.study.executor import Executor, StudyStopped
from litgpt_ext.study.spec import load_spec
from litgpt_ext.study.sweep import plan_sweep
from tests.test_study_executor import _spec, _wait_for, _weights
from tests.test_train_cli import config_file  # noqa: F401  (the tiny real-shard pretraining config)

ROOT = Path(__file__).resolve().parents[1]


def _plan(tmp_path: Path, base: Path, **kw):
    """Two seeds, each a base run split at step 2 and one arm forked there: 6 jobs, 2 chains."""
    kw = {"out_root": str(tmp_path / "runs"), "seeds": [42, 43], **kw}
    return plan_sweep(load_spec(_spec(tmp_path, base, **kw)))


def _executor(tmp_path: Path, workers: int, **kw) -> Executor:
    return Executor(label="t", resume_command="rerun t", config_dir=tmp_path / "configs", mode="inprocess",
                    log_name="run.log", workers=workers, threads=1, timings=tmp_path / "timings.jsonl", **kw)


@pytest.mark.slow
def test_two_workers_give_the_weights_one_process_gives_and_take_jobs_from_then(tmp_path, config_file, capsys):  # noqa: F811
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' count: the same float reductions
    one, two = _plan(tmp_path / "one", config_file), _plan(tmp_path / "two", config_file)
    try:
        _executor(tmp_path / "one", 1).run(one)
    finally:
        torch.set_num_threads(threads)
    extra = []

    def then(job):  # a job added once another finished (the SFT seeds after their LR sweep, in reproduce)
        if job.name != "base_seed43" or extra:
            return []
        extra.append(_plan(tmp_path / "late", config_file, seeds=[44])[0])
        return extra

    ex = _executor(tmp_path / "two", 2)
    try:
        ran = ex.run(two, then=then)
    finally:
        ex.close()
    assert sorted(ran) == sorted([j.name for j in two] + ["base_seed44_to2"])
    for j in one:  # each job wrote what the same job wrote in one process, bit for bit
        a, b = _weights(j.out_dir), _weights(tmp_path / "two" / "runs" / j.out_dir.name)
        if (j.out_dir / "final").is_dir():
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), j.name
    # every job started after its dependencies had finished: their checkpoints were there when it began
    lines = [json.loads(x) for x in (tmp_path / "two" / "timings.jsonl").read_text().splitlines()]
    assert len(lines) == 7 and all(x["cpu_seconds"] > 0 for x in lines)
    out = capsys.readouterr().out
    order = [x.split("] ")[1].split()[1] for x in out.splitlines() if x.startswith("[t ")]
    for j in two:
        for d in j.depends:
            assert order.index(d) < order.index(j.name), (d, j.name)
    # the job's own output (and lightning's log lines) went to its log, not to this process
    log = (tmp_path / "two" / "runs" / "base_seed42" / "run.log").read_text()
    assert "Done: budget at step 6" in log and "Done: budget" not in out


@pytest.mark.slow
def test_a_failed_job_on_a_worker_is_one_line_and_the_others_finish(tmp_path, config_file, capsys):  # noqa: F811
    jobs = _plan(tmp_path, config_file)
    bad = next(j for j in jobs if j.name == "base_seed43_to2")
    bad.config["train"]["no_such_key"] = 1
    ex = _executor(tmp_path, 2)
    try:
        with pytest.raises(StudyStopped) as e:
            ex.run(jobs)
    finally:
        ex.close()
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "base job base_seed43_to2 failed (exit 2)" in err[0] and "no_such_key" in err[0]
    assert "continue with: rerun t" in err[0]
    assert not (tmp_path / "runs" / "code_w0.5_at2_seed43").exists()  # nothing that depends on it started


SCRIPT = """
import sys
from pathlib import Path
from litgpt_ext.study.executor import Executor
from litgpt_ext.study.spec import load_spec
from litgpt_ext.study.sweep import plan_sweep

if __name__ == "__main__":  # the workers are spawned: they import this file too
    jobs = plan_sweep(load_spec(Path(sys.argv[1])))
    ex = Executor(label="t", resume_command="rerun t", config_dir=Path(sys.argv[2]), mode="inprocess",
                  log_name="run.log", workers=2, threads=1)
    try:
        ex.run(jobs)
    finally:
        ex.close()
"""


@pytest.mark.slow
def test_sigint_to_workers_saves_exits_99_and_resumes_bit_identically(tmp_path, config_file):  # noqa: F811
    """Ctrl-C at a terminal reaches the executor only (workers have their own sessions); it forwards it to
    the busy workers, whose jobs save and exit 99; one line; the rerun ends bit-identical to a run
    that was never interrupted."""
    over = {"train.save_interval": 200, "eval.interval": 200, "train.log_interval": 1}
    kw = {"grid": {}, "total_steps": 30, "base_overrides": over, "seeds": [42, 43]}
    ref = _spec(tmp_path / "a", config_file, out_root=str(tmp_path / "a" / "runs"), **kw)
    spec = _spec(tmp_path / "b", config_file, out_root=str(tmp_path / "b" / "runs"), **kw)
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(script)]
    done = subprocess.run(cmd + [str(ref), str(tmp_path / "a" / "cfg")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

    proc = subprocess.Popen(cmd + [str(spec), str(tmp_path / "b" / "cfg")], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = tmp_path / "b" / "runs"
    _wait_for(runs / "base_seed42" / "run.log", "step 3/30", proc)
    os.killpg(proc.pid, signal.SIGINT)  # the foreground group, as a terminal does; the workers are not in it
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 99, (out, err)
    lines = [x for x in err.splitlines() if x.startswith("litgpt-ext t")]
    assert len(lines) == 1 and "interrupted (SIGINT): base_seed4" in lines[0] and "continue with: rerun t" in lines[0]
    assert "Traceback" not in err
    logs = [(runs / s / "run.log").read_text() for s in ("base_seed42", "base_seed43") if (runs / s / "run.log").is_file()]
    assert any("Preempted (SIGINT): checkpoint saved at step" in x for x in logs)
    assert not (runs / "base_seed42" / "final").exists() and list((runs / "base_seed42").glob("step-*"))

    again = subprocess.run(cmd + [str(spec), str(tmp_path / "b" / "cfg")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    for s in ("base_seed42", "base_seed43"):
        a, b = _weights(tmp_path / "a" / "runs" / s), _weights(runs / s)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), s


@pytest.mark.slow
def test_in_process_jobs_keep_lightnings_log_lines_in_their_own_logs(tmp_path, config_file):  # noqa: F811
    """A fresh process running jobs one after another in-process (workers: 1): lightning, first imported
    inside the first job's redirect, logs each later job's lines into that job's log, not into a closed
    file ("--- Logging error ---")."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(SCRIPT).replace("workers=2", "workers=1"))
    spec = _spec(tmp_path, config_file, out_root=str(tmp_path / "runs"), seeds=[42, 43], grid={}, total_steps=2)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(script), str(spec), str(tmp_path / "cfg")], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for seed in (42, 43):
        log = (tmp_path / "runs" / f"base_seed{seed}" / "run.log").read_text()
        assert "Logging error" not in log and f"Seed set to {seed}" in log
