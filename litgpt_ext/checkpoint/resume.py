"""Which checkpoint a run resumes from (`resume: auto | true | <path>`), and setting newer ones aside."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Optional, Union

from litgpt_ext.checkpoint.layout import FINAL, FORK_RECORD, checkpoint_step
from litgpt_ext.checkpoint.select import _candidates, checkpoint_dir_of, checkpoint_step_of
from litgpt_ext.checkpoint.verify import verify_checkpoint


def resolve_resume(resume: Union[bool, str, Path], out_dir: Path, log: Callable[[str], None] = print) -> Optional[Path]:
    """`True`: the newest checkpoint in out_dir that verifies (error if none); 'auto': the same,
    or None when out_dir holds no checkpoint at all; a path: that one (error if it does not verify).

    `final/` counts (a finished run resumes from it; the loop then reports it finished). A newer
    checkpoint that fails verification is skipped with a line saying which and why; if checkpoints
    exist but none verifies, this is an error, never a silent fresh start.
    """
    if resume is False or resume is None:
        return None
    out_dir = Path(out_dir)
    if resume is True or resume == "auto":
        skipped = []
        for p in _candidates(out_dir):
            why = verify_checkpoint(p)
            if why is None:
                for s, reason in skipped:
                    log(f"resume: skipped {s} ({reason}); resuming from {p}")
                return p
            skipped.append((p, why))
        if skipped:
            fork_note = ""
            if (out_dir / FORK_RECORD).is_file():
                rec = json.loads((out_dir / FORK_RECORD).read_text())
                fork_note = (f" This run was forked from {rec.get('source')}; fork it again"
                             " (`litgpt-ext fork --force true`) if that checkpoint still exists.")
            raise FileNotFoundError(
                f"{str(out_dir)!r} holds checkpoints but none is usable: "
                + "; ".join(f"{p.name}: {why}" for p, why in skipped)
                + f". Refusing to start over from step 0.{fork_note} Move them aside to start fresh."
            )
        if resume is True:
            raise FileNotFoundError(
                f"resume=true but {str(out_dir)!r} holds no complete step-* checkpoint; use resume: auto to start"
                " fresh when there is none, or `litgpt-ext fork` to start from another run's checkpoint"
            )
        return None
    path = checkpoint_dir_of(resume)
    why = verify_checkpoint(path)
    if why is not None:
        raise FileNotFoundError(f"cannot resume from {str(path)!r}: {why}")
    return path


def set_aside_newer(resume: Union[bool, str, Path, None], out_dir: Path, log: Callable[[str], None] = print) -> Optional[Path]:
    """An explicit resume from an older step abandons the newer checkpoints of out_dir: move them
    (and final/) into `out_dir/abandoned-<stamp>/`, so that a requeue (`resume: auto`) continues
    the branch being trained, not the abandoned one. Nothing is deleted. Call on rank 0 only."""
    if resume in (False, None, True, "auto"):
        return None
    try:
        src = checkpoint_dir_of(resume)
    except FileNotFoundError:
        return None  # resolve_resume names the bad path, on every rank
    step = checkpoint_step_of(src)
    out_dir = Path(out_dir)
    newer = [p for p in _candidates(out_dir) if p.resolve() != src.resolve()
             and (p.name == FINAL or checkpoint_step(p) > step)]
    if not newer:
        return None
    dest = out_dir / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    dest.mkdir()
    for p in newer:
        os.replace(p, dest / p.name)
    log(f"resume from {src} (step {step}): moved the newer checkpoints {sorted(p.name for p in newer)} of"
        f" {out_dir} aside into {dest}, so later requeues continue this branch")
    return dest
