"""Checkpoint folder naming (`step-00001000`, `final`), kept free of heavy imports for the util scripts."""

from __future__ import annotations

import re
from pathlib import Path

STEP_RE = re.compile(r"^step-(\d+)$")


def checkpoint_step(path: Path | str) -> float:
    """Sort key: `step-N` -> N, `final` -> +inf (it is written last), anything else NaN."""
    name = Path(path).name
    if name == "final":
        return float("inf")
    m = STEP_RE.match(name)
    return float(m.group(1)) if m else float("nan")
