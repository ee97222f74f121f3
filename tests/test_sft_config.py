"""The SFT config and plan, and the parts driven by a minimal loop (what `fit` will do) with exact resume."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from litgpt import GPT, Config
from test_sft_data import make_dm, tok_dir, tokenizer  # noqa: F401  (fixtures)

from litgpt_ext.sft.config import SFTConfig, SFTEvalArgs, SFTTrainArgs, sft_plan
from litgpt_ext.sft.loss import sft_loss, validate_sft
from litgpt_ext.sft.metrics import SFTMetrics, read_sft_metrics, source_identity, write_sft_metrics

ROOT = Path(__file__).resolve().parents[1]


def test_example_config_parses():
    cfg = SFTConfig.from_yaml(ROOT / "midtrain_configs" / "sft" / "demo_math.yaml")
    assert cfg.train.epochs == 4 and (cfg.train.global_batch_size, cfg.train.micro_batch_size) == (64, 16)
    assert cfg.train.lr_warmup_fraction == 0.1 and cfg.train.min_lr == 0.0 and cfg.peak_lr == 3e-4
    assert set(cfg.eval.val_data_path) == {"general", "math"}
    init = cfg.data["init_args"]
    assert init["prompt_style"] == "plain" and init["mask_prompt"] is True and "seed" not in init


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("checkpoint_dir: a/final\nout_dir: b\ndata: {class_path: litgpt_ext.sft.data.SFTData}\n"
                   "train: {epochs: 2, max_tokens: 5}\n")
    with pytest.raises(ValueError, match=r"unknown train keys \['max_tokens'\]"):
        SFTConfig.from_yaml(bad)
    with pytest.raises(ValueError, match="data.class_path must be litgpt_ext.sft.data.SFTData"):
        SFTConfig(checkpoint_dir="a/final", out_dir="b", data={"class_path": "litgpt.data.JSON"})
    with pytest.raises(ValueError, match="is the source run's folder"):
        SFTConfig(checkpoint_dir="runs/a/final", out_dir="runs/a", data={"class_path": "litgpt_ext.sft.data.SFTData"})
    with pytest.raises(ValueError, match="optimizer.init_args.lr is not set"):
        _ = SFTConfig(checkpoint_dir="a/final", out_dir="b", data={"class_path": "litgpt_ext.sft.data.SFTData"}).peak_lr
    with pytest.raises(ValueError, match="lr_warmup_fraction must be in"):
        SFTTrainArgs(lr_warmup_fraction=1.0)
    with pytest.raises(ValueError, match="the name 'sft' is the SFT validation set's"):
        SFTEvalArgs(val_data_path={"sft": "x"})


@pytest.mark.parametrize("n,epochs,world,expected", [
    # (batches/epoch/rank, accumulation, total steps, warmup, spill)
    (100, 4, 1, (7, 4, 7, 1, 0)),
    (33, 3, 1, (3, 4, 3, 1, 3)),
    (1000, 4, 2, (32, 2, 64, 7, 0)),
])
def test_plan(n, epochs, world, expected):
    train = SFTTrainArgs(epochs=epochs, global_batch_size=64, micro_batch_size=16)
    p = sft_plan(n, train, SFTEvalArgs(), world, peak_lr=1e-3)
    assert (p.batches_per_epoch, p.accumulation, p.total_steps, p.warmup_steps, p.spill_batches) == expected
    assert p.lr(0) == 0.0 and p.lr(p.warmup_steps) == pytest.approx(1e-3) and p.lr(p.total_steps) == 0.0
    assert p.eval_interval == max(1, p.batches_per_epoch // p.accumulation)


def _fit(model, opt, loader, plan, start: int, stop: int):
    """The loop's job, minimally: accumulate token-mean micro-batch losses, the plan's LR per step."""
    it = iter(loader)
    for step in range(start, stop):
        for g in opt.param_groups:
            g["lr"] = plan.lr(step)
        for _ in range(plan.accumulation):
            loss, _ = sft_loss(model, next(it))
            (loss / plan.accumulation).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.slow
def test_parts_compose_into_an_exactly_resumable_run(tmp_path, tokenizer):
    train, ev = SFTTrainArgs(epochs=2, global_batch_size=8, micro_batch_size=4), SFTEvalArgs()
    dm = make_dm(tmp_path, tokenizer, n=30, batch_size=4)
    plan = sft_plan(len(dm.train_examples), train, ev, 1, peak_lr=3e-3)
    assert (plan.total_steps, plan.spill_batches) == (8, 0)
    torch.manual_seed(0)
    cfg = Config(name="t", n_layer=1, n_head=2, n_embd=16, block_size=64, vocab_size=tokenizer.vocab_size,
                 padded_vocab_size=tokenizer.vocab_size, rotary_percentage=1.0, bias=True)
    init = GPT(cfg).state_dict()

    def fresh():
        m = GPT(cfg)
        m.load_state_dict(init)
        return m, torch.optim.AdamW(m.parameters(), lr=0.0)

    model, opt = fresh()
    before = validate_sft(model, dm.val_dataloader())["loss"]
    _fit(model, opt, dm.train_dataloader(), plan, 0, plan.total_steps)
    after = validate_sft(model, dm.val_dataloader())
    assert after["loss"] < before

    # preempted at step 3 (mid-epoch), resumed from a checkpoint of model, optimizer and loader state
    m1, o1 = fresh()
    loader = dm.train_dataloader()
    _fit(m1, o1, loader, plan, 0, 3)
    ckpt = copy.deepcopy({"model": m1.state_dict(), "opt": o1.state_dict(), "loader": loader.state_dict()})
    m2, o2 = fresh()
    m2.load_state_dict(ckpt["model"])
    o2.load_state_dict(ckpt["opt"])
    loader2 = make_dm(tmp_path / "again", tokenizer, n=30, batch_size=4).train_dataloader()
    loader2.load_state_dict(ckpt["loader"])
    _fit(m2, o2, loader2, plan, 3, plan.total_steps)
    for (k, a), b in zip(model.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k

    run, name, step = source_identity(tmp_path / "runs" / "base" / "step-00000160")
    m = SFTMetrics(sft_set="toy", sft_val_loss=after["loss"], sft_val_tokens=after["tokens"], lr=3e-3, seed=3,
                   source_checkpoint=str(tmp_path / "runs/base/step-00000160"), source_run=run,
                   source_checkpoint_name=name, source_step=step, step=plan.total_steps, epochs=train.epochs,
                   initial={"sft_val_loss": before, "val_losses": {}})
    assert read_sft_metrics(write_sft_metrics(tmp_path / "sft", m)) == m
