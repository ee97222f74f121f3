"""Layer-wise LR decay and Muon + AdamW (`litgpt_ext.train.optim`): the spec's checks, the exact
group LRs over a schedule, Muon's and AdamW's updates against torch's own optimizers, bit-identical
resume, 2-process FSDP2 (gloo) runs and the CLI's one-line errors."""

from __future__ import annotations

import copy
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from litgpt.config import Config
from litgpt.model import GPT

sys.path.insert(0, str(Path(__file__).parent))
from test_sft_data import tok_dir, tokenizer  # noqa: E402, F401  (fixtures of `source`)
from test_sft_run import _config as _sft_config  # noqa: E402
from test_sft_run import source  # noqa: E402, F401  (a fixture: a tiny SFT source checkpoint + data)
from train_fakes import VOCAB, FakeMixedData  # noqa: E402

from litgpt_ext import checkpoint as ckpt  # noqa: E402
from litgpt_ext.train import optim  # noqa: E402
from litgpt_ext.train.args import EvalArgs, TrainArgs  # noqa: E402
from litgpt_ext.train.loop import pretrain  # noqa: E402
from litgpt_ext.train.schedules import Schedule  # noqa: E402
from litgpt_ext.train.validate import resolve_optimizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CFG = dict(name="tiny", block_size=16, n_layer=2, n_head=2, n_embd=32, padded_vocab_size=VOCAB, vocab_size=VOCAB)
ADAMW = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-3, "weight_decay": 0.01}}
LLRD = {**ADAMW, "layer_lr_decay": 0.8}
MUON = {"class_path": "torch.optim.Muon", "init_args": {"lr": 0.02, "adjust_lr_fn": "match_rms_adamw"},
        "adamw": {"lr": 3e-3, "weight_decay": 0.01}}


def run(out_dir, optimizer, data=None, train=None, **kw):
    targs = dict(max_iters=8, global_batch_size=4, micro_batch_size=2, save_interval=4, log_interval=1,
                 lr_warmup_steps=2, min_lr=1e-4)
    targs.update(train or {})
    return pretrain(model_config=Config(**CFG), out_dir=Path(out_dir), data=data or FakeMixedData(), devices=1,
                    logger_name="csv", train=TrainArgs(**targs), eval=EvalArgs(interval=4, max_iters=2),
                    optimizer=optimizer, **kw)


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(Config(**CFG))
    for p in model.parameters():  # litgpt's init leaves some tensors zero: make every update visible
        p.data.normal_(0, 0.1)
    return model


# ------------------------------------------------------------------------------------------ the spec


@pytest.mark.parametrize("spec, fragments", [
    ({**ADAMW, "layer_lr_decay": 1.5}, ["layer_lr_decay=1.5", "(0, 1]"]),
    ({**ADAMW, "layer_lr_decay": 0}, ["layer_lr_decay=0", "(0, 1]"]),
    ({**ADAMW, "layer_lr_decay": "abc"}, ["layer_lr_decay='abc'", "(0, 1]"]),
    ({**ADAMW, "layer_lr_decay": True}, ["layer_lr_decay=True", "(0, 1]"]),
    ({**ADAMW, "adamw": {"lr": 1e-3}}, ["optimizer.adamw is only for class_path torch.optim.Muon"]),
    ({**MUON, "adamw": {"lr": 1e-3, "betaz": 1}}, ["optimizer.adamw takes no argument 'betaz'", "betas"]),
    ({**MUON, "adamw": {"lr": -1}}, ["optimizer.adamw.lr=-1", "> 0"]),
    ({**MUON, "adamw": [1]}, ["optimizer.adamw=[1]", "mapping"]),
    ({**MUON, "muon_params": []}, ["optimizer.muon_params=[]", "non-empty list"]),
    ({**MUON, "init_args": {"lr": 0.02, "betas": [0.9, 0.95]}},  # an AdamW argument given to Muon
     ["optimizer Muon takes no argument 'betas'", "valid: lr, weight_decay, momentum"]),
])
def test_bad_extension_keys_are_named(spec, fragments):
    with pytest.raises(ValueError) as e:
        resolve_optimizer(spec)
    assert all(f in str(e.value) for f in fragments), str(e.value)


