"""The paper's SFT protocol over a grid of runs: per source checkpoint, the LR with the lowest mean
SFT validation loss over seeds; mean and std over seeds at that LR; comparison with a baseline arm.

Input: `SFTMetrics` (from `sft_metrics.json`, one per SFT run). Output: `BestLR` per
(source run, source checkpoint, SFT set), and `Record`s that join `collect_results.py`'s tables:
task `sft:<set>` metric `loss` (the SFT validation loss) and task `sft:<set>/val:<name>` metric
`loss` (a named token-shard set after SFT, e.g. `general` = forgetting), each the mean over seeds
with the std over seeds in the record's `stderr` field (shown as "mean ± std"); plus metrics
`loss_std`, `lr` and `n_seeds` on the `sft:<set>` task. All functions are pure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from litgpt_ext.eval.results import Record
from litgpt_ext.sft.metrics import SFTMetrics

SFT_PREFIX = "sft:"


def mean_std(xs: list[float]) -> tuple[float, Optional[float]]:
    """Mean and sample standard deviation (n - 1); std is None for a single value."""
    if not xs:
        raise ValueError("mean_std of no values")
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


@dataclass
class BestLR:
    source_run: str
    source_checkpoint_name: str
    source_step: Optional[int]
    sft_set: str
    lr: float
    seeds: list[int]
    sft_val_loss: float
    sft_val_loss_std: Optional[float]
    sft_val_losses: list[float]  # per seed, in `seeds` order (for t-tests)
    val_losses: dict[str, float] = field(default_factory=dict)
    val_losses_std: dict[str, Optional[float]] = field(default_factory=dict)
    val_losses_per_seed: dict[str, list[float]] = field(default_factory=dict)
    lr_means: dict[float, float] = field(default_factory=dict)  # every LR tried: mean SFT val loss
    complete: bool = True  # every LR ran the same seeds


GridKey = tuple[str, str, Optional[int], str]


def group(metrics: list[SFTMetrics]) -> dict[GridKey, dict[float, list[SFTMetrics]]]:
    """{(run, checkpoint, step, set): {lr: runs sorted by seed}}; a repeated (key, lr, seed) is an error."""
    out: dict[GridKey, dict[float, list[SFTMetrics]]] = {}
    for m in metrics:
        key = (m.source_run, m.source_checkpoint_name, m.source_step, m.sft_set)
        cell = out.setdefault(key, {}).setdefault(float(m.lr), [])
        dup = [o for o in cell if o.seed == m.seed]
        if dup:
            raise ValueError(f"two SFT runs for {key} lr={m.lr} seed={m.seed}: {dup[0].out_dir!r} and {m.out_dir!r}; "
                             "remove one (a rerun should write into the same out_dir)")
        cell.append(m)
    for cells in out.values():
        for runs in cells.values():
            runs.sort(key=lambda m: m.seed)
    return out


def best_lr(losses: dict[float, list[float]]) -> float:
    """The one best-LR rule (sft-grid, the sweep report, reproduce): the LR whose mean SFT validation
    loss over its seeds is lowest; ties: the smaller LR. `losses`: {lr: that LR's losses, one per seed}."""
    if not losses or any(not v for v in losses.values()):
        raise ValueError(f"best_lr: every LR needs at least one SFT validation loss, got {losses}")
    means = {lr: sum(v) / len(v) for lr, v in losses.items()}
    return min(means, key=lambda lr: (means[lr], lr))


def lr_edge_step(lrs: list[float], best: float) -> Optional[float]:
    """The factor one grid step beyond `best` when it is the grid's smallest or largest LR (the ratio
    of the two nearest LRs there), else None (the optimum is interior, or the grid has one LR)."""
    if len(lrs) < 2:
        return None
    if best == lrs[0]:
        return lrs[0] / lrs[1]
    if best == lrs[-1]:
        return lrs[-1] / lrs[-2]
    return None


def pick_lr(metrics: list[SFTMetrics]) -> list[BestLR]:
    """Per source checkpoint and SFT set: the LR whose mean SFT validation loss over seeds is lowest
    (ties: the smaller LR), with mean/std over seeds of every loss at that LR."""
    best = []
    for key, cells in sorted(group(metrics).items(), key=lambda kv: (kv[0][0], kv[0][3], _step_key(kv[0][2]), kv[0][1])):
        means = {lr: mean_std([m.sft_val_loss for m in runs])[0] for lr, runs in cells.items()}
        lr = best_lr({lr: [m.sft_val_loss for m in runs] for lr, runs in cells.items()})
        runs = cells[lr]
        losses = [m.sft_val_loss for m in runs]
        mean, std = mean_std(losses)
        names = sorted(set().union(*(m.val_losses for m in runs)))
        per_seed = {n: [m.val_losses[n] for m in runs if n in m.val_losses] for n in names}
        seed_sets = {tuple(m.seed for m in r) for r in cells.values()}
        best.append(BestLR(
            source_run=key[0], source_checkpoint_name=key[1], source_step=key[2], sft_set=key[3], lr=lr,
            seeds=[m.seed for m in runs], sft_val_loss=mean, sft_val_loss_std=std, sft_val_losses=losses,
            val_losses={n: mean_std(v)[0] for n, v in per_seed.items()},
            val_losses_std={n: mean_std(v)[1] for n, v in per_seed.items()},
            val_losses_per_seed=per_seed, lr_means=dict(sorted(means.items())), complete=len(seed_sets) == 1,
        ))
    return best


def _step_key(step: Optional[int]) -> float:
    return math.inf if step is None else step


def to_records(best: list[BestLR]) -> list[Record]:
    """Records for `collect_results`' long CSV / pivot table and `pick_best` (see the module doc)."""
    out = []
    for b in best:
        task, src = SFT_PREFIX + b.sft_set, f"sft grid lr={b.lr:g} seeds={b.seeds}"
        common = dict(run=b.source_run, checkpoint=b.source_checkpoint_name, step=b.source_step, source=src)
        out.append(Record(task=task, metric="loss", value=b.sft_val_loss, stderr=b.sft_val_loss_std, **common))
        if b.sft_val_loss_std is not None:
            out.append(Record(task=task, metric="loss_std", value=b.sft_val_loss_std, **common))
        out.append(Record(task=task, metric="lr", value=b.lr, **common))
        out.append(Record(task=task, metric="n_seeds", value=float(len(b.seeds)), **common))
        for name, v in b.val_losses.items():
            out.append(Record(task=f"{task}/val:{name}", metric="loss", value=v, stderr=b.val_losses_std[name], **common))
    return out


def welch_t(a: list[float], b: list[float]) -> tuple[float, float, Optional[float]]:
    """Welch's t statistic, its degrees of freedom and the two-sided p-value (scipy, when installed)."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"a t-test needs >= 2 seeds per arm, got {len(a)} and {len(b)}")
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    va, vb = sa**2 / len(a), sb**2 / len(b)
    if va + vb == 0:
        return (0.0 if ma == mb else math.copysign(math.inf, ma - mb)), float(len(a) + len(b) - 2), None
    t = (ma - mb) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    try:
        from scipy.stats import t as t_dist
    except ImportError:  # scipy is optional: the statistic and df are still reported
        return t, df, None
    return t, df, float(2 * t_dist.sf(abs(t), df))


@dataclass
class Comparison:
    run: str
    checkpoint: str
    step: Optional[int]
    sft_set: str
    metric: str  # "sft" (SFT val loss) or a named val set ("general": forgetting)
    baseline: float
    value: float
    relative_improvement: float  # (L_base - L_mid) / L_base: > 0 means better than the baseline
    t: Optional[float]
    p: Optional[float]


def compare_to_baseline(best: list[BestLR], baseline_run: str) -> list[Comparison]:
    """The paper's numbers: each arm against the baseline arm fine-tuned identically (same SFT set,
    same source step), for the SFT loss and every named set, with a Welch t-test across seeds."""
    base = {(b.sft_set, b.source_step): b for b in best if b.source_run == baseline_run}
    if not base:
        raise ValueError(f"no SFT results for baseline run {baseline_run!r}; runs: {sorted({b.source_run for b in best})}")
    out = []
    for b in best:
        ref = base.get((b.sft_set, b.source_step))
        if b.source_run == baseline_run or ref is None:
            continue
        pairs = [("sft", ref.sft_val_losses, b.sft_val_losses)]
        pairs += [(n, ref.val_losses_per_seed[n], b.val_losses_per_seed[n])
                  for n in b.val_losses_per_seed if n in ref.val_losses_per_seed]
        for name, ra, rb in pairs:
            lb, lm = sum(ra) / len(ra), sum(rb) / len(rb)
            t = p = None
            if len(ra) >= 2 and len(rb) >= 2:
                t, _, p = welch_t(ra, rb)
            out.append(Comparison(b.source_run, b.source_checkpoint_name, b.source_step, b.sft_set, name, lb, lm,
                                  (lb - lm) / lb, t, p))
    return out


def grid_rows(best: list[BestLR]) -> tuple[list[str], list[list[str]]]:
    """A table: one row per (run, checkpoint, set) with the chosen LR, mean ± std and every LR's mean."""
    names = sorted(set().union(*(b.val_losses for b in best))) if best else []
    lrs = sorted(set().union(*(b.lr_means for b in best))) if best else []
    header = ["run", "checkpoint", "step", "sft set", "best lr", "seeds", "sft val loss"]
    header += [f"{n} loss" for n in names] + [f"lr {lr:g}" for lr in lrs]

    def pm(m: Optional[float], s: Optional[float]) -> str:
        return "" if m is None else f"{m:.4f}" + ("" if s is None else f" ± {s:.4f}")

    rows = []
    for b in best:
        row = [b.source_run, b.source_checkpoint_name, "" if b.source_step is None else str(b.source_step), b.sft_set,
               f"{b.lr:g}", str(len(b.seeds)) + ("" if b.complete else "*"), pm(b.sft_val_loss, b.sft_val_loss_std)]
        row += [pm(b.val_losses.get(n), b.val_losses_std.get(n)) for n in names]
        row += [pm(b.lr_means.get(lr), None) for lr in lrs]
        rows.append(row)
    return header, rows
