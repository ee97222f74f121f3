"""Training and evaluation arguments: litgpt's `TrainArgs`/`EvalArgs` plus the paper's keys."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, TypedDict

from litgpt.args import EvalArgs as _LitEvalArgs
from litgpt.args import TrainArgs as _LitTrainArgs

from litgpt_ext.train.schedules import SCHEDULES


@dataclass
class TrainArgs(_LitTrainArgs):
    """Training arguments (litgpt's, with the paper's budget and schedule keys).

    Budgets count optimizer steps of `global_batch_size` sequences. A phase stops at the earliest of
    `max_iters`, `max_tokens // (global_batch_size * max_seq_length)` and `phase start +
    max_additional_steps`, fixed when the phase begins (see `litgpt_ext.train.plan`).
    """

    lr_warmup_steps: Optional[int] = None
    """Warmup length in optimizer steps (exclusive with `lr_warmup_fraction`)"""
    lr_warmup_fraction: Optional[float] = None
    """Warmup length as a fraction of the steps the schedule spans"""
    max_iters: Optional[int] = None
    """Total optimizer steps of the run (the paper's key; litgpt's `max_steps` is an alias)"""
    max_additional_steps: Optional[int] = None
    """Optimizer steps beyond the step this phase began at (midtraining budget; requeues keep it)"""
    lr_scheduler: Literal["cosine", "wsd", "decay", "constant", "rewarmup_cosine"] = "cosine"
    """LR schedule; see `litgpt_ext.train.schedules`"""
    stable_steps: Optional[int] = None
    """`wsd`: optimizer steps at the peak LR after warmup before the linear decay"""
    max_norm: Optional[float] = 1.0
    """Gradient clipping norm (None: no clipping, the norm is still logged)"""
    keep_last_k: Optional[int] = None
    """Keep only the newest k `step-*` checkpoints of this run (None: keep all)"""
    lr_horizon: Optional[int] = None
    """Optimizer step at which the LR schedule ends (reaches min_lr), when it is not the budget's
    total: e.g. the real length of a run whose config says `max_iters: 10000000` ("no limit")"""
    pause_at_step: Optional[int] = None
    """Save a checkpoint at this optimizer step and exit 0 without finishing; the plan (stop, LR
    schedule, mix) is unchanged and the next `resume: auto` start continues. `litgpt-ext sweep`
    splits a base run into SLURM jobs at its fork steps with it, so an arm starts as soon as its
    fork point exists. A run already at or past it has nothing to do in this job and exits 0"""
    new_phase: bool = False
    """Resume with a changed budget/schedule: start a new phase (plan) from the resumed step. Without
    it a resumed run keeps the plan fixed when its phase began; safe to leave on across requeues"""

    def __post_init__(self) -> None:
        _refuse_unused(self, "train", {"epochs": None, "max_time": None, "tie_embeddings": None},
                       "set the budget with max_iters, max_tokens or max_additional_steps; tie weights in model_config")
        if self.lr_warmup_fraction is not None and not 0 <= self.lr_warmup_fraction <= 1:
            raise ValueError(f"train.lr_warmup_fraction must be in [0, 1], got {self.lr_warmup_fraction}")
        super().__post_init__()
        if self.lr_scheduler not in SCHEDULES:
            raise ValueError(f"unknown train.lr_scheduler {self.lr_scheduler!r}; choose from {', '.join(SCHEDULES)}")
        if self.max_iters is None and self.max_steps is not None:
            self.max_iters = self.max_steps
        for name in ("max_iters", "max_additional_steps", "max_tokens", "keep_last_k", "save_interval",
                     "log_interval", "max_seq_length", "pause_at_step"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"train.{name} must be positive, got {v}")
        for name in ("lr_warmup_steps", "stable_steps"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"train.{name} must be >= 0, got {v}")
        if self.min_lr is None or self.min_lr < 0:
            raise ValueError(f"train.min_lr must be >= 0, got {self.min_lr}")
        if self.max_norm is not None and self.max_norm <= 0:
            raise ValueError(f"train.max_norm must be positive (or null: no clipping), got {self.max_norm}")
        if self.micro_batch_size <= 0 or self.global_batch_size <= 0:
            raise ValueError(
                f"train.micro_batch_size and train.global_batch_size must be positive, got"
                f" {self.micro_batch_size} and {self.global_batch_size}"
            )

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each rank; the global batch must split evenly."""
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} is not a multiple of"
                f" micro_batch_size ({self.micro_batch_size}) x data-parallel ranks ({world_size})"
            )
        return self.global_batch_size // per_step


@dataclass
class EvalArgs(_LitEvalArgs):
    """Evaluation on the named validation sets (`data.val_data_path: {name: path}`)."""

    interval: int = 1000
    """Optimizer steps between evaluations"""
    max_iters: int = 100
    """Batches per validation set and rank at most"""
    initial_validation: bool = True
    """Evaluate before the first step: the baseline that forgetting is measured against"""
    early_stop: Optional[dict[str, float]] = None
    """{set name: max loss increase}: stop (and checkpoint) when a set's loss rises more than that
    above its value at the start of this run, e.g. {general: 0.5}"""

    def __post_init__(self) -> None:
        _refuse_unused(self, "eval", {"max_new_tokens": None, "evaluate_example": "first"},
                       "pretraining validation computes losses only; it generates nothing")
        if self.interval <= 0:
            raise ValueError(f"eval.interval must be positive, got {self.interval}")
        if self.max_iters <= 0:
            raise ValueError(f"eval.max_iters must be positive, got {self.max_iters}")
        for name, limit in (self.early_stop or {}).items():
            if not isinstance(limit, (int, float)) or limit < 0:
                raise ValueError(f"eval.early_stop[{name!r}] must be a loss increase >= 0, got {limit!r}")


