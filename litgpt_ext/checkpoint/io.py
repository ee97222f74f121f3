"""Writing a checkpoint atomically (into `<name>.tmp/`, then rename), pruning, loading weights."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

from litgpt_ext.checkpoint.layout import (
    _WRAPPER_PREFIXES,
    CONFIG_FILE,
    HF_CONFIG_FILE,
    HPARAMS_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    STATE_FILE,
    CheckpointError,
    _sha256,
    adapter_hint,
)
from litgpt_ext.checkpoint.select import list_checkpoints


def _files(path: Path) -> list[Path]:
    """Every file under `path` (sharded/ included), sorted."""
    return sorted(p for p in Path(path).rglob("*") if p.is_file())


def _fsync_tree(path: Path) -> None:
    for p in _files(path):
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


def _save_step(tmp: Path, name: str, write: Callable[[Path], None]) -> None:
    """One file of a checkpoint; a failure names the file and the cause (disk full, quota, ...)."""
    file = tmp / name
    try:
        write(file)
    except Exception as e:
        cause = e
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        no_space = (isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)) or "unexpected pos" in str(e)
        try:
            free = shutil.disk_usage(tmp).free
        except OSError:
            free = -1
        written = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()) if tmp.is_dir() else 0
        shutil.rmtree(tmp, ignore_errors=True)
        reason = ("the disk is full or over quota" if no_space or 0 <= free < (1 << 20)
                  else f"{type(cause).__name__}: {cause}")
        raise CheckpointError(
            errno.ENOSPC if no_space else getattr(cause, "errno", None) or errno.EIO,
            f"writing {file} failed: {reason} ({free / 2**30:.2f} GiB free on its file system after"
            f" {written / 2**30:.2f} GiB of this checkpoint; raw error: {e}). The partial checkpoint was removed;"
            " earlier checkpoints are intact. Free space (or lower keep_last_k) and resume.",
        ) from e


def write_checkpoint(
    ckpt_dir: Path,
    model_state: dict,
    training_state: dict,
    model_config: Any,
    hparams: dict,
    tokenizer_dir: Optional[Path] = None,
    prepared: bool = False,
    model_file: str = MODEL_FILE,
    extra_files: Optional[dict[str, str]] = None,
) -> Path:
    """Write one checkpoint atomically (rank 0 only): into `<ckpt_dir>.tmp`, then rename.

    prepared=True: `<ckpt_dir>.tmp/` already holds what all ranks wrote (sharded/); it is kept and
    `model_state` may be None. The manifest lists every file, sharded/* included. `model_file`: the
    weights' file name (a LoRA adapter: lit_model.pth.lora); `extra_files`: {name: text} written too.
    """
    import torch
    import yaml
    from litgpt.utils import copy_config_files, save_config

    ckpt_dir = Path(ckpt_dir)
    tmp = tmp_dir_of(ckpt_dir)
    if not prepared:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    if model_state is not None:
        _save_step(tmp, model_file, lambda f: torch.save(model_state, f))  # bare: litgpt's own format
    for name, text in (extra_files or {}).items():
        _save_step(tmp, name, lambda f, text=text: f.write_text(text))
    _save_step(tmp, STATE_FILE, lambda f: torch.save(training_state, f))

    def hparams_yaml(f: Path) -> None:
        with open(f, "w", encoding="utf-8") as fh:
            yaml.safe_dump(_jsonable(hparams), fh, sort_keys=False)

    _save_step(tmp, HPARAMS_FILE, hparams_yaml)
    if tokenizer_dir is not None:
        _save_step(tmp, "tokenizer files", lambda f: copy_config_files(Path(tokenizer_dir), tmp))
    # after the tokenizer files: the tokenizer dir may carry another model's configs
    _save_step(tmp, CONFIG_FILE, lambda f: save_config(model_config, tmp))
    (tmp / HF_CONFIG_FILE).unlink(missing_ok=True)
    from litgpt_ext.checkpoint.hf import hf_config_json  # lazily: it needs litgpt (and transformers)

    hf = hf_config_json(model_config, tokenizer_dir)
    if hf is not None:
        _save_step(tmp, HF_CONFIG_FILE, lambda f: f.write_text(hf))
    files = {p.relative_to(tmp).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in _files(tmp)}
    manifest = {"format": 1, "step": int(training_state.get("step", 0)), "files": files}
    _save_step(tmp, MANIFEST_FILE, lambda f: f.write_text(json.dumps(manifest, indent=1) + "\n"))
    _save_step(tmp, "(fsync)", lambda f: _fsync_tree(tmp))
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


def tmp_dir_of(ckpt_dir: Path) -> Path:
    """Where a checkpoint is written before its atomic rename."""
    return Path(ckpt_dir).with_name(Path(ckpt_dir).name + ".tmp")


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


def load_model_state(path: Path) -> dict:
    """Weights from a checkpoint folder or a `lit_model.pth`: a bare state dict, or the older
    `{"model": sd}`; wrapper prefixes (torch.compile, Fabric, DDP) are stripped."""
    import torch

    path = Path(path)
    file = path / MODEL_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no {MODEL_FILE} at {str(path)!r}{adapter_hint(path if path.is_dir() else path.parent)}")
    sd = torch.load(file, map_location="cpu", mmap=True, weights_only=False)
    if isinstance(sd.get("model"), dict):
        sd = sd["model"]
    out = {}
    for k, v in sd.items():
        for prefix in _WRAPPER_PREFIXES:
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out
