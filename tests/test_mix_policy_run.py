"""Online data mixing through the real CLI on real shards: an ODM run, its trajectory replayed as a
static schedule (the same samples in the same order: bit-identical weights), kill -9 and resume
(bit-identical weights and trajectory), DoReMi on 2 gloo processes (FSDP2) with TensorBoard, and
the one-line errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
import torch
import yaml

from litgpt_ext import checkpoint as ckpt
from litgpt_ext.cli import main as cli_main
from tests.test_train_cli import pattern_shard

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _config(root: Path, policy: dict, steps: Optional[int] = 12, logger: str = "csv", **extra) -> Path:
    data = root / "data"
    if not data.exists():  # three types the tiny model learns at different speeds
        for name, stride, seed in (("1", 1, 0), ("2", 1, 1), ("c1", 3, 2), ("m1", 7, 5)):
            pattern_shard(data / name, stride, 60, seed)
        pattern_shard(root / "val" / "general", 1, 10, 3)
    cfg = {"model_config": {"name": "tiny", "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32,
                            "vocab_size": 64, "padded_vocab_size": 64},
           "precision": "32-true", "seed": 42, "logger_name": logger,
           "data": {"class_path": "litgpt_ext.data.ShardedMixedDataset",
                    "init_args": {"data_path": str(data), "num_workers": 0, "seed": 42,
                                  "mix_weights_str": "main:0.6,code:0.2,math:0.2",
                                  "val_data_path": {"general": str(root / "val" / "general")}}},
           "train": {"max_iters": steps, "global_batch_size": 8, "micro_batch_size": 2, "log_interval": 1,
                     "save_interval": 2, "min_lr": 1e-4, "lr_warmup_steps": 1, "max_seq_length": 16},
           "eval": {"interval": 100, "max_iters": 100},
           "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-3}},
           "mix_policy": policy, **extra}
    path = root / f"{policy['type']}-{len(list(root.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(*args, devices: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "litgpt_ext", *args, "--devices", str(devices)], env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def _same_weights(a: Path, b: Path) -> bool:
    x, y = ckpt.load_model_state(a), ckpt.load_model_state(b)
    return set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)


def _points(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "mix_trajectory.jsonl").read_text().splitlines()[1:]]


ODM = {"type": "odm", "update_every": 2, "epsilon": 0.1, "min_weight": 0.05}


@pytest.mark.slow
def test_odm_run_replays_exactly_and_survives_kill_9(tmp_path):
    cfg = _config(tmp_path, ODM, steps=12)
    online = tmp_path / "online"
    cli_main(["pretrain", "--config", str(cfg), "--out_dir", str(online)])
    points = _points(online)
    assert [p["step"] for p in points] == [0, 2, 4, 6, 8, 10]
    assert all(set(p["signals"]) == {"main", "code", "math"} for p in points[1:])
    moved = [p["arm_weights"] for p in points]
    assert moved[-1] != moved[0] and all(min(w.values()) >= 0.05 and sum(w.values()) == pytest.approx(1) for w in moved)

    # the trajectory as a static schedule: the same samples in the same order, so the same weights bit for bit
    cli_main(["mix-replay", "--trajectory", str(online / "mix_trajectory.jsonl"), "--out", str(tmp_path / "r.yaml"),
              "--out_dir", str(tmp_path / "replay")])
    replay_cfg = yaml.safe_load((tmp_path / "r.yaml").read_text())
    assert "mix_policy" not in replay_cfg and replay_cfg["data"]["init_args"]["mix_schedule_lookahead"] is False
    cli_main(["pretrain", "--config", str(tmp_path / "r.yaml")])
    assert _same_weights(online / "final", tmp_path / "replay" / "final")
    a, b = (ckpt.load_training_state(d / "final")["data"] for d in (online, tmp_path / "replay"))
    assert a["cursors"] == b["cursors"] and a["counts"] == b["counts"]

    # kill -9 after a checkpoint, resume: the same weights and the same trajectory file as the straight run
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "litgpt_ext", "pretrain", "--config", str(cfg), "--out_dir",
                             str(killed), "--devices", "1"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not any(s >= 4 for s, _ in ckpt.list_checkpoints(killed)) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # no handler runs: whatever is on disk is what resume gets
    proc.wait()
    at = ckpt.list_checkpoints(killed)[-1][0]
    assert proc.returncode == -signal.SIGKILL and 4 <= at < 12, at
    resumed = _run("pretrain", "--config", str(cfg), "--out_dir", str(killed), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed after {at // 2} updates" in resumed.stdout
    assert _same_weights(online / "final", killed / "final"), at
    assert _points(killed) == _points(online)  # the header differs only in the run's out_dir and resume


@pytest.mark.slow
def test_doremi_forked_on_two_processes_resumes_and_replays_bit_identically(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    base = _config(tmp_path, ODM, steps=4)
    cfg = yaml.safe_load(base.read_text())
    cfg.pop("mix_policy")
    (tmp_path / "ref.yaml").write_text(yaml.safe_dump(cfg))
    cli_main(["pretrain", "--config", str(tmp_path / "ref.yaml"), "--out_dir", str(tmp_path / "ref")])
    ref = str(tmp_path / "ref" / "final")
    # midtraining: fork the run (same mix, mid-segment) and let DoReMi weigh it against where it started
    policy = {"type": "doremi", "update_every": 2, "reference": ref, "step_size": 5.0}
    path = _config(tmp_path, policy, steps=None, logger="tensorboard", fork_from=ref)
    raw = yaml.safe_load(path.read_text())
    raw["train"].pop("max_iters")
    raw["train"]["max_additional_steps"] = 8
    path.write_text(yaml.safe_dump(raw))
    straight = _run("pretrain", "--config", str(path), "--out_dir", str(tmp_path / "two"), devices=2)
    assert straight.returncode == 0, straight.stderr[-3000:]
    points = _points(tmp_path / "two")
    assert [p["step"] for p in points] == [4, 6, 8, 10] and points[1]["signal"] == "excess_loss"
    signals = [v for p in points[1:] for v in p["signals"].values()]
    assert all(v is None or v >= 0 for v in signals) and any(v for v in signals)  # clipped excess loss
    assert points[-1]["arm_weights"] != points[0]["arm_weights"]
    logs = list((tmp_path / "two").rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(logs[0].parent))
    acc.Reload()
    assert {"mix/main", "mix/code", "mix/math", "mix_signal/math"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("mix/math")] == [6, 8, 10]
    assert [e.value for e in acc.Scalars("mix/math")] == pytest.approx([p["arm_weights"]["math"] for p in points[1:]])

    # every rank checks at each update that all ranks hold the same weights and signals (all_gather);
    # a 2-process resume from step 8 (the newer checkpoints set aside) continues to the same weights and points
    shutil.copytree(tmp_path / "two", tmp_path / "straight")
    again = _run("pretrain", "--config", str(path), "--out_dir", str(tmp_path / "two"), "--resume",
                 str(tmp_path / "two" / "step-00000008"), devices=2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed after 2 updates" in again.stdout
    assert _same_weights(tmp_path / "straight" / "final", tmp_path / "two" / "final")
    assert _points(tmp_path / "two") == points

    # the forked online run replayed on 2 processes: the same samples, so the same weights
    cli_main(["mix-replay", "--trajectory", str(tmp_path / "straight"), "--out", str(tmp_path / "r.yaml"),
              "--out_dir", str(tmp_path / "replay")])
    replay = _run("pretrain", "--config", str(tmp_path / "r.yaml"), devices=2)
    assert replay.returncode == 0, replay.stderr[-3000:]
    assert _same_weights(tmp_path / "straight" / "final", tmp_path / "replay" / "final")
    one = _run("pretrain", "--config", str(tmp_path / "r.yaml"), "--out_dir", str(tmp_path / "one"), devices=1)
    assert one.returncode != 0 and "world_size: recorded 2, this run 1" in one.stderr, one.stderr[-2000:]


@pytest.mark.slow
def test_bad_policy_inputs_are_one_line(tmp_path):
    cfg = _config(tmp_path, ODM, steps=4)
    proc = _run("pretrain", "--config", str(cfg), "--out_dir", str(tmp_path / "x"), "--mix_policy.type", "bandit")
    assert proc.returncode != 0 and "bandit" in proc.stderr and "Traceback" not in proc.stderr
    proc = _run("pretrain", "--config", str(cfg), "--out_dir", str(tmp_path / "x"), "--mix_policy.type", "doremi",
                "--mix_policy.epsilon", "null")
    assert proc.returncode != 0 and "needs mix_policy.reference" in proc.stderr and "Traceback" not in proc.stderr
    proc = _run("pretrain", "--config", str(cfg), "--out_dir", str(tmp_path / "x"), "--mix_policy.epsilon", "0.5")
    assert proc.returncode != 0 and "epsilon=0.5 exceeds 1/K = 0.3333" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_repetition_caps_bound_what_the_policy_may_choose(tmp_path):
    # math (m1: 138 samples of 17 tokens) may be drawn 0.2 epochs (27.6 samples) in this 12-step phase of 96
    # samples; ODM alone moves it to ~0.34 (~32 samples): with the cap, each update gives it at most what keeps
    # the rest of the phase within the budget
    policy = {"type": "odm", "update_every": 1, "epsilon": 0.3, "prior": "uniform"}
    cfg = _config(tmp_path, policy, steps=12)
    cli_main(["pretrain", "--config", str(cfg), "--out_dir", str(tmp_path / "free")])
    raw = yaml.safe_load(cfg.read_text())
    raw["data"]["init_args"]["max_epochs"] = {"math": 0.2}
    cfg.write_text(yaml.safe_dump(raw))
    cli_main(["pretrain", "--config", str(cfg), "--out_dir", str(tmp_path / "capped")])
    free, capped = (ckpt.load_training_state(tmp_path / d / "final")["data"] for d in ("free", "capped"))
    n = capped["num_samples"]["m1"]
    assert free["cursors"]["m1"] > 0.2 * n + 1 >= capped["cursors"]["m1"], (free["cursors"], capped["cursors"], n)
    w_free, w_cap = ([p["arm_weights"]["math"] for p in _points(tmp_path / d)] for d in ("free", "capped"))
    assert min(w_free[1:]) > 0.33 and max(w_cap[1:]) < 0.33, (w_free, w_cap)  # the cap took weight back
