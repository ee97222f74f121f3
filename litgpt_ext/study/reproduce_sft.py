"""`reproduce`'s SFT stage as executor jobs: the paper's protocol per (source checkpoint, task).

An LR sweep with the first SFT seed picks the LR with the lowest SFT validation loss (per checkpoint
and task, as the paper); when it is at the grid's edge, up to `sft_lr_extend` more LRs beyond that
edge are tried; then the other SFT seeds run at the chosen LR. `SFTGrid.first_jobs` are the sweep's
cells, each depending on its source's pretraining job, and `SFTGrid.then` (the executor's `then`)
adds a group's next cells once its sweep has finished, so SFT cells of one checkpoint run while other
checkpoints still train, and the executor's workers stay busy (`litgpt_ext.study.executor`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from litgpt_ext.sft.grid import best_lr, lr_edge_step
from litgpt_ext.sft.metrics import FILE_NAME, SFTMetrics, read_sft_metrics
from litgpt_ext.study.executor import Job


def lrs_for(cfg: Any, task: str) -> list[float]:
    """The SFT LR grid of `task` (`sft_lrs`: one list, or a list per task)."""
    if not isinstance(cfg.sft_lrs, dict):
        return list(cfg.sft_lrs)
    if task not in cfg.sft_lrs:
        raise ValueError(f"sft_lrs has no LR grid for the task {task!r} (it has {sorted(cfg.sft_lrs)}); add {task}: [...]")
    return list(cfg.sft_lrs[task])


@dataclass
class SFTRun:
    source: str  # pretraining job name
    family: str  # arm name without the seed (base, math_mid, ...)
    pretrain_seed: int
    task: str
    lr: float
    seed: int
    out_dir: Path

    @property
    def name(self) -> str:
        return f"{self.source}_{self.task}_lr{self.lr:g}_s{self.seed}"

    def metrics(self) -> Optional[SFTMetrics]:
        p = self.out_dir / FILE_NAME
        return read_sft_metrics(p) if p.is_file() else None


def sft_config(cfg: Any, base: dict, run: SFTRun, ckpt_dir: Path, before: bool = False) -> dict:
    """The SFT config of one cell: `sft_config`'s file with the checkpoint, out_dir, seed, LR and task set
    (`before`: it also validates before its first step, `eval.initial_validation`)."""
    c = copy.deepcopy(base)
    c["checkpoint_dir"] = str(ckpt_dir)
    c["out_dir"] = str(run.out_dir)
    c["seed"] = run.seed
    c.setdefault("optimizer", {}).setdefault("init_args", {})["lr"] = run.lr
    init = c.setdefault("data", {}).setdefault("init_args", {})
    init["train_path"] = str(cfg.demo_dir / "sft_tasks" / run.task)
    init["name"] = f"demo_{run.task}"
    init["mask_prompt"] = run.task != "code"  # code: the whole function is learned (the paper's PyCode)
    val = c.setdefault("eval", {}).setdefault("val_data_path", {})
    val["general"] = [str(cfg.demo_dir / "val" / "1"), str(cfg.demo_dir / "val" / "2")]
    if before:
        c["eval"]["initial_validation"] = True
    return c


@dataclass
class _Group:
    """One (source checkpoint, task): its sweep cells (first SFT seed), then its seed cells."""

    source: str
    family: str
    pseed: int
    task: str
    ckpt_dir: Path
    sweep: list[SFTRun] = field(default_factory=list)
    seeds: list[SFTRun] = field(default_factory=list)
    waiting: set[str] = field(default_factory=set)  # sweep cells not reported finished yet
    extended: int = 0
    followers: list["_Group"] = field(default_factory=list)  # sft_lr_sweep per_arm: groups that take its LR
    lead: bool = True  # it sweeps the LR itself


class SFTGrid:
    """The SFT cells of every (source, task) as jobs for `Executor.run(..., then=grid.then)`.

    `cfg.sft_lr_sweep`: `per_checkpoint` (the paper) sweeps the LR on every source checkpoint;
    `per_arm` sweeps it on each arm's first pretraining seed (the first source of that arm and task)
    and fine-tunes the arm's other pretraining seeds at that LR with every SFT seed. `cfg.general_before`:
    the first cell of each (checkpoint, task) also validates before its first step, which gives the
    checkpoint's general loss before SFT."""

    def __init__(self, cfg: Any, sources: list[tuple[str, str, int, Path, list[str]]]):
        self.cfg = cfg
        self.base = yaml.safe_load(cfg.sft_config.read_text()) or {}
        self.groups = [_Group(src, fam, pseed, task, ckpt) for src, fam, pseed, ckpt, tasks in sources for task in tasks]
        self._of: dict[str, _Group] = {}
        if getattr(cfg, "sft_lr_sweep", "per_checkpoint") == "per_arm":
            leads: dict[tuple[str, str], _Group] = {}
            for g in self.groups:
                lead = leads.setdefault((g.family, g.task), g)
                if lead is not g:
                    g.lead = False
                    lead.followers.append(g)

    def _cell(self, g: _Group, lr: float, seed: int) -> SFTRun:
        return SFTRun(g.source, g.family, g.pseed, g.task, lr, seed,
                      self.cfg.out_dir / "sft" / g.task / g.source / f"lr{lr:g}_seed{seed}")

    def _job(self, g: _Group, r: SFTRun, first: bool = False) -> Job:
        self._of[r.name] = g
        before = first and getattr(self.cfg, "general_before", False)
        return Job(r.name, "sft", "sft", sft_config(self.cfg, self.base, r, g.ckpt_dir, before), r.out_dir, depends=[g.source],
                   info={"what": f"sft {r.task} from {r.source} lr {r.lr:g} seed {r.seed}"}, log_name="sft.log",
                   config_dir=self.cfg.out_dir / "configs" / "sft")

    def _sweep_cell(self, g: _Group, lr: float) -> Job:
        r = self._cell(g, lr, self.cfg.sft_seeds[0])
        g.sweep.append(r)
        g.waiting.add(r.name)
        return self._job(g, r, first=len(g.sweep) == 1)

    def first_jobs(self) -> list[Job]:
        """The LR sweep of every (source, task) that sweeps, in the order of `sources` and of the task's grid."""
        return [self._sweep_cell(g, lr) for g in self.groups if g.lead for lr in lrs_for(self.cfg, g.task)]

    def then(self, job: Job) -> list[Job]:
        """After a cell: once its group's sweep has finished, one more LR beyond an edge (`sft_lr_extend`)
        or the other seeds at the chosen LR."""
        g = self._of.get(job.name)
        if g is None or job.name not in g.waiting:
            return []
        g.waiting.discard(job.name)
        if g.waiting:
            return []
        lrs = sorted(r.lr for r in g.sweep)
        best = best_lr({r.lr: [r.metrics().sft_val_loss] for r in g.sweep})
        step = lr_edge_step(lrs, best)
        if step is not None and g.extended < self.cfg.sft_lr_extend:  # an optimum at the grid's edge: one step beyond
            g.extended += 1
            return [self._sweep_cell(g, best * step)]
        if step is not None:
            print(f"[reproduce] warning: the chosen SFT LR {best:g} for {g.task} from {g.source} is at the "
                  f"{'lower' if step < 1 else 'upper'} edge of the grid {lrs}: the best LR may lie outside it"
                  f" (sft_lr_extend: N tries N more LRs beyond the edge)", flush=True)
        g.seeds = [self._cell(g, best, s) for s in self.cfg.sft_seeds[1:]]
        jobs = [self._job(g, r) for r in g.seeds]
        for f in g.followers:  # per_arm: the arm's other pretraining seeds, every SFT seed at this LR
            f.seeds = [self._cell(f, best, s) for s in self.cfg.sft_seeds]
            jobs += [self._job(f, r, first=i == 0) for i, r in enumerate(f.seeds)]
        return jobs

    def planned(self) -> list[tuple[str, str, int]]:
        """(source, task, cells) of every group, LR extensions not counted (the progress count)."""
        grid = {g.task: len(lrs_for(self.cfg, g.task)) for g in self.groups}
        n = len(self.cfg.sft_seeds)
        return [(g.source, g.task, grid[g.task] + n - 1 if g.lead else n) for g in self.groups]

    def runs(self) -> list[SFTRun]:
        """Every cell, per (source, task): its sweep (grid order, then extensions), then its seeds."""
        return [r for g in self.groups for r in g.sweep + g.seeds]


