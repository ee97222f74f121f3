"""Per-step metrics: loss, LR, grad norm, throughput and ETA, data-mix and MoE statistics, to the
loggers and one progress line."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import lightning as L
import torch


class StepLogger:
    """Logs every `log_interval` optimizer steps; rate and ETA are measured from construction."""

    def __init__(self, fabric: L.Fabric, tokens_per_step: int, start_step: int, stop_step: int) -> None:
        self.fabric, self.tokens_per_step, self.stop_step = fabric, tokens_per_step, stop_step
        self.t_start, self.step_start = time.perf_counter(), start_step

    def log(self, model: torch.nn.Module, loader: Any, *, step: int, tokens: int, loss: float, lr: float,
            grad_norm: float) -> None:
        from litgpt_ext.model import flatten_moe_stats, moe_stats

        elapsed = time.perf_counter() - self.t_start
        done = step - self.step_start
        tok_s = done * self.tokens_per_step / max(elapsed, 1e-9)
        eta = elapsed / max(done, 1) * (self.stop_step - step)
        metrics = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens, "tokens_per_sec": tok_s,
                   "step": step}
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
                          f" | {tok_s:,.0f} tok/s | tokens {tokens:,} | ETA {timedelta(seconds=int(eta))}{moe_msg}")


def data_metrics(loader: Any) -> dict[str, float]:
    """Per-shard tokens/epochs and per-type target vs realized mix, from a loader's `stats()`."""
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
    return out
