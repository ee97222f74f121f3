"""A run's logs: one TensorBoard/CSV stream per run across resumes (no version_N per requeue, no
duplicated steps), and per-shard token counters that add up to the run's `tokens`.

Real components: `litgpt-ext pretrain` in-process on real litdata shards, real Lightning loggers,
and the event files read back with TensorBoard's own EventAccumulator."""

import csv
from pathlib import Path

import numpy as np
import pytest
import yaml
from lightning.fabric.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from litgpt_ext.cli import main as cli_main
from litgpt_ext.data import ShardedMixedDataset
from litgpt_ext.train.metrics import continue_log_stream
from tests.test_train_cli import VOCAB, pattern_shard  # the arithmetic token shards

SEQ, GBS = 16, 4
TOKENS_PER_STEP = GBS * SEQ


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runlogs")
    pattern_shard(root / "data" / "1", 1, 60, 0)
    pattern_shard(root / "data" / "c1", 3, 60, 2)
    pattern_shard(root / "val", 1, 10, 3)
    return root


def config(root: Path, out: Path, logger: str) -> Path:
    cfg = {
        "model_config": {"name": "tiny", "block_size": SEQ, "n_layer": 1, "n_head": 2, "n_embd": 16,
                         "vocab_size": VOCAB, "padded_vocab_size": VOCAB},
        "out_dir": str(out), "precision": "32-true", "logger_name": logger,
        "data": {"class_path": "litgpt_ext.data.ShardedMixedDataset",
                 "init_args": {"data_path": str(root / "data"), "mix_weights_str": "main:0.75,code:0.25",
                               "val_data_path": str(root / "val"), "seed": 42}},
        "train": {"max_iters": 8, "global_batch_size": GBS, "micro_batch_size": 2, "log_interval": 1,
                  "save_interval": 2, "min_lr": 1e-4, "lr_warmup_steps": 1, "max_seq_length": SEQ},
        "eval": {"interval": 4, "max_iters": 1},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-3}},
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def pretrain(cfg: Path, *args: str) -> None:
    cli_main(["pretrain", "--config", str(cfg), "--devices", "1", *args])


def segments(cfg: Path, out: Path) -> None:
    """Job 1 pauses at step 4; job 2 resumes the older step 2 (abandoning 4: steps 3-4 were logged and
    are trained again) and pauses at 6; job 3 (`resume: auto`, a requeue) finishes at 8."""
    pretrain(cfg, "--train.pause_at_step", "4")
    pretrain(cfg, "--resume", str(out / "step-00000002"), "--train.pause_at_step", "6")
    pretrain(cfg, "--resume", "auto")


def scalars(acc: EventAccumulator, tag: str) -> dict[int, float]:
    events = acc.Scalars(tag)
    steps = [e.step for e in events]
    assert steps == sorted(set(steps)), (tag, steps)  # strictly increasing: no step twice
    return {e.step: e.value for e in events}


@pytest.mark.slow
def test_resumed_run_continues_one_tensorboard_stream(data_root):
    out = data_root / "tb"
    segments(config(data_root, out, "tensorboard"), out)
    versions = sorted(p.name for p in (out / "logs" / "tensorboard").iterdir())
    assert versions == ["version_0"]  # three jobs, one run, one stream
    log_dir = out / "logs" / "tensorboard" / "version_0"
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 3  # one event file per job
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    loss = scalars(acc, "loss")
    assert sorted(loss) == list(range(1, 9))  # the whole run, each step once
    raw = EventAccumulator(str(log_dir), size_guidance={"scalars": 0}, purge_orphaned_data=False)
    raw.Reload()  # without TensorBoard's purge, job 1's steps 3-4 are there twice: purge_step did the cut
    assert [e.step for e in raw.Scalars("loss")] == [1, 2, 3, 4, 3, 4, 5, 6, 7, 8]
    assert all(np.isfinite(v) for v in loss.values())
    assert sorted(scalars(acc, "val/val/loss")) == [0, 4, 8]  # job 1's step-4 validation was superseded too

    # the counters add up: per-shard (and per-type) trained tokens sum to `tokens` at every logged step
    tokens = scalars(acc, "tokens")
    assert tokens == {s: s * TOKENS_PER_STEP for s in range(1, 9)}
    tags = acc.Tags()["scalars"]
    shard_tags = [t for t in tags if t.startswith("data/shard/") and t.endswith("/tokens")]
    type_tags = [t for t in tags if t.startswith("data/mix/") and t.endswith("/tokens")]
    assert sorted(shard_tags) == ["data/shard/c1/tokens", "data/shard/main/1/tokens"]
    assert sorted(type_tags) == ["data/mix/code/tokens", "data/mix/main/tokens"]
    per_shard = [scalars(acc, t) for t in shard_tags]
    per_type = [scalars(acc, t) for t in type_tags]
    for step, total in tokens.items():
        assert sum(s[step] for s in per_shard) == total == sum(t[step] for t in per_type), step
    assert scalars(acc, "data/shard/c1/tokens")[8] == 8 * GBS // 4 * SEQ  # code 0.25 of an exact blend
    assert sorted(scalars(acc, "tokens_per_sec")) == list(range(1, 9))


