"""`litgpt-ext sft` end to end on the shared loop: a real tokenizer, real JSON data, real token shards,
real Fabric; metrics, val CSV, config reload, and exact resume from a mid-run checkpoint."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_shard
from litgpt import GPT, Config, Tokenizer
from test_sft_data import _records, tok_dir, tokenizer, write_json  # noqa: F401  (fixtures)

from litgpt_ext import checkpoint as ckpt
from litgpt_ext.cli import main as cli
from litgpt_ext.sft.data import SFTData, SFTLoader
from litgpt_ext.sft.loss import validate_sft
from litgpt_ext.train.state import TrainingState


@pytest.fixture(scope="module")
def source(tmp_path_factory, tok_dir, tokenizer) -> Path:  # noqa: F811
    """A tiny source run's `step-00000007` checkpoint (weights, state, config, tokenizer) + SFT data."""
    root = tmp_path_factory.mktemp("sftsrc")
    torch.manual_seed(0)
    cfg = Config(name="t", n_layer=1, n_head=2, n_embd=16, block_size=64, vocab_size=tokenizer.vocab_size,
                 padded_vocab_size=512)
    model = GPT(cfg)
    ckpt.write_checkpoint(root / "base" / "step-00000007", model.state_dict(), TrainingState(step=7).to_dict(),
                          cfg, {}, tok_dir)
    write_json(root / "sft" / "train.json", _records(40))
    write_json(root / "sft" / "val.json", _records(9, seed=1))
    make_shard(root / "val" / "1", 0, 400)
    return root


def _config(src: Path, out: Path, **train) -> Path:
    cfg = {
        "checkpoint_dir": str(src / "base" / "step-00000007"), "out_dir": str(out), "precision": "32-true",
        "devices": 1, "logger_name": "csv", "seed": 3,
        "data": {"class_path": "litgpt_ext.sft.data.SFTData",
                 "init_args": {"train_path": str(src / "sft"), "name": "toy", "mask_prompt": True}},
        "train": {"epochs": 2, "global_batch_size": 8, "micro_batch_size": 4, "lr_warmup_fraction": 0.2,
                  "max_seq_length": 64, "log_interval": 1, **train},
        "eval": {"interval": 4, "max_iters": 2, "val_data_path": {"general": str(src / "val" / "1")}},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-3, "weight_decay": 0.0}},
    }
    path = out.parent / f"{out.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _weights(d: Path) -> dict:
    return ckpt.load_model_state(d)


