"""ShardedMixedDataset on real litdata shards: exact blend, shuffle, resume, blend change, val."""

import itertools
import logging
import subprocess
import sys
from collections import Counter

import pytest
import torch

from litgpt_ext.data import MixError, ShardedMixedDataset
from tests.conftest import ROOT, make_shard, shard_of

SEQ = 15  # samples are 16 tokens


def make_dm(root, batch_size=4, rank=0, world_size=1, **kw):
    dm = ShardedMixedDataset(root, **kw)
    dm.connect(batch_size=batch_size, max_seq_length=SEQ)
    dm.setup(rank=rank, world_size=world_size)
    return dm


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def samples(batches):
    return [row for b in batches for row in b]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_prefix_is_within_one_of_the_weights(shard_root, num_workers):
    dm = make_dm(shard_root, batch_size=3, num_workers=num_workers, mix_weights_str="main:0.6,code:0.3,math:0.1")
    rows = samples(take(dm.train_dataloader(), 40))
    weights = dm.weights
    counts = Counter()
    for n, row in enumerate(rows, 1):
        counts["main/" + shard_of(row) if shard_of(row).isdigit() else shard_of(row)] += 1
        for sid, w in weights.items():
            assert abs(counts[sid] - w * n) < 1, (n, sid, counts[sid], w * n)
    assert rows[0].dtype == torch.int64 and rows[0].shape == (SEQ + 1,)


def test_stream_is_identical_for_any_worker_count(shard_root):
    a = take(make_dm(shard_root, num_workers=0, mix_weights_str="main:0.5,code:0.5").train_dataloader(), 12)
    b = take(make_dm(shard_root, num_workers=2, mix_weights_str="main:0.5,code:0.5").train_dataloader(), 12)
    c = take(make_dm(shard_root, num_workers=3, mix_weights_str="main:0.5,code:0.5").train_dataloader(), 12)
    assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(a, b, c))


def test_shuffled_epochs_cover_each_shard_exactly_once(shard_root):
    # m1 alone: 50 samples per epoch; 3 epochs = 150 samples
    dm = make_dm(shard_root, batch_size=5, literal_weights_str="m1:1", seed=7)
    loader = dm.train_dataloader()
    rows = samples(take(loader, 30))
    firsts = [int(r[0]) for r in rows]
    epochs = [firsts[i:i + 50] for i in range(0, 150, 50)]
    expected = sorted(50_000 + 16 * k for k in range(50))
    for e in epochs:
        assert sorted(e) == expected  # every sample once per epoch
    assert epochs[0] != epochs[1] and epochs[0] != sorted(epochs[0])  # reshuffled, not in file order
    st = loader.stats()["shards"]["m1"]
    assert st["epochs"] == pytest.approx(3.0) and st["completed_epochs"] == 3
    assert st["tokens"] == 150 * 15 and st["tokens_read"] == 150 * 16  # trained on (block) vs read (block + 1)
    other_seed = samples(take(make_dm(shard_root, batch_size=5, literal_weights_str="m1:1", seed=8).train_dataloader(), 10))
    assert [int(r[0]) for r in other_seed] != firsts[:50]


def test_sample_contents_are_contiguous_tokens(shard_root):
    for row in samples(take(make_dm(shard_root, mix_weights_str="main:1").train_dataloader(), 5)):
        assert torch.equal(row, torch.arange(int(row[0]), int(row[0]) + SEQ + 1))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_exact_resume(shard_root, num_workers):
    mix = dict(mix_weights_str="main:0.5,code:0.3,math:0.2")
    straight = take(make_dm(shard_root, num_workers=num_workers, **mix).train_dataloader(), 20)
    first = make_dm(shard_root, num_workers=num_workers, **mix).train_dataloader()
    head = take(first, 7)
    state = first.state_dict()
    resumed = make_dm(shard_root, num_workers=num_workers, **mix).train_dataloader()
    resumed.load_state_dict(state)
    tail = take(resumed, 13)
    assert all(torch.equal(x, y) for x, y in zip(straight, head + tail))


