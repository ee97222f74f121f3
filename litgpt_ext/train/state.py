"""What a checkpoint holds beyond the weights: one `TrainingState`, written and read by the same
code (`to_dict`/`from_dict` over its fields), and the writer that puts it in a checkpoint."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import lightning as L
import numpy as np
import torch

from litgpt_ext import checkpoint as ckpt
from litgpt_ext.train.plan import RunPlan


@dataclass
class TrainingState:
    """Everything but the weights that a resume needs (`training_state.pth`)."""

    step: int = 0  # optimizer steps
    tokens: int = 0
    iter_num: int = 0  # micro-batches on each rank
    lr: Optional[float] = None  # the LR of the last step taken
    phase_id: Optional[str] = None  # the phase this state belongs to (see litgpt_ext.train.plan)
    phase_start: Optional[int] = None
    stop_step: Optional[int] = None
    schedule: Optional[dict] = None  # the phase's `Schedule` record
    val_start: Optional[dict] = None  # each val set's loss when the phase began (early-stop baseline)
    mix: Optional[dict] = None  # the data module's resolved mix
    world_size: int = 1
    config: Optional[dict] = None  # the run's resolved config (as hyperparameters.yaml)
    optimizer: Optional[dict] = None  # full, FQN-keyed: loads on any device count
    data: Optional[dict] = None  # the train loader's state_dict
    mix_policy: Optional[dict] = None  # an online mixing policy's state (litgpt_ext.mix_policy.controller)
    rng: Optional[list] = None  # one RNG state per rank

    # -- (de)serialization: one definition of the contents ----------------------------------------
    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainingState":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})  # older checkpoints: e.g. 'out_dir' dropped

    @classmethod
    def load(cls, ckpt_dir: Path) -> "TrainingState":
        return cls.from_dict(ckpt.load_training_state(ckpt_dir))

    # -- the phase's plan ---------------------------------------------------------------------------
    @property
    def plan(self) -> Optional[RunPlan]:
        if self.phase_id is None or self.schedule is None or self.stop_step is None:
            return None  # a checkpoint from before phases were recorded
        return RunPlan.from_dict({"phase_id": self.phase_id, "start_step": self.phase_start,
                                  "stop_step": self.stop_step, "schedule": self.schedule})

    def set_plan(self, plan: RunPlan) -> None:
        d = plan.to_dict()
        self.phase_id, self.phase_start, self.stop_step, self.schedule = (
            d["phase_id"], d["start_step"], d["stop_step"], d["schedule"])

    # -- live objects -------------------------------------------------------------------------------
    def restore(self, fabric: L.Fabric, model: Any, optimizer: Any, sharded_from: Optional[Path] = None) -> None:
        """Load the optimizer state (keeping this config's hyperparameters). `sharded_from`: a sharded
        checkpoint, whose model and optimizer shards every rank loads here (any world size). The RNG
        is restored later, by `restore_rng`.

        A checkpoint of torch.optim.Muon (+ AdamW) restored into another optimizer (a fork that
        midtrains a Muon run with AdamW) converts: the matrices' Muon momentum is dropped, so their
        moments start fresh (logged), and the other tensors keep their AdamW moments; the reverse is
        `optim.MuonAdamW.load_state_dict`'s. A sharded checkpoint cannot switch between the two (its
        shards are read into this optimizer's own state layout) and is refused in one line."""
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        from litgpt_ext.train import optim

        fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        was_muon, is_muon = self.saved_muon(), isinstance(optimizer.optimizer, optim.MuonAdamW)
        if sharded_from is not None:
            from litgpt_ext.checkpoint import dcp

            if was_muon != is_muon:
                now = type(optimizer.optimizer).__name__
                raise ValueError(
                    f"checkpoint {str(sharded_from)!r} is sharded and holds the state of "
                    f"{'torch.optim.Muon (+ AdamW)' if was_muon else 'a non-Muon optimizer'}; this run's optimizer is "
                    f"{'torch.optim.Muon (+ AdamW)' if is_muon else now}: a sharded checkpoint cannot switch between "
                    f"them. Keep the checkpoint's optimizer, or `litgpt-ext consolidate` it and start from the "
                    f"weights (initial_checkpoint_dir: a fresh optimizer)")
            dcp.load_sharded(sharded_from, model.module, optimizer.optimizer)
        elif self.optimizer is None:  # none to restore (a merged LoRA checkpoint; a LoRA phase's base): fresh
            fabric.print("Optimizer: the checkpoint holds no optimizer state for this run's parameters; it starts fresh")
        else:
            saved, dropped = self.optimizer, 0
            if was_muon and not is_muon:  # before loading: torch's AdamW.__setstate__ reads every state's `step`
                saved, dropped = without_muon_momentum(saved)
                fabric.print(f"Optimizer state: the checkpoint was trained with torch.optim.Muon;"
                             f" {type(optimizer.optimizer).__name__} starts fresh moments for the {dropped} matrices"
                             " Muon updated (their Muon momentum is dropped) and keeps the AdamW moments of the rest")
            set_optimizer_state_dict(model.module, optimizer.optimizer, saved,
                                     options=_state_dict_options(fabric, for_save=False))
        for g, f in zip(optimizer.param_groups, fresh):  # this config's hyperparameters win, and only they
            for k in [k for k in g if k != "params" and k not in f]:  # (no lr_scale or name of an LLRD or Muon
                del g[k]  # checkpoint's groups left in a plain optimizer's)
            g.update(f)

    def restore_rng(self, fabric: L.Fabric) -> None:
        """This rank's saved RNG (on the same world size), once: `fit` calls it last before the first
        step, after the setup's own draws (a DataLoader iterator draws its base seed from torch's RNG),
        so a resumed run's dropout masks continue the checkpointed run's stream exactly."""
        if self.rng and self.world_size == fabric.world_size:
            _set_rng_state(self.rng[fabric.global_rank])
        self.rng = None

    def saved_muon(self) -> bool:
        """Whether the checkpoint's optimizer was torch.optim.Muon (+ AdamW): its config or its groups say so."""
        from litgpt_ext.train import optim

        spec = (self.config or {}).get("optimizer")
        path = spec.get("class_path") if isinstance(spec, dict) else spec
        groups = (self.optimizer or {}).get("param_groups") or []
        return bool(path and optim.is_muon_path(str(path))) or any(g.get("algorithm") == "muon" for g in groups)


def without_muon_momentum(saved: dict) -> tuple[dict, int]:
    """The FQN-keyed optimizer state with an empty state for every parameter that the checkpoint's
    Muon groups held (the optimizer initializes it at its next step), and their count."""
    groups = saved.get("param_groups") or []
    names = {n for g in groups if g.get("algorithm") == "muon" for n in g["params"]}
    if not names:  # no groups recorded: Muon's state is its momentum buffer alone
        names = {n for n, st in (saved.get("state") or {}).items() if set(st) == {"momentum_buffer"}}
    state = {n: ({} if n in names else st) for n, st in (saved.get("state") or {}).items()}
    return {**saved, "state": state}, sum(1 for n in names if n in state)


@dataclass
class CheckpointWriter:
    """Writes `out_dir/<name>/` (weights, TrainingState, configs, tokenizer); rank 0 writes, or with
    `sharded` every rank writes its model and optimizer shards (torch.distributed.checkpoint) first."""

    out_dir: Path
    model_config: Any
    hparams: dict
    tokenizer_dir: Optional[Path] = None
    keep_last_k: Optional[int] = None
    sharded: bool = False
    lora: Optional[Any] = None  # a litgpt_ext.train.lora.LoRARun: write the adapter only (and its lora.json)

    def save(self, fabric: L.Fabric, name: str, model: Any, optimizer: Any, loader: Any,
             state: TrainingState) -> None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        model_sd = None
        if self.sharded:  # into <name>.tmp/sharded/ on every rank; rank 0 adds the rest and renames below
            from litgpt_ext.checkpoint import dcp

            tmp = ckpt.tmp_dir_of(self.out_dir / name)
            if fabric.global_rank == 0 and tmp.exists():
                import shutil

                shutil.rmtree(tmp)
            fabric.barrier()
            ckpt._save_step(tmp, ckpt.SHARDED_DIR, lambda f: dcp.save_sharded(f, model.module, optimizer.optimizer))
            fabric.barrier()
        else:
            opts = _state_dict_options(fabric, for_save=True)
            model_sd = get_model_state_dict(  # LoRA: the frozen base is neither gathered nor written
                model.module, options=_state_dict_options(fabric, for_save=True, frozen=self.lora is None))
            state.optimizer = get_optimizer_state_dict(model.module, optimizer.optimizer, options=opts)
        state.rng = _gather_rng(fabric)
        state.data = loader.state_dict()
        state.world_size, state.config = fabric.world_size, self.hparams
        if fabric.global_rank == 0:
            lora = {} if self.lora is None else {"model_file": self.lora.model_file, "extra_files": self.lora.record()}
            path = ckpt.write_checkpoint(self.out_dir / name, model_sd, state.to_dict(), self.model_config,
                                         self.hparams, self.tokenizer_dir, prepared=self.sharded, **lora)
            if name.startswith("step-"):
                ckpt.prune_checkpoints(self.out_dir, self.keep_last_k)
            fabric.print(f"Saved {path}")
        state.optimizer = state.rng = None  # not kept alive between saves
        fabric.barrier()


def _state_dict_options(fabric: L.Fabric, for_save: bool, frozen: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    dist = fabric.world_size > 1
    if for_save:
        return StateDictOptions(full_state_dict=dist, cpu_offload=dist, ignore_frozen_params=not frozen)
    return StateDictOptions(full_state_dict=dist, broadcast_from_rank0=False)


def rng_neutral(loader: Any) -> Iterator:
    """The loader's batches, fetched without touching torch's CPU RNG: a DataLoader draws its workers'
    base seed from it on the first batch, which would leave a resumed run (whose first batch is another
    step's) one draw off the checkpointed run's RNG stream, and its dropout masks different."""
    it = iter(loader)
    while True:
        with torch.random.fork_rng(devices=[]):
            try:
                batch = next(it)
            except StopIteration:
                return
        yield batch


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _gather_rng(fabric: L.Fabric) -> list:
    if fabric.world_size == 1:
        return [_rng_state()]
    import torch.distributed as dist

    out = [None] * fabric.world_size
    dist.all_gather_object(out, _rng_state())
    return out
