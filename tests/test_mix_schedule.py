"""Mixture schedules and repetition caps: the exact time-varying blend on real litdata shards."""

import itertools
import logging
import random
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
import yaml

from litgpt_ext.data import MixError, ShardedMixedDataset
from litgpt_ext.data.blend import ScheduledBlend
from litgpt_ext.data.schedule import curve_pieces, parse_mix_schedule, schedule_weights_at
from tests.conftest import ROOT, shard_of

SEQ = 15  # samples are 16 tokens; shard sizes in samples: 1: 200, 2: 100, c1: 100, c2: 50, m1: 50

# the continued-pretraining guide's recipe: 50% domain until 10% of the phase, ramp to 80% by 50%
RECIPE = [
    {"at_fraction": 0.1, "mix_weights_str": "main:0.5,code:0.5"},
    {"at_fraction": 0.5, "mix_weights_str": "main:0.2,code:0.8", "ramp": "linear"},
]


def make_dm(root, batch_size=4, rank=0, world_size=1, phase=(0, 50, 4), **kw):
    dm = ShardedMixedDataset(root, **kw)
    dm.connect(batch_size=batch_size, max_seq_length=SEQ)
    dm.setup(rank=rank, world_size=world_size)
    if phase is not None:
        dm.set_phase(*phase)
    return dm


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def rows_of(batches):
    return [row for b in batches for row in b]


def sid_of(row) -> str:
    s = shard_of(row)
    return "main/" + s if s.isdigit() else s


def integral(record, ids, offset, scale, n, sub=64):
    """Reference T_i(n) = integral of the scheduled weight over n samples, by the midpoint rule."""
    x = (np.arange(n * sub) + 0.5) / sub
    w = np.array([[schedule_weights_at(record, offset + xi * scale)[s] for s in ids] for xi in x])
    return np.cumsum(w, axis=0)[sub - 1::sub] / sub  # row k: T(k+1)


def random_record(rng, ids):
    K = rng.randint(1, 5)
    knots = sorted(rng.uniform(-200, 2500) for _ in range(K))
    weights = []
    for _ in range(K):
        w = [rng.random() if rng.random() > 0.3 else 0.0 for _ in ids]
        w[rng.randrange(len(ids))] += 0.05
        weights.append({s: v / sum(w) for s, v in zip(ids, w)})
    ramps = ["constant"] + [rng.choice(["constant", "linear"]) for _ in range(K - 1)]
    return {"knots": knots, "weights": weights, "ramps": ramps}


@pytest.mark.slow
def test_scheduled_blend_bound_over_random_schedules():
    """|c_i(n) - T_i(n)| <= 1 - 1/(2(S-1)) at every prefix, for random piecewise-linear schedules."""
    worst = 0.0
    for trial in range(120):
        rng = random.Random(trial)
        S = rng.randint(2, 6)
        ids = [f"s{i}" for i in range(S)]
        rec = random_record(rng, ids)
        R, offset = rng.randint(1, 4), rng.uniform(0, 400)
        blend = ScheduledBlend(curve_pieces(rec, ids, offset, R))
        picks = blend.take(800)
        counts = np.cumsum(np.eye(S)[picks], axis=0)
        T = np.array([[blend.target(i, n) for i in range(S)] for n in range(1, 801)])
        bound = 1 - 1 / (2 * (S - 1))
        gap = np.abs(counts - T).max()
        assert gap <= bound + 1e-9, (trial, gap, bound)
        worst = max(worst, gap)
        # the blend's own T_i agrees with an independent integral of the schedule
        ref = integral(rec, ids, offset, R, 200, sub=16)
        assert np.abs(T[:200] - ref).max() < 0.05
    assert worst > 0.5  # the bound is not vacuous: the schedules do push against it


def test_constant_schedule_matches_constant_blend():
    from litgpt_ext.data.blend import Blend

    rec = {"knots": [0.0], "weights": [{"a": 0.5, "b": 0.3, "c": 0.2}], "ramps": ["constant"]}
    sched = ScheduledBlend(curve_pieces(rec, ["a", "b", "c"], 0.0, 1.0)).take(500)
    assert sched == Blend([0.5, 0.3, 0.2]).take(500)


