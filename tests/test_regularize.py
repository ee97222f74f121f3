"""Forgetting regularizers (litgpt_ext/train/regularize.py): EWC and the L2 anchor.

Values by hand (the Fisher is autograd's squared batch gradients, the penalties and their gradients
the hand-computed sums), bad inputs (one line, through the real CLI too), short real runs where the
logged objective includes the penalty and the weights stay closer to the anchor, bit-identical
resume after preemption, and 2 gloo processes (FSDP2) against 1."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from litgpt.config import Config
from litgpt.model import GPT

sys.path.insert(0, str(Path(__file__).parent))
from train_fakes import VOCAB, FakeMixedData, SignalAfter  # noqa: E402

from litgpt_ext import checkpoint as ckpt  # noqa: E402
from litgpt_ext.train.args import EvalArgs, RegularizerArgs, TrainArgs  # noqa: E402
from litgpt_ext.train.loop import PREEMPT_EXIT_CODE, pretrain  # noqa: E402
from litgpt_ext.train.objective import next_token_loss  # noqa: E402
from litgpt_ext.train.regularize import Regularizer, fisher_diagonal, named_params  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CFG = dict(name="tiny", block_size=16, n_layer=2, n_head=2, n_embd=32, padded_vocab_size=VOCAB, vocab_size=VOCAB)
OPT = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-3, "weight_decay": 0.0}}


# ----------------------------------------------------------------------------------------------- values by hand


def _tiny(seed=0):
    torch.manual_seed(seed)
    return GPT(Config(**CFG))


def test_fisher_is_autograd_squared_batch_gradients_and_penalties_are_the_sums():
    fabric = L.Fabric(accelerator="cpu", devices=1)
    model = fabric.setup(_tiny())
    g = torch.Generator().manual_seed(1)
    micro = [torch.randint(0, VOCAB, (2, 17), generator=g) for _ in range(6)]  # 3 batches x accum 2
    F = fisher_diagonal(fabric, model, micro, accum=2, n_batches=3, loss_fn=next_token_loss)

    ref = _tiny()
    params = [(n, p) for n, p in ref.named_parameters()]
    hand = {n: torch.zeros_like(p) for n, p in params}
    for b in range(3):
        loss = (next_token_loss(ref, micro[2 * b])[0] + next_token_loss(ref, micro[2 * b + 1])[0]) / 2
        grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
        for (n, _), gr in zip(params, grads):
            if gr is not None:
                hand[n] += gr ** 2  # the square of the batch's mean gradient: per batch, not per example
    assert set(F) == set(hand) and all(p.grad is None for p in model.parameters())
    for n in hand:
        torch.testing.assert_close(F[n], hand[n] / 3, rtol=1e-5, atol=1e-12, msg=n)
    assert sum(float(f.sum()) for f in F.values()) > 0

    # the penalties and their gradients: λ/2 Σ F (θ − θ*)², λ/2 Σ (θ − θ0)²
    named = named_params(model)
    star = {n: p.detach() + 0.01 * torch.randn(p.shape, generator=g) for n, p in named}
    for kind, weight in (("ewc", F), ("l2_anchor", None)):
        reg = Regularizer(kind, 3.0, named, star, weight)
        w = weight or {n: torch.ones_like(p) for n, p in named}
        want = 1.5 * sum(float((w[n] * (p.detach() - star[n]) ** 2).sum(dtype=torch.float64)) for n, p in named)
        got = reg.backward()
        assert float(got) == pytest.approx(want, rel=1e-5) and reg.value(fabric) == float(got)
        for n, p in named:
            torch.testing.assert_close(p.grad, 3.0 * w[n] * (p.detach() - star[n]), rtol=1e-5, atol=1e-10, msg=n)
            p.grad = None


@pytest.mark.parametrize("cfg, error", [
    ({"type": "ewc", "lambda": 1.0}, "regularizer.type=ewc needs regularizer.reference"),
    ({"type": "l2_anchor", "lambda": -0.5}, "regularizer.lambda must be >= 0, got -0.5"),
    ({"type": "fisher", "lambda": 1.0}, "regularizer.type='fisher' is not valid; choose from: ewc, l2_anchor"),
    ({"type": "ewc", "lambda": 1.0, "reference": ".", "fisher_batches": 0},
     "regularizer.fisher_batches must be an integer >= 1, got 0"),
    ({"type": "l2_anchor"}, "regularizer.lambda (the penalty's strength, >= 0) is required for l2_anchor"),
    ({"type": "l2_anchor", "lambda": 1.0, "reference": "x"}, "['reference'] are for ewc only"),
    ({"type": "ewc", "lambda": 1.0, "lamda": 2}, "unknown key(s) ['lamda']"),
])
def test_bad_regularizer_values_are_one_line(cfg, error):
    with pytest.raises(ValueError) as e:
        RegularizerArgs.parse(cfg)
    assert error in str(e.value) and "\n" not in str(e.value)


def test_l2_anchor_on_a_fresh_pretrain_is_refused_and_a_missing_reference_named(tmp_path):
    with pytest.raises(ValueError, match="a fresh pretrain has none: midtrain from a checkpoint"):
        RegularizerArgs.parse({"type": "l2_anchor", "lambda": 1.0}, fresh=True)
    with pytest.raises(FileNotFoundError, match="regularizer.reference '.*nope' does not exist"):
        RegularizerArgs.parse({"type": "ewc", "lambda": 1.0, "reference": str(tmp_path / "nope")})
    assert RegularizerArgs.parse({"type": "ewc", "lambda": 2, "reference": str(tmp_path)}) == RegularizerArgs(
        "ewc", 2.0, tmp_path, "train", 8)


def test_fisher_data_that_is_unknown_or_too_small_is_named():
    from litgpt_ext.train import regularize as rg

    data = FakeMixedData(val_batches=2)
    data.connect(batch_size=2, max_seq_length=16)
    data.setup()
    args = RegularizerArgs.parse({"type": "ewc", "lambda": 1.0, "reference": ".", "fisher_data": "math"})
    with pytest.raises(ValueError, match=r"fisher_data='math' is neither 'train' .* validation sets \['domain', 'general'\]"):
        rg._fisher_source(args, data, data.val_dataloaders())
    args = RegularizerArgs.parse({"type": "ewc", "lambda": 1.0, "reference": ".", "fisher_data": "general",
                                  "fisher_batches": 2})
    batches, source = rg._fisher_source(args, data, data.val_dataloaders())
    assert source == {"val": "general", "path": None}
    with pytest.raises(ValueError, match=r"has 2 micro-batches on rank 0, fewer than fisher_batches=2 x 2"):
        rg._need(L.Fabric(accelerator="cpu", devices=1), batches, 4, args)


# ----------------------------------------------------------------------------------------------- real runs


def run(out_dir, data=None, train=None, **kw):
    targs = dict(max_iters=6, global_batch_size=4, micro_batch_size=2, save_interval=3, log_interval=1,
                 lr_warmup_steps=1, min_lr=1e-4)
    targs.update(train or {})
    return pretrain(model_config=Config(**CFG), out_dir=Path(out_dir), data=data or FakeMixedData(val_batches=4),
                    devices=1, logger_name="csv", train=TrainArgs(**targs), eval=EvalArgs(interval=3, max_iters=2),
                    optimizer=OPT, **kw)


def csv_rows(out: Path) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for f in sorted(out.glob("logs/csv/version_*/metrics.csv")):
        with open(f) as fh:
            for r in csv.DictReader(fh):
                rows.setdefault(int(float(r["step"])), {}).update({k: v for k, v in r.items() if v not in ("", None)})
    return rows


def load_fisher(path: Path, like: dict) -> dict:
    """The Fisher a run cached (a DCP folder), as full tensors."""
    import torch.distributed.checkpoint as dcp

    names = [k[2:] for k in dcp.FileSystemReader(path).read_metadata().state_dict_metadata]
    sd = {"t": {k: torch.zeros_like(like[k], dtype=torch.float32) for k in names}}
    dcp.load(sd, storage_reader=dcp.FileSystemReader(path))
    return sd["t"]


def weighted_before(out: Path, F: dict, start: dict) -> float:
    """Σ F (θ − θ*)² at the weights step 10 started from (the penalty is taken before the step's update)."""
    w = ckpt.load_model_state(out / "step-00000009")
    return sum(float((F[k] * (w[k] - start[k]) ** 2).sum()) for k in F)


def distance(a: dict, b: dict) -> float:
    return sum(float(((a[k].float() - b[k].float()) ** 2).sum()) for k in a) ** 0.5


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """'Pretraining' on shard a only (the general data); midtraining then switches to shard b."""
    out = tmp_path_factory.mktemp("base")
    run(out, data=FakeMixedData(weight_a=1.0, val_batches=4), train={"max_iters": 4, "save_interval": 4})
    return out / "final"


NEW = dict(weight_a=0.0, val_batches=4)  # the midtraining blend: all shard b
MID = {"max_iters": 100, "max_additional_steps": 6}
EWC = {"type": "ewc", "lambda": 1e5, "fisher_data": "general", "fisher_batches": 2}
L2 = {"type": "l2_anchor", "lambda": 10.0}


@pytest.fixture(scope="module")
def plain(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    run(out, data=FakeMixedData(**NEW), fork_from=base, train=MID)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("which", ["ewc", "l2_anchor"])
def test_a_regularized_midtrain_logs_the_penalty_and_stays_closer(which, base, plain, tmp_path, capsys):
    reg = {**EWC, "reference": str(base)} if which == "ewc" else L2
    res = run(tmp_path, data=FakeMixedData(**NEW), fork_from=base, train=MID, regularizer=reg)
    assert res.step == 4 + 6
    rows = csv_rows(tmp_path)
    for s in range(5, 11):
        pen = float(rows[s][f"reg/{which}"])
        assert float(rows[s]["objective"]) == pytest.approx(float(rows[s]["loss"]) + pen, rel=1e-6)
        assert pen > 0 if s > 5 else pen == 0  # step 5 is the first from the anchor: θ = θ* (= θ0) there
    start = ckpt.load_model_state(base)
    free, held = ckpt.load_model_state(plain / "final"), ckpt.load_model_state(tmp_path / "final")
    # measured: EWC 0.82 vs 1.51 (and its Fisher-weighted distance 1.4e-5 vs 2.4e-4), L2 0.27 vs 1.51
    assert distance(held, start) < (0.8 if which == "ewc" else 0.5) * distance(free, start)
    out = capsys.readouterr().out
    if which == "ewc":
        fisher = list((tmp_path / "ewc").glob("fisher-*"))
        assert len(fisher) == 1 and (fisher[0] / ".metadata").is_file() and "computing the diagonal Fisher" in out
        F = load_fisher(fisher[0], start)
        weighted = lambda w: sum(float((F[k] * (w[k] - start[k]) ** 2).sum()) for k in F)  # noqa: E731
        assert weighted(held) < 0.2 * weighted(free)  # what EWC penalizes moved far less
        assert float(rows[10]["reg/ewc"]) == pytest.approx(0.5 * EWC["lambda"] * weighted_before(tmp_path, F, start),
                                                           rel=1e-4)
    else:
        assert len(list((tmp_path / "l2_anchor").iterdir())) == 1


@pytest.mark.slow
@pytest.mark.parametrize("which", ["ewc", "l2_anchor"])
def test_preempted_and_requeued_run_is_bit_identical(which, base, tmp_path, capsys, monkeypatch):
    reg = {**EWC, "reference": str(base), "fisher_data": "train"} if which == "ewc" else L2
    straight = run(tmp_path / "straight", data=FakeMixedData(**NEW), fork_from=base, train=MID, regularizer=reg)
    job = tmp_path / "requeued"
    with pytest.raises(SystemExit) as e:  # SIGUSR1 during step 7: checkpoint step-7, exit 99
        run(job, data=SignalAfter(n=5, **NEW), fork_from=base, train={**MID, "save_interval": 100}, regularizer=reg)
    assert e.value.code == PREEMPT_EXIT_CODE and ckpt.latest_checkpoint(job).name == "step-00000007"
    capsys.readouterr()
    if which == "ewc":  # the requeue takes θ* and F from its caches: the reference is not loaded again
        import litgpt_ext.train.regularize as rg

        monkeypatch.setattr(rg, "load_into", lambda *a: pytest.fail("the reference was loaded on a requeue"))
    again = run(job, data=FakeMixedData(**NEW), fork_from=base, train=MID, regularizer=reg)
    assert again.losses == {k: v for k, v in straight.losses.items() if k > 7}
    a, b = ckpt.load_model_state(tmp_path / "straight" / "final"), ckpt.load_model_state(job / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same anchor (the fork's weights, not step 7's)
    assert csv_rows(job)[10][f"reg/{which}"] == csv_rows(tmp_path / "straight")[10][f"reg/{which}"]
    if which == "ewc":
        assert "reusing θ* and the Fisher cached in" in capsys.readouterr().out
        monkeypatch.undo()
        # a changed key (fisher_batches) recomputes into its own cache
        run(tmp_path / "other", data=FakeMixedData(**NEW), fork_from=base, train={**MID, "max_additional_steps": 1},
            regularizer={**reg, "fisher_batches": 1})
        assert "computing the diagonal Fisher" in capsys.readouterr().out


def test_a_reference_without_manifest_is_hashed_once_per_file_state(tmp_path, monkeypatch):
    from litgpt_ext.checkpoint import layout
    from litgpt_ext.train.regularize import _file_hash

    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "lit_model.pth").write_bytes(b"weights v1")
    first = _file_hash(ref, tmp_path / "run")
    real = layout._sha256
    monkeypatch.setattr(layout, "_sha256", lambda f: pytest.fail(f"{f} hashed again"))
    assert _file_hash(ref, tmp_path / "run") == first  # remembered by (path, size, mtime)
    monkeypatch.setattr(layout, "_sha256", real)
    (ref / "lit_model.pth").write_bytes(b"weights v2!")  # another file: hashed again, another identity
    second = _file_hash(ref, tmp_path / "run")
    assert second != first and second == real(ref / "lit_model.pth")
    assert len(json.loads((tmp_path / "run" / "ewc" / "reference_hashes.json").read_text())) == 2


@pytest.mark.slow
def test_ewc_reference_of_another_shape_is_named(base, tmp_path):
    other = tmp_path / "wide"
    cfg = {**CFG, "n_embd": 64}
    pretrain(model_config=Config(**cfg), out_dir=other, data=FakeMixedData(val_batches=4), devices=1,
             logger_name="csv", train=TrainArgs(max_iters=1, global_batch_size=4, micro_batch_size=2, min_lr=1e-4),
             eval=EvalArgs(interval=3, max_iters=1, initial_validation=False), optimizer=OPT)
    with pytest.raises(ValueError, match=r"regularizer.reference: weights in .* do not fit .*n_embd: 64 vs 32"):
        run(tmp_path / "x", data=FakeMixedData(**NEW), fork_from=base, train=MID,
            regularizer={**EWC, "reference": str(other / "final")})


# ----------------------------------------------------------------------------------------------- CLI, 2 processes


@pytest.fixture(scope="module")
def cli_config(tmp_path_factory) -> Path:
    """test_train_cli's one-shard config with the CSV logger: 1 and 2 processes see the same global batches."""
    from test_train_cli import one_shard_config

    return one_shard_config(
        tmp_path_factory.mktemp("regcli"), model_name="tiny", resume=False,
        train={"max_iters": 3, "global_batch_size": 8, "micro_batch_size": 2, "log_interval": 1, "save_interval": 3,
               "min_lr": 1e-4, "lr_warmup_fraction": 0.2, "max_seq_length": 16},
        optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-3, "weight_decay": 0.0}})


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


