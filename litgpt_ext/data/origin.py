"""A replayed mix schedule's origin: the recorded run's phase, data seed, sample size, world size and shards.

`litgpt-ext mix-replay` writes `mix_schedule_origin` beside the schedule it turns a trajectory
into; `ShardedMixedDataset.set_phase` checks it here, so a replay on other data or another phase
(where the same schedule would draw other samples) is refused before any sample is drawn.
"""

from __future__ import annotations

from typing import Any, Mapping

from litgpt_ext.data.shard_types import MixError


def check_origin(origin: Mapping[str, Any], dm: Any) -> None:
    """Refuse a replayed schedule on data or a phase other than the recorded run's, naming each difference."""
    where = origin.get("trajectory", "the recorded run")
    have = {"phase": dm.phase.as_dict() if dm.phase else None, "seed": dm.seed, "block_size": dm.block_size,
            "world_size": dm.world_size,
            "shards": {s.id: s.index.num_samples(dm.block_size) for s in dm.shards} if dm.shards else None}
    diffs = []
    for key in ("phase", "seed", "block_size", "world_size"):
        if key in origin and origin[key] != have[key]:
            diffs.append(f"{key}: recorded {origin[key]}, this run {have[key]}")
    want = origin.get("shards") or {}
    for sid, n in want.items():
        got = (have["shards"] or {}).get(sid)
        if got != n:
            diffs.append(f"shard {sid}: recorded {n} samples, this run {'none' if got is None else got}")
    if diffs:
        raise MixError(f"this mix_schedule replays {where}, whose run differs from this one: " + "; ".join(diffs)
                         + " (a replay draws the same samples only on the same data, seed, max_seq_length and phase:"
                           " train budget and global_batch_size, and the same number of processes)")
