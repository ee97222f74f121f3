"""The phase a run trains in: keep the resumed phase's plan or begin a new one (moved out of loop.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning as L

from litgpt_ext.train.args import TrainArgs
from litgpt_ext.train.plan import RunPlan, choose_plan, phases_of, stop_warning
from litgpt_ext.train.state import TrainingState


def phase_plan(fabric: L.Fabric, out_dir: Path, train: TrainArgs, peak_lr: float, tokens_per_step: int,
                state: TrainingState, saved: Optional[TrainingState]) -> tuple[RunPlan, str]:
    """Keep the resumed phase's plan when the phase belongs to this run dir, else begin a new phase.

    Rank 0 decides (it reads out_dir/phases.jsonl and draws the new phase id) and broadcasts. A new
    phase is recorded by `main` once the whole setup has succeeded (a refused config leaves no trace).
    """
    decision = None
    if fabric.global_rank == 0:
        own = {p["phase_id"] for p in phases_of(out_dir)}
        old = saved.plan if saved is not None else None
        try:
            plan, what = choose_plan(train, peak_lr, state.step, tokens_per_step,
                                     old if (old is not None and old.phase_id in own) else None, state.lr)
            decision = (plan.to_dict(), what, None)
        except ValueError as e:
            decision = (None, None, str(e))
    plan_d, what, error = fabric.broadcast(decision, src=0)
    if error is not None:
        raise ValueError(error)
    plan = RunPlan.from_dict(plan_d)
    old = saved.plan if saved is not None else None
    if what == "kept":
        fabric.print(f"Continuing {plan.describe()}")
    else:
        fabric.print("=" * 100 + f"\nNew {plan.describe()}"
                     + (f"\n  previous: {old.describe()}" if old is not None else "")
                     + ("\n  (train.new_phase: the budget/schedule changed)" if what == "replaced" else "")
                     + "\n" + "=" * 100)
    warning = stop_warning(plan)
    if warning:
        fabric.print("!" * 100 + "\n" + warning + "\n" + "!" * 100)
    return plan, what
