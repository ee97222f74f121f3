"""The training loop on a tiny CPU model with real Fabric: exact resume, new blends, weights-only
init, early stop, preemption. Data comes from the stand-in in train_fakes.py (same interface as
litgpt_ext.data.ShardedMixedDataset)."""

import sys
from pathlib import Path

import pytest
import torch
from litgpt.config import Config

sys.path.insert(0, str(Path(__file__).parent))
from train_fakes import VOCAB, FakeMixedData, SignalAfter  # noqa: E402

from litgpt_ext import checkpoint as ckpt  # noqa: E402
from litgpt_ext.train.args import EvalArgs, TrainArgs  # noqa: E402
from litgpt_ext.train.loop import PREEMPT_EXIT_CODE, pretrain  # noqa: E402
from litgpt_ext.train.schedules import Schedule  # noqa: E402

CFG = dict(name="tiny", block_size=16, n_layer=2, n_head=2, n_embd=32, padded_vocab_size=VOCAB, vocab_size=VOCAB)
OPT = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-3, "weight_decay": 0.01}}


def run(out_dir, data=None, train=None, eval=None, **kw):
    train = train or {}
    targs = dict(max_iters=8, global_batch_size=4, micro_batch_size=2, save_interval=4, log_interval=1,
                 lr_warmup_steps=2, min_lr=1e-4)
    targs.update(train)
    eargs = dict(interval=4, max_iters=2)
    eargs.update(eval or {})
    return pretrain(model_config=Config(**CFG), out_dir=Path(out_dir), data=data or FakeMixedData(), devices=1,
                    logger_name="csv", train=TrainArgs(**targs), eval=EvalArgs(**eargs), optimizer=OPT, **kw)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    return out, run(out)


def test_straight_run_learns_and_writes_litgpt_checkpoints(straight):
    out, r = straight
    assert r.stopped == "budget" and r.step == 8 and r.tokens == 8 * 4 * 16
    assert r.losses[8] < r.losses[1] - 0.5
    assert [p.name for _, p in ckpt.list_checkpoints(out)] == ["step-00000004", "step-00000008"]
    for d in (out / "step-00000004", out / "final"):
        assert {"lit_model.pth", "model_config.yaml", "hyperparameters.yaml", "training_state.pth"} <= {
            p.name for p in d.iterdir()}
    sd = ckpt.load_model_state(out / "final")
    from litgpt.model import GPT

    assert sd.keys() == GPT(Config(**CFG)).state_dict().keys()  # litgpt's own names: litgpt tools load it
    st = ckpt.load_training_state(out / "step-00000004")
    assert st["step"] == 4 and st["data"]["count"] == 16 and st["mix"] == {"weights": {"a": 0.5, "b": 0.5}}
    rows = (out / "val_metrics.csv").read_text().splitlines()
    assert rows[0] == "step,tokens,set,loss,ppl" and len(rows) == 1 + 3 * 2  # start, step 4, step 8 x 2 sets