@pytest.mark.slow
def test_sft_end_to_end_and_exact_resume(tmp_path, source, capsys, monkeypatch):
    full = tmp_path / "full"
    cli(["sft", "--config", str(_config(source, full, save_interval=4))])
    # 40 examples, micro 4, accum 2, 2 epochs: 10 steps; warmup ceil(0.2 * 10) = 2
    m = json.loads((full / "sft_metrics.json").read_text())
    assert m["schema"] == "litgpt_ext/sft_metrics/1" and m["sft_set"] == "toy" and m["step"] == 10
    assert (m["lr"], m["seed"], m["epochs"]) == (3e-3, 3, 2)
    assert (m["source_run"], m["source_checkpoint_name"], m["source_step"]) == ("base", "step-00000007", 7)
    assert m["sft_val_loss"] < m["initial"]["sft_val_loss"] - 0.2  # it learned the task
    assert set(m["val_losses"]) == {"general"} and [h["step"] for h in m["history"]] == [0, 4, 8, 10]
    rows = list(csv.DictReader(open(full / "val_metrics.csv")))
    assert {(int(r["step"]), r["set"]) for r in rows} == {(s, n) for s in (0, 4, 8, 10) for n in ("sft", "general")}
    assert float([r for r in rows if r["set"] == "sft"][-1]["loss"]) == pytest.approx(m["sft_val_loss"], rel=1e-5)
    # the SFT val set is read in full (9 examples, micro 4: 3 batches > eval.max_iters=2), token-weighted
    model = GPT(Config.from_file(full / "final" / "model_config.yaml"))
    model.load_state_dict(_weights(full / "final"))
    dm = SFTData(train_path=source / "sft", seed=3)
    dm.connect(Tokenizer(full / "final"), batch_size=4, max_seq_length=64)
    dm.setup(rank=0, world_size=1)
    ref = validate_sft(model, dm.val_dataloader())
    assert len(dm.val_dataloader()) == 3 and m["sft_val_tokens"] == ref["tokens"]
    assert m["sft_val_loss"] == pytest.approx(ref["loss"], rel=1e-5)
    plan = json.loads((full / "phases.jsonl").read_text().splitlines()[0])
    assert plan["stop_step"] == 10 and plan["schedule"]["warmup_steps"] == 2 and plan["schedule"]["min_lr"] == 0.0
    # hyperparameters.yaml reloads with --config: the finished run is recognised and skipped
    capsys.readouterr()
    cli(["sft", "--config", str(full / "final" / "hyperparameters.yaml")])
    assert "is finished" in capsys.readouterr().out

    # preempted (SIGUSR1 during step 5: checkpoint at the step boundary, exit 99) and requeued with
    # `--resume auto`, as training_scripts/ do: bit-for-bit the uninterrupted run
    part = tmp_path / "part"
    inner = SFTLoader.__iter__

    def signalling(self):
        for i, b in enumerate(inner(self)):
            if i == 9:  # 2 micro-batches per step: the 10th is step 5's second
                os.kill(os.getpid(), signal.SIGUSR1)
            yield b

    marker = tmp_path / "requeue.marker"
    with monkeypatch.context() as mp:
        mp.setattr(SFTLoader, "__iter__", signalling)
        mp.setenv("LITGPT_EXT_PREEMPT_MARKER", str(marker))
        with pytest.raises(SystemExit) as e:
            cli(["sft", "--config", str(_config(source, part, save_interval=100))])
    assert e.value.code == 99 and ckpt.latest_checkpoint(part).name == "step-00000005"
    assert marker.read_text() == "step 5\n"  # the shared preemption exit: training_scripts/ requeue on it
    assert "Preempted (SIGUSR1): checkpoint saved at step 5; exit 99" in capsys.readouterr().out
    assert not (part / "final").exists() and not (part / "sft_metrics.json").exists()
    cli(["sft", "--config", str(_config(source, part, save_interval=100)), "--resume", "auto"])
    a, b = _weights(full / "final"), _weights(part / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    mp = json.loads((part / "sft_metrics.json").read_text())
    assert mp["sft_val_loss"] == m["sft_val_loss"] and mp["val_losses"] == m["val_losses"]


def test_sft_errors(tmp_path, source):
    cfg = _config(source, tmp_path / "x")
    with pytest.raises(SystemExit, match="optimizer.init_args.lr is not set"):
        cli(["sft", "--config", str(cfg), "--optimizer", "AdamW"])
    with pytest.raises(SystemExit, match="no model_config.yaml"):
        cli(["sft", "--config", str(cfg), "--checkpoint_dir", str(tmp_path)])


def test_optimizer_flags_fold_into_init_args():
    from litgpt_ext.sft.run import optimizer_spec

    spec = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-4, "weight_decay": 0.1}, "lr": "1e-4"}
    assert optimizer_spec(spec) == {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-4, "weight_decay": 0.1}}
    assert optimizer_spec("AdamW") == "AdamW"


@pytest.mark.slow
def test_sft_grid_picks_the_lr_per_checkpoint_and_skips_finished_runs(tmp_path, source, capsys):
    from litgpt_ext.sft.grid import mean_std

    # a second checkpoint of the same run: "loss after SFT vs pretraining step"
    shutil.copytree(source / "base" / "step-00000007", tmp_path / "base" / "step-00000014")
    ckpt.write_checkpoint(tmp_path / "base" / "step-00000014", ckpt.load_model_state(source / "base" / "step-00000007"),
                          TrainingState(step=14).to_dict(), Config.from_file(source / "base" / "step-00000007" / "model_config.yaml"),
                          {}, source / "base" / "step-00000007")
    cfg = _config(source, tmp_path / "unused", epochs=1)
    root = tmp_path / "grid"
    args = ["sft-grid", "--sft_config", str(cfg), "--lrs", "[1e-5, 3e-3]", "--seeds", "[1, 2]", "--out_root", str(root),
            "--checkpoints", f"[{source / 'base' / 'step-00000007'}, {tmp_path / 'base' / 'step-00000014'}]"]
    cli(args)
    out = capsys.readouterr().out
    assert "ran 8, skipped 0" in out
    rows = list(csv.DictReader(open(root / "sft_grid.csv")))
    assert [(r["checkpoint"], r["step"]) for r in rows] == [("step-00000007", "7"), ("step-00000014", "14")]
    for r in rows:  # 1e-5 barely moves the weights: 3e-3 wins; the numbers are the seeds' mean and std
        assert float(r["lr"]) == 3e-3 and r["n_seeds"] == "2"
        ck = r["checkpoint"]
        losses = [json.loads((root / "base" / ck / f"lr-0.003_seed-{s}" / "sft_metrics.json").read_text())["sft_val_loss"]
                  for s in (1, 2)]
        m, s = mean_std(losses)
        assert float(r["sft_val_loss"]) == pytest.approx(m) and float(r["sft_val_loss_std"]) == pytest.approx(s)
        assert r["general"] != ""
    assert "| run |" in (root / "sft_grid.md").read_text()
    cli(args)
    assert "ran 0, skipped 8" in capsys.readouterr().out


