"""`litgpt-ext pretrain` end to end on real litdata shards and the real ShardedMixedDataset:
paper-format config, CLI overrides, --print_config, 1 vs 2 processes (FSDP2, gloo), fork +
midtrain with a new blend."""

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import yaml

from litgpt_ext import checkpoint as ckpt
from litgpt_ext.cli import main as cli_main
from litgpt_ext.data.shard_io import write_token_shard

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 64


def pattern_shard(path: Path, stride: int, n_docs: int, seed: int) -> None:
    """Arithmetic token sequences (next = prev + stride mod VOCAB): learnable by a tiny model."""
    rng = np.random.default_rng(seed)
    docs = [(rng.integers(VOCAB) + stride * np.arange(40)) % VOCAB for _ in range(n_docs)]
    write_token_shard(path, docs, chunk_tokens=400)


def one_shard_config(root: Path, *, train: dict, optimizer: dict, eval: Optional[dict] = None,
                     name: str = "pretrain.yaml", **top) -> Path:
    """A tiny model's pretraining config on one arithmetic main shard (data/1) and a general val set
    under `root`: one shard, so 1 and 2 processes see the same global batches. `train`, `optimizer`
    and `eval` are the sections as given; `top` adds or replaces top-level keys."""
    pattern_shard(root / "data" / "1", 1, 60, 0)
    pattern_shard(root / "val" / "general", 1, 10, 3)
    cfg = {
        "model_config": {"name": "tiny", "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32,
                         "vocab_size": VOCAB, "padded_vocab_size": VOCAB},
        "precision": "32-true",
        "data": {"class_path": "litgpt_ext.data.ShardedMixedDataset",
                 "init_args": {"data_path": str(root / "data"), "num_workers": 0, "literal_weights_str": "main/1:1.0",
                               "val_data_path": {"general": str(root / "val" / "general")}, "seed": 42}},
        "train": train, "eval": eval or {"interval": 3, "max_iters": 100}, "optimizer": optimizer,
        "logger_name": "csv", **top,
    }
    path = root / name
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    data = root / "data"
    pattern_shard(data / "1", 1, 60, 0)
    pattern_shard(data / "2", 1, 60, 1)
    pattern_shard(data / "c1", 3, 60, 2)
    pattern_shard(root / "val" / "general", 1, 10, 3)
    pattern_shard(root / "val" / "domain", 3, 10, 4)
    cfg = {  # the paper's keys
        "model_name": "tiny",
        "model_config": {"name": "tiny", "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32,
                         "vocab_size": VOCAB, "padded_vocab_size": VOCAB},
        "out_dir": str(root / "out" / "pretrain"),
        "precision": "32-true",
        "resume": False,
        "data": {"class_path": "litgpt_ext.data.ShardedMixedDataset",
                 "init_args": {"data_path": str(data), "num_workers": 0, "mix_weights_str": "main:0.8,code:0.2",
                               "val_data_path": {"general": str(root / "val" / "general"),
                                                 "domain": str(root / "val" / "domain")},
                               "proportional_sampling": False, "seed": 42}},
        "train": {"max_iters": 6, "global_batch_size": 8, "micro_batch_size": 2, "log_interval": 1,
                  "save_interval": 3, "min_lr": 1e-4, "lr_scheduler": "cosine", "lr_warmup_fraction": 0.2,
                  "max_seq_length": 16, "max_tokens": 10**9},
        "eval": {"interval": 3, "max_iters": 100},  # whole val sets: comparable across rank counts
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-3, "weight_decay": 0.1}},
        "logger_name": "tensorboard",
    }
    path = root / "pretrain.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def val_rows(out: Path) -> dict:
    with open(out / "val_metrics.csv") as f:
        return {(int(r["step"]), r["set"]): float(r["loss"]) for r in csv.DictReader(f)}


def test_paper_config_parses_and_print_config_applies_overrides(config_file, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["pretrain", "--config", str(config_file), "--train.max_additional_steps", "100",
                  "--train.lr_scheduler", "wsd", "--train.stable_steps", "3", "--print_config"])
    assert e.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["max_additional_steps"] == 100 and printed["train"]["lr_scheduler"] == "wsd"
    assert printed["data"]["init_args"]["mix_weights_str"] == "main:0.8,code:0.2"
    assert printed["model_config"]["n_embd"] == 32 and printed["expert_parallel_size"] == 1


def test_bad_schedule_name_is_named(config_file, capsys):
    with pytest.raises(SystemExit):
        cli_main(["pretrain", "--config", str(config_file), "--train.lr_scheduler", "cosin"])
    err = capsys.readouterr().err
    assert "cosin" in err and "rewarmup_cosine" in err


