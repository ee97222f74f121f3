"""The SFT grid: best LR per checkpoint, mean/std over seeds, baseline comparison, and the result tables."""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "util_scripts"))

import collect_results  # noqa: E402
import pick_best  # noqa: E402

from litgpt_ext.sft.grid import compare_to_baseline, grid_rows, mean_std, pick_lr, to_records, welch_t  # noqa: E402
from litgpt_ext.sft.metrics import SFTMetrics, read_sft_metrics, source_identity, write_sft_metrics  # noqa: E402

LRS = (1e-4, 3e-4, 1e-3)
SEEDS = (1, 2, 3)


def loss_of(run: str, step: int, lr: float, seed: int) -> tuple[float, float]:
    """(sft val loss, general loss): lr 3e-4 is best for `mid`, 1e-3 for `base`; mid beats base."""
    best = {"mid": 3e-4, "base": 1e-3}[run]
    sft = (1.0 if run == "mid" else 1.2) + (0.0 if lr == best else 0.3) + 0.01 * seed - step / 1e5
    return sft, 3.0 + (0.1 if run == "base" else 0.0) + 0.02 * seed + (lr * 100)


def make_grid(root: Path) -> list[SFTMetrics]:
    out = []
    for run in ("base", "mid"):
        for step in (1000, 2000):
            for lr in LRS:
                for seed in SEEDS:
                    sft, gen = loss_of(run, step, lr, seed)
                    m = SFTMetrics(sft_set="demo_math", sft_val_loss=sft, sft_val_tokens=500, lr=lr, seed=seed,
                                   source_checkpoint=f"runs/{run}/step-{step:08d}", source_run=run,
                                   source_checkpoint_name=f"step-{step:08d}", source_step=step, step=40, epochs=4,
                                   val_losses={"general": gen}, out_dir=str(root / run / str(step) / f"{lr}_{seed}"))
                    write_sft_metrics(m.out_dir, m)
                    out.append(m)
    return out


def test_metrics_round_trip_and_schema_errors(tmp_path):
    m = make_grid(tmp_path)[0]
    path = Path(m.out_dir) / "sft_metrics.json"
    assert read_sft_metrics(path) == m
    d = json.loads(path.read_text())
    d["sft_loss"] = 1.0
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"unknown keys \['sft_loss'\]"):
        read_sft_metrics(path)
    with pytest.raises(ValueError, match="sft_val_loss must be a finite number"):
        SFTMetrics(**{**json.loads(json.dumps(m.__dict__)), "sft_val_loss": float("nan")})


def test_source_identity(tmp_path):
    assert source_identity(tmp_path / "runs" / "mid" / "step-00002000") == ("mid", "step-00002000", 2000)
    assert source_identity(tmp_path / "runs" / "mid" / "final", step=6000) == ("mid", "final", 6000)
    assert source_identity(tmp_path / "checkpoints" / "pythia-160m") == ("pythia-160m", "", None)


def test_pick_lr_mean_and_std_over_seeds(tmp_path):
    best = pick_lr(make_grid(tmp_path))
    assert [(b.source_run, b.source_step, b.lr) for b in best] == [
        ("base", 1000, 1e-3), ("base", 2000, 1e-3), ("mid", 1000, 3e-4), ("mid", 2000, 3e-4)]
    b = best[2]
    losses = [loss_of("mid", 1000, 3e-4, s)[0] for s in SEEDS]
    gens = [loss_of("mid", 1000, 3e-4, s)[1] for s in SEEDS]
    assert b.seeds == [1, 2, 3] and b.sft_val_losses == losses
    assert b.sft_val_loss == pytest.approx(statistics.mean(losses)) and b.sft_val_loss_std == pytest.approx(statistics.stdev(losses))
    assert b.val_losses["general"] == pytest.approx(statistics.mean(gens))
    assert b.val_losses_std["general"] == pytest.approx(statistics.stdev(gens))
    assert b.lr_means[1e-4] == pytest.approx(statistics.mean(losses) + 0.3) and b.complete