def test_resolved_spec_keeps_the_extension_keys_and_flags_are_parsed():
    # jsonargparse gives `--optimizer.layer_lr_decay 0.9` as a top-level string; `--optimizer.lr` still lands in init_args
    spec = resolve_optimizer({**ADAMW, "layer_lr_decay": "9e-1", "lr": "1e-3"})
    assert spec == {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3, "weight_decay": 0.01},
                    "layer_lr_decay": 0.9}
    # SFT folds unknown keys into init_args: they are taken back out before torch sees them
    base, ext = optim.split_spec({**ADAMW, "init_args": {"lr": 1e-3, "layer_lr_decay": 0.5}})
    assert base["init_args"] == {"lr": 1e-3} and ext == {"layer_lr_decay": 0.5}


def test_llrd_groups_and_scales():
    model = tiny_gpt()
    opt = optim.build_optimizer({**ADAMW, "layer_lr_decay": 0.5}, model, log=lambda s: None)
    got = {g["name"]: (g["lr_scale"], sorted(id(p) for p in g["params"])) for g in opt.param_groups}
    assert list(got) == ["embed", "block0", "block1", "head"]
    L = 2
    assert [got[n][0] for n in got] == [0.5 ** (L + 1), 0.5 ** (L - 0), 0.5 ** (L - 1), 1.0]
    named = dict(model.named_parameters())
    assert got["embed"][1] == [id(named["transformer.wte.weight"])]
    assert got["head"][1] == sorted(id(named[k]) for k in ("lm_head.weight", "transformer.ln_f.weight",
                                                            "transformer.ln_f.bias"))
    assert sum(len(g["params"]) for g in opt.param_groups) == len(named)
    assert optim.peak_lr(opt) == 3e-3 and opt.param_groups[0]["lr"] == 3e-3 * 0.5 ** 3
    # no LLRD, no Muon: exactly the optimizer litgpt builds (one group, no extra keys)
    plain = optim.build_optimizer(ADAMW, model)
    assert len(plain.param_groups) == 1 and "lr_scale" not in plain.param_groups[0] and optim.group_lrs(plain) == {}


def test_a_model_without_blocks_is_named():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"layer_lr_decay=0.9 needs transformer blocks at model.transformer.h"
                                         r" \(litgpt's GPT\); Sequential has none"):
        optim.build_optimizer({**ADAMW, "layer_lr_decay": 0.9}, model)
    with pytest.raises(ValueError, match="torch.optim.Muon needs transformer blocks at model.transformer.h"):
        optim.build_optimizer(MUON, model)


def test_a_1d_parameter_forced_into_muon_is_named():
    with pytest.raises(ValueError, match=r"optimizer.muon_params puts transformer.h.0.norm_1.weight \(shape \(32,\)\)"
                                         r" into Muon, which updates 2-D matrices only"):
        optim.build_optimizer({**MUON, "muon_params": ["transformer.h.*"]}, tiny_gpt())
    with pytest.raises(ValueError, match="pattern 'nope.*' matches no parameter"):
        optim.build_optimizer({**MUON, "muon_params": ["nope.*"]}, tiny_gpt())


# ------------------------------------------------------------------------------------------ values