def test_two_ranks_split_data_and_resume_exactly(shard_root):
    mix = dict(mix_weights_str="main:0.5,code:0.5")
    ranks = [make_dm(shard_root, rank=r, world_size=2, **mix) for r in (0, 1)]
    straight = [take(dm.train_dataloader(), 10) for dm in ranks]
    seen = [int(row[0]) for r in straight for row in samples(r)]
    assert len(seen) == len(set(seen))  # 80 samples, none served twice across ranks (within an epoch)
    loaders = [dm.train_dataloader() for dm in ranks]
    heads = [take(l, 4) for l in loaders]
    states = [l.state_dict() for l in loaders]
    assert states[0] == states[1]  # every rank holds the same state
    for r in (0, 1):
        resumed = make_dm(shard_root, rank=r, world_size=2, num_workers=2, **mix).train_dataloader()
        resumed.load_state_dict(states[0])
        assert all(torch.equal(x, y) for x, y in zip(straight[r], heads[r] + take(resumed, 6)))


def test_blend_change_on_resume_keeps_cursors(shard_root, caplog):
    old = make_dm(shard_root, mix_weights_str="main:0.5,code:0.5").train_dataloader()
    before = samples(take(old, 10))
    state = old.state_dict()
    new = make_dm(shard_root, mix_weights_str="main:0.75,math:0.25").train_dataloader()
    with caplog.at_level(logging.WARNING):
        new.load_state_dict(state)
    assert "old weight" in caplog.text and "new weight" in caplog.text and "no replay" in caplog.text
    after = samples(take(new, 10))
    # main shards continue where they stopped: nothing served before is served again
    assert not ({int(r[0]) for r in before} & {int(r[0]) for r in after})
    # the new weights hold from the switch on
    kinds = Counter("main" if shard_of(r).isdigit() else shard_of(r)[0] for r in after)
    assert kinds == {"main": 30, "m": 10}
    st = new.state_dict()
    assert st["cursors"]["c1"] == state["cursors"]["c1"] > 0  # dropped shard keeps its cursor
    assert st["cursors"]["m1"] == 10  # new shard starts fresh
    assert len(st["mix_history"]) == 2
    # and switching back to the first blend continues code where it stopped
    back = make_dm(shard_root, mix_weights_str="main:0.5,code:0.5").train_dataloader()
    back.load_state_dict(st)
    again = samples(take(back, 10))
    assert not ({int(r[0]) for r in before + after} & {int(r[0]) for r in again})


def test_a_fork_with_a_new_data_seed_reshuffles_only_the_shards_it_has_not_read(shard_root, caplog):
    """The sweep's arm_data_seeds: two forks of one checkpoint with data seeds 7 and 8 draw the new
    shard (math) in different orders, continue the read shards (main) on the checkpoint's shuffle (no
    sample served twice), and each resumes its own order exactly."""
    base = make_dm(shard_root, mix_weights_str="main:1", seed=42).train_dataloader()
    before = {int(r[0]) for r in samples(take(base, 10))}
    state = base.state_dict()
    mix = dict(mix_weights_str="main:0.5,math:0.5")
    runs = {}
    for seed in (7, 8, 42):
        fork = make_dm(shard_root, seed=seed, **mix).train_dataloader()
        with caplog.at_level(logging.WARNING):
            fork.load_state_dict(state)
        head = samples(take(fork, 3))
        resumed = make_dm(shard_root, seed=seed, **mix).train_dataloader()
        resumed.load_state_dict(fork.state_dict())
        runs[seed] = head + samples(take(resumed, 3))
        straight = make_dm(shard_root, seed=seed, **mix).train_dataloader()
        straight.load_state_dict(state)
        assert all(torch.equal(x, y) for x, y in zip(runs[seed], samples(take(straight, 6))))  # exact resume
        assert fork.state_dict()["shard_seeds"] == ({} if seed == 42 else {"m1": seed})
    firsts = {s: [int(r[0]) for r in rows] for s, rows in runs.items()}
    math = {s: [x for x in f if shard_of(torch.tensor([x])) == "m1"] for s, f in firsts.items()}
    main = {s: [x for x in f if shard_of(torch.tensor([x])) != "m1"] for s, f in firsts.items()}
    assert math[7] != math[8] and math[7] != math[42] and sorted(math[7]) != sorted(math[8])
    assert main[7] == main[8] == main[42] and not (set(main[7]) & before)  # the read shards: no replay
    assert "the shards this run has not read yet (m1) are shuffled with 7" in caplog.text


def test_resume_refuses_changed_sequence_length(shard_root):
    loader = make_dm(shard_root).train_dataloader()
    take(loader, 2)
    dm = ShardedMixedDataset(shard_root)
    dm.connect(batch_size=4, max_seq_length=SEQ + 8)
    dm.setup()
    with pytest.raises(MixError, match="max_seq_length must not change on resume"):
        dm.train_dataloader().load_state_dict(loader.state_dict())


