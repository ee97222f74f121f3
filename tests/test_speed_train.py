"""The `speed:` knobs through the real `litgpt-ext pretrain` CLI on real litdata shards: compile
(aot_eager), activation checkpointing, fused AdamW, meta-device init and sharded checkpoints on 2
processes (gloo, FSDP2), then a resume of the sharded checkpoint on 1 process; MFU in the logs."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train_cli import one_shard_config, val_rows

from litgpt_ext import checkpoint as ckpt
from litgpt_ext.checkpoint import dcp as tdcp
from litgpt_ext.cli import main as cli_main

pytestmark = pytest.mark.slow  # 2-process and compiled runs: minutes on 2 cores
ROOT = Path(__file__).resolve().parents[1]
VOCAB = 64
ALL_KNOBS = {"compile": True, "compile_backend": "aot_eager", "activation_checkpointing": True,
             "fused_optimizer": True, "empty_init": True, "checkpoint_format": "sharded"}


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    return one_shard_config(
        tmp_path_factory.mktemp("speed"), model_name="tiny",
        train={"max_iters": 6, "global_batch_size": 8, "micro_batch_size": 2, "log_interval": 1, "save_interval": 3,
               "min_lr": 1e-4, "lr_scheduler": "cosine", "lr_warmup_fraction": 0.2, "max_seq_length": 16,
               "max_tokens": 10**9},
        optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-3, "weight_decay": 0.1}})


def _speed_flags(**knobs) -> list[str]:
    out = []
    for k, v in knobs.items():
        out += [f"--speed.{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    return out


def _csv_metrics(out: Path) -> list[dict]:
    files = sorted(out.rglob("metrics.csv"))
    assert files, f"no CSV logger output under {out}"
    with open(files[-1]) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def eager(config_file):
    """The reference: no speed knobs, 1 process, full checkpoints."""
    out = config_file.parent / "eager"
    cli_main(["pretrain", "--config", str(config_file), "--devices", "1", "--out_dir", str(out)])
    return out


@pytest.fixture(scope="module")
def eager_empty_init(config_file):
    """The reference for the knobs: 1 process, eager, full checkpoints, the seeded init `empty_init`
    draws (speed.empty_init replaces litgpt's init path, whose values depend on construction-time RNG)."""
    out = config_file.parent / "eager_empty_init"
    cli_main(["pretrain", "--config", str(config_file), "--devices", "1", "--out_dir", str(out),
              "--speed.empty_init", "true"])
    return out


def test_all_knobs_on_two_processes_then_sharded_resume_on_one(config_file, eager_empty_init, capsys):
    out = config_file.parent / "fast"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "litgpt_ext", "pretrain", "--config", str(config_file),
                           "--devices", "2", "--out_dir", str(out), *_speed_flags(**ALL_KNOBS),
                           "--speed.peak_flops_per_device", "1e12"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on the meta device" in proc.stdout and "| MFU " in proc.stdout
    # each knob took effect (read back from the model and optimizer): compile per block under FSDP2
    assert "Speed: compile blocks (aot_eager), activation checkpointing, fused AdamW, sharded checkpoints" in proc.stdout
    # meta init on 2 ranks' shards reproduces the 1-process init; compile/AC/fused/FSDP2 change no
    # numbers beyond float rounding: the eager 1-process run's validation losses, step by step
    ref, fast = val_rows(eager_empty_init), val_rows(out)
    assert set(ref) == set(fast) == {(s, "general") for s in (0, 3, 6)}
    assert ref[(6, "general")] < ref[(0, "general")] - 0.3  # it learned
    # step 0: the init itself, materialized per shard on 2 ranks vs whole on 1
    assert fast[(0, "general")] == pytest.approx(ref[(0, "general")], abs=1e-5)
    for k in ref:  # fused vs foreach AdamW and 2-rank reductions: fp32 rounding over 6 steps
        assert fast[k] == pytest.approx(ref[k], abs=1e-3), k

    # sharded checkpoints: sharded/ with one .distcp per rank, a manifest listing them, no full copies
    step3 = out / "step-00000003"
    assert tdcp.is_sharded(step3) and not (step3 / ckpt.MODEL_FILE).exists()
    man = ckpt.read_manifest(step3)
    shards = sorted(f for f in man["files"] if f.startswith("sharded/"))
    assert "sharded/.metadata" in shards and len([f for f in shards if f.endswith(".distcp")]) == 2
    assert "optimizer" not in torch.load(step3 / ckpt.STATE_FILE, weights_only=False) or \
        torch.load(step3 / ckpt.STATE_FILE, weights_only=False)["optimizer"] is None
    assert ckpt.verify_checkpoint(step3) is None and ckpt.is_complete(step3)
    assert [s for s, _ in ckpt.list_checkpoints(out, final=True)] == [3, 6, 6]
    # the MFU metric sits beside tokens/s in the CSV logger (rank 0), as tokens/s x FLOPs/token / (2 x peak)
    rows = [r for r in _csv_metrics(out) if r.get("mfu")]
    assert rows, "no mfu column in the CSV logger output"
    from litgpt.config import Config

    from litgpt_ext.train.speed import flops_per_token

    fpt = flops_per_token(Config(name="tiny", block_size=16, n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB,
                                 padded_vocab_size=VOCAB), 16)
    for r in rows:
        assert float(r["mfu"]) == pytest.approx(float(r["tokens_per_sec"]) * fpt / (2 * 1e12), rel=1e-6)

    # resume the 2-rank sharded step 3 on 1 process (DCP reshards): continues to the same step-6 losses
    cli_main(["pretrain", "--config", str(config_file), "--devices", "1", "--out_dir", str(out),
              "--resume", str(step3), *_speed_flags(**ALL_KNOBS)])
    resumed = val_rows(out)
    assert "Speed: compile model (aot_eager), activation checkpointing, fused AdamW, sharded checkpoints" \
        in capsys.readouterr().out  # one device: the whole model's forward is compiled
    assert resumed[(6, "general")] == pytest.approx(fast[(6, "general")], abs=1e-4)
    assert tdcp.is_sharded(out / "final") and ckpt.verify_checkpoint(out / "final") is None

    # evaluate/soup/export need lit_model.pth: a sharded checkpoint names the fix
    with pytest.raises(FileNotFoundError, match="litgpt-ext consolidate"):
        ckpt.resolve_checkpoints(out / "final")
    # consolidate -> lit_model.pth: the weights evaluate/sft/convert read, equal to the shards
    target = tdcp.consolidate(out / "final")
    assert ckpt.is_complete(out / "final", need="weights")
    sd = ckpt.load_model_state(target)
    full = tdcp.load_full_model_state(out / "final")
    assert sd.keys() == full.keys() and all(torch.equal(sd[k], full[k]) for k in sd)
    from litgpt import GPT
    from litgpt.config import Config as C

    GPT(C.from_file(out / "final" / ckpt.CONFIG_FILE)).load_state_dict(sd, strict=True)
    # into its own folder (no manifest of files it does not hold), which convert-to-hf exports
    export = config_file.parent / "export"
    cli_main(["consolidate", str(out / "final"), "--out_dir", str(export)])
    assert ckpt.is_complete(export, need="weights") and not (export / ckpt.MANIFEST_FILE).exists()
    cli_main(["convert-to-hf", str(export), str(config_file.parent / "hf")])
    assert (config_file.parent / "hf" / "model.safetensors").is_file()


def test_sharded_checkpoints_fork_and_prune(config_file, tmp_path):
    """One process, sharded: keep_last_k prunes sharded checkpoints; fork hard-links sharded/ and the
    fork resumes."""
    out = tmp_path / "run"
    cli_main(["pretrain", "--config", str(config_file), "--devices", "1", "--out_dir", str(out),
              "--train.save_interval", "2", "--train.keep_last_k", "1", "--speed.checkpoint_format", "sharded"])
    assert [p.name for _, p in ckpt.list_checkpoints(out, final=True)] == ["step-00000006", "final"]
    dst = ckpt.fork(out / "step-00000006", tmp_path / "mid")
    assert tdcp.is_sharded(dst) and ckpt.verify_checkpoint(dst) is None
    meta = dst / "sharded" / ".metadata"
    assert os.stat(meta).st_ino == os.stat(out / "step-00000006" / "sharded" / ".metadata").st_ino  # a link
    cli_main(["pretrain", "--config", str(config_file), "--devices", "1", "--out_dir", str(tmp_path / "mid"),
              "--resume", "true", "--train.max_iters", "8", "--train.new_phase", "true",
              "--speed.checkpoint_format", "sharded"])
    assert ckpt.list_checkpoints(tmp_path / "mid", final=True)[-1][0] == 8


def test_default_speed_keeps_full_checkpoints_and_reports_mfu_na(config_file, eager, capsys):
    assert (eager / "final" / ckpt.MODEL_FILE).is_file() and not tdcp.is_sharded(eager / "final")
    rows = _csv_metrics(eager)
    assert rows and not any(r.get("mfu") for r in rows)  # CPU, no peak configured: no made-up MFU
