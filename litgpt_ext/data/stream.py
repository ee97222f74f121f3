"""One rank's infinite training sample stream: the blend picks a shard, the shuffle picks its sample.

Sample j of a shard's infinite stream is `perm(seed, shard, epoch)[j % N]` with `epoch = j // N`
(the shard's own seed from `shard_seeds` when a fork gave it one);
rank r of R takes stream elements `start + k*R + r` for its k-th pick of that shard. All ranks use
the same blend order, so all ranks hold the same state and rank 0's copy resumes every rank.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from litgpt_ext.data.loader_state import make_blend
from litgpt_ext.data.shard_io import ShardReader


class Permutations:
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


class BlendedStream(IterableDataset):
    """One rank's infinite sample stream; worker w produces batches w, w+W, … of it."""

    def __init__(self, shards: list[tuple[str, Path, int]], blend_state: dict, starts: list[int],
                 rank: int, world_size: int, batch_size: int, block_size: int, seed: int):
        super().__init__()
        self.shards, self.blend_state, self.starts = shards, blend_state, starts
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.block_size, self.seed = block_size, seed

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        readers = [ShardReader(path, self.block_size) for _, path, _ in self.shards]
        seeds = self.blend_state.get("shard_seeds") or {}  # a fork's data seed for the shards it reads first
        perms = [Permutations(seeds.get(sid, self.seed), sid, n) for sid, _, n in self.shards]
        blend = make_blend(self.blend_state)
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
