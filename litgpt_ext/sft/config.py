"""The `sft` run's configuration and its plan (steps, warmup, schedule) as pure, tested code.

The `litgpt-ext sft` command (`litgpt_ext.sft.run.sft`; `SFTConfig`'s fields are its arguments,
one per top-level YAML key of `midtrain_configs/sft/*.yaml`):

    litgpt-ext sft --config midtrain_configs/sft/demo_math.yaml [--train.lr ...] [--seed ...]

`SFTConfig.from_yaml` parses and validates such a file without building a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from litgpt_ext.train.schedules import Schedule


@dataclass
class SFTTrainArgs:
    """SFT training: epochs over the SFT set, litgpt's batch keys, warmup fraction then cosine to `min_lr`.

    litgpt's `TrainArgs` is not subclassed: most of its knobs (max_tokens, max_steps, lr_warmup_steps,
    tie_embeddings, ...) mean nothing for an epoch-based SFT run, and a knob that does nothing must
    be refused, not accepted.
    """

    epochs: int = 4
    """Passes over the SFT training set (the paper: 4)"""
    global_batch_size: int = 64
    """Examples per optimizer step over all ranks (the paper: 64)"""
    micro_batch_size: int = 16
    """Examples per forward pass and rank (the paper: 16)"""
    lr_warmup_fraction: float = 0.1
    """Linear warmup over this fraction of all SFT steps, then cosine (the paper: 10%)"""
    min_lr: float = 0.0
    """LR at the last step (the paper: 0)"""
    max_seq_length: Optional[int] = None
    """Examples are cut to this many tokens (counted and logged); None: the model's block size"""
    log_interval: int = 1
    """Optimizer steps between log lines"""
    save_interval: Optional[int] = None
    """Optimizer steps between resumable checkpoints (None: only `final`, plus preemption saves)"""
    max_norm: Optional[float] = 1.0
    """Gradient clipping norm (None: no clipping)"""
    keep_last_k: Optional[int] = None
    """Keep only the newest k `step-*` checkpoints of this run (None: keep all)"""
    allow_zero_lr: bool = False
    """Allow `optimizer.init_args.lr: 0` (a no-update control run: weights stay the source's); a
    negative LR is always refused"""

    def __post_init__(self) -> None:
        for name in ("epochs", "global_batch_size", "micro_batch_size", "log_interval", "save_interval",
                     "max_seq_length", "keep_last_k"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"train.{name} must be positive, got {v}")
        if not 0.0 <= self.lr_warmup_fraction < 1.0:
            raise ValueError(f"train.lr_warmup_fraction must be in [0, 1), got {self.lr_warmup_fraction}")
        if self.min_lr < 0:
            raise ValueError(f"train.min_lr must be >= 0, got {self.min_lr}")

    def accumulation_steps(self, world_size: int) -> int:
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ValueError(f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                             f"micro_batch_size ({self.micro_batch_size}) x data-parallel ranks ({world_size})")
        return self.global_batch_size // per_step


@dataclass
class SFTEvalArgs:
    """SFT validation: a full pass over the SFT val set, plus named token-shard sets (forgetting)."""

    interval: Optional[int] = None
    """Optimizer steps between validations (None: once per epoch)"""
    val_data_path: dict[str, Union[str, list[str]]] = field(default_factory=dict)
    """Named token-shard sets read as in pretraining, e.g. {general: [data/demo/val/1, data/demo/val/2]}"""
    max_iters: Optional[int] = 100
    """Batches per token-shard set and rank at most (None: all); the SFT val set is always read in full"""
    initial_validation: bool = True
    """Validate before the first step (the losses of the source checkpoint)"""

    def __post_init__(self) -> None:
        if self.interval is not None and self.interval <= 0:
            raise ValueError(f"eval.interval must be positive, got {self.interval}")
        if self.max_iters is not None and self.max_iters <= 0:
            raise ValueError(f"eval.max_iters must be positive, got {self.max_iters}")
        if "sft" in self.val_data_path:
            raise ValueError("eval.val_data_path: the name 'sft' is the SFT validation set's; rename that set")


@dataclass
class SFTPlan:
    """What an SFT run will do, from the data size and the batch settings."""

    batches_per_epoch: int  # micro-batches per rank and epoch (the SFT loader's len)
    accumulation: int  # micro-batches per optimizer step and rank
    total_steps: int  # optimizer steps: ceil(epochs * batches_per_epoch / accumulation)
    warmup_steps: int
    eval_interval: int  # optimizer steps
    spill_batches: int  # micro-batches the last step reads from epoch `epochs + 1` (0 when it divides)
    schedule: Schedule

    def lr(self, step: int) -> float:
        return self.schedule(step)


