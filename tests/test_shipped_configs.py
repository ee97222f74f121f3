"""Every YAML under midtrain_configs/ parses with its command's own parser, the cluster templates name
their data, and the demo/CPU configs run on demo data (a small build-demo corpus, 1-2 steps each).

The runs happen in a folder that holds `data/demo` (built once per session) and a link to the
repository's `midtrain_configs/`, so the configs run with their own relative paths (`data/demo/...`,
`runs/...`): only the budget (steps, validation batches) is overridden.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from pathlib import Path

import pytest
import yaml

from litgpt_ext.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "midtrain_configs"
# every shipped config -> the command that reads it
KIND = {
    "demo/midtrain_control.yaml": "pretrain", "demo/midtrain_math.yaml": "pretrain", "demo/moe_tiny.yaml": "pretrain",
    "demo/pretrain.yaml": "pretrain", "demo/midtrain_odm.yaml": "pretrain", "demo/midtrain_math_lora.yaml": "pretrain",
    "midtrain/pythia-160m_code_rewarmup.yaml": "pretrain", "midtrain/pythia-160m_dynamic_mix.yaml": "pretrain",
    "midtrain/pythia-160m_math_decay.yaml": "pretrain",
    "pretrain/pythia-160m_paper_c4.yaml": "pretrain", "pretrain/pythia-160m_wsd.yaml": "pretrain",
    "pretrain/tiny_cpu.yaml": "pretrain",
    "reproduce/cpu.yaml": "reproduce", "reproduce/pretrain_cpu.yaml": "pretrain", "reproduce/sft_cpu.yaml": "sft",
    "sft/demo_math.yaml": "sft", "sft/paper_sft.yaml": "sft",
    "sweeps/paper_pythia160m.yaml": "sweep", "studies/forgetting_cpu.yaml": "sweep",
    "studies/online_mixing_cpu.yaml": "sweep",
}
CLUSTER = sorted(k for k in KIND if "pythia" in k or "paper" in k)
# sweep specs of CPU studies: run shrunk (fewer arms and steps) by test_cpu_study_runs_shrunk
STUDIES = {"studies/forgetting_cpu.yaml": ["no_replay", "l2_anchor", "ewc_lo", "llrd08", "synth20"],
           "studies/online_mixing_cpu.yaml": ["fixed", "odm", "doremi"]}
SHORT = ["--eval.max_iters", "1", "--logger_name", "csv"]
# the demo/CPU configs, in dependency order: (config, extra flags, the checkpoint it must leave, its step)
RUNS = [
    ("demo/pretrain.yaml", ["--train.max_iters", "2", "--train.save_interval", "1", *SHORT],
     "runs/demo/pretrain/final", 2),
    ("demo/midtrain_math.yaml", ["--fork_from", "runs/demo/pretrain/step-00000001", "--train.max_additional_steps", "1",
                                 *SHORT], "runs/demo/midtrain_math/final", 2),
    ("demo/midtrain_odm.yaml", ["--fork_from", "runs/demo/pretrain/step-00000001", "--train.max_additional_steps", "1",
                                *SHORT], "runs/demo/midtrain_odm/final", 2),
    ("demo/midtrain_control.yaml", ["--fork_from", "runs/demo/pretrain/step-00000001",
                                    "--train.max_additional_steps", "1", *SHORT], "runs/demo/midtrain_control/final", 2),
    ("demo/midtrain_math_lora.yaml", ["--fork_from", "runs/demo/pretrain/step-00000001",
                                      "--train.max_additional_steps", "1", *SHORT], "runs/demo/midtrain_math_lora/final", 2),
    ("demo/moe_tiny.yaml", ["--train.max_iters", "1", *SHORT], "runs/moe_tiny/final", 1),
    ("pretrain/tiny_cpu.yaml", ["--train.max_iters", "2", *SHORT], "out/demo/pretrain/final", 2),
    ("sft/demo_math.yaml", ["--train.epochs", "1", "--train.global_batch_size", "16", "--eval.max_iters", "1"],
     "runs/sft/midtrain_math/final/math/lr-3e-4_seed-1/final", None),
    ("reproduce/pretrain_cpu.yaml", ["--train.max_iters", "2", *SHORT], "runs/reproduce/runs/base_seed42/final", 2),
    ("reproduce/sft_cpu.yaml", ["--eval.max_iters", "1"], "runs/reproduce/sft/math/base_seed42/lr1e-3_seed1/final", None),
    ("reproduce/cpu.yaml", ["--out_dir", "runs/reproduce_small", "--total_steps", "4", "--pretrain_seeds", "[42]",
                            "--arms", json.dumps([{"name": "math_mid", "domain": "math", "start": 2, "weight": 0.25,
                                                   "role": "mid", "tasks": ["math"]}]),
                            "--base_tasks", "[math]", "--sft_lrs", "[1.0e-3]", "--sft_seeds", "[1, 2]",
                            "--similarity_docs", "10", "--sft_task_args", json.dumps({"math_examples": 60})],
     "runs/reproduce_small/runs/math_mid_seed42/final", 4),
]


def test_every_config_is_classified():
    found = sorted(str(p.relative_to(CONFIG_DIR)) for p in CONFIG_DIR.rglob("*.y*ml"))
    assert found == sorted(KIND), "classify new configs in KIND (and RUNS if they run on the demo data)"
    assert {c for c, *_ in RUNS} | set(STUDIES) == {k for k in KIND if k not in CLUSTER}, "every demo/CPU config runs"


@functools.lru_cache(maxsize=None)
def parser_for(command: str):
    """The jsonargparse parser `litgpt-ext <command>` builds from the command's function signature."""
    from jsonargparse import ArgumentParser

    from litgpt_ext.cli import COMMANDS, _load

    parser = ArgumentParser(exit_on_error=False)
    parser.add_function_arguments(_load(COMMANDS[command][0]), as_positional=False)
    return parser


