"""collect_results / plot_results / pick_best on synthetic runs; eval_chkpts.sh's loop and skipping."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "util_scripts"))

import collect_results  # noqa: E402
import pick_best  # noqa: E402
import plot_results  # noqa: E402

from litgpt_ext.eval.evaluate import results_name  # noqa: E402


def _results(path: Path, scores: dict[str, float], step: int | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    res = {task: {"alias": task, "acc,none": v, "acc_stderr,none": 0.01, "acc_norm,none": v - 0.05,
                  "acc_norm_stderr,none": "N/A"} for task, v in scores.items()}
    path.write_text(json.dumps({"results": res, "litgpt_ext": {"step": step, "num_fewshot": None}}))


def _run(root: Path, name: str, points: list[tuple[str, float, float, float]]) -> Path:
    """points: (checkpoint, math acc, general val loss, math val loss); step from the name."""
    run = root / name
    rows = ["step,tokens,set,loss,ppl"]
    for ckpt, acc, gen, mth in points:
        step = 10_000 if ckpt == "final" else int(ckpt.split("-")[1])
        _results(run / ckpt / "eval" / "demo_math_mc.json", {"demo_math_mc": acc, "demo_prose_cloze": 0.3}, step)
        rows += [f"{step},{step * 4096},general,{gen},0", f"{step},{step * 4096},math,{mth},0"]
    (run / "val_metrics.csv").write_text("\n".join(rows) + "\n")
    return run


@pytest.fixture()
def runs(tmp_path):
    # baseline general loss 2.00 (each run's step 0); budget 5% -> eligible iff general <= 2.10
    a = _run(tmp_path, "mid-a", [("step-00000000", 0.30, 2.00, 3.0), ("step-00001000", 0.55, 2.08, 2.5),
                                 ("step-00002000", 0.70, 2.20, 2.2)])
    b = _run(tmp_path, "mid-b", [("step-00000000", 0.30, 2.00, 3.0), ("step-00001000", 0.50, 2.05, 2.6),
                                 ("final", 0.62, 2.09, 2.4)])
    return a, b


def test_collect_results_csv_and_markdown(runs, tmp_path, capsys):
    out, md = tmp_path / "r.csv", tmp_path / "r.md"
    assert collect_results.main([*map(str, runs), "--out", str(out), "--markdown", str(md)]) == 0
    rows = list(csv.DictReader(open(out)))
    acc = {(r["run"], r["checkpoint"]): float(r["value"]) for r in rows if r["task"] == "demo_math_mc" and r["metric"] == "acc"}
    assert acc == {("mid-a", "step-00000000"): 0.30, ("mid-a", "step-00001000"): 0.55, ("mid-a", "step-00002000"): 0.70,
                   ("mid-b", "step-00000000"): 0.30, ("mid-b", "step-00001000"): 0.50, ("mid-b", "final"): 0.62}
    final = [r for r in rows if r["run"] == "mid-b" and r["checkpoint"] == "final"]
    assert {r["step"] for r in final} == {"10000"}  # final's step: the run's last validation step
    val = [r for r in rows if r["task"] == "val:general"]
    assert len(val) == 6 and {r["metric"] for r in val} == {"loss"}
    assert [r for r in rows if r["metric"] == "acc_norm"][0]["stderr"] == ""  # "N/A" -> empty
    table = md.read_text().splitlines()
    assert table[0] == "| run | checkpoint | step | demo_math_mc acc | demo_prose_cloze acc | val:general loss | val:math loss |"
    assert table[2] == "| mid-a | step-00000000 | 0 | 0.3000 ± 0.0100 | 0.3000 ± 0.0100 | 2.0000 | 3.0000 |"
    assert len(table) == 2 + 6
    assert "collect_results: 36 records from 2 run(s)" in capsys.readouterr().out  # 6 ckpts x 2 tasks x 2 metrics + 12 val


def test_pick_best_respects_forgetting_budget(runs, tmp_path, capsys):
    js = tmp_path / "best.json"
    argv = ["--runs", *map(str, runs), "--domain_task", "demo_math_mc", "--general_set", "general", "--json", str(js)]
    assert pick_best.main(argv + ["--budget", "0.05"]) == 0
    best = json.loads(js.read_text())["best"]
    # mid-a step 2000 has the best score (0.70) but general loss 2.20 > 2.10: excluded
    assert (best["run"], best["checkpoint"], best["domain_score"]) == ("mid-b", "final", 0.62)
    assert pick_best.main(argv + ["--budget", "0.2"]) == 0
    assert json.loads(js.read_text())["best"]["checkpoint"] == "step-00002000"
    assert pick_best.main(argv + ["--budget", "0.03"]) == 0
    assert json.loads(js.read_text())["best"]["domain_score"] == 0.50
    assert pick_best.main(argv + ["--budget", "0.0", "--baseline_loss", "1.5"]) == 1  # nothing eligible
    assert "no checkpoint within" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no results for domain task 'demo_code'"):
        pick_best.main(["--runs", str(runs[0]), "--domain_task", "demo_code"])


@pytest.mark.slow
def test_plot_results_writes_png(runs, tmp_path):
    out = tmp_path / "plot.png"
    assert plot_results.main([*map(str, runs), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    (runs[1] / "val_metrics.csv").unlink()  # tolerated: that run just has no loss lines
    assert plot_results.main([*map(str, runs), "--out", str(out)]) == 0


def test_eval_chkpts_loops_in_order_and_skips_done(tmp_path):
    run = tmp_path / "run"
    for c in ("step-00000100", "step-00000020", "final", "step-00001000"):
        (run / c).mkdir(parents=True)
        (run / c / "lit_model.pth").write_bytes(b"")
    name = results_name("demo_math_mc,demo_prose_cloze", num_fewshot=2)
    (run / "step-00000100" / "eval").mkdir()
    (run / "step-00000100" / "eval" / name).write_text("{}")
    log = tmp_path / "calls.txt"
    stub = tmp_path / "python"  # stands in for python: records its arguments
    stub.write_text(f'#!/usr/bin/env bash\necho "$@" >> {log}\n[[ "$4" != *step-00001000 ]]\n')
    stub.chmod(0o755)
    env = dict(os.environ, PYTHON=str(stub), NUM_FEWSHOT="2")
    proc = subprocess.run(["bash", str(ROOT / "training_scripts/eval_chkpts.sh"), str(run), "demo_math_mc,demo_prose_cloze"],
                          env=env, capture_output=True, text=True)
    calls = log.read_text().splitlines()
    assert [c.split()[3].rsplit("/", 1)[1] for c in calls] == ["step-00000020", "step-00001000", "final"]
    assert calls[0].split()[:3] == ["-m", "litgpt_ext", "evaluate"]
    assert "--tasks demo_math_mc,demo_prose_cloze" in calls[0] and "--num_fewshot 2" in calls[0]
    assert f"[step-00000100] skip: {run}/step-00000100/eval/{name} exists" in proc.stdout
    assert proc.returncode == 1 and "2 evaluated, 1 skipped, 1 failed step-00001000" in proc.stdout
