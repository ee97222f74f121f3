"""ShardedMixedDataset: typed token shards streamed in an exact, resumable blend.

Why not litdata's `CombinedStreamingDataset` (what the paper's code uses): it draws sources at
random, so a shard's share only approaches its weight on average, and its resume state is tied to
the worker/process layout. Here the source order is the deterministic `Blend`, each shard is read
by index through litdata's own `StreamingDataset` + `TokensLoader`, and the whole loader state is
a few integers per shard: global cursors (samples served by all ranks), per-segment blend counts
and the mix. That makes three things exact: the mix of every prefix, resume (same batches as an
uninterrupted run, any worker count), and a blend change on resume (cursors kept, no replay).

Sample j of a shard's infinite stream is `perm(seed, shard, epoch)[j % N]` with `epoch = j // N`;
rank r of R takes stream elements `start + k*R + r` for its k-th pick of that shard. All ranks use
the same blend order, so all ranks hold the same state and rank 0's copy resumes every rank.
"""

from __future__ import annotations

import bisect
import copy
import json
import logging
import zlib
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from litgpt.data import DataModule

from litgpt_ext.data.mixing import Blend, MixSpec, mix_spec, resolve_weights
from litgpt_ext.data.shard_io import ShardError, is_shard_dir, read_shard_index
from litgpt_ext.data.shard_types import MixError, Shard, build_registry, discover_shards
from litgpt_ext.train.preempt import ignore_in_worker

