"""The run plan: where a training phase stops and its LR schedule, fixed when the phase begins.

A *phase* begins when a run starts fresh, when it resumes a checkpoint of another run (a fork, or
`resume: <path>` into a new out_dir), or when a resumed run asks for a new budget with
`train.new_phase: true`. The plan (stop step and `Schedule`) is computed once, at the phase's first
step, saved in every checkpoint, and reused unchanged by every requeue, rewind or device-count
change of the phase: `max_additional_steps` counts from the phase's start, not from each resume.

Which phases belong to a run dir is recorded in `out_dir/phases.jsonl` (one line per phase begun
there); a checkpoint whose phase is not listed there was written by another run.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from litgpt_ext.train.args import TrainArgs
from litgpt_ext.train.schedules import Schedule, warmup_steps_for

PHASES_FILE = "phases.jsonl"
FAR_HORIZON = 2.0
"""Warn when the schedule spans more than this many times the steps the phase will train."""


@dataclass(frozen=True)
class RunPlan:
    phase_id: str
    start_step: int  # the step the phase began at
    stop_step: int  # the step the phase stops at
    schedule: Schedule

    def to_dict(self) -> dict:
        return {"phase_id": self.phase_id, "start_step": self.start_step, "stop_step": self.stop_step,
                "schedule": asdict(self.schedule)}

    @classmethod
    def from_dict(cls, d: dict) -> "RunPlan":
        return cls(d["phase_id"], int(d["start_step"]), int(d["stop_step"]), Schedule(**d["schedule"]))

    def same_plan(self, other: "RunPlan") -> bool:
        """Equal stop and schedule (the phase id aside)."""
        return (self.start_step, self.stop_step, self.schedule) == (other.start_step, other.stop_step, other.schedule)

    def describe(self) -> str:
        s = self.schedule
        return (f"phase {self.phase_id}: steps {self.start_step} -> {self.stop_step}, {s.name} LR from step"
                f" {s.start_step} to {s.end_step} (peak {s.peak_lr:g}, min {s.min_lr:g}, warmup {s.warmup_steps})")


def new_phase_id() -> str:
    return uuid.uuid4().hex[:12]


def plan_phase(train: TrainArgs, peak_lr: float, start_step: int, tokens_per_step: int,
               start_lr: Optional[float] = None, phase_id: str = "") -> RunPlan:
    """The plan of a phase that begins at `start_step` (pure: same inputs, same plan).

    The run's total is `min(max_iters, max_tokens // tokens_per_step)`; the phase stops at the
    earliest of that total and `start_step + max_additional_steps`. Whole-run schedules (cosine,
    wsd, constant) span 0 -> total; phase schedules (decay from `start_lr`, rewarmup_cosine) span
    start_step -> stop. `train.lr_horizon` replaces the schedule's end (not the stop).
    """
    name = train.lr_scheduler
    anchored = name in ("decay", "rewarmup_cosine")
    totals = []
    if train.max_iters is not None:
        totals.append(train.max_iters)
    if train.max_tokens is not None:
        totals.append(train.max_tokens // tokens_per_step)
    ends = list(totals)
    if train.max_additional_steps is not None:
        ends.append(start_step + train.max_additional_steps)
    if not ends:
        raise ValueError("no training budget: set train.max_iters, train.max_tokens or train.max_additional_steps")
    stop = min(ends)
    end = stop if (anchored or not totals) else min(totals)
    if train.lr_horizon is not None:
        if train.lr_horizon <= start_step:
            raise ValueError(f"train.lr_horizon={train.lr_horizon} must lie after the step the phase starts at"
                             f" ({start_step})")
        end = train.lr_horizon
    begin = start_step if anchored else 0
    warmup = warmup_steps_for(name, end - begin, train.lr_warmup_steps, train.lr_warmup_fraction)
    schedule = Schedule(name=name, peak_lr=peak_lr, min_lr=train.min_lr, end_step=end, warmup_steps=warmup,
                        stable_steps=train.stable_steps, start_step=begin,
                        start_lr=start_lr if name == "decay" else None)
    return RunPlan(phase_id=phase_id, start_step=start_step, stop_step=stop, schedule=schedule)


def choose_plan(train: TrainArgs, peak_lr: float, step: int, tokens_per_step: int, saved: Optional[RunPlan],
                resumed_lr: Optional[float]) -> tuple[RunPlan, str]:
    """Keep the saved phase's plan, or begin a new phase at `step`; returns (plan, what happened).

    `saved` is the plan of the resumed checkpoint's phase when that phase belongs to this run (None
    for a fresh run, a fork, or a checkpoint of another run). With the same budget keys the saved
    phase recomputes to its saved plan and is kept as is. A changed budget needs
    `train.new_phase: true` (else a ValueError naming both plans): silently moving a requeued run's
    stop step is how a run never finishes.
    """
    if saved is None:
        return plan_phase(train, peak_lr, step, tokens_per_step, resumed_lr, new_phase_id()), "new"
    again = plan_phase(train, peak_lr, saved.start_step, tokens_per_step, saved.schedule.start_lr, saved.phase_id)
    if again.same_plan(saved):
        return saved, "kept"
    fresh = plan_phase(train, peak_lr, step, tokens_per_step, resumed_lr, new_phase_id())
    if train.new_phase:
        return fresh, "replaced"
    raise ValueError(
        f"this config's budget/schedule differs from the plan the run's phase began with.\n"
        f"  saved plan:  {saved.describe()}\n  this config: {again.describe()}\n"
        f"Restore the budget keys to continue the phase (a requeue must not move its stop), or set"
        f" train.new_phase=true to begin a new phase at step {step}: {fresh.describe()}"
    )


def stop_warning(plan: RunPlan) -> Optional[str]:
    """A loud note when the schedule ends far beyond the stop (e.g. `max_iters: 10000000`)."""
    s = plan.schedule
    trained = plan.stop_step - max(plan.start_step, s.start_step)
    if s.name == "constant" or (s.name == "wsd" and s.stable_steps is None):
        return None
    if trained <= 0 or (s.end_step - s.start_step) <= FAR_HORIZON * (plan.stop_step - s.start_step):
        return None
    pct = 100.0 * s(plan.stop_step) / s.peak_lr if s.peak_lr else 0.0
    return (f"WARNING: the LR schedule ends at step {s.end_step:,} but this phase stops at step {plan.stop_step:,}:"
            f" the LR at the stop is still {pct:.2f}% of peak ({s(plan.stop_step):.3e}). If the run's real length"
            f" is shorter (the paper's `max_iters: 10000000` means 'no limit'), set train.lr_horizon to it.")


# ----------------------------------------------------------------------------------------------- phase log


def phases_of(out_dir: Path) -> list[dict]:
    """The phases begun in this run dir, oldest first."""
    path = Path(out_dir) / PHASES_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def record_phase(out_dir: Path, plan: RunPlan, source: Optional[str]) -> None:
    """Append a new phase to `out_dir/phases.jsonl` (rank 0)."""
    row = {**plan.to_dict(), "resumed_from": source}
    with open(Path(out_dir) / PHASES_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
