"""Finding checkpoints: a run's step folders, the newest usable one, the folders a path names."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from litgpt_ext.checkpoint.layout import (
    CONFIG_FILE,
    FINAL,
    MODEL_FILE,
    REQUIRED_FILES,
    SHARDED_DIR,
    STEP_RE,
    adapter_hint,
    checkpoint_step,
    load_training_state,
    read_manifest,
)
from litgpt_ext.checkpoint.verify import is_complete


def checkpoint_step_of(path: Path) -> int:
    """The training step a checkpoint holds: from its name, its manifest, or its training state."""
    path = Path(path)
    m = STEP_RE.match(path.name)
    if m:
        return int(m.group(1))
    man = read_manifest(path)
    if man is not None and "step" in man:
        return int(man["step"])
    return int(load_training_state(path)["step"])


def list_checkpoints(out_dir: Union[str, Path], final: bool = False, need: str = "resume") -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as (step, path), oldest first; `*.tmp` and partial dirs skipped.

    final=True includes `final/` (sorted after a step-* of the same step).
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = []
    for p in out_dir.iterdir():
        m = STEP_RE.match(p.name)
        if (m or (final and p.name == FINAL)) and p.is_dir() and is_complete(p, need):
            step = int(m.group(1)) if m else (checkpoint_step_of(p) if need == "resume" else None)
            found.append((step, p))
    if need == "weights":  # `final` may have no training state: order by name, final last
        return sorted(found, key=lambda sp: checkpoint_step(sp[1]))
    return sorted(found, key=lambda sp: (sp[0], sp[1].name == FINAL))


def latest_checkpoint(out_dir: Union[str, Path]) -> Optional[Path]:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1][1] if ckpts else None


def checkpoint_dir_of(path: Union[str, Path], need: str = "resume") -> Path:
    """A checkpoint folder from the folder itself, a file in it, or a run dir (its latest step)."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    if path.is_dir() and is_complete(path, need):
        return path
    if path.is_dir():
        found = list_checkpoints(path, final=need == "weights", need=need)
        if found:
            return found[-1][1]
    what = f"{MODEL_FILE} and {CONFIG_FILE}" if need == "weights" else ", ".join(REQUIRED_FILES)
    if need == "weights" and (path / SHARDED_DIR).is_dir():
        raise FileNotFoundError(f"{str(path)!r} is a sharded checkpoint without {MODEL_FILE}: run"
                                f" `litgpt-ext consolidate {path}` first (it writes {MODEL_FILE} next to {SHARDED_DIR}/)")
    raise FileNotFoundError(
        f"{str(path)!r} is not a checkpoint: expected a folder with {what}"
        " (or a file in one, or a run dir holding step-* checkpoints)" + (adapter_hint(path) if need == "weights" else "")
    )


def resolve_checkpoints(path: Path, all_checkpoints: bool = False) -> list[Path]:
    """For evaluation: a checkpoint folder -> [it]; a run folder -> its latest (or all, in order)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint or run directory {str(path)!r} does not exist")
    if is_complete(path, "weights"):
        return [path]
    if adapter_hint(path):
        raise FileNotFoundError(f"{str(path)!r} has no {MODEL_FILE}{adapter_hint(path)}")
    adapters = [p for p in _candidates(path) if adapter_hint(p)]
    if adapters:  # a LoRA run: its step-*/final are adapters; a full checkpoint there is only its fork's base
        raise FileNotFoundError(f"{str(path)!r} is a LoRA run: its checkpoints {sorted(p.name for p in adapters)} hold"
                                f" adapters only{adapter_hint(adapters[0])}")
    ckpts = [p for _, p in list_checkpoints(path, final=True, need="weights")]
    if not ckpts:
        sharded = [p for p in [path, *sorted(path.iterdir())] if (p / SHARDED_DIR / ".metadata").is_file()]
        if sharded:
            raise FileNotFoundError(
                f"{str(sharded[-1])!r} is a sharded checkpoint (speed.checkpoint_format: sharded) without"
                f" {MODEL_FILE}: run `litgpt-ext consolidate {sharded[-1]}` first")
        raise FileNotFoundError(
            f"{str(path)!r} is neither a checkpoint ({MODEL_FILE} + {CONFIG_FILE}) "
            "nor a run directory with step-*/ or final/ checkpoints"
        )
    return ckpts if all_checkpoints else ckpts[-1:]


def _candidates(out_dir: Path) -> list[Path]:
    """Every step-*/final folder (complete or not), newest first."""
    if not out_dir.is_dir():
        return []
    dirs = [p for p in out_dir.iterdir() if p.is_dir() and (STEP_RE.match(p.name) or p.name == FINAL)]

    def key(p: Path):
        try:
            return (checkpoint_step_of(p), p.name == FINAL)
        except Exception:  # unreadable final/: try it last
            return (-1, False)

    return sorted(dirs, key=key, reverse=True)
