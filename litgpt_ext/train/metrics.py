"""Per-step metrics: loss, LR, grad norm, throughput and ETA, data-mix and MoE statistics, to the
loggers and one progress line."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any, Optional

import lightning as L
import torch

from litgpt_ext.train.speed import mfu as _mfu


class StepLogger:
    """Logs every `log_interval` optimizer steps; rate and ETA are measured from construction."""

    def __init__(self, fabric: L.Fabric, tokens_per_step: int, start_step: int, stop_step: int,
                 flops_per_token: Optional[float] = None, peak_flops_per_device: Optional[float] = None,
                 n_devices: int = 1) -> None:
        self.fabric, self.tokens_per_step, self.stop_step = fabric, tokens_per_step, stop_step
        self.t_start, self.step_start = time.perf_counter(), start_step
        self.flops_per_token, self.peak, self.n_devices = flops_per_token, peak_flops_per_device, n_devices

    def log(self, model: torch.nn.Module, loader: Any, *, step: int, tokens: int, loss: float, lr: float,
            grad_norm: float, lrs: Optional[dict] = None) -> None:
        from litgpt_ext.model import flatten_moe_stats, moe_stats

        elapsed = time.perf_counter() - self.t_start
        done = step - self.step_start
        tok_s = done * self.tokens_per_step / max(elapsed, 1e-9)
        eta = elapsed / max(done, 1) * (self.stop_step - step)
        metrics = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens, "tokens_per_sec": tok_s,
                   "step": step}
        metrics.update(lrs or {})  # lr/<group>: layer_lr_decay and Muon's param groups (litgpt_ext.train.optim)
        mfu = _mfu(tok_s, self.flops_per_token, self.n_devices, self.peak) if self.flops_per_token else None
        if mfu is not None:  # tokens/s is the global rate: all devices' model FLOP/s over all devices' peak
            metrics["mfu"] = mfu
        metrics.update(data_metrics(loader))
        moe = moe_stats(model)  # last micro-batch on this rank, per MoE layer
        if moe:
            metrics.update(flatten_moe_stats(moe))
        self.fabric.log_dict(metrics, step=step)
        moe_msg = ""
        if moe:
            aux = [s["aux_loss"] for s in moe.values() if "aux_loss" in s]
            moe_msg = (f" | moe imbalance {metrics['moe/imbalance_max']:.2f}"
                       + (f" aux {sum(aux):.3f}" if aux else "")
                       + (f" dropped {int(metrics['moe/dropped_tokens'])}" if metrics["moe/dropped_tokens"] else ""))
        self.fabric.print(f"step {step}/{self.stop_step} | loss {loss:.4f} | lr {lr:.3e} | gnorm {grad_norm:.3f}"
                          f" | {tok_s:,.0f} tok/s{'' if mfu is None else f' | MFU {100 * mfu:.1f}%'} | tokens {tokens:,} | ETA {timedelta(seconds=int(eta))}{moe_msg}")


def data_metrics(loader: Any) -> dict[str, float]:
    """Per-shard and per-type trained tokens, per-shard epochs and per-type target vs realized mix,
    from a loader's `stats()`. The shards' (and the types') `tokens` add up to the run's `tokens`."""
    stats = loader.stats() if hasattr(loader, "stats") else None
    out: dict[str, float] = {}
    if not stats:
        return out
    for sid, s in stats.get("shards", {}).items():
        out[f"data/shard/{sid}/tokens"] = s.get("tokens", 0)
        out[f"data/shard/{sid}/epochs"] = s.get("epochs", 0)
    for t, s in stats.get("types", {}).items():
        out[f"data/mix/{t}/target"] = s.get("target", 0.0)
        out[f"data/mix/{t}/realized"] = s.get("realized", 0.0)
        if "tokens" in s:
            out[f"data/mix/{t}/tokens"] = s["tokens"]
    return out


def continue_log_stream(fabric: Any, *, resumed: bool, step: Optional[int]) -> None:
    """A resumed run continues its own TensorBoard and CSV stream instead of starting `version_N+1`.

    `resumed`: the run asked to resume (`resume` true/auto/a path, or `fork_from`); `step`: the
    checkpoint's step, None when a requeue found no checkpoint and starts again from step 0. Each
    logger reopens its newest `version_N` and cuts it back to `step`: TensorBoard through
    `SummaryWriter(purge_step=step + 1)` (what the killed run logged after its checkpoint is hidden;
    the resumed run writes those steps again), the CSV logger by dropping `metrics.csv` rows after
    `step` and appending. A fresh run, or a logger with no earlier version, is left to Lightning.
    Call before anything is logged (the writers are created on first use).
    """
    from lightning.fabric.loggers import CSVLogger, TensorBoardLogger

    if not resumed:
        return
    keep = -1 if step is None else int(step)  # events and rows at steps <= keep stay
    for lg in fabric.loggers:
        if not isinstance(lg, (TensorBoardLogger, CSVLogger)) or lg._experiment is not None:
            continue
        latest = lg._get_next_version() - 1  # Lightning's own listing of version_N folders
        if latest < 0:
            continue
        lg._version = latest
        if isinstance(lg, TensorBoardLogger):
            lg._kwargs["purge_step"] = keep + 1
        elif fabric.global_rank == 0:
            lg._experiment = _continued_csv(lg.log_dir, keep)


def _continued_csv(log_dir: str, keep: int) -> Any:
    """Lightning's CSV writer on an existing `metrics.csv`: at the first save the rows at steps <= `keep`
    stay and new rows are appended (Lightning's own writer deletes the file when its folder is not
    empty). A job that logs nothing (finished, refused) leaves the file as it was."""
    import csv

    from lightning.fabric.loggers.csv_logs import _ExperimentWriter

    class _Continued(_ExperimentWriter):
        _cut = False

        def _check_log_dir_exists(self) -> None:
            pass

        def save(self) -> None:
            if self.metrics and not self._cut and self._fs.isfile(self.metrics_file_path):
                with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                    reader = csv.DictReader(f)
                    keys = list(reader.fieldnames or [])
                    rows = [r for r in reader if r.get("step") in (None, "") or float(r["step"]) <= keep]
                with self._fs.open(self.metrics_file_path, "w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=keys)
                    writer.writeheader()
                    writer.writerows(rows)
                self.metrics_keys = keys
            self._cut = self._cut or bool(self.metrics)
            super().save()

    return _Continued(log_dir)
