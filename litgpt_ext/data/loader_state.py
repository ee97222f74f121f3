"""The train loader's state: the plain dict a checkpoint stores, built fresh or continued on resume.

The state is a few integers per shard (global cursors, this segment's blend counts) plus the mix
and, for a mixture schedule, its resolved record and phase; `LoaderState` lists the keys. It stays a
plain dict of plain values on disk, so checkpoints written before load unchanged (version 1, from
before mixture schedules, still loads). All ranks hold the same state, so rank 0's copy resumes
every rank. `make_blend` rebuilds the current segment's blend from it.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Mapping, TypedDict

from litgpt_ext.data.blend import Blend, RevealingBlend, ScheduledBlend
from litgpt_ext.data.schedule import Phase, curve_pieces, describe_schedule, schedule_weights_at
from litgpt_ext.data.shard_types import MixError

log = logging.getLogger(__name__)
STATE_VERSION = 2  # 2 adds the mixture schedule (`schedule`, `segment_phase_pos`); 1 still loads


class LoaderState(TypedDict):
    """The keys of the loader state (a plain dict at run time and in checkpoints)."""

    version: int  # STATE_VERSION
    seed: int  # the shuffle within each shard
    shard_seeds: dict[str, int]  # (optional) shards shuffled with another seed: a fork's new data seed
    block_size: int  # tokens per sample (max_seq_length + 1); cursors count samples of this size
    world_size: int
    weights: dict[str, float]  # this segment's blend weights by shard id, in blend order
    segment_start: dict[str, int]  # each shard's global cursor when this segment began
    counts: dict[str, int]  # this rank's picks of each shard in this segment
    cursors: dict[str, int]  # global samples served from each shard (all ranks, all segments)
    num_samples: dict[str, int]  # each shard's samples of block_size, to refuse data that changed
    phase: dict | None  # Phase.as_dict() of the plan, None without a schedule or caps
    schedule: dict | None  # the mixture schedule's record (resolve_schedule), None for a constant mix
    segment_phase_pos: float  # the phase sample at which this segment began (all ranks)
    mix_history: list[dict]  # {"spec", "weights", "at_cursors"} for every segment


def make_blend(state: Mapping[str, Any]) -> Blend | ScheduledBlend | RevealingBlend:
    """The blend of the current segment: constant weights, or the schedule in this rank's coordinates.

    A segment's blend position n (samples drawn by this rank since the segment began) sits at phase
    sample `segment_phase_pos + n * world_size`, so every rank follows the same schedule. A record
    with `lookahead: false` (an online mixing policy's, or its replay) gets the `RevealingBlend`.
    """
    ids = list(state["weights"])
    counts = [state["counts"][s] for s in ids]
    sched = state.get("schedule")
    if not sched:
        return Blend([state["weights"][s] for s in ids], counts)
    pieces = curve_pieces(sched, ids, float(state["segment_phase_pos"]), float(state["world_size"]))
    if sched.get("lookahead") is False:
        return RevealingBlend(pieces, counts)
    if len(pieces) == 1 and all(w > 0 for w in pieces[0][1]):  # past the last point: the constant fast path
        return Blend(pieces[0][1], counts)
    return ScheduledBlend(pieces, counts)


def fresh_state(dm: Any) -> LoaderState:  # dm: the ShardedMixedDataset (not imported: it imports this)
    """The state of a run that starts the phase: every cursor at 0, the plan's weights at phase sample 0."""
    if dm.weights is None:
        dm.setup()
    record = dm._phase_record()
    weights = dict(schedule_weights_at(record, 0.0)) if record is not None else dict(dm.weights)
    sched = record if (record is not None and dm.schedule_points) else None
    return {
        "version": STATE_VERSION,
        "seed": dm.seed,
        "block_size": dm.block_size,
        "world_size": dm.world_size,
        "weights": weights,
        "segment_start": {s: 0 for s in weights},
        "counts": {s: 0 for s in weights},
        "cursors": {s: 0 for s in weights},
        "num_samples": {s: dm._num_samples(s) for s in weights},
        "phase": dm.phase.as_dict() if dm.phase else None,
        "schedule": copy.deepcopy(sched),
        "segment_phase_pos": 0,
        "mix_history": [{"spec": dm._spec_text(), "weights": weights, "at_cursors": {}}],
    }


def continue_state(dm: Any, saved: dict[str, Any]) -> LoaderState:  # dm: the ShardedMixedDataset
    """Continue from a checkpoint's state; with a different mix, schedule or world size keep every
    cursor (no replay) and start a new segment of the blend, logged with `mix_change_table`."""
    if saved.get("version") not in (1, STATE_VERSION):
        raise MixError(f"loader state version {saved.get('version')!r} is not 1 or {STATE_VERSION}; cannot resume it")
    saved = {"phase": None, "schedule": None, "segment_phase_pos": 0, **saved, "version": STATE_VERSION}
    if saved["block_size"] != dm.block_size:
        raise MixError(
            f"the checkpoint's loader used samples of {saved['block_size']} tokens, this run {dm.block_size}: "
            "max_seq_length must not change on resume (shard cursors count samples)"
        )
    for sid, n in saved["num_samples"].items():
        if sid in dm.shards_by_id and dm._num_samples(sid) != n:
            raise MixError(
                f"shard {sid!r} had {n} samples when the checkpoint was saved and has {dm._num_samples(sid)} now: "
                "its data changed under the run"
            )
    new = copy.deepcopy(saved)
    # where the phase stands: global samples drawn in it (all ranks)
    pos_now = saved["segment_phase_pos"] + sum(saved["counts"].values()) * saved["world_size"]
    sched_spec = describe_schedule(dm.schedule_points)
    old_sched = saved.get("schedule")
    online = old_sched is not None and old_sched.get("online") is not None and (
        old_sched["online"] == getattr(dm, "online_policy", None))
    if online:
        # the same online mixing policy continues: its record (the weights it chose so far) and phase win
        dm.phase = Phase(**saved["phase"])
        record, same_mix = old_sched, True
    elif sched_spec is not None and old_sched is not None and old_sched.get("spec") == sched_spec:
        # same schedule: the checkpoint's plan and phase win (a requeue never moves the schedule)
        if dm.phase is not None and dm.phase.as_dict() != saved["phase"]:
            log.info("data: keeping the checkpoint's phase %s for the unchanged mix_schedule (this run "
                     "passed %s); a requeue never moves the schedule", saved["phase"], dm.phase.as_dict())
        dm.phase, dm.record = Phase(**saved["phase"]), copy.deepcopy(old_sched)
        record, same_mix = old_sched, True
    else:
        last_spec = (saved.get("mix_history") or [{}])[-1].get("spec")
        if (sched_spec is None and dm.max_epochs is not None and saved["phase"] and old_sched is None
                and last_spec == dm._spec_text()):
            # same capped mix: plan it over the checkpoint's phase, so a requeue draws the same weights
            dm.phase = Phase(**saved["phase"])
            dm.record = dm._plan(dm.phase)
        record = dm._phase_record(saved["phase"])
        if sched_spec is None and record is not None:
            dm.weights = dict(record["weights"][0])
        weights0 = dict(record["weights"][0]) if sched_spec is not None else dict(dm.weights)
        same_mix = old_sched is None and sched_spec is None and set(saved["weights"]) == set(weights0) and all(
            abs(saved["weights"][s] - weights0[s]) < 1e-12 for s in weights0
        )
    if same_mix and saved["world_size"] == dm.world_size:
        if saved["seed"] != dm.seed:
            log.warning("data seed %s differs from the checkpoint's %s; the same blend continues with the "
                        "checkpoint's shuffles (a new shuffle of a shard it has read would replay samples)",
                        dm.seed, saved["seed"])
        return new
    sched = copy.deepcopy(record) if (sched_spec is not None or online) else None
    if same_mix:
        seg_pos = pos_now  # same plan, new world size: the schedule continues from here
    elif sched is not None:
        seg_pos = pos_now if saved["phase"] == (dm.phase.as_dict() if dm.phase else None) else 0
    else:
        seg_pos = 0
    weights = (dict(record["weights"][0]) if sched is not None else dict(dm.weights))
    cursors = dict(saved["cursors"])
    for sid in weights:
        cursors.setdefault(sid, 0)
    shard_seeds = dict(saved.get("shard_seeds") or {})
    if saved["seed"] != dm.seed:  # a fork's data seed: shards not read yet are shuffled with it, no replay
        fresh = [s for s in weights if cursors[s] == 0 and s not in shard_seeds]
        shard_seeds.update({s: dm.seed for s in fresh})
        log.warning("data seed %s differs from the checkpoint's %s: the shards this run has not read yet (%s) are "
                    "shuffled with %s; those it has read keep %s (a new shuffle would replay samples)", dm.seed,
                    saved["seed"], ", ".join(fresh) or "none", dm.seed, saved["seed"])
    new.update(
        world_size=dm.world_size,
        weights=weights,
        segment_start={s: cursors[s] for s in weights},
        counts={s: 0 for s in weights},
        cursors=cursors,
        shard_seeds=shard_seeds,
        num_samples={**saved["num_samples"], **{s: dm._num_samples(s) for s in weights}},
        phase=dm.phase.as_dict() if dm.phase else saved["phase"],
        schedule=sched,
        segment_phase_pos=seg_pos,
    )
    if sched is not None:
        new["weights"] = dict(schedule_weights_at(sched, seg_pos))  # the table shows the mix from here
    if not same_mix:
        new["mix_history"] = list(saved.get("mix_history", [])) + [
            {"spec": dm._spec_text(), "weights": dict(new["weights"]), "at_cursors": dict(cursors)}
        ]
    reason = "world size %d -> %d" % (saved["world_size"], dm.world_size) if same_mix else (
        "new mix schedule" if sched is not None else "new blend")
    log.warning("data mix: %s; shard cursors kept (no replay)\n%s", reason, mix_change_table(saved, new))
    return new


def mix_change_table(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """Old and new weights side by side with each shard's cursor and epochs, for the resume log."""
    ids = list(dict.fromkeys(list(old["weights"]) + list(new["weights"]) + list(new["cursors"])))
    rows = [f"{'shard':<10} {'old weight':>10} {'new weight':>10} {'cursor':>10} {'epochs':>7}"]
    for sid in ids:
        n = new["num_samples"].get(sid) or old["num_samples"].get(sid) or 1
        cur = new["cursors"].get(sid, 0)
        rows.append(f"{sid:<10} {old['weights'].get(sid, 0):>10.4f} {new['weights'].get(sid, 0):>10.4f} {cur:>10d} {cur / n:>7.2f}")
    return "\n".join(rows)
