"""training_scripts/small_model_pretrain.sh: config selection, auto-resume and requeue on preemption.

The training command is replaced by a stub python that records its arguments (the loop's own
preemption behaviour is tested with the loop); `scontrol` and `srun` are stubs that record what
they were asked. tests/test_slurm_real.py runs the script under a real SLURM.
"""

import os
import stat
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "training_scripts" / "small_model_pretrain.sh"


@pytest.fixture
def env(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_py = bin_dir / "python"
    fake_py.write_text(
        "#!/usr/bin/env bash\n"
        f'if [ "$1" = "-" ]; then exec {sys.executable} "$@"; fi\n'
        'echo "$@" >> "$CALLS"\n'
        'if [ -n "${FAKE_MARKER:-}" ]; then echo "step 7" > "$LITGPT_EXT_PREEMPT_MARKER"; fi\n'
        'exit "${FAKE_EXIT:-0}"\n'
    )
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/usr/bin/env bash\necho "scontrol $@" >> "$CALLS"\n')
    srun = bin_dir / "srun"  # records its options, runs the command
    srun.write_text('#!/usr/bin/env bash\nopts=()\nwhile [ "${1#--}" != "$1" ]; do opts+=("$1"); shift; done\n'
                    'echo "srun ${opts[*]}" >> "$CALLS"\nexec "$@"\n')
    for f in (fake_py, scontrol, srun):
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    e.update(PATH=f"{bin_dir}:{e['PATH']}", PYTHON=str(fake_py), CALLS=str(tmp_path / "calls"), REPO_DIR=str(tmp_path))
    e.pop("model_config_file", None)
    e.pop("MODEL_CONFIG_FILE", None)
    return e


def run(env, *args, **extra):
    return subprocess.run(["bash", str(SCRIPT), *args], env={**env, **extra}, capture_output=True, text=True)


def calls(env):
    with open(env["CALLS"]) as f:
        return f.read().splitlines()


def test_positional_config_and_overrides(env, tmp_path):
    cfg = tmp_path / "a.yaml"
    cfg.write_text("out_dir: out/a\n")
    before = cfg.read_text()
    r = run(env, str(cfg), "--train.max_additional_steps", "100")
    assert r.returncode == 0, r.stderr
    assert calls(env) == [f"-m litgpt_ext pretrain --config {cfg} --resume auto --train.max_additional_steps 100"]
    assert cfg.read_text() == before  # never edited


def test_env_config_and_no_auto_resume_when_config_names_a_checkpoint(env, tmp_path):
    cfg = tmp_path / "b.yaml"
    cfg.write_text("resume: out/x/step-00000010\n")
    assert run(env, model_config_file=str(cfg)).returncode == 0
    cfg2 = tmp_path / "c.yaml"
    cfg2.write_text("out_dir: out/c\n")
    assert run(env, MODEL_CONFIG_FILE=str(cfg2), AUTO_RESUME="0").returncode == 0
    assert calls(env) == [f"-m litgpt_ext pretrain --config {cfg}", f"-m litgpt_ext pretrain --config {cfg2}"]


def test_array_task_indexes_config_list(env, tmp_path):
    cfgs = []
    for name in ("x", "y", "z"):
        cfgs.append(tmp_path / f"{name}.yaml")
        cfgs[-1].write_text("out_dir: out\n")
    lst = tmp_path / "sweep.txt"
    lst.write_text(f"# sweep\n{cfgs[0]}\n\n{cfgs[1]}\n{cfgs[2]}\n")
    assert run(env, SLURM_ARRAY_TASK_ID="2", CONFIG_LIST=str(lst)).returncode == 0
    assert calls(env)[0].startswith(f"-m litgpt_ext pretrain --config {cfgs[1]} ")
    bad = run(env, SLURM_ARRAY_TASK_ID="7", CONFIG_LIST=str(lst))
    assert bad.returncode == 2 and "has no entry 7 (it lists 3)" in bad.stderr


def test_missing_config_is_a_clear_error(env, tmp_path):
    r = run(env)
    assert r.returncode == 2 and "no config" in r.stderr
    r = run(env, "cfgs/typo.yaml", "--train.max_iters", "5")
    assert r.returncode == 2 and "config 'cfgs/typo.yaml' does not exist" in r.stderr
    r = run(env, model_config_file=str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "nope.yaml' does not exist" in r.stderr


def test_preempted_job_is_requeued(env, tmp_path):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("out_dir: out\n")
    r = run(env, str(cfg), FAKE_EXIT="99", SLURM_JOB_ID="123", SLURM_ARRAY_JOB_ID="120", SLURM_ARRAY_TASK_ID="3")
    assert r.returncode == 0, r.stderr
    assert calls(env)[-1] == "scontrol requeue 120_3"
    r = run(env, str(cfg), FAKE_EXIT="99")  # no SLURM: say how to resume, keep the status
    assert r.returncode == 99 and "run this command again to resume" in r.stdout
    r = run(env, str(cfg), FAKE_EXIT="1", SLURM_JOB_ID="5")  # a crash is not requeued
    assert r.returncode == 1 and not any(c.startswith("scontrol") and "5" in c for c in calls(env)[-1:])


def test_under_slurm_the_trainer_is_a_job_step_even_for_one_task(env, tmp_path):
    """--signal=USR1@N reaches job steps only: python runs under srun, with the job's CPUs."""
    cfg = tmp_path / "s.yaml"
    cfg.write_text("out_dir: out\n")
    assert run(env, str(cfg), SLURM_JOB_ID="7", SLURM_NTASKS="1", SLURM_CPUS_PER_TASK="4").returncode == 0
    assert calls(env)[-2:] == ["srun --kill-on-bad-exit=1 --cpus-per-task=4",
                               f"-m litgpt_ext pretrain --config {cfg} --resume auto"]
    assert run(env, str(cfg), SLURM_JOB_ID="7", SLURM_STEP_ID="0").returncode == 0  # already a step: no srun
    assert not calls(env)[-1].startswith("srun")
    assert (tmp_path / "logs").is_dir()


def test_a_rank_killed_after_the_preemption_checkpoint_still_requeues(env, tmp_path):
    """srun --kill-on-bad-exit=1 turns the last rank's 99 into 143: the trainer's marker decides."""
    cfg = tmp_path / "m.yaml"
    cfg.write_text("out_dir: out\n")
    r = run(env, str(cfg), FAKE_EXIT="143", FAKE_MARKER="1", SLURM_JOB_ID="8")
    assert r.returncode == 0, r.stderr
    assert calls(env)[-1] == "scontrol requeue 8" and "exit status 143, but the trainer saved" in r.stdout
    assert not list((tmp_path / "logs").glob(".preempted-*"))  # consumed
    r = run(env, str(cfg), FAKE_EXIT="143", SLURM_JOB_ID="9")  # no marker: a failure, not requeued
    assert r.returncode == 143 and calls(env)[-1] != "scontrol requeue 9"


def test_slurm_task_count_must_match_the_world_size(monkeypatch):
    from litgpt_ext.train.parallel import resolve_devices

    for k in ("SLURM_NTASKS_PER_NODE", "SLURM_GPUS_ON_NODE", "SLURM_NNODES"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_JOB_NAME", "litgpt-ext")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "2")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "1")
    assert resolve_devices("auto", None) == (2, 1)
    with pytest.raises(ValueError, match=r"SLURM runs 2 task\(s\) \(tasks per node 2, 1 node\(s\)\) but this run's"
                                         r" world size is devices=1 x num_nodes=1 = 1"):
        resolve_devices(1, None)
    monkeypatch.setenv("SLURM_JOB_NAME", "bash")  # an interactive salloc shell: not SLURM-launched ranks
    assert resolve_devices(1, None) == (1, 1)


def test_eval_script_defaults_to_the_repo_venv_python(tmp_path):
    """Like small_model_pretrain.sh: .venv/bin/python of the repo (the submit dir under sbatch)."""
    venv_py = tmp_path / ".venv" / "bin" / "python"
    venv_py.parent.mkdir(parents=True)
    venv_py.write_text('#!/usr/bin/env bash\necho "venv $*" >> "$CALLS"\n')
    venv_py.chmod(0o755)
    (tmp_path / "run" / "step-00000001").mkdir(parents=True)
    (tmp_path / "run" / "step-00000001" / "lit_model.pth").write_bytes(b"")
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    env.update(SLURM_SUBMIT_DIR=str(tmp_path), CALLS=str(tmp_path / "calls"))
    r = subprocess.run(["bash", str(ROOT / "training_scripts" / "eval_chkpts.sh"), str(tmp_path / "run"), "t1"],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "calls").read_text().startswith(f"venv -m litgpt_ext evaluate {tmp_path}/run/step-00000001 --tasks t1")


def test_sft_configs_run_the_sft_command(env, tmp_path):
    sft = tmp_path / "sft.yaml"
    sft.write_text("checkpoint_dir: runs/a/final\ndata:\n  class_path: litgpt_ext.sft.data.SFTData\n")
    pre = tmp_path / "pre.yaml"
    pre.write_text("out_dir: out/a\ndata:\n  class_path: litgpt_ext.data.ShardedMixedDataset\n")
    assert run(env, str(sft)).returncode == 0
    assert run(env, str(pre)).returncode == 0
    assert run(env, str(pre), LITGPT_EXT_COMMAND="sft").returncode == 0  # the sweep's SFT arrays say so
    assert run(env, str(pre), LITGPT_EXT_COMMAND="synth-replay").returncode == 0  # a sweep's synth array
    assert run(env, str(pre), LITGPT_EXT_COMMAND="merge-lora").returncode == 0  # a sweep's LoRA merge job
    got = [c.split(" --config")[0] for c in calls(env)]
    assert got == ["-m litgpt_ext sft", "-m litgpt_ext pretrain", "-m litgpt_ext sft", "-m litgpt_ext synth-replay",
                   "-m litgpt_ext merge-lora"]
    assert "--resume" not in calls(env)[-1]  # only training resumes
    r = run(env, str(pre), LITGPT_EXT_COMMAND="evaluate")
    assert r.returncode == 2 and "LITGPT_EXT_COMMAND='evaluate' is not a command this script runs; expected pretrain," \
        " sft, soup, or a sweep's synth-replay, merge-lora or prep command" in r.stderr