def test_incomplete_and_duplicate_runs(tmp_path):
    ms = make_grid(tmp_path)
    partial = [m for m in ms if not (m.source_run == "mid" and m.lr == 1e-4 and m.seed == 3)]
    b = [x for x in pick_lr(partial) if x.source_run == "mid" and x.source_step == 1000][0]
    assert not b.complete and b.lr == 3e-4
    assert "3*" in grid_rows([b])[1][0]
    with pytest.raises(ValueError, match=r"two SFT runs for .* lr=0.001 seed=3"):
        pick_lr(ms + [ms[-1]])
    assert mean_std([2.0]) == (2.0, None)


def test_welch_and_baseline_comparison(tmp_path):
    scipy = pytest.importorskip("scipy.stats")
    a, b = [1.0, 1.2, 1.1, 1.3], [0.9, 0.95, 1.0]
    t, df, p = welch_t(a, b)
    ref = scipy.ttest_ind(a, b, equal_var=False)
    assert t == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)
    comps = compare_to_baseline(pick_lr(make_grid(tmp_path)), baseline_run="base")
    c = [c for c in comps if c.step == 1000 and c.metric == "sft"][0]
    base = statistics.mean(loss_of("base", 1000, 1e-3, s)[0] for s in SEEDS)
    mid = statistics.mean(loss_of("mid", 1000, 3e-4, s)[0] for s in SEEDS)
    assert c.relative_improvement == pytest.approx((base - mid) / base) and c.relative_improvement > 0
    g = [c for c in comps if c.step == 1000 and c.metric == "general"][0]
    assert g.baseline == pytest.approx(statistics.mean(loss_of("base", 1000, 1e-3, s)[1] for s in SEEDS))
    with pytest.raises(ValueError, match="no SFT results for baseline run 'c4'"):
        compare_to_baseline(pick_lr(make_grid(tmp_path)), baseline_run="c4")


def _pretrain_run(root: Path, name: str) -> Path:
    run = root / name
    for step in (1000, 2000):
        (run / f"step-{step:08d}").mkdir(parents=True)
    (run / "val_metrics.csv").write_text("step,tokens,set,loss,ppl\n1000,1,general,3.0,0\n2000,2,general,2.9,0\n")
    return run


def test_collect_results_joins_sft_on_the_source_checkpoint(tmp_path, capsys):
    make_grid(tmp_path / "sft")
    runs = [_pretrain_run(tmp_path / "runs", n) for n in ("base", "mid")]
    out, grid = tmp_path / "r.csv", tmp_path / "grid.md"
    assert collect_results.main([*map(str, runs), "--sft", str(tmp_path / "sft"), "--out", str(out),
                                 "--sft_table", str(grid)]) == 0
    rows = list(csv.DictReader(open(out)))
    sft = {(r["run"], r["checkpoint"], r["step"]): float(r["value"]) for r in rows
           if r["task"] == "sft:demo_math" and r["metric"] == "loss"}
    assert sft[("mid", "step-00001000", "1000")] == pytest.approx(statistics.mean(loss_of("mid", 1000, 3e-4, s)[0] for s in SEEDS))
    val = {(r["run"], r["checkpoint"]) for r in rows if r["task"] == "val:general"}
    assert ("mid", "step-00001000") in val  # same row keys as the pretraining losses
    table = capsys.readouterr().out
    header = [line for line in table.splitlines() if line.startswith("| run | checkpoint | step | sft:")]
    assert header and "val:general loss" in header[0]
    assert "| mid | step-00001000 | 1000 | demo_math | 0.0003 | 3 |" in grid.read_text()


def test_pick_best_on_sft_results(tmp_path, capsys):
    make_grid(tmp_path / "sft")
    # general after SFT at the best LR: mid 3.0 + 0.04 + 0.03 = 3.07; base 3.1 + 0.04 + 0.1 = 3.24
    assert pick_best.main(["--sft", str(tmp_path / "sft"), "--sft_set", "demo_math", "--baseline_loss", "3.0",
                           "--budget", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "best: mid/step-00002000 (step 2000)" in out
    assert pick_best.main(["--sft", str(tmp_path / "sft"), "--sft_set", "demo_math", "--baseline_loss", "2.9",
                           "--budget", "0.05"]) == 1  # 3.07 > 2.9 * 1.05
    rec = to_records(pick_lr(make_grid(tmp_path / "x")))
    assert {r.metric for r in rec if r.task == "sft:demo_math"} == {"loss", "loss_std", "lr", "n_seeds"}