def _get(cfg: dict, dotted: str):
    for k in dotted.split("."):
        if not isinstance(cfg, dict) or k not in cfg:
            return None
        cfg = cfg[k]
    return cfg


@pytest.mark.parametrize("name", sorted(KIND))
def test_config_parses_with_its_commands_parser(name):
    path = CONFIG_DIR / name
    kind = KIND[name]
    if kind == "pretrain":
        cfg = parser_for("pretrain").parse_path(str(path))
        assert cfg.data.class_path == "litgpt_ext.data.ShardedMixedDataset" and cfg.data.init_args.data_path
        assert cfg.model_name or cfg.model_config
    elif kind == "sft":
        from litgpt_ext.sft.config import SFTConfig

        cfg = SFTConfig.from_yaml(path)
        assert cfg.checkpoint_dir and cfg.out_dir
        parser_for("sft").parse_path(str(path))
    elif kind == "sweep":
        from litgpt_ext.study.plan_checks import check_configs
        from litgpt_ext.study.spec import load_spec
        from litgpt_ext.study.sweep import plan_sweep

        spec = load_spec(path)
        assert (ROOT / spec.base_config).is_file() and spec.arms
        cwd = os.getcwd()
        os.chdir(ROOT)
        try:  # every arm's own config (its overrides: a method's knobs) parses with its command's parser
            check_configs(plan_sweep(spec))
        finally:
            os.chdir(cwd)
    else:
        from litgpt_ext.study.reproduce import arms_of, load_config

        cwd = os.getcwd()
        os.chdir(ROOT)  # its pretrain_config / sft_config are relative to the repository
        try:
            assert arms_of(load_config(path))
        finally:
            os.chdir(cwd)


@pytest.mark.parametrize("name", CLUSTER)
def test_cluster_templates_name_their_data(name):
    raw = yaml.safe_load((CONFIG_DIR / name).read_text())
    kind = KIND[name]
    if kind == "pretrain":
        keys = ["out_dir", "tokenizer_dir", "data.init_args.data_path", "data.init_args.val_data_path"]
        if name.startswith("midtrain/"):
            keys.append("fork_from" if "fork_from" in raw else "initial_checkpoint_dir")
    elif kind == "sft":
        keys = ["checkpoint_dir", "out_dir", "data.init_args.train_path", "eval.val_data_path"]
    else:
        keys = ["base_config", "sft.config", "sft.tasks"]
        for task, overrides in raw["sft"]["tasks"].items():
            assert overrides.get("data.init_args.train_path"), f"{name}: sft task {task} names no train_path"
        assert (ROOT / raw["sft"]["config"]).is_file()
    for key in keys:
        value = _get(raw, key)
        assert value, f"{name}: {key} is missing or empty"
        if isinstance(value, dict):
            assert all(value.values()), f"{name}: {key} has an empty entry: {value}"