def test_muon_and_adamw_halves_equal_torchs_own_optimizers():
    model = tiny_gpt()
    lines = []
    opt = optim.build_optimizer({**MUON, "init_args": {"lr": 0.02, "weight_decay": 0.1, "adjust_lr_fn": None}},
                                model, log=lines.append)
    muon_names = [n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.ndim == 2]
    assert {n for n, _ in optim.named_params(model)} - set(muon_names)  # embeddings, norms, biases, head
    assert lines[0] == (f"Optimizer split: Muon {len(muon_names)} matrices"
                        f" ({sum(dict(model.named_parameters())[n].numel() for n in muon_names):,} parameters),"
                        f" AdamW 20 tensors (4,992 parameters: embeddings, norms, biases, head)")
    ref = copy.deepcopy(model)
    rp = dict(ref.named_parameters())
    ref_muon = torch.optim.Muon([rp[n] for n in muon_names], lr=0.02, weight_decay=0.1)
    ref_adamw = torch.optim.AdamW([p for n, p in rp.items() if n not in muon_names], lr=3e-3, weight_decay=0.01)
    torch.manual_seed(1)
    for step in range(3):  # momentum and Adam moments carry over
        x = torch.randint(0, VOCAB, (2, 16))
        for m in (model, ref):
            m(x).logsumexp(-1).mean().backward()
        optim.set_lrs(opt, 0.02)
        opt.step()
        ref_muon.step()
        ref_adamw.step()
        for o in (opt, ref_muon, ref_adamw):
            o.zero_grad()
        for n, p in model.named_parameters():
            assert torch.equal(p, rp[n]), (step, n)
    assert len(opt.state) == len(rp)  # one state: Muon's momentum buffers and AdamW's moments
    assert opt.state_dict()["param_groups"][0]["algorithm"] == "muon"


@pytest.mark.slow
def test_llrd_group_lrs_are_exact_over_the_schedule_and_logged(tmp_path):
    res = run(tmp_path, LLRD)
    schedule = Schedule(**res.schedule)
    with open(next((tmp_path / "logs" / "csv").glob("version_*/metrics.csv"))) as f:
        rows = {int(float(r["step"])): r for r in csv.DictReader(f) if r.get("lr/head")}
    assert sorted(rows) == list(range(1, 9))
    L, d = 2, 0.8
    scales = {"embed": d ** (L + 1), "block0": d ** (L - 0), "block1": d ** (L - 1), "head": 1.0}
    for step, row in rows.items():
        lr = schedule(step)
        assert float(row["lr"]) == lr
        for name, s in scales.items():
            assert float(row[f"lr/{name}"]) == lr * s, (step, name)  # warmup, peak and cosine steps alike
    assert len({float(rows[s]["lr/block0"]) for s in rows}) > 4  # the schedule moved


# ------------------------------------------------------------------------------------------ resume