@pytest.mark.parametrize("where, fragments", [
    # the paper's retired key (two of its configs carry it): the key and the class are named
    ("data.init_args.mix_weight", ["Key 'mix_weight' is not expected", "litgpt_ext.data.ShardedMixedDataset"]),
    ("train.bogus_key", ["'train'", "'bogus_key'"]),
    ("eval.max_itres", ["'eval'", "'max_itres'"]),  # a typo
])
def test_an_unexpected_key_in_a_config_is_named(config_file, tmp_path, capsys, where, fragments):
    cfg = yaml.safe_load(config_file.read_text())
    *parents, leaf = where.split(".")
    node = cfg
    for k in parents:
        node = node[k]
    node[leaf] = 0.3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as e:
        cli_main(["pretrain", "--config", str(bad), "--print_config"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and all(f in err for f in fragments), err
    assert not err.rstrip().splitlines()[0].endswith(":"), err  # never a wrapper cut off before its cause


def test_a_missing_config_file_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(["pretrain", "--config", str(tmp_path / "nope.yaml")])
    assert f"File does not exist: '{tmp_path / 'nope.yaml'}'" in capsys.readouterr().err


# One shard: every rank count then sees the same samples in each global batch (rank r takes the
# shard's elements r, r+R, ...), so 1 and 2 processes must agree up to float reduction order.
ONE_SHARD = ["--data.init_args.mix_weights_str", "null", "--data.init_args.literal_weights_str", "main/1:1.0"]


@pytest.fixture(scope="module")
def one_proc(config_file):
    out = config_file.parent / "out" / "one"
    cli_main(["pretrain", "--config", str(config_file), "--devices", "1", "--out_dir", str(out), *ONE_SHARD])
    return out


@pytest.mark.slow
def test_two_processes_reach_the_same_loss_as_one(config_file, one_proc):
    out2 = config_file.parent / "out" / "two"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "litgpt_ext", "pretrain", "--config", str(config_file),
                           "--devices", "2", "--out_dir", str(out2), *ONE_SHARD], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = val_rows(one_proc), val_rows(out2)
    assert set(one) == set(two) == {(s, n) for s in (0, 3, 6) for n in ("general", "domain")}
    assert one[(6, "general")] < one[(0, "general")] - 0.3  # it learned something
    for k in one:  # same global batches, fp32: equal up to reduction order
        assert two[k] == pytest.approx(one[k], abs=1e-4), k
    # the 2-process checkpoint is a full litgpt checkpoint and resumes on 1 process
    assert ckpt.list_checkpoints(out2)[-1][0] == 6 and (out2 / "final" / "lit_model.pth").is_file()
    cli_main(["pretrain", "--config", str(config_file), "--devices", "1", "--out_dir", str(out2),
              "--resume", str(out2 / "step-00000003"), *ONE_SHARD])
    assert val_rows(out2)[(6, "general")] == pytest.approx(one[(6, "general")], abs=1e-4)


@pytest.mark.slow
def test_saved_hyperparameters_reload_with_config(config_file, one_proc, capsys):
    saved = one_proc / "final" / "hyperparameters.yaml"
    text = saved.read_text()
    assert "<function" not in text and "build_strategy" not in text
    with pytest.raises(SystemExit) as e:
        cli_main(["pretrain", "--config", str(saved), "--print_config"])
    assert e.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"] == yaml.safe_load(text)["train"] and printed["out_dir"] == str(one_proc)
    assert printed["data"]["init_args"]["literal_weights_str"] == "main/1:1.0"


@pytest.mark.slow
def test_fork_then_midtrain_with_new_blend(config_file, one_proc):
    mid = config_file.parent / "out" / "mid"
    cli_main(["fork", "--from", str(one_proc / "step-00000003"), "--to", str(mid)])
    cli_main(["pretrain", "--config", str(config_file), "--devices", "1", "--out_dir", str(mid), "--resume", "true",
              "--data.init_args.mix_weights_str", "main:0.2,code:0.8", "--train.lr_scheduler", "rewarmup_cosine",
              "--train.max_additional_steps", "3", "--train.max_iters", "100"])
    old = ckpt.load_training_state(one_proc / "step-00000003")
    new = ckpt.load_training_state(mid / "final")
    assert new["step"] == 6 and new["schedule"]["start_step"] == 3 and new["schedule"]["end_step"] == 6
    assert new["mix"]["weights"]["c1"] == pytest.approx(0.8) and old["mix"]["weights"] == {"main/1": 1.0}
    hist = new["data"]["mix_history"]
    kept = {sid: hist[1]["at_cursors"][sid] for sid in old["data"]["cursors"]}
    assert len(hist) == 2 and kept == old["data"]["cursors"] == {"main/1": 24}  # cursors kept, no replay
    for sid, c in old["data"]["cursors"].items():
        assert new["data"]["cursors"][sid] >= c
    rows = val_rows(mid)  # baseline re-measured at the fork point; domain improves on the code-heavy blend
    assert rows[(6, "domain")] < rows[(3, "domain")]
    # the source run's checkpoint is untouched by the new run
    assert ckpt.load_training_state(one_proc / "step-00000003")["step"] == 3


def _shipped_command(config: Path) -> list[str]:
    """The command each shipped YAML is for: sweeps, the reproduction study, SFT, else pretrain."""
    if config.parent.name in ("sweeps", "studies"):  # sweep specs
        return ["sweep", "--spec", str(config)]
    raw = yaml.safe_load(config.read_text()) or {}
    if config.parent.name == "reproduce" and "arms" in raw:
        return ["reproduce", "--config", str(config), "--print_config"]
    if str((raw.get("data") or {}).get("class_path", "")).endswith("SFTData"):
        return ["sft", "--config", str(config), "--print_config"]
    return ["pretrain", "--config", str(config), "--print_config"]


@pytest.mark.parametrize("config", sorted((ROOT / "midtrain_configs").glob("*/*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse(config, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # configs name repo-relative paths (sweeps: their base and SFT configs)
    cmd = _shipped_command(config)
    if cmd[0] == "sweep":
        cli_main(cmd)  # the plan table (a dry run)
        assert "base_seed" in capsys.readouterr().out
        return
    with pytest.raises(SystemExit) as e:
        cli_main(cmd)
    assert e.value.code in (0, None)
    if cmd[0] != "pretrain":
        assert yaml.safe_load(capsys.readouterr().out)  # the resolved config
        return
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["class_path"] == "litgpt_ext.data.ShardedMixedDataset"
