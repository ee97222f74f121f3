"""Online data mixing, the arithmetic and the data side: EXP3 (ODM) and DoReMi updates against
hand-computed steps, floors and caps, the blend without look-ahead, and a loader whose plan changes
between batches drawing exactly what a loader that knew the whole plan from the start draws."""

import math
import random

import pytest
import torch

from litgpt_ext.data.blend import RevealingBlend, ScheduledBlend
from litgpt_ext.data.schedule import curve_pieces
from litgpt_ext.data.shard_io import write_token_shard
from litgpt_ext.mix_policy import MixPolicyArgs
from litgpt_ext.mix_policy.policies import DoReMi, Exp3, bounded


def test_exp3_matches_hand_computed_updates():
    p = Exp3([0.5, 0.3, 0.2], epsilon=None, smoothing=0.9)
    w1 = p.update([2.0, 4.0, 3.0], used=[0.5, 0.3, 0.2])
    # t = 1: eps = min(1/3, sqrt(ln 3 / 3)) = 1/3, so (1 - K eps) = 0: pure exploration
    assert w1 == pytest.approx([1 / 3] * 3, abs=1e-15)
    assert p.rewards == pytest.approx([0.1 * 2.0 / 0.5, 0.1 * 4.0 / 0.3, 0.1 * 3.0 / 0.2], rel=1e-15)
    for _ in range(3):  # t = 2, 3, 4 with the third arm not drawn (None): its reward stays
        r2 = list(p.rewards)
        w = p.update([1.0, 2.0, None], used=[1 / 3, 1 / 3, 1 / 3])
        assert p.rewards[2] == r2[2]
    t = 4
    eps = min(1 / 3, math.sqrt(math.log(3) / (3 * t)))
    assert eps < 1 / 3  # from t = 4 on the exploitation term is non-zero
    R = p.rewards
    z = [0.5 * math.exp(eps * R[0]), 0.3 * math.exp(eps * R[1]), 0.2 * math.exp(eps * R[2])]
    expect = [(1 - 3 * eps) * x / sum(z) + eps for x in z]
    assert w == pytest.approx(expect, rel=1e-12) and sum(w) == pytest.approx(1.0, abs=1e-12)
    assert w[1] / 0.3 > w[0] / 0.5  # relative to its prior, the arm with the higher loss gains
    q = Exp3([0.5, 0.3, 0.2], epsilon=0.05, smoothing=0.5)  # a fixed exploration rate
    q.load_state_dict(p.state_dict())
    assert q.t == p.t and q.rewards == p.rewards


def test_doremi_matches_the_hand_computed_step():
    d = DoReMi([0.5, 0.3, 0.2], step_size=2.0, smoothing=0.1)
    a = d.update([0.5, None, 1.0])
    raw = [0.5 * math.exp(2.0 * 0.5), 0.3, 0.2 * math.exp(2.0 * 1.0)]  # an undrawn domain has lambda = 0
    expect = [0.9 * x / sum(raw) + 0.1 / 3 for x in raw]
    assert a == pytest.approx(expect, rel=1e-12)
    b = d.update([0.0, 0.0, 0.0])  # no excess: only the smoothing moves the weights towards uniform
    assert b == pytest.approx([0.9 * x + 0.1 / 3 for x in expect], rel=1e-12)


def test_floors_and_caps():
    assert bounded([0.7, 0.2, 0.1], [0.15] * 3, [0.5, 1.0, 1.0], ["a", "b", "c"]) == pytest.approx([0.5, 0.35, 0.15])
    assert bounded([0.5, 0.5], [0.0, 0.0], [1.0, 1.0], ["a", "b"]) == [0.5, 0.5]
    with pytest.raises(ValueError, match=r"caps .* add up to 0.9000 < 1"):
        bounded([0.5, 0.5], [0, 0], [0.4, 0.5], ["a", "b"])
    with pytest.raises(ValueError, match=r"floors .* add up to 1.2000 > 1"):
        bounded([0.5, 0.5], [0.6, 0.6], [1, 1], ["a", "b"])