def _refuse_unused(args, group: str, unused: dict, hint: str) -> None:
    """Refuse litgpt's inherited knobs this loop does not implement, as litgpt's `validate_args` does:
    a value that would be silently ignored is an error naming the knob."""
    bad = [f"{group}.{k}={getattr(args, k)!r}" for k, default in unused.items() if getattr(args, k) != default]
    if bad:
        raise ValueError(f"{', '.join(bad)}: not supported by litgpt-ext pretrain (it would be ignored); remove it"
                         f" ({hint}). Unsupported in {group}: {', '.join(unused)}")


# ----------------------------------------------------------------------------------------------- regularizer

REGULARIZERS = ("ewc", "l2_anchor")
L2_FRESH = ("regularizer.type=l2_anchor anchors to the weights the run starts from, and a fresh pretrain has none:"
            " midtrain from a checkpoint (fork_from, resume, or initial_checkpoint_dir)")
# the YAML section as jsonargparse parses it: a TypedDict, because its key `lambda` (the name
# for the strength) is a Python keyword that no dataclass field can carry; `RegularizerArgs.parse`
# turns it into the typed, checked dataclass the loop uses
RegularizerConfig = TypedDict("RegularizerConfig", {
    "type": str, "lambda": float, "reference": Optional[str], "fisher_data": Optional[str], "fisher_batches": int,
}, total=False)
RegularizerConfig.__doc__ = ("Forgetting regularizer: {type: ewc, lambda: λ, reference: <checkpoint>, fisher_data:"
                             " train | <val set name or path>, fisher_batches: N} or {type: l2_anchor, lambda: λ}")


@dataclass(frozen=True)
class RegularizerArgs:
    """A checked `regularizer:` section (see `litgpt_ext.train.regularize`)."""

    type: str
    """ewc (λ/2 Σ F·(θ − θ*)², θ* and the diagonal Fisher F of `reference`) or l2_anchor
    (L2-SP: λ/2 Σ (θ − θ0)², θ0 the weights this phase started from)"""
    lam: float
    """λ >= 0 (the YAML key is `lambda`)"""
    reference: Optional[Path] = None
    """ewc: the checkpoint θ* and the Fisher come from (a folder, full or sharded)"""
    fisher_data: str = "train"
    """ewc: `train` (the run's mix, from its start) or a validation set's name or path"""
    fisher_batches: int = 8
    """ewc: global batches (train.global_batch_size sequences each) the Fisher averages over"""

    @classmethod
    def parse(cls, cfg, fresh: bool = False) -> Optional["RegularizerArgs"]:
        """The dataclass of a `regularizer:` mapping (None: none); a bad value is one ValueError naming it.
        `fresh`: the run starts from no checkpoint (no resume, fork_from or initial_checkpoint_dir)."""
        if cfg is None or isinstance(cfg, cls):
            return cfg
        if not isinstance(cfg, dict):
            raise ValueError(f"regularizer must be a mapping such as {{type: ewc, lambda: 0.1, ...}}, got {cfg!r}")
        known = ("type", "lambda", "reference", "fisher_data", "fisher_batches")
        unknown = sorted(set(cfg) - set(known))
        if unknown:
            raise ValueError(f"regularizer: unknown key(s) {unknown}; valid: {', '.join(known)}")
        kind = cfg.get("type")
        if kind not in REGULARIZERS:
            raise ValueError(f"regularizer.type={kind!r} is not valid; choose from: {', '.join(REGULARIZERS)}")
        lam = cfg.get("lambda")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)):
            raise ValueError(f"regularizer.lambda (the penalty's strength, >= 0) is required for {kind}, got {lam!r}")
        if not lam >= 0:  # NaN too
            raise ValueError(f"regularizer.lambda must be >= 0, got {lam}")
        if kind == "l2_anchor":
            extra = sorted(k for k in ("reference", "fisher_data", "fisher_batches") if cfg.get(k) is not None)
            if extra:
                raise ValueError(f"regularizer.type=l2_anchor anchors to the phase's start weights; {extra} are for"
                                 " ewc only: remove them")
            if fresh:
                raise ValueError(L2_FRESH)
            return cls(kind, float(lam))
        if cfg.get("reference") in (None, ""):
            raise ValueError("regularizer.type=ewc needs regularizer.reference: the checkpoint whose weights θ* and"
                             " Fisher anchor the run (e.g. the checkpoint the run forks from)")
        n = cfg.get("fisher_batches", 8)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"regularizer.fisher_batches must be an integer >= 1, got {n!r}")
        ref = Path(cfg["reference"])
        if not ref.exists():
            raise FileNotFoundError(f"regularizer.reference {str(ref)!r} does not exist")
        return cls(kind, float(lam), ref, str(cfg.get("fisher_data") or "train"), n)
