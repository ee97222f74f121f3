"""ShardedMixedDataset: typed token shards streamed in an exact, resumable blend.

Why not litdata's `CombinedStreamingDataset` (what the paper's code uses): it draws sources at
random, so a shard's share only approaches its weight on average, and its resume state is tied to
the worker/process layout. Here the source order is the deterministic `Blend`, each shard is read
by index through litdata's own `StreamingDataset` + `TokensLoader`, and the whole loader state is
a few integers per shard: global cursors (samples served by all ranks), per-segment blend counts
and the mix. That makes three things exact: the mix of every prefix, resume (same batches as an
uninterrupted run, any worker count), and a blend change on resume (cursors kept, no replay).

The stream itself (which sample each pick serves, on which rank) is `stream.BlendedStream`, the
train loader around it `loader.MixedLoader`; the loader state is built and continued in `loader_state`. All ranks use the same blend order, so all
ranks hold the same state and rank 0's copy resumes every rank.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from litgpt.data import DataModule

from litgpt_ext.data.loader import MixedLoader, stack_long
from litgpt_ext.data.mix_spec import MIX_SOURCES, MixSpec, check_mix_sources, mix_spec, resolve_weights
from litgpt_ext.data.origin import check_origin
from litgpt_ext.data.schedule import (
    Phase,
    apply_repetition_caps,
    check_max_epochs,
    constant_record,
    describe_schedule,
    parse_mix_schedule,
    resolve_schedule,
)
from litgpt_ext.data.shard_io import ShardError, ShardReader, is_shard_dir, read_shard_index
from litgpt_ext.data.shard_types import MixError, Shard, build_registry, discover_shards

log = logging.getLogger(__name__)


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _ValStream:
    """A finite, deterministic validation stream over one or more shards, split across ranks."""

    def __init__(self, name: str, paths: list[Path], block_size: int, batch_size: int, rank: int, world_size: int,
                 max_samples: int | None):
        self.name = name
        self.readers = [ShardReader(p, block_size) for p in paths]
        sizes = [read_shard_index(p).num_samples(block_size) for p in paths]
        for p, n in zip(paths, sizes):
            if n == 0:
                raise ShardError(f"validation shard {str(p)!r} ({name}) holds fewer tokens than one sample of {block_size}")
        self.items = [(i, j) for i, n in enumerate(sizes) for j in range(n)]
        if max_samples is not None:
            self.items = self.items[:max_samples]
        self.items = self.items[rank::world_size]
        self.batch_size = batch_size

    def __len__(self) -> int:
        return (len(self.items) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        for b in range(0, len(self.items), self.batch_size):
            yield stack_long([self.readers[i][j] for i, j in self.items[b:b + self.batch_size]])


def _val_paths(name: str, path: str | Path | list) -> list[Path]:
    """A shard folder, a folder of shard folders, or a list of either -> shard folders, in order."""
    if isinstance(path, (list, tuple)):
        return [q for item in path for q in _val_paths(name, item)]
    p = Path(path)
    if is_shard_dir(p):
        return [p]
    if not p.is_dir():
        raise MixError(f"val_data_path {name}={str(p)!r} does not exist")
    subs = sorted(c for c in p.iterdir() if c.is_dir() and is_shard_dir(c))
    if not subs:
        raise MixError(f"val_data_path {name}={str(p)!r} holds no shard (no index.json in it or its sub-folders)")
    return subs


class ShardedMixedDataset(DataModule):
    """Typed litdata token shards under `data_path`, streamed in an exact, resumable mix.

    Args:
        data_path: folder of shard folders (`1`, `2`, … main; `c1`, `m1`, … typed).
        val_data_path: a shard folder, a folder of shards, or a mapping {name: path or [paths]} for
            named validation sets (e.g. general and domain).
        num_workers: dataloader worker processes per rank (the stream is identical for any value).
        mix_weights_str: per-type weights, e.g. "main:0.8,code:0.15,math:0.05".
        literal_weights_str: exact shard weights, e.g. "main/1:0.8,q1:0.1,q2:0.1".
        mix_config_path: JSON {"weights": {...}, "proportional_sampling": bool, "literal_weights": {...}}.
        proportional_sampling: weight shards by token count (type weights multiply).
        seed: the shuffle of samples within each shard.
        extra_shard_types: more types {name: folder prefix}, e.g. {"legal": "l"}.
        val_max_samples: cap on samples per validation set (None: all).
        mix_schedule: the mix as a function of the phase position instead of one mix: a list of points
            `{at_step: N | at_fraction: F, mix_weights_str | literal_weights_str | weights | literal_weights,
            ramp: constant | linear}`; needs the phase (`set_phase`).
        max_epochs: the most epochs this phase may draw from a shard: one number for all shards, or
            {shard id or type: epochs}; needs the phase (`set_phase`).
        cap_repetition: when a shard would exceed max_epochs, cap its weight and renormalise the others
            (logged) instead of refusing the plan.
        mix_schedule_lookahead: false: the blend sees each `mix_schedule` point only when the stream
            reaches it (constant ramps only), as an online mixing policy's run does; `litgpt-ext
            mix-replay` writes it so that the static replay draws the online run's samples exactly.
        mix_schedule_origin: what `mix-replay` records about the run a schedule replays (its phase,
            data seed, sample size and shards); a run whose own differ is refused, naming them.

    The training loop calls `set_phase(start_step, stop_step, global_batch_size)` after `setup()` and
    before `train_dataloader()`: the phase's optimizer steps and global samples per step place the
    schedule's points and give the repetition caps their budget.
    """

    def __init__(
        self,
        data_path: str | Path = "data/demo",
        val_data_path: str | Path | dict[str, str | list[str]] | None = None,
        num_workers: int = 0,
        mix_weights_str: str | None = None,
        literal_weights_str: str | None = None,
        mix_config_path: str | Path | None = None,
        proportional_sampling: bool = False,
        seed: int = 42,
        extra_shard_types: dict[str, str] | None = None,
        val_max_samples: int | None = None,
        mix_schedule: list[dict] | None = None,
        max_epochs: float | dict[str, float] | None = None,
        cap_repetition: bool = False,
        mix_schedule_lookahead: bool = True,
        mix_schedule_origin: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()  # the loop writes these (mix strings included) to hyperparameters.yaml
        if num_workers < 0:
            raise MixError(f"num_workers must be >= 0, got {num_workers}")
        self.data_path = Path(data_path) if data_path not in (None, "") else None
        self.val_data_path = val_data_path
        self.num_workers = num_workers
        self.seed = seed
        self.val_max_samples = val_max_samples
        self.registry = build_registry(extra_shard_types)
        self.schedule_points = parse_mix_schedule(mix_schedule, proportional_sampling)
        if self.schedule_points:
            check_mix_sources(dict(zip(MIX_SOURCES, (mix_weights_str, literal_weights_str, mix_config_path))),
                              scheduled=True)
            self.spec: MixSpec = self.schedule_points[0].spec
        else:
            self.spec = mix_spec(mix_weights_str, literal_weights_str, mix_config_path, proportional_sampling)
        self.max_epochs = max_epochs
        self.cap_repetition = cap_repetition
        self.mix_schedule_lookahead = mix_schedule_lookahead
        if not mix_schedule_lookahead:
            if not self.schedule_points:
                raise MixError("mix_schedule_lookahead: false applies to a mix_schedule, and this data config has none")
            linear = [k for k, p in enumerate(self.schedule_points) if p.ramp != "constant"]
            if linear:
                raise MixError(f"mix_schedule_lookahead: false takes constant ramps only (a linear ramp needs the point"
                               f" it ramps to); points {linear} ramp linearly")
        self.mix_schedule_origin = mix_schedule_origin
        self.online_policy: str | None = None  # set by an online mixing policy (litgpt_ext.mix_policy) before resume
        self.phase: Phase | None = None
        self.record: dict | None = None  # the phase's plan: the schedule (or constant mix), caps applied
        self.batch_size = 1
        self.block_size: int | None = None
        self.rank, self.world_size = 0, 1
        self.shards: list[Shard] | None = None
        self.weights: dict[str, float] | None = None

    def __repr__(self) -> str:
        mix = describe_schedule(self.schedule_points) or self.spec.describe()
        return f"ShardedMixedDataset(data_path={str(self.data_path)!r}, mix={mix})"

    def connect(self, tokenizer=None, batch_size: int = 1, max_seq_length: int | None = None, **kwargs) -> None:
        if batch_size < 1:
            raise MixError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        if max_seq_length is not None:
            self.block_size = max_seq_length + 1

    def resolve(self) -> dict[str, float]:
        """Discover shards and resolve the mix (needs no block size)."""
        if self.data_path is None:
            raise MixError("data_path is not set; point it at a folder of shard folders (1, 2, c1, m1, …)")
        self.shards = discover_shards(self.data_path, self.registry)
        self.shards_by_id = {s.id: s for s in self.shards}
        check_max_epochs(self.max_epochs, self.shards, self.registry)
        if self.schedule_points:  # every shard any point uses, with the first point's weights
            union = resolve_schedule(self.schedule_points, self.shards, self.registry, Phase(0, 1, 1))
            self.weights = dict(union["weights"][0])
        else:
            self.weights = resolve_weights(self.spec, self.shards, self.registry)
        return self.weights

    def setup(self, stage: str = "", rank: int | None = None, world_size: int | None = None) -> None:
        if self.block_size is None:
            raise MixError("call connect(batch_size=…, max_seq_length=…) before setup()")
        d_rank, d_world = _dist_rank_world()
        self.rank = d_rank if rank is None else rank
        self.world_size = d_world if world_size is None else world_size
        self.resolve()
        for sid in self.weights:
            self._check_sample_size(sid)

    def _check_sample_size(self, sid: str) -> None:
        shard = self.shards_by_id[sid]
        if shard.index.num_samples(self.block_size) == 0:
            raise MixError(
                f"shard {sid!r} ({shard.path}) has {shard.num_tokens} tokens in chunks of "
                f"{max(shard.index.chunk_tokens)} at most: fewer than one sample of {self.block_size} tokens "
                f"(max_seq_length + 1); drop it from the mix or re-prepare it with larger chunks"
            )

    def set_phase(self, start_step: int, stop_step: int, global_batch_size: int) -> None:
        """The training phase: optimizer steps [start_step, stop_step) of `global_batch_size` samples each.

        Places `at_step`/`at_fraction` points and checks `max_epochs` against the phase's samples
        (refusing, or capping with `cap_repetition`) before any sample is drawn. Call after `setup()`
        (needs the block size) and before `train_dataloader()`. On resume with the same schedule the
        checkpoint's phase wins, so a requeue never moves the schedule.
        """
        if self.block_size is None:
            raise MixError("call connect(batch_size=…, max_seq_length=…) before set_phase()")
        if self.shards is None:
            self.resolve()
        self.phase = Phase(int(start_step), int(stop_step), int(global_batch_size))
        if self.mix_schedule_origin is not None:
            check_origin(self.mix_schedule_origin, self)  # a replay: the recorded run's phase, seed, shards
        self.record = self._plan(self.phase)
        if not self.schedule_points:
            self.weights = dict(self.record["weights"][0])  # caps may have changed them

    def _plan(self, phase: Phase) -> dict:
        if self.schedule_points:
            record = resolve_schedule(self.schedule_points, self.shards, self.registry, phase)
        else:
            record = constant_record(resolve_weights(self.spec, self.shards, self.registry), phase)
        if self.schedule_points and not self.mix_schedule_lookahead:
            record["lookahead"] = False
        for sid in record["weights"][0]:
            self._check_sample_size(sid)
        num = {sid: self._num_samples(sid) for sid in record["weights"][0]}
        record, lines = apply_repetition_caps(record, self.shards_by_id, num, phase.total_samples, self.max_epochs,
                                              self.cap_repetition, self.block_size, phase.global_batch_size)
        if lines:
            log.warning("%s", "\n".join(lines))
        self.cap_log = lines
        return record

    def _needs_phase(self) -> str | None:
        if self.schedule_points:
            return "mix_schedule"
        if self.max_epochs is not None:
            return "max_epochs"
        return None

    @property
    def resolved_mix(self) -> dict[str, Any]:
        if self.weights is None:
            self.resolve()
        out = {
            "spec": self.spec.describe() if not self.schedule_points else describe_schedule(self.schedule_points),
            "weights": dict(self.weights),
            "tokens": {sid: self.shards_by_id[sid].num_tokens for sid in self.weights},
        }
        # the schedule's resolved points and phase live in the loader state (the checkpoint's phase wins
        # on a requeue), so this summary stays the same for a requeue whatever phase it is handed
        return out

    def _num_samples(self, sid: str) -> int:
        return self.shards_by_id[sid].index.num_samples(self.block_size)

    def _phase_record(self, saved_phase: Mapping | None = None) -> dict | None:
        """This run's plan (None for a plain constant mix); the phase is set_phase's, else the checkpoint's."""
        need = self._needs_phase()
        if self.record is not None:
            return self.record
        if need is None:
            return None
        if saved_phase:
            self.phase = Phase(**saved_phase)
            self.record = self._plan(self.phase)
            return self.record
        raise MixError(
            f"{need} needs the training phase (its optimizer steps and global batch size): the training loop "
            "calls data.set_phase(start_step, stop_step, global_batch_size) after data.setup() and before "
            "data.train_dataloader()"
        )

    def _spec_text(self) -> str:
        return describe_schedule(self.schedule_points) or self.spec.describe()

    def train_dataloader(self) -> MixedLoader:
        if self.weights is None:
            self.setup()
        return MixedLoader(self)

    def val_dataloaders(self) -> dict[str, _ValStream]:
        if self.val_data_path in (None, ""):
            return {}
        if self.block_size is None:
            raise MixError("call connect(batch_size=…, max_seq_length=…) before asking for val loaders")
        named = self.val_data_path if isinstance(self.val_data_path, Mapping) else {"val": self.val_data_path}
        return {
            name: _ValStream(name, _val_paths(name, path), self.block_size, self.batch_size, self.rank,
                             self.world_size, self.val_max_samples)
            for name, path in named.items()
        }

    def val_dataloader(self):
        loaders = self.val_dataloaders()
        return next(iter(loaders.values())) if loaders else None