@pytest.mark.parametrize("cfg, fragment", [
    ({"type": "bandit"}, "mix_policy.type='bandit' is not a policy; choose from: fixed, odm, doremi"),
    ({"type": "doremi"}, "mix_policy.type=doremi needs mix_policy.reference"),
    ({"type": "odm", "reference": "ckpt"}, "reference (a doremi knob) set for type='odm'"),
    ({"type": "doremi", "reference": "x", "epsilon": 0.1}, "epsilon (a odm knob) set for type='doremi'"),
    ({"type": "odm", "update_every": 0}, "update_every must be an integer >= 1"),
    ({"type": "odm", "min_weight": 0.3, "max_weight": 0.2}, "max_weight must be in (0, 1] and >= min_weight"),
    ({"type": "odm", "speed": 1}, "unknown key(s) ['speed']"),
])
def test_bad_policies_are_named(cfg, fragment):
    with pytest.raises(ValueError) as e:
        MixPolicyArgs.parse(cfg)
    assert fragment in str(e.value)


def test_fixed_is_no_policy_and_defaults_fill_in():
    assert MixPolicyArgs.parse({"type": "fixed"}) is None and MixPolicyArgs.parse(None) is None
    odm = MixPolicyArgs.parse({"type": "odm"})
    assert (odm.prior, odm.reward_smoothing, odm.step_size) == ("mix", 0.9, None)


def _online_picks(record: dict, ids: list, n: int) -> list:
    """What an online run draws: the blend rebuilt from its counts each time a point is added."""
    knots, picks, counts = record["knots"], [], [0] * len(ids)
    for k in range(len(knots)):
        partial = {**record, "knots": knots[:k + 1], "weights": record["weights"][:k + 1], "ramps": record["ramps"][:k + 1]}
        blend = RevealingBlend(curve_pieces(partial, ids, 0.0, 1.0), counts)
        end = knots[k + 1] if k + 1 < len(knots) else n
        picks += blend.take(int(end) - len(picks))
        counts = list(blend.counts)
    return picks


def _random_record(rng: random.Random, ids: list, n_points: int, n: int) -> dict:
    knots = sorted(rng.sample(range(1, n), n_points - 1))
    weights = []
    for _ in range(n_points):
        w = [rng.random() + 0.05 for _ in ids]
        weights.append({s: x / sum(w) for s, x in zip(ids, w)})
    return {"knots": [0.0] + [float(k) for k in knots], "weights": weights, "ramps": ["constant"] * n_points}


def test_a_blend_without_lookahead_depends_only_on_the_points_reached():
    rng, ids, n = random.Random(0), ["a", "b", "c", "d"], 400
    differs = 0
    for _ in range(30):
        record = _random_record(rng, ids, 5, n)
        full = RevealingBlend(curve_pieces(record, ids, 0.0, 1.0)).take(n)
        assert full == _online_picks(record, ids, n)  # the replay draws what the online run drew
        ahead = ScheduledBlend(curve_pieces(record, ids, 0.0, 1.0)).take(n)
        differs += ahead != full
        counts = [0] * len(ids)  # and stays close to the plan: |count - target| < 1.5 at every prefix
        blend = RevealingBlend(curve_pieces(record, ids, 0.0, 1.0))
        for k in range(1, n + 1):
            counts[blend.next()] += 1
            assert max(abs(c - blend.target(i, k)) for i, c in enumerate(counts)) < 1.5
    assert differs > 0  # why the online run needs it: the look-ahead blend draws otherwise before a point


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixdata")
    g = torch.Generator().manual_seed(0)
    for name, off in (("1", 0), ("c1", 1000), ("m1", 2000)):
        docs = [(off + torch.randint(0, 500, (50,), generator=g)).tolist() for _ in range(40)]
        write_token_shard(root / name, docs, chunk_tokens=400)
    return root


