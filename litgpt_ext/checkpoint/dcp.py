"""Sharded checkpoints with torch.distributed.checkpoint (DCP): every rank writes its own shards.

A full checkpoint gathers the model and optimizer on rank 0, which at 1B+ parameters under FSDP2
is slow and bound by one host's memory. With `speed.checkpoint_format: sharded` a checkpoint is

    out_dir/step-00001000/  sharded/            DCP: .metadata + one __<rank>_0.distcp per rank,
                                                keys model.* and optimizer.* (FQN-keyed)
                            training_state.pth  rank 0: step, tokens, data, RNG, ... (no optimizer)
                            model_config.yaml, hyperparameters.yaml, tokenizer files

It loads under any world size (DCP reshards on load; 1 process needs no process group), and
`litgpt-ext consolidate <ckpt>` writes a litgpt `lit_model.pth` next to it (or to --out_dir) for
evaluate/sft/export. Writes are atomic like full checkpoints: everything goes into
`<name>.tmp/` (on a file system all ranks share) and rank 0 renames it into place.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from litgpt_ext import checkpoint as ckpt

SHARDED_DIR = ckpt.SHARDED_DIR  # "sharded"


def is_sharded(ckpt_dir: Union[str, Path]) -> bool:
    """A checkpoint folder holding a complete DCP checkpoint (DCP writes .metadata last)."""
    return (Path(ckpt_dir) / SHARDED_DIR / ".metadata").is_file()


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _state(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optimizer": optim_sd}


def save_sharded(path: Union[str, Path], model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> Path:
    """Every rank: write this rank's model (and optimizer) shards into the DCP folder `path`.

    Not atomic by itself: `write_sharded_checkpoint` wraps it in the `.tmp` + rename protocol.
    `model` is the unwrapped module (`fabric_model.module`), `optimizer` the torch optimizer.
    """
    import warnings

    import torch.distributed.checkpoint as dcp

    path = Path(path)
    with warnings.catch_warnings():  # one process without a process group is a supported case here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(_state(model, optimizer), storage_writer=dcp.FileSystemWriter(path))
    return path


def load_sharded(ckpt_dir: Union[str, Path], model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """Every rank: load a sharded checkpoint into `model` (and `optimizer`) in their current layout
    (any world size or FSDP2/EP layout; a single process without a process group works too)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    path = Path(ckpt_dir)
    path = path if (path / ".metadata").is_file() else path / SHARDED_DIR
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{str(ckpt_dir)!r} is not a sharded checkpoint: no {SHARDED_DIR}/.metadata in it")
    import warnings

    state = _state(model, optimizer)
    with warnings.catch_warnings():  # one process without a process group is a supported case here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=dcp.FileSystemReader(path))
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def write_sharded_checkpoint(
    ckpt_dir: Union[str, Path],
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer],
    training_state: Optional[dict],
    model_config: Any,
    hparams: dict,
    tokenizer_dir: Optional[Path] = None,
    barrier: Callable[[], None] = _barrier,
    rank: Optional[int] = None,
) -> Path:
    """Every rank: one sharded checkpoint, atomically, through `checkpoint.write_checkpoint`.

    1. rank 0 empties `<ckpt_dir>.tmp/`; barrier
    2. every rank writes its shards into `<ckpt_dir>.tmp/sharded/` (DCP: collective); barrier
    3. rank 0 finishes the folder with `write_checkpoint(prepared=True)`: training_state.pth
       (without the optimizer, which is in the shards), configs, tokenizer, manifest, fsync and the
       rename into place (the same protocol as a full checkpoint); barrier
    `training_state` is only read on rank 0.
    """
    rank = _rank() if rank is None else rank
    ckpt_dir = Path(ckpt_dir)
    tmp = ckpt.tmp_dir_of(ckpt_dir)
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    save_sharded(tmp / SHARDED_DIR, model, optimizer)
    barrier()
    if rank == 0:
        state = {k: v for k, v in (training_state or {}).items() if k != "optimizer"}
        state["checkpoint_format"] = "sharded"
        ckpt.write_checkpoint(ckpt_dir, None, state, model_config, hparams, tokenizer_dir, prepared=True)
    barrier()
    return ckpt_dir


def load_full_model_state(ckpt_dir: Union[str, Path]) -> dict[str, torch.Tensor]:
    """The full (unsharded) model state dict of a sharded checkpoint, in one process, without
    building the model; the optimizer shards are not read."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = Path(ckpt_dir)
    path = path if (path / ".metadata").is_file() else path / SHARDED_DIR
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{str(ckpt_dir)!r} is not a sharded checkpoint: no {SHARDED_DIR}/.metadata in it")
    sd: dict = {}
    # torch's own dcp_to_torch_save uses this planner; `keys` restricts the read to model.*
    _load_state_dict(sd, storage_reader=FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(keys={"model"}),
                     no_dist=True)
    if "model" not in sd:
        raise ValueError(f"sharded checkpoint {str(path)!r} holds no model.* keys")
    return sd["model"]


def consolidate(checkpoint: Path, out_dir: Optional[Path] = None, force: bool = False) -> Path:
    """Convert a sharded (DCP) checkpoint into litgpt's lit_model.pth layout.

    Writes `lit_model.pth` (a full state dict) with the checkpoint's model_config.yaml,
    hyperparameters.yaml and tokenizer files, for evaluate / sft / export.

    Args:
        checkpoint: a sharded checkpoint folder (`step-XXXXXXXX/` or `final/` holding `sharded/`).
        out_dir: where to write (default: into the checkpoint folder itself, next to `sharded/`).
        force: overwrite an existing lit_model.pth.
    """
    src = Path(checkpoint)
    if not is_sharded(src):
        raise FileNotFoundError(f"{str(src)!r} is not a sharded checkpoint: expected {SHARDED_DIR}/.metadata in it")
    dst = Path(out_dir) if out_dir is not None else src
    target = dst / ckpt.MODEL_FILE
    if target.exists() and not force:
        raise FileExistsError(f"{str(target)!r} exists; pass --force to overwrite")
    sd = load_full_model_state(src)
    dst.mkdir(parents=True, exist_ok=True)
    tmp_file = target.with_name(target.name + ".tmp")
    torch.save(sd, tmp_file)  # a bare state dict: litgpt's loaders accept it (`sd.get("model", sd)`)
    with open(tmp_file, "rb") as fh:
        os.fsync(fh.fileno())
    if dst.resolve() != src.resolve():
        for f in sorted(src.iterdir()):
            # not the manifest: it lists the sharded/ files and training state, which an export does not hold
            if f.is_file() and f.name not in (ckpt.STATE_FILE, ckpt.MODEL_FILE, ckpt.MANIFEST_FILE) \
                    and not (dst / f.name).exists():
                shutil.copy2(f, dst / f.name)
    os.replace(tmp_file, target)
    n = sum(t.numel() for t in sd.values())
    print(f"consolidated {src} -> {target} ({len(sd)} tensors, {n:,} values)")
    return target
