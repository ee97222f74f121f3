"""The one study executor: plans refused before they run, one-line failures, and a sweep interrupted by
a real SIGINT (sent to its process group, as a terminal sends it) that resumes to bit-identical weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from litgpt_ext.cli import main as cli
from litgpt_ext.study.executor import Executor, Job, StudyStopped
from tests.test_train_cli import config_file  # noqa: F401  (the tiny real-shard pretraining config)

ROOT = Path(__file__).resolve().parents[1]


def _spec(tmp_path: Path, base: Path, name: str = "sweep.yaml", **kw) -> Path:
    spec = {"name": "t", "base_config": str(base), "total_steps": 6, "out_root": str(tmp_path / "runs"),
            "seeds": [42], "grid": {"domain": ["code"], "start": [2], "weight": [0.5]}, **kw}
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(spec))
    return p


@pytest.mark.parametrize("bad, match", [
    ({"grid": {"domain": ["poetry"], "start": [2], "weight": [0.5]}},
     r"arm poetry_w0.5_at2.*unknown shard type 'poetry' in mix"),
    ({"grid": {"domain": ["math"], "start": [2], "weight": [0.5]}},
     r"arm math_w0.5_at2.*type 'math' has weight 0.5 but no shards on disk"),
    ({"seeds": [42, 7, 42]}, r"seed 42 is given more than once in \[42, 7, 42\]"),
    ({"arm_overrides": {"train.bogus_key": 1}}, r"midtrain config of code_w0.5_at2_seed42.*bogus_key"),
    ({"base_overrides": {"train.max_iters": "many"}}, r"base config of base_seed42_to2.*train.max_iters=.many. is not valid; expected one of .null, int."),
])
def test_a_plan_that_cannot_run_is_refused_when_planned(tmp_path, config_file, bad, match):  # noqa: F811
    """sweep --action plan/write refuses, with the arm or job named, before any job exists."""
    spec = _spec(tmp_path, config_file, **bad)
    for action in ("plan", "write"):
        with pytest.raises(SystemExit, match=match) as e:
            cli(["sweep", "--spec", str(spec), "--action", action])
        assert "Traceback" not in str(e.value)
    assert not (tmp_path / "runs").exists()  # nothing written: no configs, no submit.sh


def test_arms_name_their_seed_and_family(tmp_path, config_file):  # noqa: F811
    spec = _spec(tmp_path, config_file, arms=[{"name": "code_w0.5_at2", "domain": "code", "start": 4, "weight": 0.5}])
    with pytest.raises(SystemExit, match=r"duplicate arms \['code_w0.5_at2'\]"):
        cli(["sweep", "--spec", str(spec)])
    spec = _spec(tmp_path, config_file, arms=[{"name": "x", "domain": "code", "start": 4, "weight": 0.5, "seeds": [9]}])
    with pytest.raises(SystemExit, match=r"arm x: seeds \[9\] are not pretraining seeds of the sweep \[42\]"):
        cli(["sweep", "--spec", str(spec)])


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_a_failed_job_is_one_line_naming_job_status_and_log(tmp_path, capsys, workers):
    job = Job("base_seed1", "base", "pretrain", {"train": {"no_such_key": 1}}, tmp_path / "base_seed1")
    ex = Executor(label="sweep", resume_command="litgpt-ext sweep --spec s.yaml --action local",
                  config_dir=tmp_path / "cfg", mode="subprocess", workers=workers)
    with pytest.raises(StudyStopped) as e:
        ex.run([job])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == e.value.message
    log = tmp_path / "base_seed1" / "sweep.log"
    assert f"base job base_seed1 failed (exit 2); its log: {log}" in err[0] and "no_such_key" in err[0]
    assert "continue with: litgpt-ext sweep --spec s.yaml --action local" in err[0]


def _weights(run: Path) -> dict:
    return torch.load(run / "final" / "lit_model.pth", map_location="cpu", weights_only=True)


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if path.is_file() and text in path.read_text(errors="replace"):
            return
        assert proc.poll() is None, f"the sweep ended ({proc.returncode}) before {text!r} appeared in {path}"
        time.sleep(0.05)
    raise AssertionError(f"{text!r} did not appear in {path} within {timeout} s")


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_sigint_to_a_local_sweep_saves_exits_99_and_resumes_bit_identically(tmp_path, config_file, workers):  # noqa: F811
    """Ctrl-C at a terminal goes to the sweep's process group: the sweep forwards it to its job (in its
    own group) as a preemption, waits, exits 99 with one line; the rerun ends where an uninterrupted
    sweep ends, bit for bit. With 2 workers two base runs (forked from the preloaded process) run at
    once and both save."""
    over = {"train.save_interval": 200, "eval.interval": 200, "train.log_interval": 1}
    kw = {"grid": {}, "total_steps": 30, "base_overrides": over}
    if workers > 1:
        kw.update(seeds=[42, 43], local={"workers": workers, "threads": 1})
    ref = _spec(tmp_path / "a", config_file, out_root=str(tmp_path / "a" / "runs"), **kw)
    spec = _spec(tmp_path / "b", config_file, out_root=str(tmp_path / "b" / "runs"), **kw)
    cmd = [sys.executable, "-m", "litgpt_ext", "sweep", "--action", "local", "--spec"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    assert subprocess.run(cmd + [str(ref)], cwd=ROOT, env=env, capture_output=True).returncode == 0
    timings = [json.loads(x) for f in (tmp_path / "a").rglob("timings.jsonl") for x in f.read_text().splitlines()]
    # each job's CPU time, forked jobs' too (they report it as they exit: not the fork server's children)
    assert len(timings) >= len(kw.get("seeds", [42])) and all((x["cpu_seconds"] or 0) > 0 for x in timings), timings

    proc = subprocess.Popen(cmd + [str(spec)], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for seed in ([42, 43] if workers > 1 else [42]):  # every running job is training
        _wait_for(tmp_path / "b" / "runs" / f"base_seed{seed}" / "sweep.log", "step 3/30", proc)
    os.killpg(proc.pid, signal.SIGINT)  # the whole foreground group, as a terminal does; the job is not in it
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 99, (out, err)
    lines = [x for x in err.splitlines() if x.startswith("litgpt-ext sweep")]
    assert len(lines) == 1 and "interrupted (SIGINT): base_seed4" in lines[0]
    assert "saved a checkpoint and stopped" in lines[0]
    assert f"continue with: litgpt-ext sweep --spec {spec} --action local" in lines[0]
    seeds = [42, 43] if workers > 1 else [42]
    for seed in seeds:  # every running job got the signal and saved
        r = tmp_path / "b" / "runs" / f"base_seed{seed}"
        assert "Traceback" not in err and "Traceback" not in (r / "sweep.log").read_text()
        assert "Preempted (SIGINT): checkpoint saved at step" in (r / "sweep.log").read_text()
        assert not (r / "final").exists() and list(r.glob("step-*"))

    again = subprocess.run(cmd + [str(spec)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    for seed in seeds:
        a, b = (_weights(tmp_path / x / "runs" / f"base_seed{seed}") for x in ("a", "b"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
