"""Checkpoints: atomic save, find the latest, resume paths, keep-last-k, and forking a run.

Layout (litgpt-compatible, so `litgpt generate/evaluate/convert` read it as is):

    out_dir/step-00001000/  lit_model.pth        {"model": full unsharded state dict}
                            model_config.yaml    litgpt.utils.save_config
                            hyperparameters.yaml the resolved run config (loadable with --config)
                            tokenizer files      copied from tokenizer_dir
                            training_state.pth   optimizer (full, FQN-keyed: resumes on any device
                                                 count), step, tokens, data loader state, RNG,
                                                 resolved mix, LR schedule record, val baseline
    out_dir/final/          the same at the end of the run

A checkpoint is written into `<name>.tmp/` and renamed into place, so a killed run never leaves a
half-written directory that resume would pick; `*.tmp` directories are ignored and cleaned up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional, Union

import torch
import yaml

MODEL_FILE = "lit_model.pth"
STATE_FILE = "training_state.pth"
HPARAMS_FILE = "hyperparameters.yaml"
FORK_RECORD = "forked_from.json"
STEP_RE = re.compile(r"^step-(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def is_complete(path: Path) -> bool:
    return (path / MODEL_FILE).is_file() and (path / STATE_FILE).is_file()


def list_checkpoints(out_dir: Union[str, Path]) -> list[tuple[int, Path]]:
    """Complete `step-*` checkpoints of a run, oldest first (`*.tmp` and partial dirs skipped)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = []
    for p in out_dir.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir() and is_complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out_dir: Union[str, Path]) -> Optional[Path]:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1][1] if ckpts else None


def checkpoint_dir_of(path: Union[str, Path]) -> Path:
    """A checkpoint folder from the folder itself, a file in it, or a run dir (its latest step)."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    if path.is_dir() and is_complete(path):
        return path
    if path.is_dir():
        latest = latest_checkpoint(path)
        if latest is not None:
            return latest
    raise FileNotFoundError(
        f"{str(path)!r} is not a checkpoint: expected a folder with {MODEL_FILE} and {STATE_FILE}"
        " (or a file in one, or a run dir holding step-* checkpoints)"
    )


def resolve_resume(resume: Union[bool, str, Path], out_dir: Path) -> Optional[Path]:
    """`True`: latest step-* in out_dir (error if none); 'auto': latest or None; a path: that one."""
    if resume is False or resume is None:
        return None
    if resume is True or resume == "auto":
        latest = latest_checkpoint(out_dir)
        if latest is None and resume is True:
            raise FileNotFoundError(
                f"resume=true but {str(out_dir)!r} holds no complete step-* checkpoint; use resume: auto to start"
                " fresh when there is none, or `litgpt-ext fork` to start from another run's checkpoint"
            )
        return latest
    return checkpoint_dir_of(resume)


def _fsync_tree(path: Path) -> None:
    for p in path.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def write_checkpoint(
    ckpt_dir: Path,
    model_state: dict,
    training_state: dict,
    model_config: Any,
    hparams: dict,
    tokenizer_dir: Optional[Path] = None,
) -> Path:
    """Write one checkpoint atomically (rank 0 only): into `<ckpt_dir>.tmp`, then rename."""
    from litgpt.utils import copy_config_files, save_config

    ckpt_dir = Path(ckpt_dir)
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    torch.save({"model": model_state}, tmp / MODEL_FILE)
    torch.save(training_state, tmp / STATE_FILE)
    save_config(model_config, tmp)
    with open(tmp / HPARAMS_FILE, "w", encoding="utf-8") as f:
        yaml.safe_dump(_jsonable(hparams), f, sort_keys=False)
    if tokenizer_dir is not None:
        copy_config_files(Path(tokenizer_dir), tmp)
        save_config(model_config, tmp)  # the tokenizer dir may carry another model's model_config.yaml
    _fsync_tree(tmp)
    if ckpt_dir.exists():  # e.g. `final/` of an earlier invocation: swap, never leave neither in place
        old = ckpt_dir.with_name(ckpt_dir.name + ".old.tmp")
        if old.exists():
            shutil.rmtree(old)
        os.replace(ckpt_dir, old)
        os.replace(tmp, ckpt_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, ckpt_dir)
    return ckpt_dir


def prune_checkpoints(out_dir: Path, keep_last_k: Optional[int]) -> list[Path]:
    """Delete all but the newest `keep_last_k` step-* checkpoints (and stale *.tmp dirs)."""
    removed = []
    for p in Path(out_dir).glob("*.tmp"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    if keep_last_k is None:
        return removed
    for _, p in list_checkpoints(out_dir)[:-keep_last_k]:
        shutil.rmtree(p)
        removed.append(p)
    return removed


def load_training_state(ckpt_dir: Path) -> dict:
    return torch.load(Path(ckpt_dir) / STATE_FILE, map_location="cpu", weights_only=False)


def load_model_state(path: Path) -> dict:
    """Weights from a checkpoint folder or a `lit_model.pth` (litgpt's `{"model": sd}` or a bare sd)."""
    path = Path(path)
    file = path / MODEL_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no {MODEL_FILE} at {str(path)!r}")
    sd = torch.load(file, map_location="cpu", mmap=True, weights_only=False)
    return sd.get("model", sd)


def _link_or_copy(src: Path, dst: Path) -> str:
    try:
        os.link(src, dst)
        return "hardlink"
    except OSError:
        os.symlink(src.resolve(), dst)
        return "symlink"


def fork(source: Path, to: Path, force: bool = False) -> Path:
    """Start a new run from another run's checkpoint, without copying it.

    Makes `<to>/step-XXXXXXXX/` whose files are hard links (or symlinks across file systems) to the
    source checkpoint's files, and records the source in `<to>/forked_from.json`. Then
    `litgpt-ext pretrain --out_dir <to> --resume true` (with the new blend) continues from it, and a
    requeued job resumes from the new run's own latest checkpoint. Checkpoint files are never
    modified in place, so the links are safe.

    Args:
        source: the checkpoint to start from: its folder, a file in it, or a run dir (its latest step).
        to: the new run's out_dir.
        force: allow a `to` that already holds step-* checkpoints.
    """
    src = checkpoint_dir_of(source)
    to = Path(to)
    if list_checkpoints(to) and not force:
        raise FileExistsError(f"{str(to)!r} already holds checkpoints {[p.name for _, p in list_checkpoints(to)]}; pass --force to add a fork")
    m = STEP_RE.match(src.name)
    step = int(m.group(1)) if m else int(load_training_state(src)["step"])
    dst = to / step_dir_name(step)
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    kinds = set()
    for f in sorted(src.iterdir()):
        if f.is_file():
            kinds.add(_link_or_copy(f, tmp / f.name))
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)
    record = {"source": str(src.resolve()), "step": step, "links": sorted(kinds)}
    (to / FORK_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    print(f"forked {src} -> {dst} ({', '.join(sorted(kinds))}); continue with: litgpt-ext pretrain --out_dir {to} --resume true ...")
    return dst