@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (2, 2)])
def test_recipe_blend_is_exact_per_rank(shard_root, world_size, num_workers):
    """Every rank's prefix counts stay within 1 of the integral of the schedule, for any worker count."""
    phase = (0, 40, 4 * world_size)  # 40 steps, 4 samples per rank per step
    for rank in range(world_size):
        dm = make_dm(shard_root, rank=rank, world_size=world_size, num_workers=num_workers, phase=phase,
                     mix_schedule=RECIPE)
        loader = dm.train_dataloader()
        rows = rows_of(take(loader, 40))
        rec = loader.state_dict()["schedule"]
        ids = list(rec["weights"][0])
        T = integral(rec, ids, 0.0, world_size, len(rows))
        counts = Counter()
        for n, row in enumerate(rows):
            counts[sid_of(row)] += 1
            for i, sid in enumerate(ids):
                assert abs(counts[sid] - T[n, i]) < 1, (rank, n, sid, counts[sid], T[n, i])
        # the recipe: 50% code before 10% of the phase, 80% after 50%
        code = [sid_of(r).startswith("c") for r in rows]
        assert sum(code[:16]) == 8 and sum(code[-80:]) == 64


def test_resume_is_exact_across_schedule_points(shard_root):
    kw = dict(mix_schedule=RECIPE, phase=(0, 30, 4))
    straight = take(make_dm(shard_root, **kw).train_dataloader(), 30)
    for cut in (2, 3, 11, 16):  # before, at, inside and after the ramp
        first = make_dm(shard_root, **kw).train_dataloader()
        head = take(first, cut)
        state = first.state_dict()
        resumed = make_dm(shard_root, num_workers=2, **kw).train_dataloader()
        resumed.load_state_dict(state)
        assert all(torch.equal(x, y) for x, y in zip(straight, head + take(resumed, 30 - cut))), cut


def test_requeue_keeps_the_checkpoints_phase(shard_root, caplog):
    """A requeue that passes another phase (e.g. a moved stop step) does not move the schedule."""
    straight = take(make_dm(shard_root, mix_schedule=RECIPE, phase=(0, 30, 4)).train_dataloader(), 30)
    first = make_dm(shard_root, mix_schedule=RECIPE, phase=(0, 30, 4)).train_dataloader()
    head = take(first, 9)
    state = first.state_dict()
    assert state["phase"] == {"start_step": 0, "stop_step": 30, "global_batch_size": 4}
    requeued = make_dm(shard_root, mix_schedule=RECIPE, phase=(9, 39, 4)).train_dataloader()
    with caplog.at_level(logging.INFO):
        requeued.load_state_dict(state)
    assert "keeping the checkpoint's phase" in caplog.text
    assert all(torch.equal(x, y) for x, y in zip(straight, head + take(requeued, 21)))
    # and a resume that never calls set_phase takes the phase from the checkpoint
    bare = make_dm(shard_root, mix_schedule=RECIPE, phase=None).train_dataloader()
    bare.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(straight[9:], take(bare, 21)))


def test_world_size_change_continues_the_schedule(shard_root):
    one = make_dm(shard_root, mix_schedule=RECIPE, phase=(0, 40, 4)).train_dataloader()
    take(one, 10)  # 40 samples of 160: 25% of the phase
    state = one.state_dict()
    two = [make_dm(shard_root, rank=r, world_size=2, mix_schedule=RECIPE, phase=(0, 40, 4)).train_dataloader()
           for r in (0, 1)]
    for loader in two:
        loader.load_state_dict(state)
    assert two[0].phase_position() == 40
    take(two[0], 5)
    st = two[0].state_dict()
    assert st["segment_phase_pos"] == 40 and st["world_size"] == 2
    assert two[0].phase_position() == 80  # 2 ranks x 20 samples since the switch
    # mid-ramp at 25% -> 50%: the weight the loader targets matches the recipe there
    w = schedule_weights_at(st["schedule"], 80)
    assert w["c1"] + w["c2"] == pytest.approx(0.5 + 0.3 * (0.5 - 0.1) / 0.4)


