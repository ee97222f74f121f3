"""MoE through the real training loop: aux loss, stats and bias updates in `pretrain`, and
checkpoints that resume across expert-parallel layouts (EP=1 -> EP=2 with 2 real processes -> EP=1)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from litgpt_ext import checkpoint as ckpt
from litgpt_ext.data.shard_io import write_token_shard

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 64
MODEL = dict(name="moe-test", block_size=16, vocab_size=VOCAB, padded_vocab_size=VOCAB, n_layer=2, n_head=2,
             n_embd=32, rotary_percentage=1.0, parallel_residual=False, bias=False, norm_class_name="RMSNorm",
             mlp_class_name="LLaMAMoE", intermediate_size=48, moe_intermediate_size=16, n_expert=4,
             n_expert_per_token=2, n_shared_expert=1)
MOE = dict(gate="sigmoid", aux_loss_coef=0.01, bias_update_rate=0.01)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A learnable stream: documents counting up modulo VOCAB from random starts."""
    root = tmp_path_factory.mktemp("moe_data")
    rng = np.random.default_rng(0)
    docs = [(rng.integers(0, VOCAB) + np.arange(40)) % VOCAB for _ in range(200)]
    write_token_shard(root / "1", docs, chunk_tokens=1024)
    write_token_shard(root / "val" / "1", docs[:20], chunk_tokens=1024)
    return root


def config(data_dir: Path, out_dir: Path, **train) -> dict:
    t = dict(max_iters=6, global_batch_size=4, micro_batch_size=2, save_interval=3, log_interval=1,
             lr_warmup_steps=1, min_lr=1e-4, max_seq_length=16)
    t.update(train)
    return {
        "model_config": MODEL, "moe": MOE, "out_dir": str(out_dir), "precision": "32-true", "logger_name": "csv",
        "data": {"class_path": "litgpt_ext.data.ShardedMixedDataset",
                 "init_args": {"data_path": str(data_dir), "val_data_path": {"general": str(data_dir / "val" / "1")},
                               "mix_weights_str": "main:1.0"}},
        "train": t, "eval": {"interval": 3, "max_iters": 2},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-3, "weight_decay": 0.01}},
    }


def pretrain_cli(cfg: dict, tmp: Path, *args: str, name: str = "run.yaml") -> subprocess.CompletedProcess:
    path = tmp / name
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "litgpt_ext", "pretrain", "--config", str(path), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def run_in_process(cfg: dict, **kw) -> dict:
    from litgpt.config import Config

    from litgpt_ext.data import ShardedMixedDataset
    from litgpt_ext.model import MoEArgs
    from litgpt_ext.train.args import EvalArgs, TrainArgs
    from litgpt_ext.train.loop import pretrain

    return pretrain(model_config=Config(**cfg["model_config"]), moe=MoEArgs(**cfg["moe"]),
                    out_dir=Path(cfg["out_dir"]), devices=1, precision="32-true", logger_name="csv",
                    data=ShardedMixedDataset(**cfg["data"]["init_args"]), train=TrainArgs(**cfg["train"]),
                    eval=EvalArgs(**cfg["eval"]), optimizer=cfg["optimizer"], **kw)


def expert_weights(path: Path) -> torch.Tensor:
    return ckpt.load_model_state(path)["transformer.h.1.mlp.experts.fc_1"]


@pytest.mark.slow
def test_moe_pretrain_and_resume_across_ep_layouts(data_dir, tmp_path, capsys):
    # 1) single process (EP=1): trains, logs MoE stats, updates the aux-free biases
    a = tmp_path / "a"
    run_in_process(config(data_dir, a))
    out = capsys.readouterr().out
    assert "moe imbalance" in out and " aux " in out
    losses = [float(line.split("| loss ")[1].split()[0]) for line in out.splitlines() if "| loss " in line]
    assert len(losses) == 6 and losses[-1] < losses[0]
    sd = ckpt.load_model_state(a / "step-00000003")
    assert sd["transformer.h.0.mlp.experts.fc_1"].shape == (4, 16, 32)
    assert sd["transformer.h.0.mlp.gate.e_score_correction_bias"].abs().sum() > 0  # biases moved
    metrics = (next(a.rglob("metrics.csv"))).read_text().splitlines()[0]
    assert "moe/l0/imbalance" in metrics and "moe/l1/tokens_e3" in metrics and "moe/l0/aux_loss" in metrics

    # 2) resume that EP=1 checkpoint under EP=2 on 2 processes (experts split 2 + 2, FSDP2 on the rest)
    b = tmp_path / "b"
    # (global batch 8 = 2 micro-batches of 2 on each of 2 ranks: gradient accumulation under EP)
    out = pretrain_cli(config(data_dir, b, global_batch_size=8), tmp_path, "--devices", "2",
                       "--expert_parallel_size", "2",
                       "--resume", str(a / "step-00000003"), name="b.yaml").stdout
    assert "Resumed from" in out and "step 6/6" in out
    w3, w6 = expert_weights(a / "step-00000003"), expert_weights(b / "final")
    assert w6.shape == (4, 16, 32)  # saved in the global layout, not rank 0's half
    assert not torch.allclose(w6[2:], w3[2:]) and not torch.allclose(w6[:2], w3[:2])  # both halves trained
    from litgpt.config import Config

    from litgpt_ext.model import MoEArgs, build_model, load_moe_args

    assert load_moe_args(b / "final") == MoEArgs(**MOE)  # eval/export can rebuild the MoE model
    model = build_model(Config.from_file(b / "final" / "model_config.yaml"), load_moe_args(b / "final"))
    model.load_state_dict(ckpt.load_model_state(b / "final"), strict=True)
    from litgpt_ext.checkpoint.loading import load_model  # the lm-eval backend's loader: MoE, no conversion

    evaluated, _ = load_model(b / "final", device="cpu", dtype="float32")
    x = torch.randint(0, VOCAB, (2, 8))
    assert torch.allclose(evaluated(x), model.eval()(x), atol=1e-6)
    st = ckpt.load_training_state(b / "final")
    assert st["step"] == 6 and st["world_size"] == 2

    # 3) and the EP=2 checkpoint back under EP=1 (a midtraining run with a new data order)
    cfg = config(data_dir, tmp_path / "c", max_additional_steps=2, max_iters=None)
    cfg["data"]["init_args"]["seed"] = 7
    r = run_in_process(cfg, resume=b / "final")
    assert r.step == 8 and all(np.isfinite(v) for v in r.losses.values())
    assert r.losses[7] < losses[0]  # continues from trained weights, not from scratch