@pytest.mark.slow
def test_sft_from_a_converted_litgpt_checkpoint(tmp_path, source):
    """A folder as `litgpt download`/`convert_hf_checkpoint` leave it: a bare state dict, no training state."""
    src = source / "base" / "step-00000007"
    conv = tmp_path / "checkpoints" / "EleutherAI" / "tiny"
    conv.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in (ckpt.MODEL_FILE, ckpt.STATE_FILE, "hyperparameters.yaml"):
            shutil.copy(f, conv / f.name)
    torch.save(ckpt.load_model_state(src), conv / ckpt.MODEL_FILE)  # bare: no {"model": ...}
    cfg = _config(source, tmp_path / "out", epochs=1)
    cli(["sft", "--config", str(cfg), "--checkpoint_dir", str(conv), "--eval.val_data_path", "{}",
         "--eval.initial_validation", "false"])
    m = json.loads((tmp_path / "out" / "sft_metrics.json").read_text())
    assert (m["source_run"], m["source_checkpoint_name"], m["source_step"]) == ("tiny", "", None)
    assert m["val_losses"] == {} and m["step"] == 5
    assert m["initial"] is None  # no validation before step 1: not the final one relabelled "initial"


@pytest.mark.slow
def test_two_process_sft_preempted_writes_the_marker_and_resumes_bit_identically(tmp_path, source):
    """2 ranks (gloo), SIGUSR1 to the process group mid-run as SLURM sends it: every rank saves its
    part, rank 0 writes the requeue marker, exit 99; `--resume auto` then ends where the
    uninterrupted 2-process run ends, bit for bit."""
    import re
    import subprocess
    import sys

    from tests.conftest import ROOT

    def start(out: Path, *args: str, marker: Path = None) -> subprocess.Popen:
        cfg = _config(source, out, save_interval=100)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
        if marker is not None:
            env["LITGPT_EXT_PREEMPT_MARKER"] = str(marker)
        return subprocess.Popen([sys.executable, "-m", "litgpt_ext", "sft", "--config", str(cfg), "--devices", "2",
                                 *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)

    full = start(tmp_path / "full")
    out, _ = full.communicate(timeout=600)
    assert full.returncode == 0, out[-3000:]
    marker = tmp_path / "marker"
    part = start(tmp_path / "part", marker=marker)
    seen = ""
    for line in part.stdout:  # a handshake, not a sleep: signal once step 2 is logged
        seen += line
        if re.match(r"step 2/", line):
            os.killpg(part.pid, signal.SIGUSR1)
            break
    out, _ = part.communicate(timeout=600)
    seen += out
    step = int(re.search(r"checkpoint saved at step (\d+); exit 99", seen).group(1))
    assert part.returncode == 99 and marker.read_text() == f"step {step}\n" and step < 10, seen[-3000:]
    assert ckpt.latest_checkpoint(tmp_path / "part").name == ckpt.step_dir_name(step)
    again = start(tmp_path / "part", "--resume", "auto")
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out[-3000:]
    a, b = _weights(tmp_path / "full" / "final"), _weights(tmp_path / "part" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sft_with_an_l2_anchor_logs_the_penalty_and_stays_closer(tmp_path, source):
    """`regularizer: {type: l2_anchor}` in SFT anchors to the source checkpoint: the penalty is logged
    beside the loss (0 at the first step, positive after) and the weights move less than without it."""
    start = _weights(source / "base" / "step-00000007")
    dist = {}
    for name, reg in (("free", None), ("anchored", {"type": "l2_anchor", "lambda": 50.0})):
        out = tmp_path / name
        path = _config(source, out, epochs=1)
        if reg is not None:
            cfg = yaml.safe_load(path.read_text())
            cfg["regularizer"] = reg
            path.write_text(yaml.safe_dump(cfg))
        cli(["sft", "--config", str(path)])
        w = _weights(out / "final")
        dist[name] = sum(float(((w[k].float() - start[k].float()) ** 2).sum()) for k in start) ** 0.5
        rows = list(csv.DictReader(open(next(out.rglob("metrics.csv")))))
        pen = [float(r["reg/l2_anchor"]) for r in rows if r.get("reg/l2_anchor") not in (None, "")]
        if reg is None:
            assert not pen
        else:
            assert pen and pen[0] == pytest.approx(0.0, abs=1e-9) and max(pen) > 0
    assert dist["anchored"] < 0.8 * dist["free"]
    with pytest.raises(SystemExit, match="regularizer.lambda must be >= 0"):
        cfg = yaml.safe_load(_config(source, tmp_path / "bad").read_text())
        cfg["regularizer"] = {"type": "l2_anchor", "lambda": -1}
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
        cli(["sft", "--config", str(tmp_path / "bad.yaml")])