def test_changed_schedule_on_resume_keeps_cursors(shard_root, caplog):
    old = make_dm(shard_root, mix_weights_str="main:1", phase=None).train_dataloader()
    before = rows_of(take(old, 10))
    state = old.state_dict()
    new = make_dm(shard_root, mix_schedule=RECIPE, phase=(10, 40, 4)).train_dataloader()
    with caplog.at_level(logging.WARNING):
        new.load_state_dict(state)
    assert "new mix schedule" in caplog.text and "no replay" in caplog.text
    after = rows_of(take(new, 20))
    assert not ({int(r[0]) for r in before} & {int(r[0]) for r in after})  # main continues, no replay
    st = new.state_dict()
    assert st["segment_phase_pos"] == 0 and st["segment_start"]["main/1"] == state["cursors"]["main/1"] > 0
    # a second change of the schedule in the same phase continues from the phase position
    other = [dict(p) for p in RECIPE]
    other[1]["mix_weights_str"] = "main:0.4,code:0.6"
    again = make_dm(shard_root, mix_schedule=other, phase=(10, 40, 4)).train_dataloader()
    again.load_state_dict(st)
    assert again.state_dict()["segment_phase_pos"] == 80 and len(again.state_dict()["mix_history"]) == 3


def test_stats_target_follows_the_schedule(shard_root):
    loader = make_dm(shard_root, mix_schedule=RECIPE, phase=(0, 40, 4)).train_dataloader()
    it = iter(loader)
    seen = []
    for _ in range(8):
        for _ in range(5):
            next(it)
        s = loader.stats()["types"]
        seen.append((s["code"]["target"], s["code"]["realized"], s["code"]["scheduled"]))
    assert seen[0][0] == pytest.approx(0.5, abs=0.005) and seen[-1][0] == pytest.approx(0.8)  # ramp starts at 16
    assert all(abs(t - r) <= 2 / 20 for t, r, _ in seen)  # 20 samples per window: within 1 per shard
    assert seen[3][0] == pytest.approx(0.5 + 0.3 * (70 / 160 - 0.1) / 0.4, abs=0.02)  # window 60-80 mid-ramp


def test_schedule_needs_the_phase(shard_root):
    dm = make_dm(shard_root, mix_schedule=RECIPE, phase=None)
    with pytest.raises(MixError, match=r"data.set_phase\(start_step, stop_step, global_batch_size\)"):
        take(dm.train_dataloader(), 1)


def test_at_step_points_and_constant_switch(shard_root):
    sched = [{"at_step": 0, "literal_weights_str": "main/1:1"}, {"at_step": 15, "literal_weights": {"m1": 1.0}}]
    rows = rows_of(take(make_dm(shard_root, mix_schedule=sched, phase=(10, 30, 4)).train_dataloader(), 8))
    assert [sid_of(r) for r in rows] == ["main/1"] * 20 + ["m1"] * 12  # switch at step 15 = sample 20


@pytest.mark.parametrize("points,fragment", [
    ({"at_step": 1}, "must be a list of points"),
    ([{"at_fraction": 0.1}], "set exactly one of mix_weights_str"),
    ([{"mix_weights_str": "main:1"}], "exactly one of at_step"),
    ([{"at_fraction": 1.5, "mix_weights_str": "main:1"}], "at_fraction=1.5 must be a number in"),
    ([{"at_step": 0, "mix_weights_str": "main:1", "ramp": "linear"}], "first point cannot ramp"),
    ([{"at_step": 0, "mix_weights_str": "main:1", "ramp": "cosine"}], "ramp='cosine'; valid: constant, linear"),
    ([{"at_step": 0, "mix_weights_str": "main=1"}], "mix_schedule point 0: mix_weights_str: entry 'main=1'"),
    ([{"at_step": 0, "mix_weights_str": "main:1", "when": 3}], "unknown keys \\['when'\\]"),
])
def test_schedule_parse_errors(points, fragment):
    with pytest.raises(MixError, match=fragment):
        parse_mix_schedule(points)


def test_schedule_errors_on_data(shard_root):
    with pytest.raises(MixError, match="point 1 .*before point 0"):
        make_dm(shard_root, mix_schedule=[{"at_fraction": 0.5, "mix_weights_str": "main:1"},
                                          {"at_step": 2, "mix_weights_str": "code:1"}], phase=(0, 40, 4))
    with pytest.raises(MixError, match="mix_schedule point 1: unknown shard type 'mth'"):
        make_dm(shard_root, mix_schedule=[{"at_step": 0, "mix_weights_str": "main:1"},
                                          {"at_step": 2, "mix_weights_str": "mth:1"}])
    with pytest.raises(MixError, match="either in mix_schedule's points or in mix_weights_str"):
        ShardedMixedDataset(shard_root, mix_schedule=RECIPE, mix_weights_str="main:1")


