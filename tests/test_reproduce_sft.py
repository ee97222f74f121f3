"""`reproduce`'s SFT stage as executor jobs (`litgpt_ext.study.reproduce_sft.SFTGrid`): which cells run, in
which order, at which LR, for both LR-sweep protocols, per-task grids and edge extension; driven by
the same `then` calls the executor makes, with each cell's sft_metrics.json written as SFT writes it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from litgpt_ext.sft.metrics import SFTMetrics, write_sft_metrics
from litgpt_ext.study.report import cells_of, general_before_of
from litgpt_ext.study.reproduce import ReproduceConfig, validate_config
from litgpt_ext.study.reproduce_sft import SFTGrid, best_lr_runs, lr_edges

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [("base_seed42", "base", 42), ("base_seed43", "base", 43), ("math_mid_seed42", "math_mid", 42),
           ("math_mid_seed43", "math_mid", 43)]


def _cfg(tmp_path: Path, **kw) -> ReproduceConfig:
    sft = tmp_path / "sft.yaml"
    sft.write_text(yaml.safe_dump({"eval": {"initial_validation": False}}))
    return ReproduceConfig(out_dir=tmp_path / "study", sft_config=sft, pretrain_config=sft, pretrain_seeds=[42, 43],
                           sft_seeds=[1, 2], **kw)


def _finish(job, loss: float, before: float = 4.0) -> None:
    """What a finished SFT cell leaves: its sft_metrics.json (the `initial` block when it validated first)."""
    c = job.config
    initial = {"sft_val_loss": 9.0, "val_losses": {"general": before}} if c["eval"].get("initial_validation") else None
    src = Path(c["checkpoint_dir"]).parent.name
    write_sft_metrics(job.out_dir, SFTMetrics("demo_math", loss, 100, c["optimizer"]["init_args"]["lr"], c["seed"],
                                              c["checkpoint_dir"], src, "final", 12, 3, 1,
                                              val_losses={"general": before + 1}, initial=initial))


def _drive(grid: SFTGrid, loss) -> list:
    """Run the grid as the executor would (one cell at a time, `then` after each); every job, in order."""
    todo, order = grid.first_jobs(), []
    while todo:
        j = todo.pop(0)
        order.append(j)
        _finish(j, loss(j))
        todo += grid.then(j)
    return order


def _sources(tmp_path: Path, tasks: list[str]):
    return [(s, f, p, tmp_path / "runs" / s / "final", tasks) for s, f, p in SOURCES]


def _lr(job) -> float:
    return job.config["optimizer"]["init_args"]["lr"]


def test_per_checkpoint_sweeps_every_checkpoint_then_seeds_at_its_best_lr(tmp_path, capsys):
    cfg = _cfg(tmp_path, sft_lrs={"math": [1e-3, 3e-3, 1e-2]}, general_before=True)
    grid = SFTGrid(cfg, _sources(tmp_path, ["math"]))
    # U-shaped in the LR; seed 43's checkpoints prefer the larger LR
    order = _drive(grid, lambda j: {1e-3: 2.0, 3e-3: 1.5, 1e-2: 1.6 if "seed42" in j.name else 1.4}[_lr(j)])
    assert len(order) == 4 * (3 + 1)
    for j in order:  # every cell waits for its own checkpoint's pretraining job
        assert j.depends == [j.name.split("_math_")[0]]
    seeds2 = {j.name: _lr(j) for j in order if j.config["seed"] == 2}
    assert seeds2 == {"base_seed42_math_lr0.003_s2": 3e-3, "base_seed43_math_lr0.01_s2": 1e-2,
                      "math_mid_seed42_math_lr0.003_s2": 3e-3, "math_mid_seed43_math_lr0.01_s2": 1e-2}
    # seed 43's best LR is at the grid's edge: said as it runs and listed for the report
    assert "the chosen SFT LR 0.01 for math from base_seed43 is at the upper edge" in capsys.readouterr().out
    assert lr_edges(grid.runs()) == ["base_seed43/math: 0.01 of [0.001, 0.003, 0.01]",
                                     "math_mid_seed43/math: 0.01 of [0.001, 0.003, 0.01]"]
    # the first cell of each (checkpoint, task) validated before SFT: every run's general loss before SFT
    firsts = [j for j in order if j.config["eval"].get("initial_validation")]
    assert [j.name for j in firsts] == [f"{s}_math_lr0.001_s1" for s, _, _ in SOURCES]
    runs = grid.runs()
    cells = cells_of(best_lr_runs(runs), general_before_of([r.metrics() for r in runs]))
    assert cells[("base", "math")].general_before == [4.0] * 4 and cells[("base", "math")].pseeds == [42, 42, 43, 43]
    assert cells_of(best_lr_runs(runs))[("base", "math")].general_before is None  # without the map: not measured


def test_per_arm_sweeps_the_first_pretraining_seed_and_extends_an_edge(tmp_path):
    cfg = _cfg(tmp_path, sft_lrs={"math": [1e-3, 3e-3], "prose": [3e-4, 1e-3, 3e-3]}, sft_lr_sweep="per_arm",
               sft_lr_extend=2, general_before=True)
    grid = SFTGrid(cfg, _sources(tmp_path, ["math", "prose"]))
    # math keeps improving up to 9e-3 (two steps beyond the grid, then worse); prose is best inside its grid
    loss = {1e-3: 2.0, 3e-3: 1.8, 9e-3: 1.7, 2.7e-2: 1.9, 3e-4: 3.0}
    order = _drive(grid, lambda j: loss.get(round(_lr(j), 12), 2.5) if "_math_" in j.name else
                   {3e-4: 3.0, 1e-3: 2.9, 3e-3: 3.1}[_lr(j)])
    names = [j.name for j in order]
    # only the first pretraining seed sweeps; the sweep extends twice beyond its upper edge (x3 each)
    sweep = [n for n in names if n.endswith("_s1") and "seed42" in n and "math_mid" not in n and "_math_" in n]
    assert sweep == ["base_seed42_math_lr0.001_s1", "base_seed42_math_lr0.003_s1", "base_seed42_math_lr0.009_s1",
                     "base_seed42_math_lr0.027_s1"]
    assert not any("seed43_math_lr0.00" in n and "lr0.009" not in n for n in names)  # seed 43 does not sweep
    at = {n: _lr(j) for n, j in zip(names, order) if "seed43" in n}
    assert at == {"base_seed43_math_lr0.009_s1": pytest.approx(9e-3), "base_seed43_math_lr0.009_s2": pytest.approx(9e-3),
                  "base_seed43_prose_lr0.001_s1": 1e-3, "base_seed43_prose_lr0.001_s2": 1e-3,
                  "math_mid_seed43_math_lr0.009_s1": pytest.approx(9e-3),
                  "math_mid_seed43_math_lr0.009_s2": pytest.approx(9e-3),
                  "math_mid_seed43_prose_lr0.001_s1": 1e-3, "math_mid_seed43_prose_lr0.001_s2": 1e-3}
    job = {j.name: j for j in order}  # the very LR the lead chose, not a re-rounded one
    assert _lr(job["base_seed43_math_lr0.009_s1"]) == _lr(job["base_seed42_math_lr0.009_s2"]) == _lr(
        job["base_seed42_math_lr0.009_s1"])
    # per (checkpoint, task) the planned count (without extensions) is what runs, extensions aside
    planned = {(s, t): n for s, t, n in grid.planned()}
    assert planned[("base_seed42", "math")] == 3 and planned[("base_seed43", "math")] == 2
    assert planned[("base_seed42", "prose")] == 4
    cells = cells_of(best_lr_runs(grid.runs()), general_before_of([r.metrics() for r in grid.runs()]))
    assert cells[("base", "math")].lrs == [pytest.approx(9e-3)] and cells[("base", "math")].pseeds == [42, 42, 43, 43]
    assert cells[("base", "prose")].general_before == [4.0] * 4
    assert lr_edges(grid.runs()) == []  # the extended optimum is interior


def test_a_finished_grid_is_found_again_without_running_anything(tmp_path):
    """Cells that finished in an earlier invocation: `then` on each (the executor calls it for finished jobs
    too) reaches the same follow-ups from their sft_metrics.json, so a rerun plans exactly the cells that ran."""
    cfg = _cfg(tmp_path, sft_lrs=[1e-3, 3e-3], sft_lr_sweep="per_arm")
    first = _drive(SFTGrid(cfg, _sources(tmp_path, ["math"])), lambda j: {1e-3: 2.0, 3e-3: 1.5}[_lr(j)])
    again, seen = SFTGrid(cfg, _sources(tmp_path, ["math"])), []
    todo = again.first_jobs()
    while todo:
        j = todo.pop(0)
        seen.append(j.name)
        todo += again.then(j)
    assert seen == [j.name for j in first]


@pytest.mark.parametrize("bad, match", [
    ({"sft_lrs": {"math": [1e-3], "poetry": [1e-3]}}, r"sft_lrs names tasks \['poetry'\] that are not SFT tasks"),
    ({"sft_lrs": {"math": [1e-3]}, "base_tasks": ["math", "prose"]}, r"no LR grid for the task 'prose'.*add prose"),
    ({"sft_lrs": {"math": []}, "base_tasks": ["math"]}, r"sft_lrs must be positive learning rates"),
    ({"sft_lr_sweep": "per_seed"}, r"sft_lr_sweep must be per_checkpoint or per_arm, got 'per_seed'"),
    ({"workers": 0}, r"workers and threads must be >= 1, got workers=0"),
])
def test_bad_sft_settings_are_refused_naming_the_value(tmp_path, bad, match):
    kw = {"pretrain_config": ROOT / "midtrain_configs/reproduce/pretrain_cpu.yaml",
          "sft_config": ROOT / "midtrain_configs/reproduce/sft_cpu.yaml", **bad}
    with pytest.raises(ValueError, match=match):
        validate_config(ReproduceConfig(**kw))
