"""Checkpoints that can be trusted and one writer per run: manifests and fallback, disk full,
`final/` and abandoned branches on resume, forks that never depend on their source, the run lock
(with real processes), and litgpt's own tools reading our checkpoints."""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from litgpt import GPT
from litgpt.config import Config

sys.path.insert(0, str(Path(__file__).parent))
from eval_fixtures import tiny_config, train_tokenizer  # noqa: E402

from litgpt_ext import checkpoint as ckpt  # noqa: E402

CFG = Config(name="tiny", block_size=8, n_layer=1, n_head=1, n_embd=8, padded_vocab_size=16, vocab_size=16)
ROOT = Path(__file__).resolve().parents[1]


def write(out, step, name=None):
    return ckpt.write_checkpoint(out / (name or ckpt.step_dir_name(step)), {"w": torch.tensor([float(step)])},
                                 {"step": step}, CFG, {"train": {"max_iters": 10}})


# ------------------------------------------------------------------------------ manifest, fallback


def test_manifest_lists_every_file_and_corrupt_newest_falls_back(tmp_path):
    for s in (2, 4, 6):
        write(tmp_path, s)
    man = json.loads((tmp_path / "step-00000006" / "manifest.json").read_text())
    assert man["step"] == 6
    assert set(man["files"]) == {"lit_model.pth", "training_state.pth", "hyperparameters.yaml", "model_config.yaml",
                                 "config.json"}  # this config has an exact Transformers equivalent (GPT-NeoX)
    assert all(len(m["sha256"]) == 64 and m["size"] > 0 for m in man["files"].values())
    # step 6: one flipped byte (same size: only the checksum sees it); step 4: truncated
    f = tmp_path / "step-00000006" / "lit_model.pth"
    b = bytearray(f.read_bytes())
    b[-30] ^= 0xFF
    f.write_bytes(bytes(b))
    g = tmp_path / "step-00000004" / "training_state.pth"
    g.write_bytes(g.read_bytes()[:-10])
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 6]  # the size check is cheap; checksums at resume
    said = []
    assert ckpt.resolve_resume("auto", tmp_path, log=said.append) == tmp_path / "step-00000002"
    assert "skipped " + str(tmp_path / "step-00000006") + " (lit_model.pth does not match its sha256 checksum" in said[0]
    assert "step-00000004 (training_state.pth has" in said[1] and "the manifest says" in said[1]
    with pytest.raises(FileNotFoundError, match="cannot resume from .*step-00000006.*sha256"):
        ckpt.resolve_resume(tmp_path / "step-00000006", tmp_path)


def test_checkpoint_without_hyperparameters_is_not_complete(tmp_path):
    write(tmp_path, 1)
    d = write(tmp_path, 3)
    (d / "hyperparameters.yaml").unlink()
    assert not ckpt.is_complete(d) and ckpt.is_complete(d, need="weights")
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000001"
    said = []
    assert ckpt.resolve_resume(True, tmp_path, log=said.append).name == "step-00000001"
    assert "missing hyperparameters.yaml" in said[0]
    (d / "manifest.json").unlink()  # an old-style checkpoint without a manifest needs all four files too
    assert not ckpt.is_complete(d)


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    d = write(tmp_path, 5)
    (d / "training_state.pth").unlink()
    with pytest.raises(FileNotFoundError, match="holds checkpoints but none is usable: step-00000005: missing"
                       " training_state.pth. Refusing to start over from step 0"):
        ckpt.resolve_resume("auto", tmp_path)
    assert ckpt.resolve_resume("auto", tmp_path / "empty") is None  # nothing there at all: fresh start


# ------------------------------------------------------------------------------------- disk full

class _Usage:
    def __init__(self, free):
        self.free = free



@pytest.mark.parametrize("failure", ["enospc", "unexpected_pos"])
def test_disk_full_names_file_and_cause_and_leaves_nothing_half_written(tmp_path, monkeypatch, failure):
    write(tmp_path, 1)
    real_save = torch.save

    def save(obj, f, *a, **kw):
        if Path(f).name == "training_state.pth":
            if failure == "enospc":
                raise OSError(errno.ENOSPC, "No space left on device")
            real_save(obj, f, *a, **kw)  # what torch really raises: the errno is lost
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 6208 vs 6096")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save)
    if failure == "unexpected_pos":  # torch's message alone says "disk full" only via the free space
        monkeypatch.setattr(shutil, "disk_usage", lambda p: _Usage(free=1000))
    with pytest.raises(ckpt.CheckpointError) as e:
        write(tmp_path, 2)
    msg = str(e.value)
    assert f"writing {tmp_path / 'step-00000002.tmp' / 'training_state.pth'} failed: the disk is full or over quota" in msg
    assert "The partial checkpoint was removed; earlier checkpoints are intact" in msg
    assert e.value.errno == errno.ENOSPC or failure == "unexpected_pos"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]
    assert ckpt.verify_checkpoint(tmp_path / "step-00000001") is None