@pytest.mark.slow
@pytest.mark.parametrize("which", ["llrd", "muon"])
def test_interrupted_and_resumed_run_is_bit_identical(tmp_path, which):
    # a checkpoint at step 3, then a new start from it (what a kill -9 after that save leaves) and resume
    spec = LLRD if which == "llrd" else {**MUON, "layer_lr_decay": 0.9}
    straight = run(tmp_path / "straight", spec)
    if which == "llrd":
        seg = run(tmp_path / "cut", spec, train={"pause_at_step": 3})
        assert seg.stopped == "paused" and not (tmp_path / "cut" / "final").exists()
    else:  # the preemption pattern: SIGUSR1 during step 3 -> checkpoint at 3, exit 99
        from train_fakes import SignalAfter

        with pytest.raises(SystemExit) as e:
            run(tmp_path / "cut", spec, data=SignalAfter(n=5), train={"save_interval": 100})
        assert e.value.code == 99 and ckpt.latest_checkpoint(tmp_path / "cut").name == "step-00000003"
        seg = straight  # the losses up to 3 are not returned by an exit; the weights below decide
    st = ckpt.load_training_state(tmp_path / "cut" / "step-00000003")
    groups = st["optimizer"]["param_groups"]
    assert [g["name"] for g in groups][:2] == (["embed", "block0"] if which == "llrd" else ["muon/block0", "muon/block1"])
    if which == "muon":
        states = st["optimizer"]["state"]
        assert set(states["transformer.h.0.attn.qkv.weight"]) == {"momentum_buffer"}
        assert set(states["lm_head.weight"]) == {"step", "exp_avg", "exp_avg_sq"}
    rest = run(tmp_path / "cut", spec, resume="auto")
    assert {**{k: v for k, v in seg.losses.items() if k <= 3}, **rest.losses} == straight.losses
    a, b = ckpt.load_model_state(tmp_path / "straight" / "final"), ckpt.load_model_state(tmp_path / "cut" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_plain_adamw_checkpoint_midtrains_with_llrd(tmp_path):
    # the forgetting use case: fork a pretrained (one-group AdamW) run, midtrain with decayed lower layers
    base = run(tmp_path / "base", ADAMW, train={"max_iters": 4})
    mid = run(tmp_path / "mid", LLRD, fork_from=tmp_path / "base" / "final",
              train={"max_iters": 100, "max_additional_steps": 2})
    assert base.step == 4 and mid.step == 6
    st = ckpt.load_training_state(tmp_path / "mid" / "final")
    assert [g["name"] for g in st["optimizer"]["param_groups"]] == ["embed", "block0", "block1", "head"]
    assert st["optimizer"]["state"]["transformer.wte.weight"]["step"] == 6  # Adam moments continued
    # ... or with Muon: the matrices' AdamW moments are dropped, Muon's momentum starts afresh
    muon = run(tmp_path / "muon", MUON, fork_from=tmp_path / "base" / "final",
               train={"max_iters": 100, "max_additional_steps": 2})
    st = ckpt.load_training_state(tmp_path / "muon" / "final")["optimizer"]["state"]
    assert muon.step == 6 and set(st["transformer.h.0.attn.qkv.weight"]) == {"momentum_buffer"}
    assert st["lm_head.weight"]["step"] == 6


@pytest.mark.slow
def test_a_muon_checkpoint_midtrains_with_plain_adamw(tmp_path, capsys):
    # the other direction: Muon's momentum is dropped (the matrices' AdamW moments start fresh, logged),
    # the other tensors keep theirs, and no Muon group key (lr_scale 0.15, name) is left in AdamW's group
    run(tmp_path / "muon", MUON, train={"max_iters": 4})
    capsys.readouterr()
    for name, spec in (("adamw", ADAMW), ("llrd", LLRD)):
        res = run(tmp_path / name, spec, fork_from=tmp_path / "muon" / "final",
                  train={"max_iters": 100, "max_additional_steps": 2})
        assert res.step == 6 and all(torch.isfinite(torch.tensor(v)) for v in res.losses.values())
        out = capsys.readouterr().out
        assert "the checkpoint was trained with torch.optim.Muon; AdamW starts fresh moments for the 8 matrices" in out
        ts = ckpt.load_training_state(tmp_path / name / "final")
        st = ts["optimizer"]
        assert st["state"]["transformer.h.0.attn.qkv.weight"]["step"] == 2  # fresh at the fork: 2 steps since
        assert "momentum_buffer" not in st["state"]["transformer.h.0.attn.qkv.weight"]
        assert st["state"]["lm_head.weight"]["step"] == 6  # AdamW's moments continued
        groups = st["param_groups"]
        if name == "adamw":
            assert len(groups) == 1 and not {"lr_scale", "name", "algorithm", "base_lr"} & set(groups[0])
            assert groups[0]["lr"] == ts["lr"]  # the schedule's LR itself: not x 0.15 (Muon's AdamW-half scale)
        else:
            assert [g["name"] for g in groups] == ["embed", "block0", "block1", "head"]
            assert not any("algorithm" in g for g in groups)


@pytest.mark.slow
def test_a_sharded_muon_checkpoint_into_adamw_is_one_named_refusal(tmp_path):
    from litgpt_ext.train.speed import SpeedArgs

    sharded = SpeedArgs(checkpoint_format="sharded")
    run(tmp_path / "muon", MUON, train={"max_iters": 2}, speed=sharded)
    with pytest.raises(ValueError) as e:
        run(tmp_path / "adamw", ADAMW, fork_from=tmp_path / "muon" / "final", speed=sharded,
            train={"max_iters": 100, "max_additional_steps": 1})
    msg = str(e.value)
    assert "\n" not in msg and "holds the state of torch.optim.Muon (+ AdamW)" in msg and "this run's optimizer is AdamW" in msg
    assert "cannot switch between them" in msg and "initial_checkpoint_dir" in msg


# ------------------------------------------------------------------------------------------ CLI, FSDP2


@pytest.fixture(scope="module")
def cli_config(tmp_path_factory) -> Path:
    from tests.test_train_cli import one_shard_config

    return one_shard_config(
        tmp_path_factory.mktemp("optim_cli"), name="run.yaml", optimizer=ADAMW, eval={"interval": 2, "max_iters": 100},
        train={"max_iters": 4, "global_batch_size": 8, "micro_batch_size": 2, "log_interval": 1, "save_interval": 2,
               "min_lr": 1e-4, "lr_warmup_steps": 1, "max_seq_length": 16})


def _cli(*args, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "litgpt_ext", "pretrain", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_cli_bad_decay_is_one_line(cli_config, tmp_path):
    out = tmp_path / "out"
    proc = _cli("--config", str(cli_config), "--out_dir", str(out), "--optimizer.layer_lr_decay", "1.5", timeout=120)
    err = [line for line in proc.stderr.strip().splitlines() if "LITGPT_EXT_TRACEBACK" not in line]  # the hint
    assert proc.returncode == 1 and len(err) == 1, proc.stderr
    assert "layer_lr_decay=1.5" in err[0] and "(0, 1]" in err[0] and "Traceback" not in proc.stderr
    assert not out.exists()


def val_rows(out: Path) -> dict:
    with open(out / "val_metrics.csv") as f:
        return {(int(r["step"]), r["set"]): float(r["loss"]) for r in csv.DictReader(f)}


@pytest.mark.slow
@pytest.mark.parametrize("which", ["llrd", "muon"])
def test_two_gloo_processes_fsdp2_match_one(cli_config, tmp_path, which):
    from litgpt_ext.cli import main as cli_main

    spec = LLRD if which == "llrd" else {**MUON, "layer_lr_decay": 0.9}
    cfg = yaml.safe_load(cli_config.read_text())
    cfg["optimizer"] = spec
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli_main(["pretrain", "--config", str(path), "--devices", "1", "--out_dir", str(tmp_path / "one")])
    proc = _cli("--config", str(path), "--devices", "2", "--out_dir", str(tmp_path / "two"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    if which == "muon":
        assert "Optimizer split: Muon 8 matrices (24,576 parameters), AdamW 20 tensors" in proc.stdout + proc.stderr
    one, two = val_rows(tmp_path / "one"), val_rows(tmp_path / "two")
    assert set(one) == set(two) == {(s, "general") for s in (0, 2, 4)}
    assert one[(4, "general")] < one[(0, "general")] - 0.1
    for k in one:  # the same global batches: equal up to reduction order
        assert two[k] == pytest.approx(one[k], abs=1e-4), k  # measured: 0 (LLRD), <= 1e-5 (Muon)
    a, b = ckpt.load_model_state(tmp_path / "one" / "final"), ckpt.load_model_state(tmp_path / "two" / "final")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-3  # measured: 8.7e-5 (LLRD), 5.4e-5 (Muon)
    # the 2-process checkpoint's optimizer state (full, FQN-keyed) resumes on one process
    cli_main(["pretrain", "--config", str(path), "--devices", "1", "--out_dir", str(tmp_path / "two"),
              "--resume", str(tmp_path / "two" / "step-00000002")])
    assert val_rows(tmp_path / "two")[(4, "general")] == pytest.approx(one[(4, "general")], abs=1e-4)


RANK_SCRIPT = """
import copy, sys, torch, torch.distributed as dist
from litgpt.config import Config
from litgpt.model import GPT
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from litgpt_ext.train import optim

rank, pg_file, out, cfg, spec, vocab = int(sys.argv[1]), sys.argv[2], sys.argv[3], eval(sys.argv[4]), eval(sys.argv[5]), 64
dist.init_process_group("gloo", init_method=f"file://{pg_file}", rank=rank, world_size=2)
torch.manual_seed(0)
model = GPT(Config(**cfg))
for p in model.parameters():
    p.data.normal_(0, 0.1)
ref = copy.deepcopy(model)
mesh = init_device_mesh("cpu", (2,))
for block in model.transformer.h:
    fully_shard(block, mesh=mesh)
fully_shard(model, mesh=mesh)
opt, ref_opt = (optim.build_optimizer(spec, m, log=lambda s: None) for m in (model, ref))
torch.manual_seed(1)
for _ in range(3):
    x = torch.randint(0, vocab, (2, 16))  # the same batch on both ranks: FSDP's mean gradient is this gradient
    for m, o in ((model, opt), (ref, ref_opt)):
        m(x).logsumexp(-1).mean().backward()
        optim.set_lrs(o, 0.02)
        o.step()
        o.zero_grad()
refp = dict(ref.named_parameters())
diff = {n: float((p.detach().full_tensor() - refp[n].detach()).abs().max()) for n, p in model.named_parameters()}
if rank == 0:
    torch.save(diff, out)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_muon_under_fsdp2_equals_the_unsharded_update(tmp_path):
    # FSDP2 shards each matrix by rows (DTensor Shard(0)); Newton-Schulz runs on the gathered matrix.
    # Two plain processes (not mp.spawn/fork: no re-import of this module, no fork of a threaded process)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = [str(tmp_path / "pg"), str(tmp_path / "diff.pt"), repr(CFG), repr(MUON)]
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(r), *args], env=env, stderr=subprocess.PIPE,
                              text=True) for r in (0, 1)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    diff = torch.load(tmp_path / "diff.pt")
    assert len(diff) == 4 + 2 * 12 and all(v == 0.0 for v in diff.values()), diff


@pytest.mark.slow
def test_sft_takes_llrd_and_muon_through_the_same_loop(tmp_path, source):
    from litgpt_ext.cli import main as cli_main

    out = tmp_path / "sft"
    path = _sft_config(source, out)
    cfg = yaml.safe_load(path.read_text())
    cfg["optimizer"] = {**MUON, "init_args": {"lr": 3e-3}, "adamw": {"lr": 1e-3, "weight_decay": 0.0}}
    path.write_text(yaml.safe_dump(cfg))
    cli_main(["sft", "--config", str(path), "--optimizer.layer_lr_decay", "0.5"])  # a flag, folded by SFT
    st = ckpt.load_training_state(out / "final")
    groups = {g["name"]: g for g in st["optimizer"]["param_groups"]}
    assert set(groups) == {"muon/block0", "adamw/embed", "adamw/block0", "adamw/head"}
    with open(next((out / "logs" / "csv").glob("version_*/metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r.get("lr/muon/block0")]
    assert rows and all(float(r["lr/muon/block0"]) == float(r["lr"]) * 0.5 ** 1 for r in rows)
    assert all(float(r["lr/adamw/embed"]) == float(r["lr"]) * ((1e-3 / 3e-3) * 0.5 ** 2) for r in rows)


@pytest.mark.slow
def test_kill_9_and_resume_is_bit_identical_through_the_cli(cli_config, tmp_path):
    from train_fakes import kill_9_after_first_checkpoint

    cfg = yaml.safe_load(cli_config.read_text())
    cfg["optimizer"] = {**MUON, "layer_lr_decay": 0.9}
    cfg["train"].update(max_iters=30, save_interval=2)
    cfg["eval"].update(interval=100)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert _cli("--config", str(path), "--out_dir", str(tmp_path / "straight"), "--devices", "1").returncode == 0
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    killed = tmp_path / "killed"
    at = kill_9_after_first_checkpoint([sys.executable, "-m", "litgpt_ext", "pretrain", "--config", str(path),
                                        "--out_dir", str(killed), "--devices", "1"], killed, env)
    assert at < 30
    assert _cli("--config", str(path), "--out_dir", str(killed), "--devices", "1", "--resume", "auto").returncode == 0
    a, b = ckpt.load_model_state(tmp_path / "straight" / "final"), ckpt.load_model_state(killed / "final")
    assert all(torch.equal(a[k], b[k]) for k in a), at
