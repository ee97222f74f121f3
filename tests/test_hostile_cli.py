"""A hostile probe of the CLI: bad files (missing, empty, a folder, not UTF-8, not YAML/JSON, a list
where a mapping belongs), bad values and unknown keys, over every command that reads files.

Each case asserts: a non-zero exit (2 for parse errors, 1 otherwise), one short message naming the
culprit, no traceback, and no output folder left behind. Most run in-process
(`litgpt_ext.cli.main`); a few real subprocesses (marked slow where they import torch) check what a
user sees: stderr, the exit status, the time to the error.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from litgpt_ext.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> Path:
    """Hostile inputs: empty, broken and binary files, a list-valued YAML, a folder, a fake checkpoint."""
    root = tmp_path_factory.mktemp("hostile")
    (root / "empty.yaml").write_text("")
    (root / "empty.json").write_text("")
    (root / "bad.yaml").write_text("a: [1, 2\n")
    (root / "bad.json").write_text('{"a": ')
    (root / "bin.yaml").write_bytes(b"\xff\xfe\x00garbage")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "unknown.yaml").write_text("nosuch_key: 1\n")
    (root / "dir").mkdir()
    ck = root / "ckdir"  # a checkpoint folder whose weights file is empty
    ck.mkdir()
    (ck / "lit_model.pth").write_bytes(b"")
    (ck / "model_config.yaml").write_text("name: x\n")
    (root / "grid.yaml").write_text(yaml.safe_dump({
        "checkpoint_dir": str(ck), "out_dir": str(root / "sftout"),
        "data": {"class_path": "litgpt_ext.sft.data.SFTData", "init_args": {"train_path": str(root / "t.json")}},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}}}))
    return root


GRID = ["sft-grid", "--sft_config", "{w}/grid.yaml", "--lrs", "[1e-3]"]
# name -> (argv, exit status, substrings the message must contain)
CASES = {
    # ---- --config files, checked before the command is imported (validate_first)
    "sft-config-empty": (["sft", "--config", "{w}/empty.yaml"], 2, ["empty.yaml", "is empty"]),
    "sft-config-yaml": (["sft", "--config", "{w}/bad.yaml"], 2, ["bad.yaml", "not valid YAML at line 2"]),
    "sft-config-binary": (["sft", "--config", "{w}/bin.yaml"], 2, ["bin.yaml", "not UTF-8"]),
    "sft-config-list": (["sft", "--config", "{w}/list.yaml"], 2, ["list.yaml", "holds a list", "mapping"]),
    "sft-config-folder": (["sft", "--config", "{w}/dir"], 2, ["dir'", "is a folder"]),
    "sft-config-missing": (["sft", "--config", "{w}/nope.yaml"], 2, ["config='", "nope.yaml' is not valid: File does not exist"]),
    "sft-config-unknown-key": (["sft", "--config", "{w}/unknown.yaml"], 2, ["'nosuch_key'", "checkpoint_dir"]),
    "sweep-config-list": (["sweep", "--config", "{w}/list.yaml"], 2, ["list.yaml", "holds a list"]),
    "soup-config-unknown": (["soup", "--config", "{w}/unknown.yaml"], 2, ["'nosuch_key'", "checkpoints"]),
    # ---- sft-grid
    "grid-every-0": ([*GRID, "--run_dir", "{w}/dir", "--every", "0"], 1, ["every=0", "positive integer"]),
    "grid-every-neg": ([*GRID, "--checkpoints", "[{w}/ckdir]", "--every", "-3"], 1, ["every=-3", "positive integer"]),
    "grid-config-empty": (["sft-grid", "--sft_config", "{w}/empty.yaml", "--lrs", "[1e-3]"], 1,
                          ["empty.yaml", "missing 3 required", "checkpoint_dir"]),
    "grid-config-list": (["sft-grid", "--sft_config", "{w}/list.yaml", "--lrs", "[1e-3]"], 1, ["list.yaml", "'list'"]),
    "grid-config-binary": (["sft-grid", "--sft_config", "{w}/bin.yaml", "--lrs", "[1e-3]"], 1, ["bin.yaml", "utf-8"]),
    "grid-config-folder": (["sft-grid", "--sft_config", "{w}/dir", "--lrs", "[1e-3]"], 1, ["dir'", "does not exist"]),
    # ---- sweep
    "sweep-spec-yaml": (["sweep", "--spec", "{w}/bad.yaml"], 1, ["bad.yaml", "not valid YAML at line 2"]),
    "sweep-spec-binary": (["sweep", "--spec", "{w}/bin.yaml"], 1, ["bin.yaml", "utf-8"]),
    "sweep-spec-empty": (["sweep", "--spec", "{w}/empty.yaml"], 1, ["empty.yaml", "lacks", "base_config"]),
    "sweep-spec-unknown": (["sweep", "--spec", "{w}/unknown.yaml"], 1, ["'nosuch_key'", "base_config"]),
    "sweep-action": (["sweep", "--spec", "{w}/unknown.yaml", "--action", "run"], 2, ["'run'", "plan, write, local"]),
    # ---- soup, fork, consolidate, convert-to-hf, evaluate: checkpoints that are none
    "soup-missing": (["soup", "{w}/nope", "{w}/nope2", "--out", "{out}"], 1, ["nope", "does not exist"]),
    "soup-folder": (["soup", "{w}/dir", "{w}/ckdir", "--out", "{out}"], 1, ["dir'", "neither a checkpoint"]),
    "soup-weights-type": (["soup", "{w}/ckdir", "{w}/dir", "--out", "{out}", "--weights", "abc"], 2, ["'abc'", "list[float]"]),
    "fork-not-checkpoint": (["fork", "--from", "{w}/ckdir", "--to", "{out}"], 1, ["ckdir", "training_state.pth"]),
    "consolidate-file": (["consolidate", "{w}/empty.yaml"], 1, ["empty.yaml", "sharded/.metadata"]),
    "convert-empty-weights": (["convert-to-hf", "{w}/ckdir", "{out}"], 1, ["ckdir/lit_model.pth", "not a readable torch file"]),
    "evaluate-file": (["evaluate", "{w}/empty.yaml"], 1, ["empty.yaml", "does not exist"]),
    "merge-lora-full-checkpoint": (["merge-lora", "{w}/ckdir", "{out}"], 1,
                                   ["ckdir'", "holds no LoRA adapter (lit_model.pth.lora)", "full checkpoint"]),
    "merge-lora-folder": (["merge-lora", "{w}/dir", "{out}"], 1, ["dir'", "holds no LoRA adapter"]),
    # ---- data commands
    "clean-folder": (["clean", "--inputs+", "{w}/dir", "--output", "{out}/o.jsonl"], 1, ["dir'", "no supported files"]),
    "clean-output-folder": (["clean", "--inputs+", "{w}/bad.json", "--output", "{w}/dir"], 1, ["dir'", ".jsonl file"]),
    "clean-threshold": (["clean", "--inputs+", "{w}/bad.json", "--output", "{out}/o.jsonl", "--threshold", "abc"], 2,
                        ["threshold='abc'", "float"]),
    "prepare-tokenizer-folder": (["prepare", "--inputs+", "{w}/dir", "--output_dir", "{out}", "--tokenizer_dir", "{w}/dir"],
                                 1, ["dir'", "holds no tokenizer"]),
    "prepare-sft-task": (["prepare-sft", "--task", "gsm9k", "--out_dir", "{out}"], 1, ["'gsm9k'", "gsm8k, sciq"]),
    "prepare-sft-empty": (["prepare-sft", "--task", "gsm8k", "--out_dir", "{out}", "--train_files+", "{w}/empty.json"], 1,
                          ["empty.json", "not valid JSON"]),
    "prepare-sft-extension": (["prepare-sft", "--task", "gsm8k", "--out_dir", "{out}", "--train_files+", "{w}/bin.yaml"], 1,
                              ["bin.yaml", ".jsonl"]),
    "similarity-sets-type": (["similarity", "--data_path", "{w}/dir", "--tokenizer_dir", "{w}/dir", "--sets", "abc",
                              "--sft", "{{s: x.json}}"], 2, ["sets='abc'", "dict"]),
    "inspect-mix-config-empty": (["inspect-mix", "--data_path", "{w}/dir", "--mix_config_path", "{w}/empty.json"], 1,
                                 ["empty.json", "not valid JSON"]),
    "inspect-schedule-empty": (["inspect-mix", "--data_path", "{w}/dir", "--mix_schedule", "[]"], 1,
                               ["mix_schedule is an empty list", "at_step"]),
    "inspect-schedule-duplicate": (["inspect-mix", "--data_path", "{w}/dir", "--mix_schedule",
                                    "[{{at_step: 5, mix_weights_str: 'main:1'}}, {{at_step: 5, mix_weights_str: 'math:1'}}]"],
                                   1, ["point 1", "at_step=5 is also point 0's"]),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_hostile_input_is_one_line(case, w, tmp_path, capsys, monkeypatch):
    argv, status, expected = CASES[case]
    out = tmp_path / "out"
    argv = [a.format(w=w, out=out) for a in argv]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LITGPT_EXT_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    code = 1 if isinstance(e.value.code, str) else e.value.code
    captured = capsys.readouterr()
    err = captured.err + (e.value.code if isinstance(e.value.code, str) else "")
    assert code == status, f"{case}: exit status {code}, expected {status}:\n{err}"
    assert "Traceback" not in err + captured.out
    for s in expected:
        assert s in err, f"{case}: {s!r} not in:\n{err}"
    assert len(err.strip().splitlines()) <= 3, f"{case}: one line (and the hint), not a report:\n{err}"
    assert not out.exists(), f"{case}: left {out}"
    assert not list(tmp_path.iterdir()), f"{case}: wrote into the working folder"


@pytest.mark.parametrize("case", [
    "sweep-spec-yaml",  # fast: no torch
    pytest.param("grid-every-0", marks=pytest.mark.slow),  # these import torch first (~10-20 s here)
    pytest.param("convert-empty-weights", marks=pytest.mark.slow),
])
def test_real_processes_print_one_line(case, w, tmp_path):
    """What a user sees: stderr of a real process, its exit status, nothing written."""
    argv, status, expected = CASES[case]
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("LITGPT_EXT_TRACEBACK", None)
    p = subprocess.run([sys.executable, "-m", "litgpt_ext", *[a.format(w=w, out=out) for a in argv]],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert p.returncode == status and "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"litgpt-ext {argv[0]}: error: "), p.stderr
    assert all(s in lines[0] for s in expected), p.stderr
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ the general mechanism
def _input_error_before_work(x: int = 1) -> None:
    {"a": 1}["checkpoint_dir"]  # noqa: B018  (a config without a key the command needs)


def _bug_in_fit(x: int = 1) -> None:
    # a function named `fit` in a file named like the training loop: the work has started
    code = compile("def fit():\n    raise TypeError('a bug in a training step')\n", "/x/litgpt_ext/train/loop.py", "exec")
    ns: dict = {}
    exec(code, ns)
    ns["fit"]()


def test_input_errors_before_the_work_are_one_line_but_bugs_in_it_keep_their_traceback(monkeypatch):
    from litgpt_ext import cli

    monkeypatch.setitem(cli.COMMANDS, "t-input", (f"{__name__}:_input_error_before_work", "test"))
    monkeypatch.setitem(cli.COMMANDS, "t-bug", (f"{__name__}:_bug_in_fit", "test"))
    monkeypatch.delenv("LITGPT_EXT_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as e:
        cli_main(["t-input"])
    assert "error: missing key 'checkpoint_dir'" in e.value.code and "LITGPT_EXT_TRACEBACK=1" in e.value.code
    with pytest.raises(TypeError, match="a bug in a training step"):
        cli_main(["t-bug"])
    monkeypatch.setenv("LITGPT_EXT_TRACEBACK", "1")
    with pytest.raises(KeyError):
        cli_main(["t-input"])


def test_early_check_reads_signatures_without_importing_the_command():
    from litgpt_ext.validate_first import function_params, literal_choices

    params = function_params("litgpt_ext.train.loop:pretrain")
    assert {"model_config", "tokenizer_dir", "data", "train"} <= set(params)
    assert literal_choices(params["precision"]) == ["bf16-true", "bf16-mixed", "32-true", None]
    assert literal_choices(params["resume"]) is None  # Union[bool, Literal['auto'], Path]: not only choices
    code = "import sys, litgpt_ext.validate_first as v; v.function_params('litgpt_ext.sft.run:sft'); print('torch' in sys.modules)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert p.stdout.strip() == "False", p.stderr


def test_early_check_values_and_overrides(tmp_path, monkeypatch):
    from litgpt_ext.validate_first import ConfigError, check_configs

    monkeypatch.chdir(tmp_path)
    target = "litgpt_ext.train.loop:pretrain"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"precision": "bf16", "tokenizer_dir": "nope/tok"}))
    with pytest.raises(ConfigError, match=r"precision='bf16' is not valid; choose from: bf16-true, bf16-mixed, 32-true, null"):
        check_configs("pretrain", target, ["--config", str(cfg)])
    check_configs("pretrain", target, ["--config", str(cfg), "--precision", "32-true", "--tokenizer_dir", "x"])  # flags win
    cfg.write_text(yaml.safe_dump({"tokenizer_dir": "nope/tok", "data": {"init_args": {"data_path": "nope/data"}}}))
    with pytest.raises(ConfigError, match=r"tokenizer_dir='nope/tok' does not exist \(and 1 more: 'nope/data'\)") as e:
        check_configs("pretrain", target, ["--config", str(cfg)])
    assert e.value.exit_code == 1
    later = tmp_path / "later.yaml"  # a later --config that sets the keys wins over the first one's
    (tmp_path / "tok").mkdir()
    later.write_text(yaml.safe_dump({"tokenizer_dir": "tok", "data": {"init_args": {"data_path": "tok"}}}))
    check_configs("pretrain", target, ["--config", str(cfg), "--config", str(later)])
    check_configs("pretrain", target, ["--config", str(cfg), "--help"])  # --help reads no config
    check_configs("pretrain", target, ["--config", str(cfg), "--print_config"])  # shows it: paths may come later
    cfg.write_text(yaml.safe_dump({"trian": {"max_iters": 3}}))
    with pytest.raises(ConfigError, match=r"unknown key 'trian'.*did you mean train\?"):
        check_configs("pretrain", target, ["--config", str(cfg)])


@pytest.mark.parametrize("config,needle", [
    ("midtrain_configs/pretrain/tiny_cpu.yaml", "tokenizer_dir='data/demo/tokenizer' does not exist"),
    ("midtrain_configs/sft/demo_math.yaml", "checkpoint_dir='runs/demo/midtrain_math/final' does not exist"),
])
def test_bad_config_is_reported_in_under_5_s(config, needle, tmp_path):
    """A real process, in a folder without the demo data: the error before torch is imported."""
    (tmp_path / "midtrain_configs").symlink_to(REPO / "midtrain_configs")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("LITGPT_EXT_TRACEBACK", None)
    t0 = time.perf_counter()
    command = "sft" if "/sft/" in config else "pretrain"
    p = subprocess.run([sys.executable, "-m", "litgpt_ext", command, "--config", config],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    dt = time.perf_counter() - t0
    assert p.returncode == 1 and needle in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 2, p.stderr
    assert dt < 5.0, f"{dt:.1f} s to report a bad config"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["midtrain_configs"]  # no out/, runs/ created


# ------------------------------------------------------------------ mix_schedule
def test_mix_schedule_refuses_duplicates_empty_and_steps_beyond_the_budget():
    from litgpt_ext.data.schedule import Phase, check_schedule_budget, parse_mix_schedule
    from litgpt_ext.data.shard_types import MixError

    with pytest.raises(MixError, match="mix_schedule is an empty list"):
        parse_mix_schedule([])
    with pytest.raises(MixError, match=r"mix_schedule point 2: at_fraction=0.5 is also point 1's"):
        parse_mix_schedule([{"at_step": 0, "mix_weights_str": "main:1"}, {"at_fraction": 0.5, "mix_weights_str": "math:1"},
                            {"at_fraction": 0.5, "mix_weights_str": "main:1"}])
    points = parse_mix_schedule([{"at_step": 0, "mix_weights_str": "main:1"}, {"at_step": 120, "mix_weights_str": "math:1"}])
    check_schedule_budget(points, Phase(0, 120, 4))  # at the last step: allowed (a ramp may end there)
    with pytest.raises(MixError, match=r"point 1: at_step=120 is beyond this run's budget \(the phase is steps 0->100\)"):
        check_schedule_budget(points, Phase(0, 100, 4))


def test_mix_schedule_beyond_the_budget_on_data(shard_root):
    from litgpt_ext.data import ShardedMixedDataset
    from litgpt_ext.data.shard_types import MixError

    dm = ShardedMixedDataset(shard_root, mix_schedule=[{"at_step": 0, "mix_weights_str": "main:1"},
                                                       {"at_step": 500, "mix_weights_str": "code:1"}])
    dm.connect(batch_size=2, max_seq_length=8)
    dm.setup(rank=0, world_size=1)  # resolving the points needs no budget
    with pytest.raises(MixError, match="point 1: at_step=500 is beyond this run's budget"):
        dm.set_phase(0, 40, 4)


# ------------------------------------------------------------------ sft-grid's sources
def test_sft_grid_sources_refuse_a_non_positive_every(tmp_path):
    from litgpt_ext.study.sft_grid import sources

    for every in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match=f"every={every!r} must be a positive integer"):
            sources([tmp_path], tmp_path, every)


# ------------------------------------------------------------------ weights that do not fit
def test_weights_that_do_not_fit_are_one_line_naming_the_fields(tmp_path):
    import torch
    from litgpt import GPT
    from litgpt.utils import save_config

    from litgpt_ext.checkpoint.loading import WeightsMismatchError, load_weights
    from tests.eval_fixtures import tiny_config

    small = tiny_config("pythia", vocab_size=64, block_size=16)
    torch.save({"model": GPT(small).state_dict()}, tmp_path / "lit_model.pth")
    save_config(small, tmp_path)
    big = tiny_config("pythia", vocab_size=64, block_size=16, n_embd=128)
    with pytest.raises(WeightsMismatchError) as e:
        load_weights(GPT(big), tmp_path, big)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "lit_model.pth") in msg
    assert "n_embd: 64 vs 128" in msg and "intermediate_size: 256 vs 512" in msg and "e.g. " in msg
    deeper = tiny_config("pythia", vocab_size=64, block_size=16, n_layer=3)
    with pytest.raises(WeightsMismatchError, match=r"Missing key\(s\).*n_layer: 2 vs 3"):
        load_weights(GPT(deeper), tmp_path, deeper)
    load_weights(GPT(small), tmp_path, small)
    from litgpt_ext.checkpoint.loading import load_model  # the eval backend's loader: the checkpoint's own config

    save_config(big, tmp_path)  # model_config.yaml now disagrees with lit_model.pth
    with pytest.raises(WeightsMismatchError, match=r"the model's config is .*model_config.yaml's, so that checkpoint's"):
        load_model(tmp_path, "cpu")


@pytest.mark.slow
def test_pretrain_from_weights_of_another_shape_is_one_line(tmp_path, shard_root):
    """A real process: no size-mismatch dump, no srun warning, no checkpoint written."""
    import torch
    from litgpt import GPT
    from litgpt.utils import save_config

    from tests.eval_fixtures import tiny_config

    ck = tmp_path / "ck"
    ck.mkdir()
    small = tiny_config("pythia", vocab_size=4096, block_size=16, n_layer=1, n_head=2, n_embd=16)
    torch.save({"model": GPT(small).state_dict()}, ck / "lit_model.pth")
    save_config(small, ck)
    mc = {"name": "tiny", "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 32, "vocab_size": 4096,
          "padded_vocab_size": 4096, "bias": True, "parallel_residual": True, "rotary_percentage": 0.25}
    out = tmp_path / "run"
    argv = ["pretrain", "--model_name", "tiny", "--model_config", json.dumps(mc), "--precision", "32-true",
            "--initial_checkpoint_dir", str(ck), "--out_dir", str(out), "--devices", "1", "--logger_name", "csv",
            "--data", "litgpt_ext.data.ShardedMixedDataset", "--data.data_path", str(shard_root),
            "--train.max_iters", "2", "--train.global_batch_size", "2", "--train.micro_batch_size", "2",
            "--train.max_seq_length", "16"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("LITGPT_EXT_TRACEBACK", None)
    p = subprocess.run([sys.executable, "-m", "litgpt_ext", *argv], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=300)
    assert p.returncode == 1, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and "size mismatch for" not in p.stderr
    line = next(x for x in p.stderr.splitlines() if x.startswith("litgpt-ext pretrain: error:"))
    assert str(ck / "lit_model.pth") in line and "n_embd: 16 vs 32" in line
    assert "srun" not in p.stderr  # Lightning's PossibleUserWarning on a machine with SLURM installed
    assert not list(out.rglob("lit_model.pth")) if out.exists() else True


# ------------------------------------------------------------------ lm-eval's pass-through
def test_lm_eval_run_checks_and_defaults(tmp_path):
    from litgpt_ext.eval import interop

    ns = argparse.Namespace(model="litgpt_ext", model_args={"pretrained": str(tmp_path / "nope")}, output_path=None)
    with pytest.raises(interop.InteropError, match=r"checkpoint '.*nope' \(--model_args pretrained=\) does not exist"):
        interop.check_run_args(ns)
    ns.model_args = {"pretrained": str(tmp_path)}
    with pytest.raises(interop.InteropError, match="has no lit_model.pth"):
        interop.check_run_args(ns)
    (tmp_path / "lit_model.pth").write_bytes(b"x")
    (tmp_path / "model_config.yaml").write_text("name: x\n")
    assert interop.check_run_args(ns) == tmp_path / "eval" and ns.output_path == str(tmp_path / "eval")
    ns.output_path = "elsewhere"
    assert interop.check_run_args(ns) == Path("elsewhere")
    hf = argparse.Namespace(model="hf", model_args={"pretrained": "gpt2"}, output_path=None)
    assert interop.check_run_args(hf) is None  # other backends: lm-eval's own behaviour


def test_unknown_task_names_close_matches(monkeypatch):
    from litgpt_ext.eval import interop

    class Manager:
        all_tasks = ["arc_easy", "arc_challenge", "demo_math_mc", "demo_math_ppl", "hellaswag"]

    monkeypatch.setattr(interop, "_MANAGERS", [Manager()])
    msg = interop.unknown_tasks_message("demo_mth_mc, zzzz")
    assert msg.splitlines() == ["unknown task 'demo_mth_mc'; did you mean: demo_math_mc, demo_math_ppl?",
                                "unknown task 'zzzz'; `litgpt-ext lm-eval ls tasks` lists them"]


@pytest.mark.slow
def test_lm_eval_cli_errors_and_default_output(tmp_path):
    """Real processes, outside a git checkout: one line for a missing checkpoint and an unknown task
    (close names from lm-eval's list, ours included), results saved under <checkpoint>/eval, no git noise."""
    import torch
    from litgpt import GPT

    from tests.eval_fixtures import arithmetic_docs, save_checkpoint, tiny_config, train_tokenizer

    tok = train_tokenizer(tmp_path / "tok", [d["text"] for d in arithmetic_docs(200)] * 3, vocab_size=300)
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "run" / "final", GPT(tiny_config("pythia", vocab_size=300, block_size=64)), tok)
    from litgpt_ext.eval.build_tasks import build_tasks

    (tmp_path / "demo" / "raw").mkdir(parents=True)
    (tmp_path / "demo" / "raw" / "math_heldout.jsonl").write_text(
        "".join(json.dumps(d) + "\n" for d in arithmetic_docs(40, seed=1)))
    build_tasks(demo_dir=tmp_path / "demo", out_dir=tmp_path / "eval_tasks", max_examples=8)
    env = dict(os.environ, PYTHONPATH=str(REPO), LITGPT_EXT_EVAL_DATA=str(tmp_path / "eval_tasks"),
               GIT_CEILING_DIRECTORIES=str(tmp_path.parent))
    env.pop("LITGPT_EXT_TRACEBACK", None)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "litgpt_ext", "lm-eval", "run", "--model", "litgpt_ext",
                               "--device", "cpu", *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)

    p = run("--model_args", f"pretrained={tmp_path / 'nope'}", "--tasks", "demo_math_mc")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert f"litgpt-ext lm-eval: error: checkpoint '{tmp_path / 'nope'}' (--model_args pretrained=) does not exist" in p.stderr
    p = run("--model_args", f"pretrained={ckpt}", "--tasks", "demo_mth_mc")
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "unknown task 'demo_mth_mc'; did you mean: demo_math_mc" in p.stderr
    p = run("--model_args", f"pretrained={ckpt}", "--tasks", "demo_math_mc", "--limit", "4")
    assert p.returncode == 0, p.stderr[-3000:]
    saved = sorted((ckpt / "eval").rglob("results_*.json"))
    assert len(saved) == 1 and f"lm-eval: results saved to {saved[0]}" in p.stdout
    assert "demo_math_mc" in json.loads(saved[0].read_text())["results"]
    assert "fatal:" not in p.stderr and "not a git repository" not in p.stderr