# ----------------------------------------------------------------------- final/ and abandoned branches


def test_resume_considers_final(tmp_path):
    write(tmp_path, 8, name="final")  # a finished run whose step-* were pruned
    assert ckpt.latest_checkpoint(tmp_path) is None  # step-* only, as before
    assert ckpt.resolve_resume("auto", tmp_path) == tmp_path / "final"
    assert ckpt.resolve_resume(True, tmp_path) == tmp_path / "final"
    write(tmp_path, 8)
    write(tmp_path, 9)  # a newer step than final (a continued run): the step wins
    assert ckpt.resolve_resume("auto", tmp_path).name == "step-00000009"
    assert [p.name for _, p in ckpt.list_checkpoints(tmp_path, final=True)] == ["step-00000008", "final", "step-00000009"]


def test_resume_from_older_step_sets_newer_aside(tmp_path):
    for s in (2, 4, 6):
        write(tmp_path, s)
    write(tmp_path, 6, name="final")
    said = []
    dest = ckpt.set_aside_newer(tmp_path / "step-00000002", tmp_path, log=said.append)
    assert dest.parent == tmp_path and dest.name.startswith("abandoned-")
    assert sorted(p.name for p in dest.iterdir()) == ["final", "step-00000004", "step-00000006"]
    assert "moved the newer checkpoints ['final', 'step-00000004', 'step-00000006']" in said[0]
    assert ckpt.resolve_resume("auto", tmp_path).name == "step-00000002"  # a requeue continues this branch
    assert ckpt.set_aside_newer("auto", tmp_path) is None and ckpt.set_aside_newer(tmp_path / "step-00000002", tmp_path) is None


# -------------------------------------------------------------------------------------------- fork


def test_fork_across_file_systems_copies_and_survives_its_source(tmp_path, monkeypatch):
    src = write(tmp_path / "run", 7)

    def no_link(a, b):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    dst = ckpt.fork(src, tmp_path / "mid")
    assert json.loads((tmp_path / "mid" / "forked_from.json").read_text())["links"] == ["copy"]
    assert not any(p.is_symlink() for p in dst.iterdir())
    shutil.rmtree(tmp_path / "run")
    assert ckpt.resolve_resume(True, tmp_path / "mid") == dst


def test_old_symlink_fork_whose_source_vanished_is_an_error(tmp_path):
    src = write(tmp_path / "run", 7)
    mid = tmp_path / "mid"
    (mid / "step-00000007").mkdir(parents=True)
    for f in src.iterdir():
        os.symlink(f, mid / "step-00000007" / f.name)  # what fork did across file systems before
    (mid / "forked_from.json").write_text(json.dumps({"source": str(src), "step": 7}))
    assert ckpt.resolve_resume("auto", mid) == mid / "step-00000007"
    shutil.rmtree(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"none is usable: step-00000007: .* point\(s\) to files that no longer"
                       r" exist .* This run was forked from .*run/step-00000007"):
        ckpt.resolve_resume("auto", mid)


def test_fork_refuses_to_replace_the_targets_own_progress(tmp_path):
    src = write(tmp_path / "run", 3)
    mid = tmp_path / "mid"
    ckpt.fork(src, mid)
    write(mid, 5)  # the forked run trained on
    for force in (False, True):
        with pytest.raises(FileExistsError, match=r"holds its own training progress \['step-00000005'\].*"
                           "--abandon_progress true"):
            ckpt.fork(src, mid, force=force)
    ckpt.fork(src, mid, abandon_progress=True)
    (aside,) = mid.glob("abandoned-*")
    assert [p.name for p in aside.iterdir()] == ["step-00000005"]
    assert [p.name for _, p in ckpt.list_checkpoints(mid)] == ["step-00000003"]


def test_fork_refuses_a_corrupt_source(tmp_path):
    src = write(tmp_path / "run", 3)
    (src / "training_state.pth").write_bytes(b"x" * (src / "training_state.pth").stat().st_size)
    with pytest.raises(FileNotFoundError, match="cannot fork .*training_state.pth does not match its sha256"):
        ckpt.fork(src, tmp_path / "mid")
    assert not (tmp_path / "mid" / "step-00000003").exists()


# -------------------------------------------------------------------------------------------- lock