# ------------------------------------------------------------------------------------ repetition caps

def test_max_epochs_refuses_with_the_culprit_named(shard_root):
    # m1: 50 samples; 0.5 x 400 samples = 200 samples = 4 epochs
    with pytest.raises(MixError) as e:
        make_dm(shard_root, mix_weights_str="main:0.5,math:0.5", max_epochs={"math": 2}, phase=(0, 100, 4))
    msg = str(e.value)
    assert "shard 'm1' (800 tokens = 50 samples of 16)" in msg and "4.00 epochs" in msg and "max_epochs=2" in msg
    assert "200 samples (3,200 tokens = 50 optimizer steps of 4)" in msg and "cap_repetition: true" in msg
    # per shard beats per type; within budget passes
    make_dm(shard_root, mix_weights_str="main:0.5,math:0.5", max_epochs={"math": 2, "m1": 4}, phase=(0, 100, 4))
    with pytest.raises(MixError, match="max_epochs names 'x9'"):
        make_dm(shard_root, max_epochs={"x9": 1}, phase=(0, 10, 4))
    with pytest.raises(MixError, match="max_epochs needs the training phase"):
        take(make_dm(shard_root, max_epochs=3, phase=None).train_dataloader(), 1)


def test_cap_repetition_caps_and_renormalises(shard_root, caplog):
    with caplog.at_level(logging.WARNING):
        dm = make_dm(shard_root, mix_weights_str="main:0.5,math:0.5", max_epochs={"m1": 2}, cap_repetition=True,
                     phase=(0, 100, 4))
    assert "capped m1" in caplog.text
    assert dm.weights == pytest.approx({"main/1": 0.375, "main/2": 0.375, "m1": 0.25})  # 100 of 400 samples
    loader = dm.train_dataloader()
    rows = rows_of(take(loader, 40))
    state = loader.state_dict()
    # a requeue passes a shorter phase (from where it resumes): the checkpoint's phase and caps hold
    requeued = make_dm(shard_root, mix_weights_str="main:0.5,math:0.5", max_epochs={"m1": 2}, cap_repetition=True,
                       phase=(40, 100, 4)).train_dataloader()
    requeued.load_state_dict(state)
    assert requeued.state_dict()["mix_history"] == state["mix_history"]
    rows += rows_of(take(requeued, 60))
    assert Counter(sid_of(r) for r in rows)["m1"] == 100  # exactly 2 epochs over the phase


def test_cap_repetition_on_a_schedule(shard_root):
    # uncapped, code draws 0.71 of 400 samples: c2 (50 samples) 2.84 epochs, c1 (100 samples) 1.42
    dm = make_dm(shard_root, mix_schedule=RECIPE, max_epochs={"code": 2}, cap_repetition=True, phase=(0, 100, 4))
    loader = dm.train_dataloader()
    take(loader, 100)
    st = loader.stats()["shards"]
    assert 2 - 1 / 50 <= st["c2"]["epochs"] <= 2 + 1 / 50  # capped to its budget, within one sample
    assert st["c1"]["epochs"] > 1.42 + 0.05  # c1 took part of the freed share
    assert sum(w for w in dm.record["weights"][-1].values()) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------ config and CLI

def test_example_recipe_yaml_parses(shard_root):
    """midtrain_configs/midtrain/*dynamic_mix*.yaml instantiates the data module through jsonargparse."""
    from jsonargparse import ArgumentParser
    from litgpt.data import DataModule

    cfg = yaml.safe_load((ROOT / "midtrain_configs/midtrain/pythia-160m_dynamic_mix.yaml").read_text())
    init = dict(cfg["data"]["init_args"], data_path=str(shard_root), val_data_path=None)
    sched = [dict(p, mix_weights_str=p["mix_weights_str"].replace("math", "code")) for p in init["mix_schedule"]]
    init["mix_schedule"] = sched
    parser = ArgumentParser()
    parser.add_argument("--data", type=DataModule)
    dm = parser.instantiate_classes(parser.parse_object({"data": {"class_path": cfg["data"]["class_path"],
                                                                  "init_args": init}})).data
    dm.connect(batch_size=4, max_seq_length=SEQ)
    dm.setup()
    dm.set_phase(0, 40, 4)
    w = schedule_weights_at(dm.record, 0.3 * 160)
    assert w["c1"] + w["c2"] == pytest.approx(0.65)