@pytest.mark.slow
def test_bad_regularizer_through_the_real_cli_is_one_line(cli_config, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "litgpt_ext", "pretrain", "--config", str(cli_config), "--out_dir",
                           str(tmp_path / "out"), "--regularizer.type", "l2_anchor", "--regularizer.lambda", "-1"],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == "litgpt-ext pretrain: error: regularizer.lambda must be >= 0, got -1.0", proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("which", ["ewc", "l2_anchor"])
def test_kill_9_and_resume_is_bit_identical_through_the_cli(which, cli_config, tmp_path):
    """A real SIGKILL (no handler runs) after the first checkpoint past the fork: the rerun resumes from
    what is on disk and ends bit-identical to an uninterrupted run, penalty included (the anchor is the
    fork's weights and EWC's Fisher its cache, not the killed run's last checkpoint)."""
    import yaml
    from train_fakes import kill_9_after_first_checkpoint

    from litgpt_ext.cli import main as cli_main

    base = tmp_path / "base"
    cli_main(["pretrain", "--config", str(cli_config), "--devices", "1", "--out_dir", str(base)])
    ref = base / "final"
    reg = {"type": "ewc", "lambda": 1e4, "reference": str(ref), "fisher_batches": 2} if which == "ewc" else \
        {"type": "l2_anchor", "lambda": 10.0}
    argv = [sys.executable, "-m", "litgpt_ext", "pretrain", "--config", str(cli_config), "--devices", "1",
            "--fork_from", str(ref), "--train.max_iters", "100", "--train.max_additional_steps", "16",
            "--train.save_interval", "2", "--eval.interval", "100",
            "--regularizer", yaml.safe_dump(reg, default_flow_style=True).strip()]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = subprocess.run(argv + ["--out_dir", str(straight)], env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    at = kill_9_after_first_checkpoint(argv + ["--out_dir", str(killed)], killed, _env(), after_step=3)
    assert 3 < at < 19
    proc = subprocess.run(argv + ["--out_dir", str(killed), "--resume", "auto"], env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = ckpt.load_model_state(straight / "final"), ckpt.load_model_state(killed / "final")
    assert all(torch.equal(a[k], b[k]) for k in a), at
    pa, pb = csv_rows(straight)[19][f"reg/{which}"], csv_rows(killed)[19][f"reg/{which}"]
    assert float(pa) > 0 and pa == pb


@pytest.mark.slow
def test_two_processes_give_the_one_process_penalty(cli_config):
    """FSDP2 on 2 gloo ranks: each holds its shards of θ*, F and θ0, and the all-reduced penalty (and
    the Fisher itself) matches 1 process on the same global batches."""
    import yaml

    from litgpt_ext.cli import main as cli_main

    root = cli_config.parent
    cli_main(["pretrain", "--config", str(cli_config), "--devices", "1", "--out_dir", str(root / "base")])
    ref = root / "base" / "final"
    mid = ["--fork_from", str(ref), "--train.max_iters", "100", "--train.max_additional_steps", "3"]
    for which, reg in (("ewc", {"type": "ewc", "lambda": 1e4, "reference": str(ref), "fisher_batches": 2}),
                       ("l2_anchor", {"type": "l2_anchor", "lambda": 10.0})):
        flag = ["--regularizer", yaml.safe_dump(reg, default_flow_style=True).strip()]
        one, two = root / f"one_{which}", root / f"two_{which}"
        cli_main(["pretrain", "--config", str(cli_config), "--devices", "1", "--out_dir", str(one), *mid, *flag])
        proc = subprocess.run([sys.executable, "-m", "litgpt_ext", "pretrain", "--config", str(cli_config),
                               "--devices", "2", "--out_dir", str(two), *mid, *flag],
                              env=_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        a, b = csv_rows(one), csv_rows(two)
        assert float(a[4][f"reg/{which}"]) == float(b[4][f"reg/{which}"]) == 0.0  # θ = θ* (θ0) at the fork
        for s in (5, 6):
            pa, pb = float(a[s][f"reg/{which}"]), float(b[s][f"reg/{which}"])
            assert pa > 0 and pb == pytest.approx(pa, rel=1e-3), (which, s, pa, pb)
            assert float(b[s]["objective"]) == pytest.approx(float(b[s]["loss"]) + pb, rel=1e-6)
        if which == "ewc":  # the Fisher the 2 ranks wrote as shards, read whole, is the 1-process one
            start = ckpt.load_model_state(ref)
            fa, fb = (load_fisher(next((d / "ewc").glob("fisher-*")), start) for d in (one, two))
            assert fa.keys() == fb.keys()
            for k in fa:
                torch.testing.assert_close(fb[k], fa[k], rtol=1e-3, atol=1e-9, msg=k)
