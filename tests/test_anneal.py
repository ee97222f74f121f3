"""`litgpt-ext anneal`: branches share the parent's weights at the branch step, decay to min_lr on the
candidate and the control mix with the same budget, and one table compares them; bad inputs are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from litgpt_ext import checkpoint as ckpt
from litgpt_ext.cli import main as cli
from tests.test_train_cli import config_file  # noqa: F401  (the tiny real-shard pretraining config)


@pytest.fixture(scope="module")
def parent(tmp_path_factory, config_file) -> Path:  # noqa: F811
    root = tmp_path_factory.mktemp("anneal")
    cfg = yaml.safe_load(Path(config_file).read_text())
    cfg["out_dir"] = str(root / "base")
    cfg["logger_name"] = "csv"
    path = root / "base.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli(["pretrain", "--config", str(path)])
    return root / "base"


def test_bad_branch_points_and_budgets_are_named(parent, tmp_path):
    with pytest.raises(SystemExit, match=r"has no checkpoint at step\(s\) \[4\]; it has \[3, 6\]"):
        cli(["anneal", "--source", str(parent), "--at", "[4]", "--mix", "main:0.5,code:0.5", "--steps", "2"])
    with pytest.raises(SystemExit, match="is not a complete checkpoint"):
        cli(["anneal", "--source", str(tmp_path), "--mix", "main:0.5,code:0.5", "--steps", "2"])
    with pytest.raises(SystemExit, match="steps must be >= 1"):
        cli(["anneal", "--source", str(parent / "step-00000003"), "--mix", "main:0.5,code:0.5", "--steps", "0"])
    with pytest.raises(SystemExit, match="the candidate mix and the control are both 'main:1.0'"):
        cli(["anneal", "--source", str(parent / "step-00000003"), "--mix", "main:1.0", "--steps", "2"])
    with pytest.raises(SystemExit, match="unknown shard type 'poetry'"):  # checked when planned
        cli(["anneal", "--source", str(parent / "step-00000003"), "--mix", "main:0.5,poetry:0.5", "--steps", "2"])


@pytest.mark.slow
def test_anneal_branches_from_the_parents_weights_and_compares_with_the_control(parent, tmp_path):
    src = parent / "step-00000003"
    out = tmp_path / "anneal"
    cli(["anneal", "--source", str(src), "--mix", "main:0.5,code:0.5", "--steps", "3", "--out_root", str(out),
         "--action", "local"])
    names = {"candidate": "anneal_at3_candidate_main_0.5_code_0.5", "control": "anneal_at3_control_main_1.0"}
    parent_w = torch.load(src / "lit_model.pth", weights_only=True)
    finals = {}
    for role, name in names.items():
        run = out / name
        forked = torch.load(run / "step-00000003" / "lit_model.pth", weights_only=True)
        assert all(torch.equal(parent_w[k], forked[k]) for k in parent_w)  # the branch starts bit for bit there
        state = ckpt.load_training_state(run / "final")
        assert state["step"] == 6 and state["lr"] == pytest.approx(0.0, abs=1e-12)  # linear decay to min_lr = 0
        finals[role] = state
    assert finals["candidate"]["mix"]["weights"] == {"main/1": 0.25, "main/2": 0.25, "c1": 0.5}
    assert finals["control"]["mix"]["weights"] == {"main/1": 0.5, "main/2": 0.5}
    table = json.loads((out / "anneal.json").read_text())
    rows = {r["set"]: r for r in table["rows"]}
    assert {"general", "domain"} <= set(rows)
    for r in (rows["general"], rows["domain"]):
        assert r["delta"] == pytest.approx(r["candidate"] - r["control"])
    assert "| 3 | domain |" in (out / "anneal.md").read_text()


def test_a_probe_without_sft_lr_plans_with_the_sft_configs_lr(parent, tmp_path, capsys):
    sft = tmp_path / "sft.yaml"
    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "midtrain_configs/reproduce/sft_cpu.yaml").read_text())
    cfg["optimizer"]["init_args"]["lr"] = 2.0e-4
    sft.write_text(yaml.safe_dump(cfg))
    cli(["anneal", "--source", str(parent / "step-00000003"), "--mix", "main:0.5,code:0.5", "--steps", "2",
         "--sft_config", str(sft), "--out_root", str(tmp_path / "a")])  # --action plan: the table only
    out = capsys.readouterr().out
    assert out.count("probe, lr 0.0002, seed 0") == 2, out
