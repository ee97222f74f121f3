"""The run plan as a pure function: stop step and schedule fixed when a phase begins."""

import pytest

from litgpt_ext.train.args import TrainArgs
from litgpt_ext.train.plan import RunPlan, choose_plan, plan_phase, stop_warning

TPS = 64  # tokens per step


def args(**kw):
    base = dict(global_batch_size=4, micro_batch_size=2, min_lr=0.0, lr_warmup_steps=2)
    return TrainArgs(**{**base, **kw})


def test_whole_run_schedule_spans_the_total_and_additional_steps_stop_early():
    p = plan_phase(args(max_iters=100, max_additional_steps=10), 1.0, 40, TPS, phase_id="x")
    assert (p.start_step, p.stop_step) == (40, 50)
    assert (p.schedule.name, p.schedule.start_step, p.schedule.end_step, p.schedule.warmup_steps) == ("cosine", 0, 100, 2)
    p = plan_phase(args(max_iters=100, max_tokens=30 * TPS), 1.0, 0, TPS)
    assert p.stop_step == p.schedule.end_step == 30  # max_tokens is the tighter total
    with pytest.raises(ValueError, match="no training budget"):
        plan_phase(args(), 1.0, 0, TPS)


def test_phase_schedules_start_at_the_phase():
    p = plan_phase(args(lr_scheduler="decay", max_iters=1000, max_additional_steps=20), 1.0, 40, TPS, start_lr=0.5)
    s = p.schedule
    assert (p.stop_step, s.start_step, s.end_step, s.start_lr, s.warmup_steps) == (60, 40, 60, 0.5, 0)
    assert s(40) == 0.5 and s(50) == pytest.approx(0.25) and s(60) == 0.0


def test_lr_horizon_replaces_the_schedule_end_not_the_stop():
    p = plan_phase(args(max_iters=10_000_000, max_additional_steps=50, lr_horizon=80), 1.0, 0, TPS)
    assert (p.stop_step, p.schedule.end_step) == (50, 80)
    with pytest.raises(ValueError, match="train.lr_horizon=30 must lie after the step the phase starts at \\(40\\)"):
        plan_phase(args(max_iters=100, lr_horizon=30), 1.0, 40, TPS)


def test_requeues_keep_the_phase_plan():
    train = args(max_iters=10_000, max_additional_steps=100)
    first, what = choose_plan(train, 1.0, 500, TPS, saved=None, resumed_lr=0.7)
    assert what == "new" and first.phase_id and (first.start_step, first.stop_step) == (500, 600)
    plan = first
    for step in (530, 571, 599):  # preempted and requeued three times: the stop does not move
        plan, what = choose_plan(train, 1.0, step, TPS, saved=RunPlan.from_dict(plan.to_dict()), resumed_lr=0.1)
        assert what == "kept" and plan == first
    # new_phase left on in a requeued config: still the same phase while the budget is unchanged
    again, what = choose_plan(args(max_iters=10_000, max_additional_steps=100, new_phase=True), 1.0, 550, TPS,
                              saved=first, resumed_lr=0.1)
    assert what == "kept" and again == first


def test_a_changed_budget_needs_new_phase():
    train = args(max_iters=10_000, max_additional_steps=100)
    first, _ = choose_plan(train, 1.0, 500, TPS, saved=None, resumed_lr=None)
    more = args(max_iters=10_000, max_additional_steps=300)
    with pytest.raises(ValueError, match=r"(?s)saved plan:  phase \w+: steps 500 -> 600.*"
                                         r"this config: phase \w+: steps 500 -> 800.*"
                                         r"train.new_phase=true to begin a new phase at step 550: .*steps 550 -> 850"):
        choose_plan(more, 1.0, 550, TPS, saved=first, resumed_lr=None)
    new, what = choose_plan(args(max_iters=10_000, max_additional_steps=300, new_phase=True), 1.0, 550, TPS,
                            saved=first, resumed_lr=None)
    assert what == "replaced" and new.phase_id != first.phase_id and (new.start_step, new.stop_step) == (550, 850)


def test_far_horizon_warning():
    paper = plan_phase(args(max_iters=10_000_000, max_additional_steps=61_000), 3e-4, 0, TPS)
    msg = stop_warning(paper)
    assert msg is not None and "ends at step 10,000,000" in msg and "stops at step 61,000" in msg
    assert "still 99.99% of peak" in msg and "train.lr_horizon" in msg
    assert stop_warning(plan_phase(args(max_iters=1000, max_additional_steps=600), 1.0, 0, TPS)) is None
    assert stop_warning(plan_phase(args(max_iters=10_000_000, max_additional_steps=600, lr_horizon=600),
                                   1.0, 0, TPS)) is None
    assert stop_warning(plan_phase(args(lr_scheduler="constant", max_iters=10_000_000, max_additional_steps=6),
                                   1.0, 0, TPS)) is None
