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
        is restored later, by `restore_rng`."""
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        if sharded_from is not None:
            from litgpt_ext.checkpoint import dcp

            dcp.load_sharded(sharded_from, model.module, optimizer.optimizer)
        elif self.optimizer is None:  # none to restore (a merged LoRA checkpoint; a LoRA phase's base): fresh
            fabric.print("Optimizer: the checkpoint holds no optimizer state for this run's parameters; it starts fresh")
        else:
            set_optimizer_state_dict(model.module, optimizer.optimizer, self.optimizer,
                                     options=_state_dict_options(fabric, for_save=False))
        for g, f in zip(optimizer.param_groups, fresh):  # this config's hyperparameters win
            g.update(f)

    def restore_rng(self, fabric: L.Fabric) -> None:
        """This rank's saved RNG (on the same world size), once: `fit` calls it last before the first
        step, after the setup's own draws (a DataLoader iterator draws its base seed from torch's RNG),
        so a resumed run's dropout masks continue the checkpointed run's stream exactly."""
        if self.rng and self.world_size == fabric.world_size:
            _set_rng_state(self.rng[fabric.global_rank])
        self.rng = None


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
