"""Per-arm mixes and overrides (a method is an arm), and the methods report: gain, forgetting, the
Pareto front, from the arms' own validation logs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from litgpt_ext import checkpoint as ckpt
from litgpt_ext.cli import main as cli
from litgpt_ext.study.methods_report import pareto
from litgpt_ext.study.spec import load_spec
from litgpt_ext.study.sweep import plan_sweep
from tests.test_train_cli import config_file  # noqa: F401  (the tiny real-shard pretraining config)

ARMS = [{"name": "no_replay", "domain": "code", "start": 2, "weight": 1.0, "role": "ablation"},
        {"name": "replay50", "domain": "code", "start": 2, "weight": 0.5, "role": "ablation"},
        {"name": "l2", "domain": "code", "start": 2, "weight": 1.0, "role": "ablation",
         "overrides": {"train.min_lr": 0.0, "optimizer.init_args.weight_decay": 0.0, "log.group": "${fork_from}"}},
        {"name": "explicit", "domain": "code", "start": 2, "mix": "main:0.6,code:0.4", "role": "ablation"}]


def _spec(tmp_path: Path, base: Path) -> Path:
    spec = {"name": "m", "base_config": str(base), "total_steps": 6, "out_root": str(tmp_path / "runs"),
            "seeds": [1, 2, 3], "arms": ARMS, "report": {"kind": "methods", "bootstrap": 300, "reference": "no_replay"}}
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def test_an_arm_carries_its_own_mix_and_overrides(tmp_path, config_file):  # noqa: F811
    jobs = {j.name: j for j in plan_sweep(load_spec(_spec(tmp_path, config_file)))}
    assert jobs["explicit_seed1"].config["data"]["init_args"]["mix_weights_str"] == "main:0.6,code:0.4"
    assert jobs["explicit_seed1"].info["weight"] == pytest.approx(0.4)
    assert jobs["l2_seed1"].config["optimizer"]["init_args"]["weight_decay"] == 0.0
    assert jobs["l2_seed2"].config["log"]["group"] == str(tmp_path / "runs" / "base_seed2" / "step-00000002")
    assert jobs["replay50_seed1"].config["optimizer"]["init_args"]["weight_decay"] == 0.1  # not the other arm's


def test_pareto_front():
    assert pareto({"a": (1.0, 0.5), "b": (0.5, 0.1), "c": (0.4, 0.6), "d": (1.0, 0.5)}) == {"a", "b", "d"}


def test_paired_differences_tell_apart_what_marginal_intervals_cannot():
    """Two arms whose seeds differ a lot (wide marginal intervals) but by the same amount in every
    seed: paired, the difference is told apart; a difference that changes sign across seeds is not."""
    from litgpt_ext.study.methods_report import paired, summarize, told

    a = {(s, d): {"gain": 1.0 * s + 0.1 * d, "forgetting": 0.3 * s} for s in (1, 2, 3) for d in (7, 8)}
    b = {k: {"gain": v["gain"] - 0.05, "forgetting": v["forgetting"] + (0.01 if k[0] != 2 else -0.02)} for k, v in a.items()}
    ma, mb = summarize(a, 500), summarize(b, 500)
    assert ma["gain"]["lo"] < mb["gain"]["point"] < ma["gain"]["hi"]  # marginally: overlapping intervals
    d = paired(a, b, 500)
    assert d["gain"]["point"] == pytest.approx(0.05) and told(d["gain"], "gain") == "more gain"
    assert told(d["forgetting"], "forgetting") is None  # -0.01, -0.01, +0.02 by seed: not told apart
    assert told({"point": 1e-9, "lo": 1e-9, "hi": 2e-9}, "gain") is None  # below the printed precision


def test_methods_report_ranks_gain_and_forgetting_with_intervals(tmp_path, config_file):  # noqa: F811
    spec = _spec(tmp_path, config_file)
    # (gain, forgetting) per arm: no_replay gains most and forgets most; replay50 forgets least; l2 is
    # dominated by no_replay's neighbour explicit? no: explicit gains 0.3 forgets 0.25 (dominated by replay50)
    truth = {"no_replay": (0.8, 0.6), "replay50": (0.5, 0.1), "l2": (0.7, 0.3), "explicit": (0.3, 0.25)}
    for j in plan_sweep(load_spec(spec)):
        if j.stage != "midtrain":
            continue
        g, f = truth[j.info["arm"]]
        jitter = 0.01 * j.info["seed"]
        j.out_dir.mkdir(parents=True)
        (j.out_dir / "val_metrics.csv").write_text(
            "step,tokens,set,loss,ppl\n2,0,general,4.0,1\n2,0,code,3.0,1\n"
            f"6,0,general,{4.0 + f + jitter},1\n6,0,code,{3.0 - g - jitter},1\n")
        (j.out_dir / "final").mkdir()
        for name in ckpt.REQUIRED_FILES:
            (j.out_dir / "final" / name).write_bytes(b"x")
    cli(["sweep", "--spec", str(spec), "--action", "report"])
    out = tmp_path / "runs" / "report"
    res = json.loads((out / "results.json").read_text())
    assert res["front"] == ["l2", "no_replay", "replay50"]
    r = res["arms"]["l2"]
    assert r["n"] == 3 and r["gain"]["point"] == pytest.approx(0.72) and r["forgetting"]["point"] == pytest.approx(0.32)
    assert r["gain"]["lo"] < 0.72 < r["gain"]["hi"]
    md = (out / "REPORT.md").read_text()
    assert "| no_replay | code:1.0 | 3 |" in md and "On the front (by means): l2, no_replay, replay50." in md
    assert (out / "pareto.png").stat().st_size > 1000
    # paired on the pretraining seed: the seed jitter cancels, so each difference is exact
    d = res["vs_reference"]["replay50"]
    assert d["gain"]["point"] == pytest.approx(-0.3) and d["forgetting"]["point"] == pytest.approx(-0.5)
    assert d["gain"]["lo"] == pytest.approx(-0.3) and d["gain"]["hi"] == pytest.approx(-0.3)
    assert "| replay50 | -0.3000 [-0.3000, -0.3000] | -0.5000 [-0.5000, -0.5000] | n/a | less gain, forgets less |" in md
    assert res["front_not_told_apart"] == []  # every pair of front arms differs (exactly) on both axes
    assert "- explicit: off the front, beaten by replay50 by means; significantly by replay50." in md