def test_resume_continues_bit_for_bit(straight, tmp_path):
    out, r = straight
    first = run(tmp_path, train={"max_additional_steps": 3, "save_interval": 3})  # cosine still over 8
    assert first.losses == {k: v for k, v in r.losses.items() if k <= 3}
    with pytest.raises(ValueError, match=r"(?s)saved plan:.*steps 0 -> 3.*train.new_phase=true.*steps 3 -> 8"):
        run(tmp_path, resume=True)  # the phase's plan stops at 3: a requeue must not move it silently
    second = run(tmp_path, resume=True, train={"new_phase": True})  # the budget changed on purpose
    assert second.losses == {k: v for k, v in r.losses.items() if k > 3}
    a = ckpt.load_model_state(out / "final")
    b = ckpt.load_model_state(tmp_path / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_new_blend_keeps_schedule_and_cursors(straight, tmp_path, capsys):
    out, r = straight
    new = FakeMixedData(weight_a=0.9)
    mid = run(tmp_path, data=new, resume=out / "step-00000004", train={"max_additional_steps": 2})
    assert mid.step == 6  # 4 resumed + 2 additional
    st = ckpt.load_training_state(tmp_path / "final")
    assert mid.schedule == r.schedule and st["lr"] == Schedule(**r.schedule)(6)  # same cosine over 8
    assert st["mix"]["weights"] == pytest.approx({"a": 0.9, "b": 0.1})
    # cursors continue from the checkpoint's (16 samples seen), no replay
    assert st["data"]["count"] == 16 + 2 * 4 and sum(st["data"]["cursors"].values()) == 24
    assert "checkpoint mix: {'weights': {'a': 0.5, 'b': 0.5}}\n  new mix:        {'weights': {'a': 0.9" in capsys.readouterr().out
    assert mid.losses[5] != r.losses[5]  # other data


def test_decay_branch_starts_from_resumed_lr(straight, tmp_path):
    out, _ = straight
    lr4 = ckpt.load_training_state(out / "step-00000004")["lr"]
    res = run(tmp_path, resume=out / "step-00000004",
              train={"lr_scheduler": "decay", "max_additional_steps": 4, "max_iters": 100, "min_lr": 0.0})
    s = res.schedule
    assert s["start_step"] == 4 and s["start_lr"] == lr4 and s["end_step"] == 8
    assert ckpt.load_training_state(tmp_path / "final")["lr"] == 0.0


def test_initial_checkpoint_loads_weights_only(straight, tmp_path):
    out, r = straight
    res = run(tmp_path, initial_checkpoint_dir=out / "final", train={"max_iters": 2},
              eval={"initial_validation": True})
    assert res.step == 2  # fresh step counter
    start = {row["set"]: row["loss"] for row in res.val if row["step"] == 0}
    final = {row["set"]: row["loss"] for row in r.val if row["step"] == 8}
    assert start == pytest.approx(final, abs=1e-6)  # evaluated the loaded weights
    assert ckpt.load_training_state(tmp_path / "final")["data"]["count"] == 2 * 4  # fresh data stream


@pytest.mark.slow
def test_early_stop_when_a_set_worsens(tmp_path):
    # the domain set (stride 3) is never trained on (weight_a=1) -> its loss rises above the start
    res = run(tmp_path, data=FakeMixedData(weight_a=1.0), train={"max_iters": 40},
              eval={"interval": 2, "early_stop": {"domain": 0.05}})
    assert res.stopped == "early_stop" and res.step < 40
    last = [row for row in res.val if row["set"] == "domain"][-1]
    assert last["loss"] - res.val_start["domain"] > 0.05
    assert ckpt.latest_checkpoint(tmp_path).name == f"step-{res.step:08d}" and (tmp_path / "final").is_dir()
    with pytest.raises(ValueError, match=r"unknown validation sets \['nope'\]; known: \['domain', 'general'\]"):
        run(tmp_path / "x", eval={"early_stop": {"nope": 1.0}})


@pytest.mark.slow
def test_preemption_saves_and_exits_with_requeue_code(straight, tmp_path):
    out, r = straight
    with pytest.raises(SystemExit) as e:
        run(tmp_path, data=SignalAfter(n=5), train={"save_interval": 100})
    assert e.value.code == PREEMPT_EXIT_CODE == 99
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000003" and not (tmp_path / "final").exists()
    again = run(tmp_path, resume="auto")
    assert again.losses == {k: v for k, v in r.losses.items() if k > 3}


@pytest.mark.slow
def test_requeued_phase_stops_where_it_was_planned_with_the_same_lrs(straight, tmp_path):
    # issue 8.2: a midtraining phase of 8 steps from step 4, preempted and requeued three times
    out, _ = straight
    train = {"max_iters": 100, "max_additional_steps": 8, "save_interval": 100}
    ref = run(tmp_path / "ref", fork_from=out / "step-00000004", train=train)
    requeued = tmp_path / "requeued"
    for _ in range(3):  # each job trains 2 steps, then gets SIGUSR1 (the first one forks)
        with pytest.raises(SystemExit):
            run(requeued, data=SignalAfter(n=3), fork_from=out / "step-00000004", train=train)
    last = run(requeued, fork_from=out / "step-00000004", train=train)
    assert ref.step == last.step == 4 + 8  # not 4 + 4 * 8: the stop belongs to the phase
    assert [s for s, _ in ckpt.list_checkpoints(requeued)] == [4, 6, 8, 10]  # the fork, 3 preemptions
    dirs = [requeued / ckpt.step_dir_name(s) for s in (6, 8, 10)] + [requeued / "final"]
    plans = [ckpt.load_training_state(d) for d in dirs]
    assert [p["step"] for p in plans] == [6, 8, 10, 12]
    assert len({p["phase_id"] for p in plans}) == 1 and all(p["stop_step"] == 12 for p in plans)
    assert {k: v for k, v in last.plan.items() if k != "phase_id"} == {
        k: v for k, v in ref.plan.items() if k != "phase_id"}
    schedule = Schedule(**ref.schedule)  # cosine over 100 from step 0: the same LR at every step
    assert [p["lr"] for p in plans] == [schedule(s) for s in (6, 8, 10, 12)]
    assert last.losses == {k: v for k, v in ref.losses.items() if k > 10}  # bit-identical continuation
    assert len((requeued / "phases.jsonl").read_text().splitlines()) == 1


@pytest.mark.slow
def test_pause_at_step_splits_a_phase_into_jobs_without_moving_its_plan(straight, tmp_path):
    # sweep's base segments: each job stops at a fork step (exit 0, no final/), the next continues
    out, r = straight
    seg1 = run(tmp_path, train={"pause_at_step": 3})
    assert seg1.stopped == "paused" and seg1.step == 3 and not (tmp_path / "final").exists()
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000003"
    assert seg1.losses == {k: v for k, v in r.losses.items() if k <= 3}
    again = run(tmp_path, resume="auto", train={"pause_at_step": 3})  # a resubmitted segment: nothing to do
    assert again.stopped == "paused" and again.losses == {}
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000003"
    seg2 = run(tmp_path, resume="auto", train={"pause_at_step": 6})
    seg3 = run(tmp_path, resume="auto")  # the last segment: no pause
    assert (seg2.step, seg3.stopped, seg3.step) == (6, "budget", 8)
    assert {**seg1.losses, **seg2.losses, **seg3.losses} == r.losses  # bit-identical, same plan
    assert seg1.plan == seg3.plan and len((tmp_path / "phases.jsonl").read_text().splitlines()) == 1
    a, b = ckpt.load_model_state(out / "final"), ckpt.load_model_state(tmp_path / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
