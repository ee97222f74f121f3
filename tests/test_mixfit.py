"""`litgpt-ext mixfit`: the surrogate recovers a known surface from a synthetic results.json, its intervals
cover the truth, the best point is near the optimum, LOAO is what it says, `--propose` emits arms the sweep
planner accepts, and bad input is refused by name."""

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from litgpt_ext.study.mixfit import arms_fragment, fit_results, validate
from litgpt_ext.study.mixfit_model import Z95, Point, Surface, design, loao, points_of
from litgpt_ext.study.spec import load_spec, plan_arms
from tests.conftest import ROOT

T = 200
S0, W0 = 120.0, 0.45  # the true optimum of the gain


def true_gain(s, w, domain="math"):
    return (0.06 if domain == "math" else 0.03) - 0.08 * ((s - S0) / T) ** 2 - 0.15 * (w - W0) ** 2


def true_forget(s, w, domain="math"):
    return 0.002 + 0.02 * w * (1 - s / T)


def synthetic(tmp_path, arms_at, noise=0.002, pseeds=(42, 43), sft_seeds=2, seed=0, name="results.json"):
    """A results.json as `write_report` writes it: base and arm cells per task with runs per (pretraining
    seed, SFT seed); the arm's SFT loss is the base's times (1 - true gain) plus noise."""
    rng = np.random.default_rng(seed)
    cells, arms = {}, []
    base = {t: {s: 2.0 + 0.01 * rng.standard_normal() for s in pseeds} for t in ("math", "code")}
    gbase = {s: 3.0 + 0.01 * rng.standard_normal() for s in pseeds}
    for t in ("math", "code"):
        ps = [s for s in pseeds for _ in range(sft_seeds)]
        cells[f"base|{t}"] = {"family": "base", "task": t, "n": len(ps), "lrs": [1e-3], "pseeds": ps,
                              "sft": [base[t][s] + 0.001 * rng.standard_normal() for s in ps],
                              "general": [gbase[s] + 0.001 * rng.standard_normal() for s in ps]}
    for d, s, w in arms_at:
        name_ = f"{d}_w{w:g}_at{s}"
        ps = [p for p in pseeds for _ in range(sft_seeds)]
        g = {p: true_gain(s, w, d) + noise * rng.standard_normal() for p in pseeds}
        f = {p: true_forget(s, w, d) + noise * rng.standard_normal() for p in pseeds}
        cells[f"{name_}|{d}"] = {"family": name_, "task": d, "n": len(ps), "lrs": [1e-3], "pseeds": ps,
                                 "sft": [base[d][p] * (1 - g[p]) + 0.0005 * rng.standard_normal() for p in ps],
                                 "general": [gbase[p] * (1 + f[p]) + 0.0005 * rng.standard_normal() for p in ps]}
        arms.append({"name": name_, "domain": d, "start": s, "weight": w, "seeds": list(pseeds), "tasks": None,
                     "role": "cpt" if w == 1.0 else "mid", "match_tokens_of": None, "mix": f"main:{1 - w:g},{d}:{w:g}"})
    path = tmp_path / name
    path.write_text(json.dumps({"cells": cells, "findings": [], "arms": arms, "replay": "main",
                                "base_seeds": list(pseeds)}))
    return path


GRID = [("math", s, w) for s in (20, 60, 100, 140, 180) for w in (0.1, 0.3, 0.6, 0.9)]


@pytest.fixture(scope="module")
def grid_fit(tmp_path_factory):
    path = synthetic(tmp_path_factory.mktemp("mixfit"), GRID)
    return fit_results(path, total_steps=T, propose_n=3)