def best_lr_runs(runs: list[SFTRun]) -> dict[tuple[str, str], list[SFTMetrics]]:
    """{(family, task): metrics of the runs at each source's chosen LR, all seeds, all pretraining seeds}."""
    by_src: dict[tuple[str, str], list[SFTRun]] = {}
    for r in runs:
        by_src.setdefault((r.source, r.task), []).append(r)
    out: dict[tuple[str, str], list[SFTMetrics]] = {}
    for (_source, task), rs in by_src.items():
        first_seed = min(r.seed for r in rs)
        best = best_lr({r.lr: [r.metrics().sft_val_loss] for r in rs if r.seed == first_seed})
        for r in rs:
            if r.lr == best:
                out.setdefault((r.family, task), []).append(r.metrics())
    return out


def lr_edges(runs: list[SFTRun]) -> list[str]:
    """`source/task: lr of [grid]` for each (source, task) whose chosen LR is the smallest or largest tried."""
    out = []
    by_src: dict[tuple[str, str], dict[float, float]] = {}
    first = min((r.seed for r in runs), default=0)
    for r in runs:
        if r.seed == first:
            by_src.setdefault((r.source, r.task), {})[r.lr] = r.metrics().sft_val_loss
    for (src, task), losses in sorted(by_src.items()):
        best = best_lr({lr: [v] for lr, v in losses.items()})
        if lr_edge_step(sorted(losses), best) is not None:
            out.append(f"{src}/{task}: {best:g} of {sorted(losses)}")
    return out