@pytest.mark.slow
def test_inspect_mix_prints_the_schedule(shard_root):
    import json

    out = subprocess.run(
        [sys.executable, "-m", "litgpt_ext", "inspect-mix", "--data_path", str(shard_root), "--tokens", "9600",
         "--max_seq_length", str(SEQ), "--global_batch_size", "4", "--mix_schedule", json.dumps(RECIPE), "--json", "true"],
        capture_output=True, text=True, cwd=ROOT, check=True,
    ).stdout
    rep = json.loads(out)
    segs = rep["segments"]
    assert [round(s["start_fraction"], 2) for s in segs] == [0.0, 0.1, 0.5]
    ramp = segs[1]["shards"]["c1"]
    assert ramp["weight_start"] == pytest.approx(0.25) and ramp["weight_end"] == pytest.approx(0.4)
    # 160 steps x 4 = 640 samples; c1 draws 0.25*64 + (0.25+0.4)/2*256 + 0.4*320 = 227.2 samples
    total = sum(s["shards"]["c1"]["samples"] for s in segs)
    assert total == pytest.approx(227.2) and segs[-1]["shards"]["c1"]["epochs_total"] == pytest.approx(2.272)
    table = subprocess.run(
        [sys.executable, "-m", "litgpt_ext", "inspect-mix", "--data_path", str(shard_root), "--tokens", "9600",
         "--max_seq_length", str(SEQ), "--global_batch_size", "4", "--mix_schedule", json.dumps(RECIPE)],
        capture_output=True, text=True, cwd=ROOT, check=True,
    ).stdout
    assert "0.2500->0.4000" in table and "steps 16-80 (10%-50% of the phase)" in table


@pytest.mark.slow
def test_pretrain_follows_the_schedule_and_resume_keeps_it(tmp_path):
    """Through the real `pretrain` CLI: the loop hands the phase to the data module (set_phase), the
    realized code share ramps with the schedule, and a resumed run continues the same plan exactly."""

    import yaml

    from litgpt_ext import checkpoint as ckpt
    from litgpt_ext.cli import main as cli_main
    from tests.test_train_cli import pattern_shard

    data = tmp_path / "data"
    for name, stride, seed in (("1", 1, 0), ("c1", 3, 1)):
        pattern_shard(data / name, stride, 60, seed)
    cfg = {
        "model_config": {"name": "tiny", "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16,
                         "vocab_size": 64, "padded_vocab_size": 64},
        "out_dir": str(tmp_path / "run"), "precision": "32-true", "logger_name": "csv",
        "data": {"class_path": "litgpt_ext.data.ShardedMixedDataset",
                 "init_args": {"data_path": str(data), "num_workers": 0, "seed": 1, "mix_schedule": [
                     {"at_fraction": 0.0, "mix_weights_str": "main:1.0"},
                     {"at_fraction": 1.0, "mix_weights_str": "main:0.5,code:0.5", "ramp": "linear"}]}},
        "train": {"max_iters": 8, "global_batch_size": 4, "micro_batch_size": 4, "max_seq_length": 16,
                  "log_interval": 1, "save_interval": 4, "lr_scheduler": "constant"},
        "eval": {"interval": 100},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli_main(["pretrain", "--config", str(path)])
    full = ckpt.load_training_state(tmp_path / "run" / "final")["data"]
    # 32 samples with the code weight ramping 0 -> 0.5: its integral is 8 samples, within 1
    assert full["phase"] == {"start_step": 0, "stop_step": 8, "global_batch_size": 4}  # from the loop's plan
    assert full["counts"] == {"main/1": 24, "c1": 8}
    # resume from step 4 into the same run dir: same plan, same final loader state
    import shutil

    shutil.rmtree(tmp_path / "run" / "final")
    shutil.rmtree(tmp_path / "run" / "step-00000008")
    cli_main(["pretrain", "--config", str(path), "--resume", "true"])
    assert ckpt.load_training_state(tmp_path / "run" / "final")["data"] == full
