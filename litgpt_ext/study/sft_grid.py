"""`litgpt-ext sft-grid`: the paper's SFT protocol, LRs x seeds from one or several checkpoints.

    litgpt-ext sft-grid --sft_config midtrain_configs/sft/demo_math.yaml --lrs '[1e-4, 3e-4, 1e-3]' \\
        --seeds '[1, 2, 3]' --checkpoints '[runs/demo/midtrain_math/final, runs/demo/pretrain/final]' \\
        --out_root runs/sft/math

Each cell is one `litgpt-ext sft --config <out_root>/configs/<cell>.yaml` run into
`<out_root>/<source run>/<checkpoint>/lr-<lr>_seed-<seed>` (its output in `sft.log` there), run in this
process one after another by the study executor (`litgpt_ext.study.executor`: torch, lightning and
litgpt are imported once); a finished cell (sft_metrics.json and final/) is skipped, an interrupted
one resumes (so the grid itself can be requeued); a preempted cell exits 99 with the command to continue. Then, per source checkpoint, the LR with the lowest mean SFT validation loss
over seeds is picked (`litgpt_ext.sft.grid.pick_lr`) and the table is written as Markdown and CSV
(`<out_root>/sft_grid.md`, `sft_grid.csv`). `util_scripts/collect_results.py --sft <out_root>` joins
the same results to the pretraining tables.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

from litgpt_ext.sft.metrics import SFTMetrics, source_identity

GRID_MD, GRID_CSV = "sft_grid.md", "sft_grid.csv"


def cell_dir(out_root: Path, checkpoint: Path, lr: float, seed: int) -> Path:
    run, name, _ = source_identity(checkpoint)
    return Path(out_root) / run / (name or "model") / f"lr-{lr:g}_seed-{seed}"


def sources(checkpoints: Optional[list[Path]], run_dir: Optional[Path], every: Optional[int]) -> list[Path]:
    """The source checkpoints: those listed, plus every `every`-th step-* of `run_dir` (and its final/)."""
    from litgpt_ext import checkpoint as ckpt

    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ValueError(f"every={every!r} must be a positive integer (keep the step-* checkpoints whose step is a "
                         "multiple of it), e.g. --every 1000; leave it unset for all of them")
    out = [Path(c) for c in checkpoints or []]
    if run_dir is not None:
        found = ckpt.list_checkpoints(run_dir)
        if not found:
            raise FileNotFoundError(f"run_dir {str(run_dir)!r} holds no complete step-* checkpoint")
        out += [p for step, p in found if every is None or step % every == 0]
        if ckpt.is_complete(Path(run_dir) / "final"):
            out.append(Path(run_dir) / "final")
    elif every is not None:
        raise ValueError("every needs run_dir (the run whose step-* checkpoints to fine-tune)")
    if not out:
        raise ValueError("no source checkpoint: give checkpoints: [...] and/or run_dir (with every: k)")
    return out


def sft_grid(
    sft_config: Path,
    lrs: list[float],
    seeds: list[int] = [1, 2, 3],  # noqa: B006  (jsonargparse reads the default; never mutated)
    out_root: Path = Path("runs/sft"),
    checkpoints: Optional[list[Path]] = None,
    run_dir: Optional[Path] = None,
    every: Optional[int] = None,
    table_dir: Optional[Path] = None,
) -> list:
    """Run SFT for every (source checkpoint, LR, seed), then pick the best LR per checkpoint.

    Args:
        sft_config: An SFT config (`litgpt-ext sft`'s YAML); its checkpoint_dir, out_dir, seed and
            optimizer.init_args.lr are replaced per cell.
        lrs: Peak LRs to sweep.
        seeds: SFT seeds per LR (model-side seed and data order).
        out_root: Cells go to `<out_root>/<source run>/<checkpoint>/lr-<lr>_seed-<seed>`.
        checkpoints: Source checkpoints (default: the config's checkpoint_dir, unless run_dir is given).
        run_dir: Fine-tune checkpoints of this run too ("loss after SFT vs pretraining step") ...
        every: ... those whose step is a multiple of this (default: all of them), plus final/.
        table_dir: Where sft_grid.md / sft_grid.csv go (default: out_root).
    Returns the best-LR rows (`litgpt_ext.sft.grid.BestLR`).
    """
    import yaml

    from litgpt_ext.sft.config import SFTConfig
    from litgpt_ext.sft.metrics import find_sft_metrics, read_sft_metrics
    from litgpt_ext.sft.run import optimizer_spec
    from litgpt_ext.study.executor import Executor, Job

    config = Path(sft_config)
    if not config.is_file():
        raise FileNotFoundError(f"SFT config {str(config)!r} does not exist")
    if not lrs or not seeds:
        raise ValueError(f"lrs and seeds must be non-empty, got lrs={lrs} seeds={seeds}")
    base = yaml.safe_load(config.read_text()) or {}
    SFTConfig.from_yaml(config)  # unknown keys and bad values fail before the first cell
    srcs = sources(checkpoints if (checkpoints or run_dir) else [Path(base["checkpoint_dir"])], run_dir, every)
    cells = [(s, lr, seed) for s in srcs for lr in lrs for seed in seeds]
    print(f"sft-grid: {len(srcs)} checkpoint(s) x {len(lrs)} LR(s) x {len(seeds)} seed(s) = {len(cells)} runs"
          f" -> {out_root}")
    jobs = []
    for src, lr, seed in cells:  # each cell is `litgpt-ext sft --config <cell>.yaml`, run by the study executor
        out_dir = cell_dir(out_root, src, lr, seed)
        opt = optimizer_spec(base.get("optimizer", "AdamW"))
        if not isinstance(opt, dict):
            opt = {"class_path": f"torch.optim.{opt}", "init_args": {}}
        cfg = {**base, "checkpoint_dir": str(src), "out_dir": str(out_dir), "seed": seed,
               "optimizer": {**opt, "init_args": {**opt.get("init_args", {}), "lr": float(lr)}}}
        name = f"{out_dir.parent.parent.name}_{out_dir.parent.name}_{out_dir.name}"
        jobs.append(Job(name, "sft", "sft", cfg, out_dir, info={"source": str(src), "lr": float(lr), "seed": seed}))
    ex = Executor(label="sft-grid", resume_command=f"the same `litgpt-ext sft-grid` (out_root {out_root})",
                  config_dir=Path(out_root) / "configs", mode="inprocess", log_name="sft.log", rerun_finished=True)
    before = sum(j.done() for j in jobs)  # each still goes to `sft`, which refuses a changed config
    ran = ex.run(jobs)
    print(f"sft-grid: ran {len(ran)}, skipped {before} finished run(s) (their configs unchanged)")
    mine = {cell_dir(out_root, s, lr, seed) for s, lr, seed in cells}
    metrics = [read_sft_metrics(f) for f in find_sft_metrics([out_root]) if f.parent in mine]
    return write_tables(metrics, Path(table_dir or out_root))


def write_tables(metrics: list[SFTMetrics], table_dir: Path) -> list:
    """Best LR per source checkpoint, mean ± std over seeds: Markdown (printed too) and CSV."""
    from litgpt_ext.eval.results import markdown_table
    from litgpt_ext.sft.grid import grid_rows, pick_lr

    best = pick_lr(metrics)
    header, rows = grid_rows(best)
    table_dir.mkdir(parents=True, exist_ok=True)
    md = markdown_table(header, rows)
    (table_dir / GRID_MD).write_text(md)
    with open(table_dir / GRID_CSV, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "checkpoint", "step", "sft_set", "lr", "n_seeds", "sft_val_loss", "sft_val_loss_std"]
                   + [c for n in sorted(set().union(*(b.val_losses for b in best))) for c in (n, n + "_std")])
        names = sorted(set().union(*(b.val_losses for b in best))) if best else []
        for b in best:
            w.writerow([b.source_run, b.source_checkpoint_name, b.source_step, b.sft_set, b.lr, len(b.seeds),
                        b.sft_val_loss, b.sft_val_loss_std]
                       + [x for n in names for x in (b.val_losses.get(n), b.val_losses_std.get(n))])
    print(md, end="")
    print(f"sft-grid: {table_dir / GRID_MD}, {table_dir / GRID_CSV}")
    return best