@pytest.fixture(scope="session")
def demo_runs(tmp_path_factory):
    """Build a small demo corpus once, then run every demo/CPU config on it; {config: error or None}."""
    import torch

    from litgpt_ext.demo.corpus import build_demo

    root = tmp_path_factory.mktemp("shipped")
    build_demo(root / "data" / "demo", main_tokens=30_000, code_tokens=12_000, math_tokens=12_000, heldout_docs=40,
               tokenizer_sample_chars=150_000, chunk_tokens=4096, val_fraction=0.1, seed=5)  # vocab 4096, as the configs
    (root / "midtrain_configs").symlink_to(CONFIG_DIR, target_is_directory=True)
    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(root)
    torch.set_num_threads(1)
    errors: dict[str, str | None] = {}
    try:
        cli_main(["build-sft-tasks", "--demo_dir", "data/demo", "--math_examples", "60"])
        for name, flags, _, _ in RUNS:
            command = KIND[name]
            t0 = time.perf_counter()
            try:
                cli_main([command, "--config", f"midtrain_configs/{name}", *flags])
                errors[name] = None
            except (SystemExit, Exception) as e:  # noqa: B014  (a failed command exits)
                errors[name] = f"{type(e).__name__}: {e}"
            print(f"shipped config {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    return root, errors


@pytest.mark.slow
@pytest.mark.parametrize("name, checkpoint, step", [(c, ck, s) for c, _, ck, s in RUNS], ids=[c for c, *_ in RUNS])
def test_demo_and_cpu_configs_run_on_demo_data(demo_runs, name, checkpoint, step):
    root, errors = demo_runs
    assert errors[name] is None, f"{name}: {errors[name]}"
    manifest = json.loads((root / checkpoint / "manifest.json").read_text())
    if step is not None:
        assert manifest["step"] == step
    if KIND[name] == "sft":
        metrics = json.loads((root / Path(checkpoint).parent / "sft_metrics.json").read_text())
        assert metrics["sft_val_loss"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(STUDIES))
def test_cpu_study_runs_shrunk(demo_runs, name):
    """The study's own arms (their mixes and method overrides), its prep and synthetic-replay stages and
    its two workers, shrunk to a few steps, run by the one command `sweep --action local`, which ends
    with the methods report."""
    root, _ = demo_runs
    raw = yaml.safe_load((CONFIG_DIR / name).read_text())
    keep = STUDIES[name]
    raw.update(total_steps=6, seeds=[42], arm_data_seeds=[7, 8], out_root=f"runs/small_{Path(name).stem}", sft=None,
               base_overrides={**raw.get("base_overrides", {}), "eval.max_iters": 1, "logger_name": "csv"},
               arms=[{**a, "start": 3} for a in raw["arms"] if a["name"] in keep])
    raw["arm_overrides"] = {**raw.get("arm_overrides", {}), "eval.interval": 3, "eval.max_iters": 1}
    for a in raw["arms"]:
        if "regularizer" in a.get("overrides", {}) and a["overrides"]["regularizer"].get("fisher_batches"):
            a["overrides"]["regularizer"]["fisher_batches"] = 1
        if "mix_policy" in a.get("overrides", {}):  # an update at every step of the 3
            a["overrides"]["mix_policy"]["update_every"] = 1
    for step in raw.get("prep", []):  # the demo corpus is the fixture's (prep_demo is skipped: it exists)
        if step["command"] == "build-sft-tasks":
            step["args"]["math_examples"] = 60
    if "synth_replay" in raw:
        raw["synth_replay"]["args"].update(num_docs=8, max_new_tokens=40)  # > one sample of 129 tokens
    spec = root / "study_small.yaml"
    spec.write_text(yaml.safe_dump(raw))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        cli_main(["sweep", "--spec", str(spec), "--action", "local"])
    finally:
        os.chdir(cwd)
    out, ref = root / "runs" / f"small_{Path(name).stem}", raw["report"]["reference"]
    res = json.loads((out / "report" / "results.json").read_text())
    assert sorted(res["arms"]) == sorted(keep) and res["front"] and res["reference"] == ref
    for arm in keep:
        r = res["arms"][arm]
        assert r["n"] == 2 and not r["missing"] and math.isfinite(r["gain"]["point"]) and math.isfinite(r["forgetting"]["point"])
    assert set(res["vs_reference"]) == set(keep) - {ref}
    assert (out / "report" / "pareto.png").stat().st_size > 1000
    a, b = (json.loads((out / f"{ref}_seed42_data{d}" / "final" / "manifest.json").read_text()) for d in (7, 8))
    assert a["files"]["lit_model.pth"] != b["files"]["lit_model.pth"]  # two data orders, two models
    if "mix_policy" in json.dumps(raw["arms"]):  # the online arms wrote their trajectories
        assert all((out / f"{a}_seed42_data7" / "mix_trajectory.jsonl").is_file() for a in ("odm", "doremi"))
    if "synth_replay" not in raw:
        return
    assert json.loads((out / "synth_replay_seed42" / "data" / "s1" / "synth_meta.json").read_text())["checkpoint"].endswith(
        "base_seed42/step-00000003")  # sampled from the arms' own fork checkpoint
    synth = yaml.safe_load((out / "synth20_seed42_data7" / "final" / "hyperparameters.yaml").read_text())
    assert synth["data"]["init_args"]["data_path"] == f"{out.relative_to(root)}/synth_replay_seed42/data"
