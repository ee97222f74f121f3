"""LoRA through the real CLI: a bad flag, kill -9 and a bit-identical resume (dropout on), and FSDP2 with
2 gloo processes matching 1 (real shards, real processes). The library side: tests/test_lora.py."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from litgpt.config import Config
from litgpt.model import GPT

sys.path.insert(0, str(Path(__file__).parent))
from train_fakes import VOCAB, kill_9_after_first_checkpoint  # noqa: E402

from litgpt_ext import checkpoint as ckpt  # noqa: E402
from litgpt_ext.cli import main as cli_main  # noqa: E402
from litgpt_ext.train.state import TrainingState  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ADAMW = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-2, "weight_decay": 0.0}}
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["query", "value", "projection", "mlp", "head"]}


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


@pytest.fixture(scope="module")
def cli_config(tmp_path_factory) -> Path:
    """A LoRA midtraining config on one real shard, forking a base checkpoint at step 2."""
    from tests.test_train_cli import one_shard_config

    root = tmp_path_factory.mktemp("lora_cli")
    mc = dict(name="tiny", block_size=16, n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, padded_vocab_size=VOCAB)
    torch.manual_seed(0)
    model = GPT(Config(**mc))
    ckpt.write_checkpoint(root / "base" / "step-00000002", model.state_dict(), TrainingState(step=2).to_dict(),
                          Config(**mc), {}, None)
    return one_shard_config(
        root, name="lora.yaml", optimizer=ADAMW, eval={"interval": 2, "max_iters": 100}, fork_from=str(root / "base" / "step-00000002"),
        lora=LORA,
        train={"max_iters": 6, "global_batch_size": 8, "micro_batch_size": 2, "log_interval": 1, "save_interval": 2,
               "min_lr": 1e-3, "lr_warmup_steps": 1, "max_seq_length": 16})


def _cli(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "litgpt_ext", "pretrain", *args], env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _val(out: Path) -> dict:
    with open(out / "val_metrics.csv") as f:
        return {(int(r["step"]), r["set"]): float(r["loss"]) for r in csv.DictReader(f)}


@pytest.mark.slow
def test_a_bad_lora_flag_is_one_line(cli_config, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["pretrain", "--config", str(cli_config), "--out_dir", str(tmp_path / "o"), "--lora.alpha", "0"])
    err = capsys.readouterr().err + str(e.value.code)
    assert e.value.code not in (0, None) and "Traceback" not in err and len(err.strip().splitlines()) <= 3, err
    assert "error: lora.alpha=0.0 is not valid: give a number > 0" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_kill_9_and_resume_is_bit_identical_through_the_cli(cli_config, tmp_path):
    cfg = yaml.safe_load(cli_config.read_text())
    cfg["lora"]["dropout"] = 0.1  # the dropout masks come from the RNG the checkpoint restores
    cfg["train"].update(max_iters=20, save_interval=2)
    cfg["eval"].update(interval=100)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert _cli("--config", str(path), "--out_dir", str(tmp_path / "straight"), "--devices", "1").returncode == 0
    killed = tmp_path / "killed"
    at = kill_9_after_first_checkpoint([sys.executable, "-m", "litgpt_ext", "pretrain", "--config", str(path),
                                        "--out_dir", str(killed), "--devices", "1"], killed, _env(), after_step=2)
    assert 2 < at < 20 and ckpt.is_complete(killed / ckpt.step_dir_name(at))  # an adapter checkpoint, past the fork
    assert (killed / ckpt.step_dir_name(at) / ckpt.LORA_FILE).is_file()
    proc = _cli("--config", str(path), "--out_dir", str(killed), "--devices", "1", "--resume", "auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (torch.load(d / "final" / ckpt.LORA_FILE, weights_only=True) for d in (tmp_path / "straight", killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), at
    sa, sb = (ckpt.load_training_state(d / "final")["optimizer"]["state"] for d in (tmp_path / "straight", killed))
    assert all(torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"]) for k in sa)


@pytest.mark.slow
def test_two_gloo_processes_fsdp2_match_one(cli_config, tmp_path):
    cli_main(["pretrain", "--config", str(cli_config), "--devices", "1", "--out_dir", str(tmp_path / "one")])
    proc = _cli("--config", str(cli_config), "--devices", "2", "--out_dir", str(tmp_path / "two"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _val(tmp_path / "one"), _val(tmp_path / "two")
    assert set(one) == set(two) == {(s, "general") for s in (2, 4, 6)}
    assert one[(6, "general")] < one[(2, "general")] - 0.05
    for k in one:  # the same global batches: equal up to reduction order
        assert two[k] == pytest.approx(one[k], abs=1e-4), k
    a, b = (torch.load(tmp_path / d / "final" / ckpt.LORA_FILE, weights_only=True) for d in ("one", "two"))
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-3
    # the 2-process adapter checkpoint (full, FQN-keyed optimizer state) resumes on one process
    cli_main(["pretrain", "--config", str(cli_config), "--devices", "1", "--out_dir", str(tmp_path / "two"),
              "--resume", str(tmp_path / "two" / "step-00000004")])
    assert _val(tmp_path / "two")[(6, "general")] == pytest.approx(one[(6, "general")], abs=1e-4)