@pytest.mark.slow
def test_recovers_a_known_surface_at_held_out_points(tmp_path):
    """Over 10 synthetic studies (20 arms x 2 pretraining seeds, noise 0.002 per seed) the surface is within
    0.01 of the truth at 12 held-out points (it spans ~0.1 there), and its 95% intervals cover the truth at
    most of them (measured: 82.5% on average, 50-100% per study; the intervals are conditional on the fitted
    hyperparameters, so below nominal with so few arms)."""
    from threadpoolctl import threadpool_limits

    held = [(s, w) for s in (40, 80, 120, 160) for w in (0.2, 0.45, 0.75)]  # none of them is an arm
    truth = np.array([true_gain(s, w) for s, w in held])
    errs, covered = [], []
    with threadpool_limits(1):
        for seed in range(10):
            path = synthetic(tmp_path, GRID, seed=seed)
            pts, _, _ = points_of(json.loads(path.read_text()), path)
            gain = Surface(design([(p.domain, p.start, p.weight) for p in pts], ["math"]), np.array([p.gain for p in pts]))
            mu, sd = gain.predict(design([("math", s, w) for s, w in held], ["math"]))
            errs.append(np.abs(mu - truth))
            covered.append(np.abs(mu - truth) <= Z95 * sd)
    assert np.max(errs) < 0.01 and np.mean(errs) < 0.003, np.max(errs, axis=1)
    assert np.mean(covered) >= 0.75, np.mean(covered, axis=1)


def test_best_point_is_near_the_true_optimum_and_loao_is_small(grid_fit):
    b = grid_fit["best"]["math"]
    assert abs(b["start"] - S0) <= 25 and abs(b["weight"] - W0) <= 0.1, b
    assert b["inside_measured_range"]
    assert grid_fit["model"]["n_arms"] == 20 and grid_fit["model"]["n_points"] == 40
    held = [(s, w) for s in (40, 80, 120, 160) for w in (0.2, 0.45, 0.75)]  # one study: the slow test does 10
    mu, _ = grid_fit["_surfaces"][0]["gain"].predict(design([("math", s, w) for s, w in held], ["math"]))
    err = np.abs(mu - np.array([true_gain(s, w) for s, w in held]))
    assert err.max() < 0.01 and err.mean() < 0.003, err
    g = grid_fit["loao"]["gain"]
    assert len(g["rows"]) == 20 and g["mae"] < 0.01 and g["spearman"] > 0.9, (g["mae"], g["spearman"])


def test_budget_keeps_domain_steps_within_it(tmp_path):
    path = synthetic(tmp_path, GRID)
    fit = fit_results(path, total_steps=T, budget_steps=20, propose_n=2)
    b = fit["best"]["math"]
    assert b["weight"] * (T - b["start"]) <= 20 and b["domain_steps"] <= 20
    assert all(p["weight"] * (T - p["start"]) <= 20 for p in fit["proposals"])


def test_loao_by_hand_on_a_tiny_case():
    """A 'model' that predicts the mean of its training targets: held out arm A (y 1, 1: two seeds) is
    predicted from B, C = (2 + 4) / 2 = 3 (error 2); B from A's two points and C: (1 + 1 + 4) / 3 = 2 (error 0);
    C from (1 + 1 + 2) / 3 = 4/3 (error -8/3). MAE = (2 + 0 + 8/3) / 3; Spearman(pred, measured) = -1."""
    class Mean:
        noise = 0.0

        def __init__(self, X, y):
            self.m = float(np.mean(y))

        def predict(self, X):
            return np.full(len(X), self.m), np.zeros(len(X))

    pts = [Point("A", "math", 10, 0.1, 1, 1.0, 0.0), Point("A", "math", 10, 0.1, 2, 1.0, 0.0),
           Point("B", "math", 20, 0.2, 1, 2.0, 0.0), Point("C", "math", 30, 0.3, 1, 4.0, 0.0)]
    r = loao(pts, "gain", ["math"], Mean)
    pred = {row["arms"][0]: row["predicted"] for row in r["rows"]}
    assert pred == pytest.approx({"A": 3.0, "B": 2.0, "C": 4 / 3})
    assert r["mae"] == pytest.approx((2 + 0 + 8 / 3) / 3)
    assert r["spearman"] == pytest.approx(-1.0)
    assert [row["n_pseeds"] for row in r["rows"]] == [2, 1, 1]


def test_proposals_are_arms_the_sweep_planner_accepts(grid_fit, tmp_path):
    props = grid_fit["proposals"]
    assert len(props) == 3 and len({p["name"] for p in props}) == 3
    assert grid_fit["acquisition"]["kind"] == "ei"
    measured = {(m["start"], m["weight"]) for m in grid_fit["measured"]}
    assert not any((p["start"], p["weight"]) in measured for p in props)
    frag = yaml.safe_load(arms_fragment(props))
    spec = tmp_path / "next.yaml"
    spec.write_text(yaml.safe_dump({"name": "next", "base_config": "midtrain_configs/demo/pretrain.yaml",
                                    "total_steps": T, "seeds": [42, 43], **frag}))
    arms = plan_arms(load_spec(spec))
    assert [a.name for a in arms] == [p["name"] for p in props]
    assert all(a.name == f"{a.domain}_w{a.weight:g}_at{a.start}" for a in arms)


