"""The training loader of `ShardedMixedDataset`: batches with exact state, and the shard of every sample.

`MixedLoader` wraps the rank's `BlendedStream` in a torch `DataLoader` and replays the same blend in
the main process (the tracker), so its state counts exactly the batches handed to the caller
(prefetched ones do not count) and it knows which shard served each sample of the last batch
(`last_sources`, what an online mixing policy attributes losses to). `set_schedule` replaces the
blend's plan between two batches (an online policy's new weights): the next batch comes from a
new stream started at the exact position the caller stands at, so nothing is replayed or skipped.
"""

from __future__ import annotations

import copy
from typing import Any, Iterator, Mapping

import torch
from torch.utils.data import DataLoader

from litgpt_ext.data.loader_state import LoaderState, continue_state, fresh_state, make_blend
from litgpt_ext.data.schedule import schedule_weights_at
from litgpt_ext.data.stream import BlendedStream
from litgpt_ext.preempt import ignore_in_worker


def stack_long(rows: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(rows).long()


class MixedLoader:
    """The training loader: an infinite iterable of [batch, block] LongTensors with exact state.

    The state advances only for batches handed to the caller (prefetched ones do not count), so
    `state_dict()` after k batches resumes at batch k+1 whatever `num_workers` is. The state is
    built on first use, so `load_state_dict` can replace it before a phase is known.
    """

    def __init__(self, dm: Any):  # dm: the ShardedMixedDataset (not imported: it imports this module)
        self.dm = dm
        self._state: LoaderState | None = None
        self._tracker = None
        self._window = None  # (position, counts) at the last stats() call
        self._generation = 0  # bumped by set_schedule: a running iterator restarts its stream
        self.last_sources: list[str] = []  # the shard id of each sample of the last batch handed out

    def _ensure(self) -> LoaderState:
        if self._state is None:
            self._state = fresh_state(self.dm)
            self._tracker = make_blend(self._state)
        return self._state

    def _sync(self) -> LoaderState:
        """Fold the tracker's counts into the state, so a new stream starts where the caller stands."""
        self._ensure()
        self._state = self.state_dict()
        counts = list(self._tracker.counts)
        self._tracker = make_blend(self._state)
        assert list(self._tracker.counts) == counts
        return self._state

    def __iter__(self) -> Iterator[torch.Tensor]:
        dm = self.dm
        while True:
            st, generation = self._sync(), self._generation
            ids = list(st["weights"])
            shards = [(sid, dm.shards_by_id[sid].path, st["num_samples"][sid]) for sid in ids]
            stream = BlendedStream(
                shards, copy.deepcopy(st), [st["segment_start"][s] for s in ids],
                dm.rank, dm.world_size, dm.batch_size, dm.block_size, st["seed"],
            )
            loader = DataLoader(stream, batch_size=dm.batch_size, num_workers=dm.num_workers, collate_fn=stack_long,
                                worker_init_fn=ignore_in_worker,  # SLURM signals every process; the main one saves
                                persistent_workers=False, prefetch_factor=2 if dm.num_workers > 0 else None)
            batches = iter(loader)
            for batch in batches:
                self.last_sources = [ids[i] for i in self._tracker.take(dm.batch_size)]
                yield batch
                if self._generation != generation:  # a new plan: drop what the workers prefetched
                    break
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def state_dict(self) -> dict[str, Any]:
        st = copy.deepcopy(self._ensure())
        R = st["world_size"]
        for sid, c in zip(st["weights"], self._tracker.counts):
            st["counts"][sid] = c
            st["cursors"][sid] = st["segment_start"][sid] + c * R
        return st

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from `state`; with a different mix or schedule, keep every cursor and switch the blend."""
        self._state = continue_state(self.dm, dict(state))
        self._tracker = make_blend(self._state)
        self._window = None

    def set_schedule(self, record: Mapping[str, Any], new_segment: bool = False) -> None:
        """Follow `record` (a schedule record, `data.schedule.resolve_schedule`'s) from the next batch on.

        The blend keeps its counts: the record must agree with the one it replaces on every phase
        sample already drawn (an online policy only appends points at the current position), so the
        blend continues as if it had followed `record` all along. `new_segment`: the record starts a
        phase here instead (an online policy's first point), so the blend starts a new segment at the
        current cursors, as a resume with a new mix does (`loader_state.continue_state`). A running
        iterator restarts its stream at the current position (prefetched batches are dropped,
        nothing is replayed).
        """
        st = self._sync()
        if new_segment:  # phase sample 0 is here, whatever segment (and world size) the state was in
            st["segment_start"] = {s: st["cursors"][s] for s in st["weights"]}
            st["counts"] = {s: 0 for s in st["weights"]}
            st["segment_phase_pos"] = 0
            st["phase"] = copy.deepcopy(record.get("phase"))
            st["mix_history"] = list(st.get("mix_history", [])) + [
                {"spec": record.get("spec"), "weights": dict(record["weights"][0]), "at_cursors": dict(st["cursors"])}]
        pos = st["segment_phase_pos"] + sum(st["counts"].values()) * st["world_size"]
        if set(record["weights"][0]) != set(st["weights"]):
            raise ValueError(f"set_schedule: the record's shards {sorted(record['weights'][0])} differ from the"
                             f" running blend's {sorted(st['weights'])}")
        st["schedule"] = copy.deepcopy(dict(record))
        if pos == 0:  # nothing drawn yet: the blend's order is the record's (as a run that starts with it)
            order = list(record["weights"][0])
            st["weights"] = dict(schedule_weights_at(record, 0.0))
            for key in ("segment_start", "counts", "cursors"):
                st[key] = {s: st[key][s] for s in order}
        else:
            st["weights"] = {s: schedule_weights_at(record, pos)[s] for s in st["weights"]}
        self._state = st
        self._tracker = make_blend(st)
        self._generation += 1

    def phase_position(self) -> int:
        """Global samples drawn in this phase so far (all ranks)."""
        st = self._ensure()
        return int(round(st.get("segment_phase_pos", 0))) + self._tracker.position * st["world_size"]

    def stats(self) -> dict[str, Any]:
        """Global consumption per shard and type and realized vs target mix, for logging.

        A shard's `tokens` are the tokens trained on (`samples * max_seq_length`, so all shards' sum
        is the run's `tokens`); `tokens_read` adds the one extra token per sample that the
        input/target shift reads (`samples * (max_seq_length + 1)`). Both follow from the cursors
        (samples), which is all the checkpoint stores.

        `target_weight` and `realized_weight` cover the samples this rank drew since the previous
        `stats()` call (the loop calls it once per log interval): the schedule's average weight over
        that window and the share actually drawn. With a constant mix the target is the weight.
        `scheduled_weight` is the schedule's weight at the current position.
        """
        st = self.state_dict()
        block, tracker = self.dm.block_size, self._tracker
        ids = list(st["weights"])
        pos, counts = tracker.position, list(tracker.counts)
        prev_pos, prev_counts = self._window or (0, [0] * len(ids))
        if len(prev_counts) != len(ids):
            prev_pos, prev_counts = 0, [0] * len(ids)
        self._window = (pos, counts)
        if st.get("schedule"):
            now = schedule_weights_at(st["schedule"], st["segment_phase_pos"] + pos * st["world_size"])
        else:
            now = dict(st["weights"])
        span = pos - prev_pos
        shards = {}
        for sid, cursor in st["cursors"].items():
            n = st["num_samples"][sid]
            if sid in st["weights"]:
                i = ids.index(sid)
                if span > 0:
                    target = (tracker.target(i, pos) - tracker.target(i, prev_pos)) / span
                    realized = (counts[i] - prev_counts[i]) / span
                else:
                    target, realized = now.get(sid, 0.0), counts[i] / max(pos, 1)
            else:
                target = realized = 0.0
            shards[sid] = {
                "target_weight": target,
                "realized_weight": realized,
                "scheduled_weight": now.get(sid, 0.0),
                "samples": cursor,
                "tokens": cursor * (block - 1),  # trained on: inputs (= targets) of max_seq_length per sample
                "tokens_read": cursor * block,  # read from the shard: + 1 per sample for the target shift
                "epochs": cursor / n,
                "completed_epochs": cursor // n,
            }
        types: dict[str, dict[str, float]] = {}
        for sid, s in shards.items():
            t = types.setdefault(self.dm.shards_by_id[sid].type,
                                 {"target": 0.0, "realized": 0.0, "scheduled": 0.0, "tokens": 0})
            t["tokens"] += s["tokens"]
            t["target"] += s["target_weight"]
            t["realized"] += s["realized_weight"]
            t["scheduled"] += s["scheduled_weight"]
        return {"shards": shards, "types": types, "position": pos, "phase_position": self.phase_position()}

