"""`litgpt-ext sweep`: grid expansion, fork/budget wiring, SLURM plan files, and a real local run."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from litgpt_ext import checkpoint as ckpt
from litgpt_ext.study.execute import run_local
from litgpt_ext.study.spec import load_spec, mix_string
from litgpt_ext.study.sweep import plan_sweep, plan_table, write_plan
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
    # each base run is one job per fork step (2, 4), then the rest: an arm waits for its step only
    assert [j.name for j in jobs[:6]] == ["base_seed1_to2", "base_seed1_to4", "base_seed1",
                                          "base_seed2_to2", "base_seed2_to4", "base_seed2"]
    assert [j.stage for j in jobs] == ["base"] * 6 + ["midtrain"] * 6
    assert by["base_seed1_to4"].depends == ["base_seed1_to2"] and by["base_seed1"].depends == ["base_seed1_to4"]
    seg = by["base_seed1_to4"].config
    assert seg["train"]["pause_at_step"] == 4 and seg["out_dir"] == by["base_seed1"].config["out_dir"]
    assert {**seg["train"], "pause_at_step": None} == by["base_seed1"].config["train"]  # same plan otherwise
    base = by["base_seed1"].config
    assert base["resume"] == "auto" and base["train"]["pause_at_step"] is None
    assert base["train"]["max_iters"] == 6 and base["train"]["max_tokens"] is None
    assert base["train"]["save_interval"] == 3  # the config's: each segment's pause saves its fork step
    unsplit = {j.name: j for j in plan_sweep(load_spec(_spec(tmp_path, config_file, split_base=False)))}
    assert list(unsplit) == ["base_seed42", "code_w0.5_at2_seed42", "code_w0.5_at4_seed42"]
    assert unsplit["base_seed42"].config["train"]["save_interval"] == 1  # gcd(2, 4) = 2 vs the config's 3 -> 1
    assert unsplit["code_w0.5_at4_seed42"].depends == ["base_seed42"]
    assert base["seed"] == 1 and base["data"]["init_args"]["seed"] == 1
    arm = by["code_w0.5_at4_seed2"]
    assert arm.depends == ["base_seed2_to4"] and by["code_w0.5_at2_seed2"].depends == ["base_seed2_to2"]
    assert arm.config["fork_from"] == str(tmp_path / "runs" / "base_seed2" / "step-00000004")
    assert arm.config["data"]["init_args"]["mix_weights_str"] == "main:0.5,code:0.5"
    assert arm.config["train"]["max_iters"] == 6 and arm.config["train"]["max_additional_steps"] is None
    assert arm.config["train"]["lr_scheduler"] == "cosine"  # the base run's schedule continues
    assert by["cpt_seed1"].config["data"]["init_args"]["mix_weights_str"] == "code:1.0"
    table = plan_table(jobs)
    assert "fork @4, main:0.5,code:0.5" in table and "cpt_seed2" in table


def test_write_plan_submits_each_group_after_exactly_what_it_needs(tmp_path, config_file):  # noqa: F811
    spec = load_spec(_spec(tmp_path, config_file, seeds=[1, 2], arm_data_seeds=[7, 8], soup_data_seeds=True))
    jobs = plan_sweep(spec)
    by = {j.name: j for j in jobs}
    arm = by["code_w0.5_at2_seed2_data8"]  # forked from seed 2's base run; only the data order differs
    assert arm.config["seed"] == 2 and arm.config["data"]["init_args"]["seed"] == 8
    assert arm.config["fork_from"] == by["code_w0.5_at2_seed2_data7"].config["fork_from"]
    soups = [j for j in jobs if j.stage == "soup"]  # one per (arm, pretraining seed): never across seeds
    assert [j.name for j in soups] == ["soup_code_w0.5_at2_seed1", "soup_code_w0.5_at4_seed1",
                                       "soup_code_w0.5_at2_seed2", "soup_code_w0.5_at4_seed2"]
    assert soups[2].depends == ["code_w0.5_at2_seed2_data7", "code_w0.5_at2_seed2_data8"]
    assert soups[2].config["checkpoints"] == [str(tmp_path / "runs" / f"code_w0.5_at2_seed2_data{d}" / "final")
                                              for d in (7, 8)]
    submit = write_plan(jobs, tmp_path / "cfg")
    lists = {s: (tmp_path / "cfg" / f"{s}.txt").read_text().split() for s in ("base", "midtrain", "soup")}
    assert (len(lists["base"]), len(lists["midtrain"]), len(lists["soup"])) == (6, 8, 4)
    for p in lists["base"] + lists["midtrain"]:
        assert yaml.safe_load(Path(p).read_text())["out_dir"].startswith(str(tmp_path / "runs"))
    text = submit.read_text()
    # groups: both seeds' first segments (one array); per seed the segment to 4 and the rest; the data
    # seeds of one arm (one array: same dependency); one array per soup
    arrays = sorted((tmp_path / "cfg" / "arrays").iterdir())
    assert [len(a.read_text().split()) for a in arrays] == [2, 1, 1, 1, 1, 2, 2, 2, 2, 1, 1, 1, 1]
    assert arrays[0].read_text().split() == [str(tmp_path / "cfg" / f"base_seed{s}_to2.yaml") for s in (1, 2)]
    sub = {line.split("=", 1)[0]: line for line in text.splitlines() if "sbatch" in line}
    assert "--dependency" not in sub["g1"] and "--array=1-2" in sub["g1"]
    assert "--dependency=afterok:${g1}_1 " in sub["g2"]  # seed 1's segment to 4 after seed 1's first segment
    arm2 = next(k for k, v in sub.items() if "midtrain-code_w0.5_at2_seed2_data7" in v)
    assert "--dependency=afterok:${g1}_2 " in sub[arm2]  # the seed-2 arms at step 2: their segment, nothing else
    soup = next(k for k, v in sub.items() if "soup-soup_code_w0.5_at2_seed2" in v)
    assert "LITGPT_EXT_COMMAND=soup" in sub[soup]
    assert f"--dependency=afterok:${{{arm2}}}_1:${{{arm2}}}_2 " in sub[soup]  # after both data seeds' runs
    assert "--kill-on-invalid-dep=yes" in sub[arm2]
    import subprocess

    assert subprocess.run(["bash", "-n", str(submit)]).returncode == 0


SYNTH_ARMS = [{"name": "plain", "domain": "code", "start": 2, "weight": 1.0},
              {"name": "synth", "domain": "code", "start": 4, "mix": "synth:0.2,code:0.8"}]
SYNTH = {"shard": "s1", "args": {"prompts": "p.txt", "num_docs": 3}}


def test_prep_and_synth_replay_are_jobs_with_their_dependencies(tmp_path, config_file):  # noqa: F811
    prep = [{"name": "sft", "command": "build-sft-tasks", "creates": str(tmp_path / "sft" / "manifest.json"),
             "args": {"demo_dir": "data/demo", "out_dir": str(tmp_path / "sft")}}]
    spec = load_spec(_spec(tmp_path, config_file, seeds=[1, 2], grid={}, arms=SYNTH_ARMS, prep=prep,
                           synth_replay=SYNTH))
    jobs = plan_sweep(spec)
    by = {j.name: j for j in jobs}
    assert [j.name for j in jobs if j.stage in ("prep", "synth")] == ["prep_sft", "synth_replay_seed1", "synth_replay_seed2"]
    assert by["base_seed1_to2"].depends == ["prep_sft"] and by["base_seed1_to4"].depends == ["base_seed1_to2"]
    synth = by["synth_replay_seed2"]  # sampled from the seed's own base at the synth arms' start
    assert synth.command == "synth-replay" and synth.depends == ["base_seed2_to4"]
    root = tmp_path / "runs"
    assert synth.config == {"prompts": "p.txt", "num_docs": 3, "checkpoint": str(root / "base_seed2" / "step-00000004"),
                            "out_dir": str(root / "synth_replay_seed2" / "data"), "shard": "s1",
                            "link_shards_from": str(config_file.parent / "data")}
    arm = by["synth_seed2"]  # the arm named synth: its runs are synth_seed<S>, the stage's jobs synth_replay_seed<S>
    assert arm.stage == "midtrain" and arm.depends == ["base_seed2_to4", "synth_replay_seed2"]
    assert arm.config["data"]["init_args"]["data_path"] == str(root / "synth_replay_seed2" / "data")
    plain = next(j for j in jobs if j.stage == "midtrain" and j.info["arm"] == "plain")
    assert plain.config["data"]["init_args"]["data_path"] == str(config_file.parent / "data")
    assert not by["prep_sft"].done() and not synth.done()  # done = the path each `creates` exists
    (root / "synth_replay_seed2" / "data" / "s1").mkdir(parents=True)
    (root / "synth_replay_seed2" / "data" / "s1" / "synth_meta.json").write_text("{}")
    assert synth.done()
    write_plan(jobs, tmp_path / "cfg")
    sub = {line.split("=", 1)[0]: line for line in (tmp_path / "cfg" / "submit.sh").read_text().splitlines()
           if "sbatch" in line}
    g_prep = next(k for k, v in sub.items() if "prep-prep_sft" in v)
    g_synth = next(k for k, v in sub.items() if "synth-synth_replay_seed1" in v)
    assert "LITGPT_EXT_COMMAND=build-sft-tasks" in sub[g_prep] and "--dependency" not in sub[g_prep]
    assert "LITGPT_EXT_COMMAND=synth-replay" in sub[g_synth] and "--dependency=afterok:" in sub[g_synth]
    g_arm = next(k for k, v in sub.items() if "midtrain-synth_seed1" in v)
    assert f"${{{g_synth}}}_1" in sub[g_arm]  # the synth arm waits for its seed's shard


@pytest.mark.parametrize("bad, match", [
    ({"synth_replay": SYNTH, "arms": [SYNTH_ARMS[0]]}, r"synth_replay: no arm's mix has type 'synth'"),
    ({"synth_replay": {**SYNTH, "args": {"out_dir": "x"}}}, r"synth_replay.args.out_dir is set by the plan"),
    ({"synth_replay": {**SYNTH, "step": 9}}, r"synth_replay.step must be a base step in \(0, total_steps=6\)"),
    ({"synth_replay": SYNTH, "arms": SYNTH_ARMS + [{**SYNTH_ARMS[1], "name": "s2", "start": 3}]},
     r"the arms that mix synth start at \[3, 4\]; give synth_replay.step"),
    ({"prep": [{"name": "x", "command": "bake", "creates": "y"}]}, r"command 'bake' is not a litgpt-ext command"),
    ({"prep": [{"name": "x", "command": "prepare"}]}, r"lacks \['creates'\]"),
    ({"prep": [{"name": "x", "command": "prepare", "creates": "a"}, {"name": "x", "command": "clean", "creates": "b"}]},
     r"steps \['x'\] are named more than once"),
    ({"local": {"workers": 0}}, r"local.workers must be an integer >= 1, got 0"),
    ({"local": {"threds": 1}}, r"sweep spec local: unknown keys \['threds'\]"),
])
def test_bad_stages_are_named(tmp_path, config_file, bad, match):  # noqa: F811
    kw = {"grid": {}, "arms": SYNTH_ARMS, **bad}
    with pytest.raises(ValueError, match=match):
        plan_sweep(load_spec(_spec(tmp_path, config_file, **kw)))


def test_token_matched_cpt_control(tmp_path, config_file):  # noqa: F811
    arms = [{"name": "mid", "domain": "code", "start": 20, "weight": 0.12},
            {"name": "cpt", "domain": "code", "weight": 1.0, "match_tokens_of": "mid"}]
    jobs = {j.name: j for j in plan_sweep(load_spec(_spec(tmp_path, config_file, total_steps=200, grid={}, arms=arms)))}
    cpt = jobs["cpt_seed42"]
    assert cpt.info["start"] == 200 - round(0.12 * 180) == 178  # 21.6 -> 22 steps of 100% code
    assert cpt.config["fork_from"].endswith("step-00000178") and cpt.depends == ["base_seed42_to178"]
    assert jobs["mid_seed42"].info["domain_steps"] == pytest.approx(21.6) and cpt.info["domain_steps"] == 22
    assert "code ~22 steps" in plan_table(list(jobs.values()))


@pytest.mark.parametrize("bad, match", [
    ({"grid": {}, "arms": [{"name": "c", "domain": "code", "weight": 1.0, "match_tokens_of": "nope"}]},
     r"match_tokens_of='nope' names no arm with a start; arms: \[\]"),
    ({"arms": [{"name": "c", "domain": "math", "weight": 1.0, "match_tokens_of": "code_w0.5_at2"}]},
     r"trains on 'code', not 'math'"),
    ({"arms": [{"name": "c", "domain": "code", "weight": 1.0, "strat": 3}]}, r"unknown keys \['strat'\]"),
    ({"seeds": [1, 2], "soup_data_seeds": True}, r"soup_data_seeds needs >= 2 arm_data_seeds, got \[\].*different"
                                                 r" random initializations"),
    ({"grid": {"domain": ["code"], "start": [9], "weight": [0.2]}}, r"start must be in \(0, total_steps=6\)"),
    ({"grid": {"domain": ["code"], "start": [2], "weight": [1.5]}}, r"weight must be in \(0, 1\]"),
    ({"grid": {"domain": ["code"], "start": [2], "wieght": [0.2]}}, r"unknown dimensions \['wieght'\]"),
    ({"colour": 1}, r"unknown keys \['colour'\]"),
    ({"report": {"task_domain": {}}}, r"sweep spec report: unknown keys \['task_domain'\]"),
])
def test_bad_specs_are_named(tmp_path, config_file, bad, match):  # noqa: F811
    with pytest.raises(ValueError, match=match):
        plan_sweep(load_spec(_spec(tmp_path, config_file, **bad)))


@pytest.mark.slow
def test_local_run_forks_and_ends_at_the_shared_total(tmp_path, config_file):  # noqa: F811
    spec = load_spec(_spec(tmp_path, config_file, grid={"domain": ["code"], "start": [2], "weight": [0.5]}))
    jobs = plan_sweep(spec)
    assert run_local(jobs, tmp_path / "cfg") == ["base_seed42_to2", "base_seed42", "code_w0.5_at2_seed42"]
    base, arm = (tmp_path / "runs" / n / "final" for n in ("base_seed42", "code_w0.5_at2_seed42"))
    sb, sa = ckpt.load_training_state(base), ckpt.load_training_state(arm)
    assert sb["step"] == sa["step"] == 6
    assert sa["lr"] == pytest.approx(sb["lr"])  # same schedule position: no re-warmup, same horizon
    assert sa["mix"]["weights"] == {"main/1": 0.25, "main/2": 0.25, "c1": 0.5}  # the arm's new blend
    assert sb["mix"]["weights"]["c1"] == pytest.approx(0.2)  # the base config's own blend
    assert "Done: paused at step 2" in (tmp_path / "runs" / "base_seed42" / "sweep.log").read_text()
    assert len((tmp_path / "runs" / "base_seed42" / "phases.jsonl").read_text().splitlines()) == 1  # one plan
    assert run_local(jobs, tmp_path / "cfg") == []  # finished runs are skipped


def test_report_from_the_finished_sft_runs(tmp_path, config_file, capsys):  # noqa: F811
    """`--action report` on a planned sweep whose SFT runs wrote known metrics (one still missing): the LR
    with the lowest mean over seeds per (checkpoint, task), relative improvements, F1 with a near-domain
    arm as the paper has (QA), F2 against the CPT arm, an ablation arm kept out of the findings."""
    import json

    from litgpt_ext.cli import main as cli
    from litgpt_ext.sft.metrics import SFTMetrics, write_sft_metrics

    sft_cfg = tmp_path / "sft.yaml"
    sft_cfg.write_text(yaml.safe_dump({"data": {"init_args": {"train_path": str(tmp_path / "none")}}}))
    spec_path = _spec(tmp_path, config_file, grid={}, arms=[
        {"name": "code_mid", "domain": "code", "start": 2, "weight": 0.5},
        {"name": "qa_mid", "domain": "qa", "start": 2, "weight": 0.5},
        {"name": "code_cpt", "domain": "code", "start": 4, "weight": 1.0},
        {"name": "code_late", "domain": "code", "start": 4, "weight": 0.5, "role": "ablation"}],
        sft={"config": str(sft_cfg), "tasks": {"pycode": {}, "sciq": {}}, "lr": [1e-4, 3e-4], "seeds": [0, 1]},
        report={"task_domains": {"pycode": "code", "sciq": "qa"}})
    jobs = plan_sweep(load_spec(spec_path))
    # SFT loss per (source family, task) at lr 3e-4 (lr 1e-4 is 0.1 worse); general loss after SFT
    sft = {("base", "pycode"): 2.0, ("code_mid", "pycode"): 1.5, ("code_cpt", "pycode"): 1.6, ("code_late", "pycode"): 1.7,
           ("qa_mid", "pycode"): 2.0, ("base", "sciq"): 3.0, ("qa_mid", "sciq"): 2.97, ("code_mid", "sciq"): 3.0,
           ("code_cpt", "sciq"): 3.1, ("code_late", "sciq"): 3.0}
    general = {"code_cpt": 4.5}
    skipped = "sft_sciq_code_late_seed42_lr0.0003_s1"
    for j in jobs:
        if j.stage != "sft" or j.name == skipped:
            continue
        fam = j.info["source"].rsplit("_seed", 1)[0]
        loss = sft[(fam, j.info["task"])] + (0.1 if j.info["lr"] == 1e-4 else 0.0) + 0.01 * j.info["seed"]
        write_sft_metrics(j.out_dir, SFTMetrics(
            sft_set=j.info["task"], sft_val_loss=loss, sft_val_tokens=100, lr=j.info["lr"], seed=j.info["seed"],
            source_checkpoint=str(j.config["checkpoint_dir"]), source_run=j.info["source"], source_checkpoint_name="final",
            source_step=6, step=10, epochs=1.0, val_losses={"general": general.get(fam, 4.0) + 0.01 * j.info["seed"]}))
        final = j.out_dir / "final"  # the one "finished" rule: sft_metrics.json and a complete final/
        final.mkdir()
        for f in ckpt.REQUIRED_FILES:
            (final / f).write_bytes(b"x")
    cli(["sweep", "--spec", str(spec_path), "--action", "report"])
    out = tmp_path / "runs" / "report"
    report, res = (out / "REPORT.md").read_text(), json.loads((out / "results.json").read_text())
    assert "39 of 40 SFT runs have finished" in report and skipped in report
    cell = res["cells"]["base|pycode"]
    assert cell["lrs"] == [3e-4] and cell["sft"] == pytest.approx([2.0, 2.01])
    assert res["cells"]["code_late|sciq"]["n"] == 1  # its other seed is missing: the cell says so
    f = {x["id"]: x for x in res["findings"]}
    assert f["F1"]["holds"] and [x[0] for x in f["F1"]["numbers"]["far"]] == ["code_mid"]  # not the ablation
    assert [x[:2] for x in f["F1"]["numbers"]["near"]] == [["qa_mid", "sciq"]]
    assert f["F1"]["numbers"]["far_mean"] == pytest.approx((2.005 - 1.505) / 2.005)
    assert f["F2"]["holds"] and f["F2"]["numbers"][0]["cpt"] == "code_cpt"
    assert "F3" not in f and "the similarity stage failed (missing" in report  # no shards here: said, not skipped
    assert "### F4" in report and (out / "sft_losses.png").stat().st_size > 1000
    bad = yaml.safe_load(spec_path.read_text())
    for key, value, match in (("similarity_docs", -1, "similarity_docs must be >= 0"),
                              ("task_domains", {"gsm8k": "math"}, r"names \['gsm8k'\], which are not SFT tasks")):
        bad["report"][key] = value
        spec_path.write_text(yaml.safe_dump(bad))
        with pytest.raises(SystemExit, match=match):
            cli(["sweep", "--spec", str(spec_path), "--action", "report"])
        bad["report"][key] = {"similarity_docs": 1000, "task_domains": {"pycode": "code"}}[key]
    with pytest.raises(SystemExit, match="role must be one of mid, cpt, cross, ablation"):
        cli(["sweep", "--spec", str(_spec(tmp_path, config_file, arms=[
            {"name": "x", "domain": "code", "start": 2, "weight": 0.5, "role": "main"}])), "--action", "report"])


def test_one_best_lr_rule_and_one_run_name_parser():
    from litgpt_ext.sft.grid import best_lr, lr_edge_step
    from litgpt_ext.study.spec import arm_name, arm_of, split_run_name

    assert best_lr({3e-3: [1.0, 1.4], 1e-3: [1.3, 1.3]}) == 3e-3  # the lowest mean over seeds (1.2 < 1.3)
    assert best_lr({3e-3: [1.0], 1e-3: [1.0]}) == 1e-3  # a tie: the smaller LR
    with pytest.raises(ValueError, match="every LR needs at least one"):
        best_lr({1e-3: []})
    a = arm_of({"name": "math_mid_seed_fix", "domain": "math", "start": 3, "weight": 0.2})
    assert (a.role, arm_of({"domain": "math", "start": 3, "weight": 1.0}).name) == ("mid", "math_w1_at3")
    assert arm_of({"domain": "math", "start": 3, "weight": 1.0}).role == "cpt"  # the default at weight 1.0
    assert lr_edge_step([1e-3, 3e-3], 3e-3) == pytest.approx(3) and lr_edge_step([1e-3, 3e-3], 1e-3) == pytest.approx(1 / 3)
    assert lr_edge_step([1e-4, 1e-3, 3e-3], 1e-3) is None and lr_edge_step([1e-3], 1e-3) is None
    assert split_run_name(arm_name(a, 42)) == ("math_mid_seed_fix", 42)
    with pytest.raises(ValueError, match=r"'base' does not end in _seed<N>"):
        split_run_name("base")


def test_an_arm_added_after_its_base_finished_needs_a_checkpoint_at_its_start(tmp_path, monkeypatch):
    from litgpt_ext.study.executor import Job
    from litgpt_ext.study.plan_checks import check_forks

    run = tmp_path / "base_seed42"
    for step in (20, 66):
        (run / f"step-{step:08d}").mkdir(parents=True)
    monkeypatch.setattr("litgpt_ext.checkpoint.list_checkpoints", lambda d, **kw: [(20, d / "step-00000020"),
                                                                                   (66, d / "step-00000066")])
    base = Job("base_seed42_to60", "base", "pretrain", {}, run, info={"pause": 60})
    monkeypatch.setattr(Job, "done", lambda self: self.stage == "base")  # the base ran past 60 long ago
    arm = Job("math_at60_seed42", "midtrain", "pretrain", {"fork_from": str(run / "step-00000060")},
              tmp_path / "arm", depends=[base.name])
    with pytest.raises(ValueError, match=r"has finished without a checkpoint there \(it has steps \[20, 66\]\)"):
        check_forks([base, arm])
    arm.config["fork_from"] = str(run / "step-00000066")  # a start the base saved: fine
    check_forks([base, arm])


def test_a_lora_arm_is_merged_before_its_sft_runs(tmp_path, config_file):  # noqa: F811
    arms = [{"name": "full", "domain": "code", "start": 4, "weight": 1.0},
            {"name": "lora8", "domain": "code", "start": 4, "weight": 1.0, "overrides": {"lora": {"r": 8, "alpha": 16}}}]
    sft = {"config": str(Path(__file__).resolve().parents[1] / "midtrain_configs/reproduce/sft_cpu.yaml"),
           "tasks": {"code": {}}, "lr": [1e-3], "seeds": [1]}
    jobs = plan_sweep(load_spec(_spec(tmp_path, config_file, grid={}, arms=arms, sft=sft)))
    by = {j.name: j for j in jobs}
    root = tmp_path / "runs"
    merge = by["merge_lora8_seed42"]
    assert merge.stage == "merge" and merge.command == "merge-lora" and merge.depends == ["lora8_seed42"]
    assert merge.config == {"checkpoint": str(root / "lora8_seed42" / "final"), "out_dir": str(root / "lora8_seed42" / "merged")}
    assert not merge.done() and "merge_full_seed42" not in by  # only the adapter arm needs a merge
    lora_sft = next(j for j in jobs if j.stage == "sft" and j.info["source"] == "lora8_seed42")
    full_sft = next(j for j in jobs if j.stage == "sft" and j.info["source"] == "full_seed42")
    assert lora_sft.depends == ["merge_lora8_seed42"] and full_sft.depends == ["full_seed42"]
    assert lora_sft.config["checkpoint_dir"] == str(root / "lora8_seed42" / "merged")
    write_plan(jobs, tmp_path / "cfg")
    sub = (tmp_path / "cfg" / "submit.sh").read_text()
    assert "LITGPT_EXT_COMMAND=merge-lora" in sub and "--job-name=merge-merge_lora8_seed42" in sub
