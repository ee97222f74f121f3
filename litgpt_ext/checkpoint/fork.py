"""Forking a checkpoint into a new run folder (the start of a midtraining arm)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from litgpt_ext.checkpoint.io import _files
from litgpt_ext.checkpoint.layout import FORK_RECORD, step_dir_name
from litgpt_ext.checkpoint.lock import run_lock
from litgpt_ext.checkpoint.select import _candidates, checkpoint_dir_of, checkpoint_step_of
from litgpt_ext.checkpoint.verify import verify_checkpoint


def _link_or_copy(src: Path, dst: Path) -> str:
    """A hard link (no copy, survives the source being deleted); a copy across file systems.
    Never a symlink: a fork must not depend on its source staying in place."""
    try:
        os.link(src, dst)
        return "hardlink"
    except OSError:
        shutil.copy2(src, dst)
        return "copy"


def _own_progress(to: Path) -> list[Path]:
    """Checkpoints in `to` that are not the one an earlier fork made."""
    forked = None
    if (to / FORK_RECORD).is_file():
        try:
            rec = json.loads((to / FORK_RECORD).read_text())
            forked = rec.get("dst") or step_dir_name(int(rec["step"]))
        except (ValueError, KeyError, TypeError):
            pass
    return [p for p in _candidates(to) if p.name != forked]


def _link_lora_base(src: Path, to: Path) -> None:
    """A LoRA adapter checkpoint's base comes along into `<to>/lora_base/` (hard links, sha256 checked),
    so the fork resumes even after the source run is gone. A base that cannot be found is said, not fatal:
    resuming the fork then needs `lora.base` (its new location)."""
    from litgpt_ext.checkpoint.lora import find_base, is_adapter, link_base, read_record

    if not is_adapter(src):
        return
    rec = read_record(src)
    try:
        base = find_base(src, rec, what="lora.base when resuming the fork")
    except FileNotFoundError as e:
        print(f"fork: WARNING: {e}")
        return
    b = rec["base"]
    link_base(base, to, b["sha256"], b["size"], b.get("source", str(base)), log=lambda s: print(f"fork: {s}"))


def fork(source: Path, to: Path, force: bool = False, abandon_progress: bool = False) -> Path:
    """Start a new run from another run's checkpoint, without copying it.

    Makes `<to>/step-XXXXXXXX/` whose files are hard links to the source checkpoint's files (copies
    across file systems), and records the source in `<to>/forked_from.json`. Then
    `litgpt-ext pretrain --out_dir <to> --resume true` (with the new blend) continues from it, and a
    requeued job resumes from the new run's own latest checkpoint. Checkpoint files are never
    modified in place, so the links are safe; the source is verified against its manifest first.

    Args:
        source: the checkpoint to start from: its folder, a file in it, or a run dir (its latest step).
        to: the new run's out_dir.
        force: replace an earlier fork in `to` (refused if `to` has trained on since: see below).
        abandon_progress: `to` holds its own training progress (checkpoints other than an earlier
            fork's): move them into `to/abandoned-<stamp>/` and fork anyway. Without it, refused.
    """
    src = checkpoint_dir_of(source)
    why = verify_checkpoint(src)
    if why is not None:
        raise FileNotFoundError(f"cannot fork {str(src)!r}: {why}")
    to = Path(to)
    with run_lock(to):
        own = _own_progress(to)
        existing = _candidates(to)
        if own and not abandon_progress:
            raise FileExistsError(
                f"{str(to)!r} holds its own training progress {sorted(p.name for p in own)}; forking into it"
                " would mix two runs. Fork into a new out_dir, or pass --abandon_progress true to move them"
                f" into {to}/abandoned-<stamp>/ first"
            )
        if existing and not own and not force:
            raise FileExistsError(
                f"{str(to)!r} already holds the fork {[p.name for p in existing]}; pass --force true to replace it"
            )
        if own:
            dest = to / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
            dest.mkdir()
            for p in own:
                os.replace(p, dest / p.name)
            print(f"fork: moved {sorted(p.name for p in own)} of {to} aside into {dest}")
        step = checkpoint_step_of(src)
        dst = to / step_dir_name(step)
        tmp = dst.with_name(dst.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        kinds = set()
        for f in _files(src):  # sharded/ too
            (tmp / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            kinds.add(_link_or_copy(f, tmp / f.relative_to(src)))
        for p in existing:  # the earlier fork (force)
            if p.exists():
                shutil.rmtree(p)
        os.replace(tmp, dst)
        _link_lora_base(src, to)
        record = {"source": str(src.resolve()), "step": step, "dst": dst.name, "links": sorted(kinds)}
        (to / FORK_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    how = "hard links, no copy" if kinds == {"hardlink"} else f"{', '.join(sorted(kinds))} (another file system)"
    print(f"forked {src} -> {dst} ({how}); continue with: litgpt-ext pretrain --out_dir {to} --resume true ...")
    return dst