log = logging.getLogger(__name__)
STATE_VERSION = 1


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _ShardReader:
    """Random access to one shard's samples, opened lazily in each process.

    Uncompressed local shards are read straight from their chunk files with one memmap per chunk,
    in exactly `TokensLoader`'s layout (header of 1 + items + 1 uint32, then the tokens; sample k
    of a chunk is tokens [k*block, (k+1)*block)). This replaces litdata's per-item
    `StreamingDataset.__getitem__` path, whose per-sample bookkeeping (chunk cache, reader, index
    lookups) cost a third of the streaming rate (see BENCHMARKS.md); compressed or encrypted
    shards still go through litdata.
    """

    def __init__(self, path: Path, block_size: int):
        self.path, self.block_size = path, block_size
        self._ds = None
        self._chunks: list[tuple[str, int, int]] | None = None  # (filename, header bytes, samples)
        self._mmaps: dict[int, np.memmap] = {}

    def _open(self) -> None:
        meta = json.loads((self.path / "index.json").read_text())
        cfg = meta["config"]
        if cfg.get("compression") or cfg.get("encryption"):
            from litdata.streaming import StreamingDataset
            from litdata.streaming.item_loader import TokensLoader

            self._ds = StreamingDataset(str(self.path), item_loader=TokensLoader(block_size=self.block_size))
            self._chunks = []
            return
        from litdata.constants import _NUMPY_DTYPES_MAPPING, _TORCH_DTYPES_MAPPING

        serializer, code = cfg["data_format"][0].split(":")
        dtype = _TORCH_DTYPES_MAPPING[int(code)] if serializer == "no_header_tensor" else _NUMPY_DTYPES_MAPPING[int(code)]
        self._np_dtype = torch.empty(0, dtype=dtype).numpy().dtype if isinstance(dtype, torch.dtype) else np.dtype(dtype)
        self._chunks = [(c["filename"], (1 + c["chunk_size"] + 1) * 4, c["dim"] // self.block_size) for c in meta["chunks"]]
        self._ends = np.cumsum([n for _, _, n in self._chunks]).tolist()

    def __getitem__(self, idx: int) -> torch.Tensor:
        if self._chunks is None:
            self._open()
        if self._ds is not None:
            return self._ds[int(idx)]
        c = bisect.bisect_right(self._ends, idx)
        mm = self._mmaps.get(c)
        if mm is None:
            name, header, _ = self._chunks[c]
            mm = self._mmaps[c] = np.memmap(self.path / name, dtype=self._np_dtype, mode="r", offset=header)
        start = (idx - (self._ends[c - 1] if c else 0)) * self.block_size
        return torch.from_numpy(np.array(mm[start:start + self.block_size]))


class _Permutations:
    """The per-epoch shuffle of one shard, cached for the current epoch."""

    def __init__(self, seed: int, shard_id: str, num_samples: int):
        self.key = [seed, zlib.crc32(shard_id.encode())]
        self.n = num_samples
        self._epoch, self._perm = -1, None

    def __call__(self, element: int) -> int:
        epoch, pos = divmod(element, self.n)
        if epoch != self._epoch:
            self._perm = np.random.default_rng(self.key + [epoch]).permutation(self.n)
            self._epoch = epoch
        return int(self._perm[pos])


class _BlendedStream(IterableDataset):
    """One rank's infinite sample stream; worker w produces batches w, w+W, … of it."""

    def __init__(self, shards: list[tuple[str, Path, int]], weights: list[float], starts: list[int],
                 counts: list[int], rank: int, world_size: int, batch_size: int, block_size: int, seed: int):
        super().__init__()
        self.shards, self.weights, self.starts, self.counts = shards, weights, starts, counts
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.block_size, self.seed = block_size, seed

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        readers = [_ShardReader(path, self.block_size) for _, path, _ in self.shards]
        perms = [_Permutations(self.seed, sid, n) for sid, _, n in self.shards]
        blend = Blend(self.weights, self.counts)
        counts, starts, R, r = blend.counts, self.starts, self.world_size, self.rank
        batch = 0
        while True:
            mine = batch % nworkers == wid
            for _ in range(self.batch_size):
                i = blend.next()
                if mine:
                    element = starts[i] + (counts[i] - 1) * R + r
                    yield readers[i][perms[i](element)]
            batch += 1


def _stack_long(rows: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(rows).long()


class MixedLoader:
    """The training loader: an infinite iterable of [batch, block] LongTensors with exact state.

    The state advances only for batches handed to the caller (prefetched ones do not count), so
    `state_dict()` after k batches resumes at batch k+1 whatever `num_workers` is.
    """

    def __init__(self, dm: "ShardedMixedDataset"):
        self.dm = dm
        self._state = dm._fresh_state()
        self._tracker = self._make_tracker()

    def _make_tracker(self) -> Blend:
        ids = list(self._state["weights"])
        return Blend([self._state["weights"][s] for s in ids], [self._state["counts"][s] for s in ids])

    def __iter__(self) -> Iterator[torch.Tensor]:
        st, dm = self._state, self.dm
        ids = list(st["weights"])
        shards = [(sid, dm.shards_by_id[sid].path, st["num_samples"][sid]) for sid in ids]
        stream = _BlendedStream(
            shards, [st["weights"][s] for s in ids], [st["segment_start"][s] for s in ids],
            [st["counts"][s] for s in ids], dm.rank, dm.world_size, dm.batch_size, dm.block_size, st["seed"],
        )
        loader = DataLoader(stream, batch_size=dm.batch_size, num_workers=dm.num_workers, collate_fn=_stack_long,
                            worker_init_fn=ignore_in_worker,  # SLURM signals every process; the main one saves
                            persistent_workers=False, prefetch_factor=2 if dm.num_workers > 0 else None)
        for batch in loader:
            self._tracker.take(dm.batch_size)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        st = copy.deepcopy(self._state)
        R = self.dm.world_size
        for sid, c in zip(st["weights"], self._tracker.counts):
            st["counts"][sid] = c
            st["cursors"][sid] = st["segment_start"][sid] + c * R
        return st

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from `state`; with a different mix, keep every cursor and switch the blend."""
        self._state = self.dm._continue_state(dict(state))
        self._tracker = self._make_tracker()

    def stats(self) -> dict[str, Any]:
        """Global consumption per shard and realized vs target mix (this segment), for logging."""
        st = self.state_dict()
        block = self.dm.block_size
        shards = {}
        seg_total = sum(st["counts"].values()) or 1
        for sid, cursor in st["cursors"].items():
            n = st["num_samples"][sid]
            shards[sid] = {
                "target_weight": st["weights"].get(sid, 0.0),
                "realized_weight": st["counts"].get(sid, 0) / seg_total,
                "samples": cursor,
                "tokens": cursor * block,
                "epochs": cursor / n,
                "completed_epochs": cursor // n,
            }
        types: dict[str, dict[str, float]] = {}
        for sid, s in shards.items():
            t = types.setdefault(self.dm.shards_by_id[sid].type, {"target": 0.0, "realized": 0.0})
            t["target"] += s["target_weight"]
            t["realized"] += s["realized_weight"]
        return {"shards": shards, "types": types, "position": sum(st["counts"].values())}


class _ValStream:
    """A finite, deterministic validation stream over one or more shards, split across ranks."""

    def __init__(self, name: str, paths: list[Path], block_size: int, batch_size: int, rank: int, world_size: int,
                 max_samples: int | None):
        self.name = name
        self.readers = [_ShardReader(p, block_size) for p in paths]
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
            yield _stack_long([self.readers[i][j] for i, j in self.items[b:b + self.batch_size]])


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
        self.spec: MixSpec = mix_spec(mix_weights_str, literal_weights_str, mix_config_path, proportional_sampling)
        self.batch_size = 1
        self.block_size: int | None = None
        self.rank, self.world_size = 0, 1
        self.shards: list[Shard] | None = None
        self.weights: dict[str, float] | None = None

    def __repr__(self) -> str:
        return f"ShardedMixedDataset(data_path={str(self.data_path)!r}, mix={self.spec.describe()})"

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
            shard = self.shards_by_id[sid]
            if shard.index.num_samples(self.block_size) == 0:
                raise MixError(
                    f"shard {sid!r} ({shard.path}) has {shard.num_tokens} tokens in chunks of "
                    f"{max(shard.index.chunk_tokens)} at most: fewer than one sample of {self.block_size} tokens "
                    f"(max_seq_length + 1); drop it from the mix or re-prepare it with larger chunks"
                )

    @property
    def resolved_mix(self) -> dict[str, Any]:
        if self.weights is None:
            self.resolve()
        return {
            "spec": self.spec.describe(),
            "weights": dict(self.weights),
            "tokens": {sid: self.shards_by_id[sid].num_tokens for sid in self.weights},
        }

    def _num_samples(self, sid: str) -> int:
        return self.shards_by_id[sid].index.num_samples(self.block_size)

    def _fresh_state(self) -> dict[str, Any]:
        if self.weights is None:
            self.setup()
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "block_size": self.block_size,
            "world_size": self.world_size,
            "weights": dict(self.weights),
            "segment_start": {s: 0 for s in self.weights},
            "counts": {s: 0 for s in self.weights},
            "cursors": {s: 0 for s in self.weights},
            "num_samples": {s: self._num_samples(s) for s in self.weights},
            "mix_history": [{"spec": self.spec.describe(), "weights": dict(self.weights), "at_cursors": {}}],
        }

    def _continue_state(self, saved: dict[str, Any]) -> dict[str, Any]:
        if saved.get("version") != STATE_VERSION:
            raise MixError(f"loader state version {saved.get('version')!r} is not {STATE_VERSION}; cannot resume it")
        if saved["block_size"] != self.block_size:
            raise MixError(
                f"the checkpoint's loader used samples of {saved['block_size']} tokens, this run {self.block_size}: "
                "max_seq_length must not change on resume (shard cursors count samples)"
            )
        if saved["seed"] != self.seed:
            log.warning("data seed %s differs from the checkpoint's %s; keeping %s so no shard replays data",
                        self.seed, saved["seed"], saved["seed"])
        for sid, n in saved["num_samples"].items():
            if sid in self.shards_by_id and self._num_samples(sid) != n:
                raise MixError(
                    f"shard {sid!r} had {n} samples when the checkpoint was saved and has {self._num_samples(sid)} now: "
                    "its data changed under the run"
                )
        new = copy.deepcopy(saved)
        same_mix = set(saved["weights"]) == set(self.weights) and all(
            abs(saved["weights"][s] - self.weights[s]) < 1e-12 for s in self.weights
        )
        if same_mix and saved["world_size"] == self.world_size:
            return new
        cursors = dict(saved["cursors"])
        for sid in self.weights:
            cursors.setdefault(sid, 0)
        new.update(
            world_size=self.world_size,
            weights=dict(self.weights),
            segment_start={s: cursors[s] for s in self.weights},
            counts={s: 0 for s in self.weights},
            cursors=cursors,
            num_samples={**saved["num_samples"], **{s: self._num_samples(s) for s in self.weights}},
        )
        new["mix_history"] = list(saved.get("mix_history", [])) + [
            {"spec": self.spec.describe(), "weights": dict(self.weights), "at_cursors": dict(cursors)}
        ]
        reason = "world size %d -> %d" % (saved["world_size"], self.world_size) if same_mix else "new blend"
        log.warning("data mix: %s; shard cursors kept (no replay)\n%s", reason, mix_change_table(saved, new))
        return new

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


def mix_change_table(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """Old and new weights side by side with each shard's cursor and epochs, for the resume log."""
    ids = list(dict.fromkeys(list(old["weights"]) + list(new["weights"]) + list(new["cursors"])))
    rows = [f"{'shard':<10} {'old weight':>10} {'new weight':>10} {'cursor':>10} {'epochs':>7}"]
    for sid in ids:
        n = new["num_samples"].get(sid) or old["num_samples"].get(sid) or 1
        cur = new["cursors"].get(sid, 0)
        rows.append(f"{sid:<10} {old['weights'].get(sid, 0):>10.4f} {new['weights'].get(sid, 0):>10.4f} {cur:>10d} {cur / n:>7.2f}")
    return "\n".join(rows)