def test_proposals_extend_the_cpu_study_as_they_are(grid_fit):
    """The validation route (docs/studies.md): the fragment's arms appended to reproduce's own config are
    arms `reproduce` accepts (its default tasks: the domain's and prose; its first pretraining seed)."""
    from litgpt_ext.study.reproduce import ReproduceConfig, arms_of

    cfg = yaml.safe_load((ROOT / "midtrain_configs/reproduce/cpu.yaml").read_text())
    cfg["arms"] += [{**a, "role": "ablation"} for a in yaml.safe_load(arms_fragment(grid_fit["proposals"]))["arms"]]
    arms = arms_of(ReproduceConfig(**{**cfg, "total_steps": T}))
    assert [a.name for a in arms[-3:]] == [p["name"] for p in grid_fit["proposals"]]
    assert all(a.tasks == ["math", "prose"] and a.seeds == [42] for a in arms[-3:])


def test_compare_checks_earlier_proposals_against_their_runs(grid_fit, tmp_path):
    """--compare: the proposals of an earlier fit, once run (here: drawn from the true surface), are matched by
    position and their predicted gain and forgetting set against the measured ones."""
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({k: v for k, v in grid_fit.items() if not k.startswith("_")}))
    ran = [(p["domain"], p["start"], p["weight"]) for p in grid_fit["proposals"][:2]]
    fit = fit_results(synthetic(tmp_path, GRID + ran, seed=1), total_steps=T)
    v = validate(earlier, fit)
    assert [r["arm"] for r in v["rows"]] == [p["name"] for p in grid_fit["proposals"][:2] for _ in ("gain", "forget")]
    assert v["not_measured"] == [grid_fit["proposals"][2]["name"]]
    assert v["summary"]["gain"]["n"] == 2 and v["summary"]["gain"]["mae"] < 0.01
    r = v["rows"][0]
    assert r["error"] == pytest.approx(r["predicted"] - r["measured"]) and r["lo"] < r["predicted"] < r["hi"]


def test_two_domains_as_a_categorical(tmp_path):
    at = [(d, s, w) for d in ("math", "code") for s in (30, 100, 170) for w in (0.2, 0.7)]
    fit = fit_results(synthetic(tmp_path, at, noise=0.001), total_steps=T)
    assert fit["model"]["inputs"] == ["start", "weight", "domain=math"] and fit["model"]["n_params"] == 5
    assert set(fit["best"]) == {"code", "math"}
    assert fit["best"]["math"]["gain"]["mean"] > fit["best"]["code"]["gain"]["mean"]  # math's surface is 0.03 higher


def test_bad_inputs_are_named(tmp_path):
    few = synthetic(tmp_path, GRID[:3], name="few.json")
    with pytest.raises(ValueError, match=r"3 arm\(s\).*fewer than the 4 parameters.*at least 4"):
        fit_results(few, total_steps=T)
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"cells": {}, "findings": []}))
    with pytest.raises(ValueError, match=r"old\.json: no 'arms' list .*\['cells', 'findings'\]"):
        fit_results(old, total_steps=T)
    path = synthetic(tmp_path, GRID)
    with pytest.raises(ValueError, match=r"--domains: unknown domain\(s\) \['poetry'\]; .* \['math'\]"):
        fit_results(path, domains=["poetry"], total_steps=T)
    with pytest.raises(ValueError, match=r"--weights: \[1\.5, 0\.0\] outside \(0, 1\]"):
        fit_results(path, total_steps=T, weights=[0.2, 1.5, 0.0])
    raw = json.loads(path.read_text())
    raw["arms"][0]["weight"] = 1.2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"arm 'math_w0.1_at20' has weight 1.2, outside \(0, 1\]"):
        fit_results(bad, total_steps=T)
    with pytest.raises(ValueError, match=r"--task_of \{'math': 'gsm8k'\}: no such SFT task .*\['code', 'math'\]"):
        fit_results(path, task_of={"math": "gsm8k"}, total_steps=T)
    raw = json.loads(path.read_text())
    raw["arms"][0]["domain"] = "qa"
    bad.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"no SFT task measures domain 'qa'.*--task_of '\{qa: <task>\}'"):
        fit_results(bad, total_steps=T)
    with pytest.raises(ValueError, match="pass --total_steps"):
        fit_results(path)