def test_shard_smaller_than_one_sample(tmp_path):
    make_shard(tmp_path / "1", 0, 800)
    make_shard(tmp_path / "m1", 50_000, 10, chunk_tokens=10)
    dm = ShardedMixedDataset(tmp_path, mix_weights_str="main:0.5,math:0.5")
    dm.connect(batch_size=2, max_seq_length=SEQ)
    with pytest.raises(MixError, match=r"shard 'm1' .* fewer than one sample of 16 tokens"):
        dm.setup()


def test_named_val_sets(shard_root):
    dm = make_dm(shard_root, batch_size=4, val_data_path={"general": str(shard_root / "val" / "1"), "domain": str(shard_root / "val" / "m1")})
    vals = dm.val_dataloaders()
    assert list(vals) == ["general", "domain"]
    gen = list(vals["general"])
    assert len(gen) == len(vals["general"]) == 7  # 400 tokens in one chunk -> 25 samples -> 7 batches of 4
    assert [int(r[0]) for r in samples(gen)] == [90_000 + 16 * k for k in range(25)]
    assert list(vals["general"])[0].equal(gen[0])  # deterministic
    r1 = make_dm(shard_root, rank=1, world_size=2, val_data_path=str(shard_root / "val")).val_dataloaders()["val"]
    assert [int(r[0]) for r in samples(r1)][:3] == [90_016, 90_048, 90_080]  # folder of shards, odd items for rank 1
    both = make_dm(shard_root, val_data_path={"all": [str(shard_root / "val" / "1"), str(shard_root / "val" / "m1")]})
    assert sum(len(b) for b in both.val_dataloaders()["all"]) == 25 + 15  # m1: 240 tokens -> 15 samples
    with pytest.raises(MixError, match="val_data_path general='/nonexistent' does not exist"):
        make_dm(shard_root, val_data_path={"general": "/nonexistent"}).val_dataloaders()


def test_data_module_from_paper_style_config(shard_root, tmp_path):
    """The class path + init_args form the paper's YAML uses instantiates through jsonargparse."""
    from jsonargparse import ArgumentParser
    from litgpt.data import DataModule

    parser = ArgumentParser()
    parser.add_argument("--data", type=DataModule)
    cfg = parser.parse_object({"data": {"class_path": "litgpt_ext.data.ShardedMixedDataset", "init_args": {
        "data_path": str(shard_root), "val_data_path": str(shard_root / "val"), "num_workers": 0,
        "mix_weights_str": "main:0.9,math:0.1", "seed": 3}}})
    dm = parser.instantiate_classes(cfg).data
    assert isinstance(dm, ShardedMixedDataset) and dm.seed == 3
    assert dm.resolve() == pytest.approx({"main/1": 0.45, "main/2": 0.45, "m1": 0.1})


@pytest.mark.slow
def test_inspect_mix_cli(shard_root):
    out = subprocess.run(
        [sys.executable, "-m", "litgpt_ext", "inspect-mix", "--data_path", str(shard_root),
         "--mix_weights_str", "main:0.8,math:0.2", "--tokens", "4000", "--max_seq_length", str(SEQ)],
        capture_output=True, text=True, cwd=ROOT, check=True,
    ).stdout
    assert "m1" in out and "0.2000" in out and "1.00" in out  # m1: 800 tokens, 0.2*4000 -> 1 epoch
    bad = subprocess.run(
        [sys.executable, "-m", "litgpt_ext", "inspect-mix", "--data_path", str(shard_root), "--mix_weights_str", "main:0.8,mth:0.2"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert bad.returncode != 0 and "unknown shard type 'mth'" in bad.stderr


def test_reader_matches_litdata_streaming_dataset(tmp_path):
    """Our memmap reader serves exactly what litdata's TokensLoader serves, uneven chunks included."""
    import numpy as np
    from litdata.streaming import StreamingDataset
    from litdata.streaming.item_loader import TokensLoader

    from litgpt_ext.data.shard_io import ShardReader, write_token_shard

    rng = np.random.default_rng(0)
    write_token_shard(tmp_path / "1", [rng.integers(0, 60_000, int(rng.integers(5, 90))) for _ in range(60)], chunk_tokens=300)
    ds = StreamingDataset(str(tmp_path / "1"), item_loader=TokensLoader(block_size=SEQ + 1))
    reader = ShardReader(tmp_path / "1", SEQ + 1)
    assert len(ds) > 50
    for i in [*range(len(ds)), 0, len(ds) - 1, 7]:
        assert torch.equal(reader[i].long(), ds[i].long()), i