HOLDER = """
import sys, time
from litgpt_ext.checkpoint import run_lock
with run_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def _holder(out_dir, env_extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env_extra}
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(out_dir)], stdout=subprocess.PIPE, text=True, env=env)
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_writer_refused_then_dead_holder_taken_over(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    holder = _holder(tmp_path, {"SLURM_JOB_ID": "4242"})
    try:
        rec = json.loads((tmp_path / ".run.lock").read_text())
        assert rec["pid"] == holder.pid and rec["host"] == socket.gethostname() and rec["job_id"] == "4242"
        # a second real process is refused, naming the holder
        r = subprocess.run([sys.executable, "-c", HOLDER, str(tmp_path)], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
        assert r.returncode == 1 and "RunLockedError" in r.stderr
        assert (f"is being written by another training run (host {socket.gethostname()}, pid {holder.pid},"
                " SLURM job 4242, since") in r.stderr
        with pytest.raises(ckpt.RunLockedError, match=f"pid {holder.pid}, SLURM job 4242"):
            ckpt.run_lock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock: no release
        holder.wait()
    assert json.loads((tmp_path / ".run.lock").read_text())["pid"] == holder.pid  # left behind
    said = []
    with ckpt.run_lock(tmp_path, log=said.append):
        assert json.loads((tmp_path / ".run.lock").read_text())["pid"] == os.getpid()
        with ckpt.run_lock(tmp_path):  # re-entrant in one process (the loop's own fork)
            pass
        assert (tmp_path / ".run.lock").exists()
    assert f"took over the stale lock of {tmp_path} (host {socket.gethostname()}, pid {holder.pid}" in said[0]
    assert f"pid {holder.pid} on this host is gone" in said[0]
    assert not (tmp_path / ".run.lock").exists()  # released


def test_lock_from_another_host_is_stale_after_its_heartbeat_or_same_job(tmp_path, monkeypatch):
    lock = tmp_path / ".run.lock"
    lock.write_text(json.dumps({"host": "node-17", "pid": 1, "job_id": "77", "started": "then"}))
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    with pytest.raises(ckpt.RunLockedError, match="host node-17, pid 1, SLURM job 77"):
        ckpt.run_lock(tmp_path).acquire()
    said = []
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # the same job, requeued: its earlier run is over
    with ckpt.run_lock(tmp_path, log=said.append):
        pass
    assert "earlier run of this SLURM job 77 (requeued)" in said[0]
    lock.write_text(json.dumps({"host": "node-17", "pid": 1, "job_id": "77"}))
    old = time.time() - 3600
    os.utime(lock, (old, old))
    monkeypatch.setenv("SLURM_JOB_ID", "79")
    with ckpt.run_lock(tmp_path, stale_after_s=600, log=said.append):
        pass
    assert "no heartbeat for 36" in said[1]


def test_training_refuses_a_second_writer(tmp_path):
    from train_fakes import FakeMixedData

    from litgpt_ext.train.args import TrainArgs
    from litgpt_ext.train.loop import pretrain

    holder = _holder(tmp_path, {})
    try:
        with pytest.raises(ckpt.RunLockedError, match=f"pid {holder.pid}, not a SLURM job"):
            pretrain(model_config=CFG, out_dir=tmp_path, data=FakeMixedData(), devices=1, logger_name="csv",
                     train=TrainArgs(max_iters=1, global_batch_size=2, micro_batch_size=2),
                     optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}})
        assert not list(tmp_path.glob("step-*")) and not (tmp_path / "final").exists()
    finally:
        holder.kill()
        holder.wait()


# ------------------------------------------------------------------------ the loop: final, branches


def _train(out, **kw):
    from train_fakes import VOCAB, FakeMixedData

    from litgpt_ext.train.args import EvalArgs, TrainArgs
    from litgpt_ext.train.loop import pretrain

    cfg = Config(name="tiny", block_size=16, n_layer=1, n_head=2, n_embd=16, padded_vocab_size=VOCAB, vocab_size=VOCAB)
    train = dict(max_iters=6, global_batch_size=2, micro_batch_size=2, save_interval=2, log_interval=1,
                 lr_warmup_steps=1, min_lr=1e-4)
    train.update(kw.pop("train", {}))
    return pretrain(model_config=cfg, out_dir=out, data=FakeMixedData(), devices=1, logger_name="csv",
                    train=TrainArgs(**train), eval=EvalArgs(interval=100, max_iters=1, initial_validation=False,
                                                            final_validation=False),
                    optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}}, **kw)


@pytest.mark.slow
def test_loop_finished_run_reports_finished_and_older_resume_abandons_newer(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out).step == 6
    for p in out.glob("step-*"):
        shutil.rmtree(p)  # only final/ is left
    again = _train(out, resume="auto")
    assert again.stopped == "finished" and again.step == 6
    assert "Already finished: " + str(out / "final") + " is at step 6" in capsys.readouterr().out
    assert not (out / ".run.lock").exists()
    # an explicit resume from an older step, then a requeue (`auto`): continues that branch
    first = _train(tmp_path / "b")
    assert first.step == 6
    _train(tmp_path / "b", resume=tmp_path / "b" / "step-00000002",
           train={"max_additional_steps": 1, "new_phase": True})  # a new budget from step 2: a new phase
    (aside,) = (tmp_path / "b").glob("abandoned-*")
    assert sorted(p.name for p in aside.iterdir()) == ["final", "step-00000004", "step-00000006"]
    assert "moved the newer checkpoints ['final', 'step-00000004', 'step-00000006']" in capsys.readouterr().out
    assert ckpt.resolve_resume("auto", tmp_path / "b").name == "final"
    assert ckpt.load_training_state(tmp_path / "b" / "final")["step"] == 3


# ------------------------------------------------------------------------- litgpt reads them as its own


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """A tiny pythia-like checkpoint written by our writer, with a real tokenizer."""
    root = tmp_path_factory.mktemp("ours")
    tok = train_tokenizer(root / "tok", ["the cat sat on the mat", "a dog ran", "one two three four"] * 20, 300)
    cfg = tiny_config("pythia", vocab_size=320)
    torch.manual_seed(0)
    model = GPT(cfg)
    d = ckpt.write_checkpoint(root / "step-00000001", model.state_dict(), {"step": 1}, cfg, {"model_name": "x"}, tok)
    return d, model


def test_litgpt_load_checkpoint_reads_ours(ours):
    import lightning as L
    from litgpt.utils import check_valid_checkpoint_dir, load_checkpoint

    d, model = ours
    check_valid_checkpoint_dir(d, raise_error=True)
    fabric = L.Fabric(devices=1, accelerator="cpu")
    fresh = GPT(Config.from_file(d / "model_config.yaml"))
    load_checkpoint(fabric, fresh, d / "lit_model.pth", strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    assert set(torch.load(d / "lit_model.pth", weights_only=True)) == set(model.state_dict())  # bare, no "model"


def test_litgpt_merge_lora_reads_ours(ours, tmp_path):
    from litgpt.lora import GPT as LoRAGPT
    from litgpt.lora import Config as LoRAConfig
    from litgpt.lora import lora_filter
    from litgpt.scripts.merge_lora import merge_lora
    from litgpt.utils import save_config

    d, model = ours
    lora = {"lora_r": 2, "lora_alpha": 4, "lora_query": True, "lora_value": True}
    cfg = LoRAConfig.from_file(d / "model_config.yaml", **lora)
    lmodel = LoRAGPT(cfg)
    lmodel.load_state_dict(ckpt.load_model_state(d), strict=False)
    sd = {k: torch.randn_like(v) * 0.1 for k, v in lmodel.state_dict().items() if lora_filter(k, v)}
    out = tmp_path / "lora"
    out.mkdir()
    torch.save(sd, out / "lit_model.pth.lora")
    save_config(cfg, out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (out / f).write_bytes((d / f).read_bytes())
    (out / "hyperparameters.yaml").write_text(yaml.safe_dump({**lora, "checkpoint_dir": str(d), "precision": "32-true"}))
    merge_lora(out)
    merged = torch.load(out / "lit_model.pth")
    base = model.state_dict()
    assert set(merged) == set(base)
    assert torch.equal(merged["transformer.wte.weight"], base["transformer.wte.weight"])
    assert not torch.equal(merged["transformer.h.0.attn.qkv.weight"], base["transformer.h.0.attn.qkv.weight"])


def test_config_json_lets_litgpt_convert_for_transformers(ours, tmp_path):
    transformers = pytest.importorskip("transformers")
    from litgpt.scripts.convert_lit_checkpoint import convert_lit_checkpoint
    from litgpt.utils import copy_config_files

    d, model = ours
    assert json.loads((d / "config.json").read_text())["model_type"] == "gpt_neox"
    copy_config_files(d, tmp_path)  # what `litgpt evaluate` does before HFLM(pretrained=out_dir)
    convert_lit_checkpoint(d, tmp_path)
    torch.save(torch.load(tmp_path / "model.pth"), tmp_path / "pytorch_model.bin")  # litgpt evaluate's next step
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    x = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, model.eval()(x), atol=1e-4)