@pytest.mark.slow
def test_cli_writes_json_md_png(tmp_path):
    path = synthetic(tmp_path, GRID)
    out = tmp_path / "fit"
    r = subprocess.run([sys.executable, "-m", "litgpt_ext", "mixfit", "--results", str(path), "--out_dir", str(out),
                        "--total_steps", str(T), "--budget_steps", "60", "--propose", "2", "--acquisition", "ucb"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "mixfit.json").read_text())
    assert len(res["proposals"]) == 2 and res["acquisition"]["kind"] == "ucb" and res["budget_steps"] == 60
    md = (out / "mixfit.md").read_text()
    assert "## Leave one arm out" in md and "upper confidence bound (kappa = 2)" in md
    assert (out / "mixfit_math.png").read_bytes()[:4] == b"\x89PNG"
    assert yaml.safe_load((out / "mixfit_arms.yaml").read_text())["arms"][0]["name"].startswith("math_w")
    from litgpt_ext.study.mixfit import mixfit

    ran = [(p["domain"], p["start"], p["weight"]) for p in res["proposals"]]  # the proposals, run
    after = mixfit(synthetic(tmp_path, GRID + ran, name="after.json"), out_dir=tmp_path / "after", total_steps=T,
                   compare=out / "mixfit.json")
    assert after["validation"]["summary"]["gain"]["n"] == 2 and not after["validation"]["not_measured"]
    assert "## Predicted before" in (tmp_path / "after" / "mixfit.md").read_text()
    r = subprocess.run([sys.executable, "-m", "litgpt_ext", "mixfit", "--results", str(path), "--domains", "[poetry]",
                        "--total_steps", str(T), "--out_dir", str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and "unknown domain(s) ['poetry']" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_reads_what_write_report_writes_and_the_arms_run_configs(tmp_path):
    """A results.json written by the report itself (`write_report`, reproduce's layout): the cells' and arms'
    keys are read as written, and the total steps come from the arms' run configs (configs/pretrain/)."""
    from litgpt_ext.study.report import Analysis, Cell, write_report
    from litgpt_ext.study.spec import Arm

    arms = [Arm(name=f"m{i}", domain="math", start=s, weight=w, seeds=[42, 43], tasks=["math"], role="ablation")
            for i, (s, w) in enumerate([(20, 0.2), (20, 0.6), (100, 0.2), (100, 0.6), (160, 0.4)])]
    cells = {("base", "math"): Cell("base", "math", 4, [2.0, 2.01, 2.1, 2.11], [3.0] * 4, [1e-3], [42, 42, 43, 43])}
    for a in arms:
        g = true_gain(a.start, a.weight)
        cells[(a.name, "math")] = Cell(a.name, "math", 4, [2.0 * (1 - g), 2.01 * (1 - g), 2.1 * (1 - g), 2.11 * (1 - g)],
                                       [3.03] * 4, [1e-3], [42, 42, 43, 43], [3.02] * 4)
    write_report(tmp_path, title="t", intro="", setup=[], arms=arms, base_seeds=[42, 43], base_tasks=["math"],
                 replay="main", cells=cells, sim=None, analysis=Analysis(task_of={"math": "math"}), footer=[], n_boot=0)
    (tmp_path / "configs" / "pretrain").mkdir(parents=True)
    (tmp_path / "configs" / "pretrain" / "m0_seed42.yaml").write_text(yaml.safe_dump({"train": {"max_iters": T}}))
    fit = fit_results(tmp_path / "results.json")
    assert fit["total_steps"] == T and fit["model"]["n_arms"] == 5 and fit["model"]["n_points"] == 10
    m = {x["arms"][0]: x["measured"] for x in fit["measured"]}
    # seed 42: SFT seeds averaged (2.0, 2.01), base of the same seed: the gain is exact; forgetting 3.03 / 3.0 - 1
    assert m["m1"]["gain"] == pytest.approx(true_gain(20, 0.6)) and m["m1"]["forget"] == pytest.approx(0.01)
