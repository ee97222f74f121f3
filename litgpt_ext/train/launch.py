"""The one launch path of every stage (pretraining, midtraining, SFT, a grid cell) and what a run returns.

`launch` builds the logger and the Fabric strategy, starts Fabric, runs the stage's body (which
calls `loop.main`: lock, resume, plan, `fit`), finalizes the loggers, and sends a preempted run
through the one preemption exit (`litgpt_ext.preempt.exit_preempted`: every rank waits for the
checkpoint, rank 0 writes the requeue marker, then exit 99). A stage adds a config, a data module
that satisfies `LoopData` and a loss; it does not write its own start-up or exit.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, runtime_checkable

from litgpt_ext import preempt

STOPS = ("budget", "early_stop", "preempted", "paused", "finished")
"""Why a run stopped: its step budget, early stopping, a preemption signal (checkpoint saved, exit
99), `train.pause_at_step` (a segment; no final/), or it had finished before this invocation."""


@dataclass
class RunResult:
    """What one invocation of the loop did."""

    stopped: str  # one of STOPS
    step: int
    tokens: int
    losses: dict[int, float] = field(default_factory=dict)  # logged training loss per step
    val: list[dict] = field(default_factory=list)  # validation rows: step, tokens, set, loss
    val_start: Optional[dict] = None  # the phase's baseline validation loss per set
    schedule: dict = field(default_factory=dict)
    plan: dict = field(default_factory=dict)
    signal: Optional[int] = None  # the preemption signal, when stopped == "preempted"
    metrics: Any = None  # the stage's own summary (SFT: its SFTMetrics)

    def __post_init__(self) -> None:
        if self.stopped not in STOPS:
            raise ValueError(f"RunResult.stopped={self.stopped!r}; one of {', '.join(STOPS)}")


@runtime_checkable
class LoopData(Protocol):
    """What the loop needs of a data module (litgpt_ext.data.ShardedMixedDataset, litgpt_ext.sft.data.SFTData):
    litgpt's DataModule hooks, `setup` that shards by rank, and a train loader whose position is
    checkpointed (`state_dict()`/`load_state_dict()`) for exact resume. Optional: `set_phase(start,
    stop, global_batch)` (mix schedules, repetition caps) and `resolved_mix` (recorded per checkpoint)."""

    def connect(self, tokenizer: Any = None, batch_size: int = 1, max_seq_length: Optional[int] = None) -> None: ...

    def prepare_data(self) -> None: ...

    def setup(self, rank: int = 0, world_size: int = 1) -> None: ...

    def train_dataloader(self) -> Any: ...


def check_data_module(data: Any) -> None:
    """The loop shards data by rank and resumes its cursors: it needs the ShardedMixedDataset interface."""
    params = inspect.signature(data.setup).parameters if isinstance(data, LoopData) else {}
    if not {"rank", "world_size"} <= set(params):
        raise ValueError(
            f"data module {type(data).__name__} is not supported: the loop needs one whose setup(rank=, world_size=)"
            " shards by rank and whose train loader has state_dict()/load_state_dict() for exact resume, such as"
            " litgpt_ext.data.ShardedMixedDataset (prepare other data with `litgpt-ext prepare`)"
        )


def launch(
    body: Callable[[Any], RunResult],
    *,
    out_dir: Path,
    run_name: str,
    devices: int,
    num_nodes: int,
    precision: str,
    strategy: Any,
    logger_name: str,
    resume: bool,
    log_interval: int,
    log_args: Optional[dict] = None,
    preempt_exit_code: int = preempt.PREEMPT_EXIT_CODE,
) -> tuple[Any, RunResult]:
    """Start Fabric for one run and run `body(fabric)`; returns (fabric, result) unless preempted,
    in which case this exits `preempt_exit_code` on every rank after the marker is written."""
    import lightning as L
    from litgpt.utils import choose_logger

    kw = {"log_args": log_args} if log_args is not None else {}
    logger = choose_logger(logger_name, Path(out_dir), name=run_name, resume=resume, log_interval=log_interval, **kw)
    # on a machine with SLURM installed, Lightning warns on every run not under srun (a local run is on purpose)
    __import__("warnings").filterwarnings("ignore", message="The `srun` command is available on your system")
    fabric = L.Fabric(devices=devices, num_nodes=num_nodes, strategy=strategy, precision=precision, loggers=[logger])
    fabric.launch()
    try:
        result = body(fabric)
    finally:
        for lg in fabric.loggers:
            lg.finalize("success")
    if result.stopped == "preempted":
        preempt.exit_preempted(fabric, result.step, result.signal, preempt_exit_code)
    return fabric, result


@contextmanager
def preemption():
    """The one place the loop takes the preemption flag (installed by the CLI at start-up, so a signal
    that came while torch loaded is kept) and puts the previous handlers back."""
    flag = preempt.shared_flag()
    try:
        yield flag
    finally:
        flag.restore()


def preempt_requested(fabric: Any, flag: preempt.PreemptFlag) -> bool:
    """Did any rank get a preemption signal? (all ranks must stop at the same step boundary)"""
    import torch

    if fabric.world_size == 1:
        return flag.signum is not None
    t = torch.tensor(1.0 if flag.signum is not None else 0.0, device=fabric.device)
    return bool(fabric.all_reduce(t, reduce_op="max") > 0)
