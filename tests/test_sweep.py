"""`litgpt-ext sweep`: grid expansion, fork/budget wiring, SLURM plan files, and a real local run."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from litgpt_ext.study.sweep import load_spec, mix_string, plan_sweep, plan_table, run_local, write_plan
from litgpt_ext.train import checkpoint as ckpt
from tests.test_train_cli import config_file  # noqa: F401  (the tiny real-shard pretraining config)


def _spec(tmp_path: Path, base: Path, **kw) -> Path:
    spec = {"name": "t", "base_config": str(base), "total_steps": 6, "out_root": str(tmp_path / "runs"),
            "seeds": [42], "grid": {"domain": ["code"], "start": [2, 4], "weight": [0.5]}, **kw}
    p = tmp_path / "sweep.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def test_mix_strings():
    assert mix_string("main", "math", 0.12) == "main:0.88,math:0.12"
    assert mix_string("main", "code", 1.0) == "code:1.0"


def test_plan_wires_forks_budgets_and_seeds(tmp_path, config_file):  # noqa: F811
    spec = load_spec(_spec(tmp_path, config_file, seeds=[1, 2],
                           arms=[{"name": "cpt", "domain": "code", "start": 4, "weight": 1.0}]))
    jobs = plan_sweep(spec)
    by = {j.name: j for j in jobs}
    assert [j.stage for j in jobs] == ["base"] * 2 + ["midtrain"] * 6
    base = by["base_seed1"].config
    assert base["train"]["max_iters"] == 6 and base["train"]["max_tokens"] is None
    assert base["train"]["save_interval"] == 1  # gcd(2, 4) = 2 does not divide by the config's 3 -> 1
    assert base["seed"] == 1 and base["data"]["init_args"]["seed"] == 1
    arm = by["code_w0.5_at4_seed2"]
    assert arm.depends == ["base_seed2"]
    assert arm.config["fork_from"] == str(tmp_path / "runs" / "base_seed2" / "step-00000004")
    assert arm.config["data"]["init_args"]["mix_weights_str"] == "main:0.5,code:0.5"
    assert arm.config["train"]["max_iters"] == 6 and arm.config["train"]["max_additional_steps"] is None
    assert arm.config["train"]["lr_scheduler"] == "cosine"  # the base run's schedule continues
    assert by["cpt_seed1"].config["data"]["init_args"]["mix_weights_str"] == "code:1.0"
    table = plan_table(jobs)
    assert "fork @4, main:0.5,code:0.5" in table and "cpt_seed2" in table


def test_write_plan_chains_stages(tmp_path, config_file):  # noqa: F811
    jobs = plan_sweep(load_spec(_spec(tmp_path, config_file)))
    submit = write_plan(jobs, tmp_path / "cfg")
    lists = {s: (tmp_path / "cfg" / f"{s}.txt").read_text().split() for s in ("base", "midtrain")}
    assert len(lists["base"]) == 1 and len(lists["midtrain"]) == 2
    for p in lists["base"] + lists["midtrain"]:
        assert yaml.safe_load(Path(p).read_text())["out_dir"].startswith(str(tmp_path / "runs"))
    text = submit.read_text()
    assert "--array=1-1" in text and "--array=1-2" in text and "--dependency=afterok:$prev" in text


@pytest.mark.parametrize("bad, match", [
    ({"grid": {"domain": ["code"], "start": [9], "weight": [0.2]}}, r"start must be in \(0, total_steps=6\)"),
    ({"grid": {"domain": ["code"], "start": [2], "weight": [1.5]}}, r"weight must be in \(0, 1\]"),
    ({"grid": {"domain": ["code"], "start": [2], "wieght": [0.2]}}, r"unknown dimensions \['wieght'\]"),
    ({"colour": 1}, r"unknown keys \['colour'\]"),
])
def test_bad_specs_are_named(tmp_path, config_file, bad, match):  # noqa: F811
    with pytest.raises(ValueError, match=match):
        plan_sweep(load_spec(_spec(tmp_path, config_file, **bad)))


@pytest.mark.slow
def test_local_run_forks_and_ends_at_the_shared_total(tmp_path, config_file):  # noqa: F811
    spec = load_spec(_spec(tmp_path, config_file, grid={"domain": ["code"], "start": [2], "weight": [0.5]}))
    jobs = plan_sweep(spec)
    assert run_local(jobs, tmp_path / "cfg") == ["base_seed42", "code_w0.5_at2_seed42"]
    base, arm = (tmp_path / "runs" / n / "final" for n in ("base_seed42", "code_w0.5_at2_seed42"))
    sb, sa = ckpt.load_training_state(base), ckpt.load_training_state(arm)
    assert sb["step"] == sa["step"] == 6
    assert sa["lr"] == pytest.approx(sb["lr"])  # same schedule position: no re-warmup, same horizon
    assert sa["mix"]["weights"] == {"main/1": 0.25, "main/2": 0.25, "c1": 0.5}  # the arm's new blend
    assert sb["mix"]["weights"]["c1"] == pytest.approx(0.2)  # the base config's own blend
    assert run_local(jobs, tmp_path / "cfg") == []  # finished runs are skipped