def sft_plan(num_train_examples: int, train: SFTTrainArgs, eval: SFTEvalArgs, world_size: int, peak_lr: float) -> SFTPlan:
    """Steps, warmup and the LR schedule (warmup fraction, then cosine to `min_lr` at the last step).

    An optimizer step always sums `accumulation` micro-batches; when the epochs' micro-batches do
    not divide evenly, the last step reads `spill_batches` from the next (seeded) epoch rather than
    dropping examples of the last one.
    """
    if num_train_examples <= 0:
        raise ValueError("the SFT training set is empty")
    accum = train.accumulation_steps(world_size)
    per_epoch = math.ceil(num_train_examples / (train.micro_batch_size * world_size))
    total_micro = train.epochs * per_epoch
    total = math.ceil(total_micro / accum)
    warmup = int(math.ceil(train.lr_warmup_fraction * total))
    interval = eval.interval if eval.interval is not None else max(1, per_epoch // accum)
    sched = Schedule(name="cosine", peak_lr=peak_lr, min_lr=train.min_lr, end_step=total, warmup_steps=warmup)
    return SFTPlan(per_epoch, accum, total, warmup, interval, total * accum - total_micro, sched)


def check_peak_lr(lr: float, allow_zero: bool = False, min_lr: float = 0.0) -> None:
    """A peak LR that cannot train (0, negative, nan, inf) would still run and report like a real run."""
    if lr == 0 and allow_zero:
        return
    if not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"optimizer.init_args.lr={lr:g}: the peak LR must be a positive finite number (an LR of 0 "
                         "trains nothing but reports like a real run; for a deliberate no-update control run set "
                         "train.allow_zero_lr: true)")
    if min_lr > lr:
        raise ValueError(f"train.min_lr={min_lr:g} exceeds the peak LR optimizer.init_args.lr={lr:g}: the cosine "
                         "would rise; set min_lr <= lr")


@dataclass
class SFTConfig:
    """One SFT run: the arguments of `litgpt-ext sft` (= the top-level keys of an SFT YAML).

    checkpoint_dir: the source checkpoint (`step-*`, `final`, a fork, a converted litgpt model);
        weights only, fresh optimizer; its model config and tokenizer are used.
    out_dir: the SFT run folder (checkpoints, sft_metrics.json, val_metrics.csv, logs).
    data: the SFT data module, `{class_path: litgpt_ext.sft.data.SFTData, init_args: {...}}`.
    """

    checkpoint_dir: Path
    out_dir: Path
    data: dict[str, Any]
    train: SFTTrainArgs = field(default_factory=SFTTrainArgs)
    eval: SFTEvalArgs = field(default_factory=SFTEvalArgs)
    optimizer: Union[str, dict[str, Any]] = "AdamW"
    resume: Union[bool, str, Path] = "auto"
    precision: Optional[str] = None
    devices: Union[int, str, None] = None
    num_nodes: Optional[int] = None
    logger_name: str = "csv"
    seed: int = 42
    regularizer: Optional[dict[str, Any]] = None

    def __post_init__(self) -> None:
        self.checkpoint_dir, self.out_dir = Path(self.checkpoint_dir), Path(self.out_dir)
        if isinstance(self.train, dict):
            self.train = SFTTrainArgs(**self.train)
        if isinstance(self.eval, dict):
            self.eval = SFTEvalArgs(**self.eval)
        cp = self.data.get("class_path") if isinstance(self.data, dict) else None
        if cp != "litgpt_ext.sft.data.SFTData":
            raise ValueError(f"data.class_path must be litgpt_ext.sft.data.SFTData, got {cp!r}")
        if self.out_dir.resolve() == self.checkpoint_dir.resolve().parent:
            raise ValueError(f"out_dir {str(self.out_dir)!r} is the source run's folder; SFT writes its own "
                             "checkpoints, give it a separate folder")

    @property
    def peak_lr(self) -> float:
        if isinstance(self.optimizer, dict):
            lr = (self.optimizer.get("init_args") or {}).get("lr")
            if lr is not None:
                try:
                    lr = float(lr)
                except (TypeError, ValueError):
                    raise ValueError(f"optimizer.init_args.lr={lr!r} is not a number") from None
                check_peak_lr(lr, self.train.allow_zero_lr, self.train.min_lr)
                return lr
        raise ValueError("optimizer.init_args.lr is not set: SFT needs an explicit peak LR (the grid sweeps it)")

    def build_data(self):
        """The SFTData module from `data.init_args` (jsonargparse-style dict, checked by the constructor)."""
        from litgpt_ext.sft.data import SFTData

        return SFTData(**self.data.get("init_args", {}))

    @classmethod
    def from_yaml(cls, path: Union[str, Path], **overrides: Any) -> "SFTConfig":
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"SFT config {str(path)!r} does not exist")
        d = yaml.safe_load(path.read_text()) or {}
        d.update(overrides)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; known: {sorted(known)}")
        for name, sub in (("train", SFTTrainArgs), ("eval", SFTEvalArgs)):
            bad = sorted(set(d.get(name) or {}) - set(sub.__dataclass_fields__))
            if bad:
                raise ValueError(f"{path}: unknown {name} keys {bad}; known: {sorted(sub.__dataclass_fields__)}")
        return cls(**d)