@pytest.mark.slow
def test_resumed_run_continues_one_csv_file(data_root):
    out = data_root / "csv"
    segments(config(data_root, out, "csv"), out)
    assert sorted(p.name for p in (out / "logs" / "csv").iterdir()) == ["version_0"]
    with open(out / "logs" / "csv" / "version_0" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    train_rows = [r for r in rows if r["loss"]]  # validation rows (step 0, 4, 8) are rows of their own
    assert [int(r["step"]) for r in train_rows] == list(range(1, 9))  # job 1's steps 3-4 were cut, not repeated
    assert [int(r["step"]) for r in rows if r["val/val/loss"]] == [0, 4, 8]
    for r in train_rows:
        shards = int(float(r["data/shard/main/1/tokens"])) + int(float(r["data/shard/c1/tokens"]))
        assert shards == int(float(r["tokens"])) == int(r["step"]) * TOKENS_PER_STEP


class _Fabric:
    """The two things continue_log_stream reads of Fabric, around real Lightning loggers."""

    def __init__(self, *loggers):
        self.loggers, self.global_rank = list(loggers), 0


def _log(lg, steps, value: float) -> None:
    for s in steps:
        lg.log_metrics({"loss": value + s}, step=s)
    lg.finalize("success")


def test_fresh_run_is_unchanged_and_a_requeue_without_checkpoint_supersedes_the_stream(tmp_path):
    root = tmp_path / "logs"
    fresh = TensorBoardLogger(root_dir=root, name="tensorboard")
    continue_log_stream(_Fabric(fresh), resumed=True, step=None)  # resume: auto into an empty out_dir
    assert fresh.version == 0 and "purge_step" not in fresh._kwargs
    _log(fresh, range(0, 5), 0.0)
    other = TensorBoardLogger(root_dir=root, name="tensorboard")
    continue_log_stream(_Fabric(other), resumed=False, step=None)  # resume: false keeps Lightning's versions
    assert other.version == 1
    _log(other, range(0, 5), 50.0)
    requeue = TensorBoardLogger(root_dir=root, name="tensorboard")  # killed before its first checkpoint
    continue_log_stream(_Fabric(requeue), resumed=True, step=None)
    assert requeue.version == 1 and requeue._kwargs["purge_step"] == 0  # the newest version, all of it replaced
    _log(requeue, range(0, 3), 100.0)
    acc = EventAccumulator(requeue.log_dir)
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(0, 100.0), (1, 101.0), (2, 102.0)]


def test_csv_logger_keeps_rows_up_to_the_resume_step(tmp_path):
    first = CSVLogger(root_dir=tmp_path, name="csv")
    _log(first, range(1, 7), 0.0)
    finished = CSVLogger(root_dir=tmp_path, name="csv")  # a job that logs nothing leaves the file alone
    continue_log_stream(_Fabric(finished), resumed=True, step=2)
    finished.finalize("success")
    path = tmp_path / "csv" / "version_0" / "metrics.csv"
    assert len(path.read_text().splitlines()) == 1 + 6
    again = CSVLogger(root_dir=tmp_path, name="csv")
    continue_log_stream(_Fabric(again), resumed=True, step=4)
    for s in (5, 6, 7):
        again.log_metrics({"loss": 100.0 + s, "new_key": 1.0}, step=s)  # a new column rewrites the header
    again.finalize("success")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["step"]), float(r["loss"])) for r in rows] == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 105),
                                                                  (6, 106), (7, 107)]
    assert [r["new_key"] for r in rows] == [""] * 4 + ["1.0"] * 3
    assert not (tmp_path / "csv" / "version_1").exists()


def _dm(root: Path) -> ShardedMixedDataset:
    dm = ShardedMixedDataset(data_path=root / "data", mix_weights_str="main:0.75,code:0.25", seed=42)
    dm.connect(batch_size=2, max_seq_length=SEQ)
    dm.setup(rank=0, world_size=1)
    return dm


def test_shard_tokens_count_trained_tokens_and_an_old_state_loads(data_root):
    loader = _dm(data_root).train_dataloader()
    it = iter(loader)
    for _ in range(10):  # 20 samples of SEQ + 1 tokens
        next(it)
    st = loader.stats()
    assert sum(s["tokens"] for s in st["shards"].values()) == 20 * SEQ  # what a run's `tokens` counts
    assert sum(s["tokens_read"] for s in st["shards"].values()) == 20 * (SEQ + 1)  # + the target shift
    assert {t: s["tokens"] for t, s in st["types"].items()} == {"main": 15 * SEQ, "code": 5 * SEQ}
    # a checkpoint written before this change (state version 1: cursors in samples, no token field)
    # loads and reports the new counting: the cursors are all it stores
    old = loader.state_dict()
    for k in ("schedule", "segment_phase_pos", "phase"):
        old.pop(k)
    old["version"] = 1
    resumed = _dm(data_root).train_dataloader()
    resumed.load_state_dict(old)
    again = resumed.stats()["shards"]
    assert {s: v["tokens"] for s, v in again.items()} == {s: v["tokens"] for s, v in st["shards"].items()}
    assert {s: v["samples"] for s, v in again.items()} == {"main/1": 15, "c1": 5}
    it2 = iter(resumed)
    for _ in range(2):
        next(it2)
    assert sum(s["tokens"] for s in resumed.stats()["shards"].values()) == 24 * SEQ
