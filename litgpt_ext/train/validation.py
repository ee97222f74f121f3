"""Named validation sets: loss per set, the baseline forgetting is measured against, val_metrics.csv
and early stop. Used by `fit` for pretraining and midtraining alike."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch

from litgpt_ext.train.args import EvalArgs
from litgpt_ext.train.objective import LossFn, next_token_loss

VAL_CSV = "val_metrics.csv"


def val_loaders_of(data: Any) -> dict:
    """The data module's named validation loaders ({} when it has none)."""
    return dict(data.val_dataloaders() or {}) if hasattr(data, "val_dataloaders") else {}


class Validator:
    """Evaluates the named sets and keeps the run's validation record.

    `baseline` holds each set's loss at the start of this phase (restored on requeue); early stop
    compares against it. A loader with a true `full_pass` attribute (SFT's val set) is read in
    full; the others stop after `eval.max_iters` batches.
    """

    def __init__(self, fabric: L.Fabric, loaders: dict, eval: EvalArgs, out_dir: Path,
                 baseline: Optional[dict] = None, loss_fn: LossFn = next_token_loss) -> None:
        unknown = sorted(set(eval.early_stop or {}) - set(loaders))
        if unknown:
            raise ValueError(f"eval.early_stop names unknown validation sets {unknown}; known: {sorted(loaders)}")
        self.fabric, self.loaders, self.eval, self.out_dir, self.loss_fn = fabric, loaders, eval, out_dir, loss_fn
        self.baseline = baseline
        self.history: list[dict] = []

    def __bool__(self) -> bool:
        return bool(self.loaders)

    def due(self, step: int, last: bool) -> bool:
        return bool(self.loaders) and (step % self.eval.interval == 0 or (last and self.eval.final_validation))

    @torch.no_grad()
    def losses(self, model: torch.nn.Module) -> dict[str, float]:
        """Mean loss per target token on each set (at most `eval.max_iters` batches per rank, unless
        the loader asks for a `full_pass`)."""
        fabric = self.fabric
        model.eval()
        out = {}
        for name, loader in self.loaders.items():
            total = torch.zeros(2, dtype=torch.float64, device=fabric.device)
            for k, batch in enumerate(loader):
                if k >= self.eval.max_iters and not getattr(loader, "full_pass", False):
                    break
                loss, n = self.loss_fn(model, fabric.to_device(batch))
                total += torch.stack([loss.detach().double() * n, n.double()])
            total = fabric.all_reduce(total, reduce_op="sum")
            out[name] = float(total[0] / total[1]) if total[1] > 0 else float("nan")
        model.train()
        return out

    def run(self, model: torch.nn.Module, step: int, tokens: int) -> Optional[str]:
        """Evaluate, log, append to val_metrics.csv; return the name of a set past its early-stop limit."""
        return self.record(self.losses(model), step, tokens)

    def record(self, losses: dict[str, float], step: int, tokens: int) -> Optional[str]:
        fabric = self.fabric
        if self.baseline is None:
            self.baseline = dict(losses)
        metrics, parts = {}, []
        for name, loss in losses.items():
            ppl = math.exp(min(loss, 50.0))
            delta = loss - self.baseline.get(name, loss)
            metrics.update({f"val/{name}/loss": loss, f"val/{name}/ppl": ppl, f"val/{name}/delta": delta})
            parts.append(f"{name} {loss:.4f} (ppl {ppl:.2f}, {delta:+.4f} vs start)")
            self.history.append({"step": step, "tokens": tokens, "set": name, "loss": loss, "ppl": ppl})
        fabric.log_dict(metrics, step=step)
        fabric.print(f"val step {step}: " + " | ".join(parts))
        if fabric.global_rank == 0:
            self._append_csv(losses, step, tokens)
        for name, limit in (self.eval.early_stop or {}).items():
            if losses[name] - self.baseline[name] > limit:
                fabric.print(f"Early stop: validation set {name!r} rose more than {limit} above its start value")
                return name
        return None

    def _append_csv(self, losses: dict[str, float], step: int, tokens: int) -> None:
        path = self.out_dir / VAL_CSV
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["step", "tokens", "set", "loss", "ppl"])
            for name, loss in losses.items():
                w.writerow([step, tokens, name, f"{loss:.6f}", f"{math.exp(min(loss, 50.0)):.6f}"])