def _loader(root, workers: int, **kw):
    from litgpt_ext.data import ShardedMixedDataset

    dm = ShardedMixedDataset(data_path=root, num_workers=workers, seed=3, **kw)
    dm.connect(batch_size=2, max_seq_length=15)
    dm.setup(rank=0, world_size=1)
    dm.set_phase(0, 40, 4)  # 40 steps of 4 samples
    return dm, dm.train_dataloader()


@pytest.mark.parametrize("workers", [0, 2])
def test_a_plan_changed_between_batches_draws_what_the_whole_plan_draws(shards, workers):
    from litgpt_ext.data.schedule import parse_mix_schedule, resolve_schedule

    points = [{"at_step": 0, "literal_weights": {"main/1": 0.5, "c1": 0.3, "m1": 0.2}},
              {"at_step": 5, "literal_weights": {"main/1": 0.1, "c1": 0.1, "m1": 0.8}},
              {"at_step": 9, "literal_weights": {"main/1": 0.3, "c1": 0.6, "m1": 0.1}}]
    dm, online = _loader(shards, workers, mix_weights_str="main:0.5,code:0.3,math:0.2")
    it, got, sources = iter(online), [], []
    for k, p in enumerate(points):  # the policy adds each point at its step boundary (2 micro-batches a step)
        record = resolve_schedule(parse_mix_schedule(points[:k + 1]), dm.shards, dm.registry, dm.phase)
        online.set_schedule({**record, "lookahead": False})
        for _ in range(2 * ((points[k + 1]["at_step"] if k + 1 < len(points) else 14) - p["at_step"])):
            got.append(next(it))
            sources.append(online.last_sources)
    _, replay = _loader(shards, workers, mix_schedule=points, mix_schedule_lookahead=False)
    it2 = iter(replay)
    want = [next(it2) for _ in got]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert online.state_dict()["cursors"] == replay.state_dict()["cursors"]
    # last_sources names the shard each sample came from: its tokens lie in that shard's range
    base = {"main/1": 0, "c1": 1000, "m1": 2000}
    assert all(base[s] <= int(b[i].min()) and int(b[i].max()) < base[s] + 500
               for b, srcs in zip(got, sources) for i, s in enumerate(srcs))
    assert sum(s == "m1" for srcs in sources[10:18] for s in srcs) >= 12  # steps 5-8 draw math at 0.8


def test_lookahead_false_needs_a_constant_schedule(shards):
    from litgpt_ext.data import MixError, ShardedMixedDataset

    with pytest.raises(MixError, match="applies to a mix_schedule"):
        ShardedMixedDataset(data_path=shards, mix_weights_str="main:1.0", mix_schedule_lookahead=False)
    pts = [{"at_step": 0, "mix_weights_str": "main:1.0"}, {"at_step": 4, "mix_weights_str": "code:1.0", "ramp": "linear"}]
    with pytest.raises(MixError, match=r"constant ramps only .* points \[1\]"):
        ShardedMixedDataset(data_path=shards, mix_schedule=pts, mix_schedule_lookahead=False)


def test_a_replay_on_another_phase_or_data_is_refused(shards):
    from litgpt_ext.data import MixError

    origin = {"phase": {"start_step": 0, "stop_step": 40, "global_batch_size": 8}, "seed": 3, "block_size": 16,
              "shards": {"main/1": 125, "c1": 999}, "trajectory": "runs/x/mix_trajectory.jsonl"}
    pts = [{"at_step": 0, "literal_weights": {"main/1": 0.5, "c1": 0.5}}]
    with pytest.raises(MixError) as e:
        _loader(shards, 0, mix_schedule=pts, mix_schedule_lookahead=False, mix_schedule_origin=origin)
    msg = str(e.value)
    assert "replays runs/x/mix_trajectory.jsonl" in msg and "global_batch_size': 8" in msg
    assert "shard c1: recorded 999 samples, this run 125" in msg
