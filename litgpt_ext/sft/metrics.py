"""`<sft out_dir>/sft_metrics.json`: one SFT run's result, the unit the LR x seed grid aggregates.

Schema (version 1):

    {
      "schema": "litgpt_ext/sft_metrics/1",
      "sft_set": "demo_math",                  SFT data set name (data.name)
      "sft_val_loss": 1.234,                   full pass, token-weighted, at the end of SFT
      "sft_val_tokens": 12345,                 target tokens in that pass
      "val_losses": {"general": 3.21},         named token-shard sets after SFT (general = forgetting)
      "lr": 1e-4, "seed": 1,                   the grid coordinates
      "source_checkpoint": "runs/x/step-00001000",   what SFT started from, as given
      "source_run": "x", "source_checkpoint_name": "step-00001000", "source_step": 1000,
      "step": 40, "epochs": 4,                 SFT optimizer steps, epochs
      "train_tokens": 81920,                   real tokens trained on (prompt included, no padding), all ranks
      "train_tokens_padded": 98304,            what the padded batches held
      "train_target_tokens": 20480,            tokens that carried loss (0 in files written before these keys)
      "initial": {"sft_val_loss": 2.1, "val_losses": {...}} | null,   before the first SFT step
      "history": [{"step": 10, "sft_val_loss": 1.5, "val_losses": {...}}, ...],
      "out_dir": "runs/sft/x/..."
    }

`source_run`/`source_checkpoint_name`/`source_step` match the run/checkpoint/step columns of
`util_scripts/collect_results.py`, so SFT results join the pretraining tables on them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from litgpt_ext.eval.naming import STEP_RE

SCHEMA = "litgpt_ext/sft_metrics/1"
FILE_NAME = "sft_metrics.json"


@dataclass
class SFTMetrics:
    sft_set: str
    sft_val_loss: float
    sft_val_tokens: int
    lr: float
    seed: int
    source_checkpoint: str
    source_run: str
    source_checkpoint_name: str
    source_step: Optional[int]
    step: int
    epochs: float
    train_tokens: int = 0
    train_tokens_padded: int = 0
    train_target_tokens: int = 0
    val_losses: dict[str, float] = field(default_factory=dict)
    initial: Optional[dict[str, Any]] = None
    history: list[dict[str, Any]] = field(default_factory=list)
    out_dir: str = ""
    schema: str = SCHEMA

    def __post_init__(self) -> None:
        for name in ("sft_val_loss", "lr"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"sft_metrics: {name} must be a finite number, got {v!r}")
        for k, v in self.val_losses.items():
            if not isinstance(v, (int, float)):
                raise ValueError(f"sft_metrics: val_losses[{k!r}] must be a number, got {v!r}")


def source_identity(checkpoint_dir: str | Path, step: Optional[int] = None) -> tuple[str, str, Optional[int]]:
    """(run, checkpoint name, step) of a source checkpoint folder; `step` overrides (e.g. for `final`,
    whose step the loop reads from its training state)."""
    p = Path(checkpoint_dir)
    if p.name == "final" or STEP_RE.match(p.name):
        run = p.resolve().parent.name
        if step is None and (m := STEP_RE.match(p.name)):
            step = int(m.group(1))
        return run, p.name, step
    return p.resolve().name, "", step  # a converted model (e.g. checkpoints/EleutherAI/pythia-160m)


def write_sft_metrics(out_dir: str | Path, metrics: SFTMetrics) -> Path:
    """Write atomically (a preempted writer never leaves half a file for the grid to read)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / FILE_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(asdict(metrics), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_sft_metrics(path: str | Path) -> SFTMetrics:
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e
    if d.get("schema") != SCHEMA:
        raise ValueError(f"{path}: schema {d.get('schema')!r} is not {SCHEMA!r}")
    known = set(SFTMetrics.__dataclass_fields__)
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; known: {sorted(known)}")
    try:
        return SFTMetrics(**d)
    except TypeError as e:
        raise ValueError(f"{path}: {e}") from e


def find_sft_metrics(roots: list[str | Path]) -> list[Path]:
    """Every sft_metrics.json under the given folders (or the files themselves), sorted."""
    out: list[Path] = []
    for r in roots:
        r = Path(r)
        if r.is_file():
            out.append(r)
        elif r.is_dir():
            out += sorted(r.rglob(FILE_NAME))
        else:
            raise FileNotFoundError(f"SFT results path {str(r)!r} does not exist")
    return out
