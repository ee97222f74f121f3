"""Learning-rate schedules as pure functions of the optimizer step.

Every schedule is `lr = f(step)` with all of its shape fixed by a `Schedule` record, so a resumed
run recomputes exactly the LR it would have had (nothing is stored but the record), and each shape
is tested value by value. Steps count optimizer steps, not micro-batches.

Names (`train.lr_scheduler`):
- `cosine`: linear warmup from 0, cosine to `min_lr` at `end_step` (the run's real horizon).
- `wsd`: warmup, stable at the peak for `stable_steps`, then linear decay to `min_lr` at `end_step`
  (with `stable_steps` unset the run stays stable to the end: branch decays off it later).
- `decay`: linear decay from the LR the run resumed with (`start_lr` at `start_step`) to `min_lr`
  at `end_step`: the cool-down branch of a WSD run.
- `constant`: warmup, then the peak LR.
- `rewarmup_cosine`: midtraining: from `start_step` warm up again from `min_lr` to the peak, then
  cosine to `min_lr` at `end_step`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

SCHEDULES = ("cosine", "wsd", "decay", "constant", "rewarmup_cosine")


@dataclass(frozen=True)
class Schedule:
    name: str
    peak_lr: float
    min_lr: float
    end_step: int  # the step at which the schedule reaches its end (the run's horizon)
    warmup_steps: int = 0
    stable_steps: Optional[int] = None  # wsd only
    start_step: int = 0  # decay / rewarmup_cosine: where this run started (the resumed step)
    start_lr: Optional[float] = None  # decay: the LR the run resumed with (defaults to peak_lr)

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown lr_scheduler {self.name!r}; choose from {', '.join(SCHEDULES)}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup steps must be >= 0, got {self.warmup_steps}")
        if self.stable_steps is not None and self.stable_steps < 0:
            raise ValueError(f"train.stable_steps must be >= 0, got {self.stable_steps}")

    def __call__(self, step: int) -> float:
        return _FUNCS[self.name](self, step)


def _warmup(peak: float, step: int, warmup: int, floor: float = 0.0) -> float:
    """Linear from `floor` at step 0 to `peak` at step `warmup`."""
    return floor + (peak - floor) * step / warmup


def _cosine_tail(s: Schedule, step: int, begin: int) -> float:
    span = s.end_step - begin
    if span <= 0 or step >= s.end_step:
        return s.min_lr
    ratio = min(max((step - begin) / span, 0.0), 1.0)
    return s.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (s.peak_lr - s.min_lr)


def _linear(step: int, begin: int, end: int, lr0: float, lr1: float) -> float:
    if step >= end or end <= begin:
        return lr1
    if step <= begin:
        return lr0
    return lr0 + (lr1 - lr0) * (step - begin) / (end - begin)


def cosine(s: Schedule, step: int) -> float:
    if step < s.warmup_steps:
        return _warmup(s.peak_lr, step, s.warmup_steps)
    return _cosine_tail(s, step, s.warmup_steps)


def wsd(s: Schedule, step: int) -> float:
    if step < s.warmup_steps:
        return _warmup(s.peak_lr, step, s.warmup_steps)
    if s.stable_steps is None:
        return s.peak_lr
    decay_begin = s.warmup_steps + s.stable_steps
    return _linear(step, decay_begin, s.end_step, s.peak_lr, s.min_lr)


def decay(s: Schedule, step: int) -> float:
    start_lr = s.peak_lr if s.start_lr is None else s.start_lr
    return _linear(step, s.start_step, s.end_step, start_lr, s.min_lr)


def constant(s: Schedule, step: int) -> float:
    if step < s.warmup_steps:
        return _warmup(s.peak_lr, step, s.warmup_steps)
    return s.peak_lr


def rewarmup_cosine(s: Schedule, step: int) -> float:
    rel = step - s.start_step
    if rel < s.warmup_steps:
        return _warmup(s.peak_lr, max(rel, 0), s.warmup_steps, floor=s.min_lr)
    return _cosine_tail(s, step, s.start_step + s.warmup_steps)


_FUNCS: dict[str, Callable[[Schedule, int], float]] = {
    "cosine": cosine,
    "wsd": wsd,
    "decay": decay,
    "constant": constant,
    "rewarmup_cosine": rewarmup_cosine,
}


def warmup_steps_for(
    name: str, span: int, lr_warmup_steps: Optional[int], lr_warmup_fraction: Optional[float]
) -> int:
    """Warmup length: `lr_warmup_steps`, or `lr_warmup_fraction` of the steps this schedule spans."""
    if name == "decay":
        return 0
    if lr_warmup_steps is not None:
        return min(int(lr_warmup_steps), max(span, 0))
    if lr_warmup_fraction:
        return int(math.ceil(lr_warmup_fraction * max(span, 0)))
    return 0
