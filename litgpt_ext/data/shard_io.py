"""Writing and reading litdata token shards (the format litdata's `TokensLoader` streams).

`write_token_shard` drives litdata's own `BinaryWriter` in-process (no worker pool), so that the
prepare step, the demo builder and the tests all produce byte-identical litdata shards cheaply.
`token_chunks` is the one decoder of a shard's chunk layout (token dtype, chunk files, header
sizes); `read_chunk_tokens`, `ShardReader` (random access by sample) and the training-setup token
id check all read chunks through it.
"""

from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

INDEX_FILENAME = "index.json"


def write_token_shard(
    out_dir: str | Path,
    docs: Iterable[Iterable[int] | np.ndarray | torch.Tensor],
    chunk_tokens: int = 2**20,
    dtype: torch.dtype = torch.int32,
) -> int:
    """Write documents (token id sequences, EOS already appended) as one litdata token shard.

    Returns the number of tokens written. Documents are concatenated; litdata's `TokensLoader`
    later cuts the stream into blocks of `max_seq_length + 1` tokens per chunk. An empty stream
    writes nothing and returns 0 (litdata's merge would wait forever for an index that never comes).
    """
    from litdata.streaming.item_loader import TokensLoader
    from litdata.streaming.writer import BinaryWriter

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = BinaryWriter(str(out_dir), chunk_size=chunk_tokens, item_loader=TokensLoader())
    total = 0
    for i, doc in enumerate(docs):
        t = torch.as_tensor(np.asarray(doc), dtype=dtype) if not isinstance(doc, torch.Tensor) else doc.to(dtype)
        if t.numel() == 0:
            continue
        writer[i] = t
        total += t.numel()
    if total == 0:
        return 0
    writer.done()
    writer.merge()
    return total


@dataclass(frozen=True)
class ShardIndex:
    """What a shard's index.json says, enough to size a mix without opening chunks."""

    path: Path
    chunk_tokens: tuple[int, ...]  # tokens in each chunk file

    @property
    def num_tokens(self) -> int:
        return sum(self.chunk_tokens)

    def num_samples(self, block_size: int) -> int:
        """Samples of `block_size` tokens that TokensLoader serves (each chunk's tail is not served)."""
        return sum(t // block_size for t in self.chunk_tokens)

    def unserved_tokens(self, block_size: int) -> int:
        return self.num_tokens - self.num_samples(block_size) * block_size


class ShardError(ValueError):
    """A shard folder that cannot be used, with the reason and the path."""


def read_shard_index(path: str | Path) -> ShardIndex:
    path = Path(path)
    index = path / INDEX_FILENAME
    if not index.is_file():
        raise ShardError(f"shard {str(path)!r} has no {INDEX_FILENAME}; a shard is a litdata folder written by `litgpt-ext prepare`")
    try:
        meta = json.loads(index.read_text())
        chunks = meta["chunks"]
        data_format = meta["config"]["data_format"]
        dims = tuple(int(c["dim"]) for c in chunks)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ShardError(f"shard {str(path)!r} has a corrupt {INDEX_FILENAME} ({type(e).__name__}: {e})") from e
    if not any(str(f).startswith("no_header_tensor") or str(f).startswith("no_header_numpy") for f in data_format):
        raise ShardError(
            f"shard {str(path)!r} is not a token shard (data_format={data_format}); expected litdata TokensLoader chunks"
        )
    missing = [c["filename"] for c in chunks if not (path / c["filename"]).is_file()]
    if missing:
        raise ShardError(f"shard {str(path)!r} lists chunk files that are missing: {missing[:5]}")
    return ShardIndex(path=path, chunk_tokens=dims)


def is_shard_dir(path: str | Path) -> bool:
    return os.path.isfile(os.path.join(path, INDEX_FILENAME))


@dataclass(frozen=True)
class TokenChunks:
    """An uncompressed token shard's chunk files, in order, as litdata `TokensLoader` lays them out:
    each file is a header of 1 + items + 1 uint32, then the tokens."""

    path: Path
    dtype: np.dtype
    chunks: tuple[tuple[str, int, int], ...]  # (filename, header bytes, tokens)

    def memmap(self, k: int) -> np.memmap:
        """The tokens of chunk k as a read-only memmap."""
        name, header, _ = self.chunks[k]
        return np.memmap(self.path / name, dtype=self.dtype, mode="r", offset=header)


def token_chunks(path: str | Path) -> TokenChunks | None:
    """The chunk layout `index.json` describes; None for a compressed or encrypted shard (only litdata
    can decode those). Reads the index as is: call `read_shard_index` first for clear errors."""
    path = Path(path)
    meta = json.loads((path / INDEX_FILENAME).read_text())
    cfg = meta["config"]
    if cfg.get("compression") or cfg.get("encryption"):
        return None
    from litdata.constants import _NUMPY_DTYPES_MAPPING, _TORCH_DTYPES_MAPPING

    serializer, code = cfg["data_format"][0].split(":")
    dtype = _TORCH_DTYPES_MAPPING[int(code)] if serializer == "no_header_tensor" else _NUMPY_DTYPES_MAPPING[int(code)]
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype if isinstance(dtype, torch.dtype) else np.dtype(dtype)
    return TokenChunks(path, np_dtype, tuple((c["filename"], (1 + c["chunk_size"] + 1) * 4, c["dim"]) for c in meta["chunks"]))


def read_chunk_tokens(path: str | Path) -> list[np.ndarray]:
    """Every chunk of an uncompressed token shard as a read-only memmap of its tokens, in order.

    The layout is litdata `TokensLoader`'s: a header of 1 + items + 1 uint32, then the tokens.
    """
    path = Path(path)
    read_shard_index(path)  # clear errors for a missing or corrupt index
    layout = token_chunks(path)
    if layout is None:
        raise ShardError(f"shard {str(path)!r} is compressed or encrypted; only plain token chunks can be read directly")
    return [layout.memmap(k) for k in range(len(layout.chunks))]


class ShardReader:
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
        layout = token_chunks(self.path)
        if layout is None:
            from litdata.streaming import StreamingDataset
            from litdata.streaming.item_loader import TokensLoader

            self._ds = StreamingDataset(str(self.path), item_loader=TokensLoader(block_size=self.block_size))
            self._chunks = []
            return
        self._layout = layout
        self._chunks = [(name, header, tokens // self.block_size) for name, header, tokens in layout.chunks]
        self._ends = np.cumsum([n for _, _, n in self._chunks]).tolist()

    def __getitem__(self, idx: int) -> torch.Tensor:
        if self._chunks is None:
            self._open()
        if self._ds is not None:
            return self._ds[int(idx)]
        c = bisect.bisect_right(self._ends, idx)
        mm = self._mmaps.get(c)
        if mm is None:
            mm = self._mmaps[c] = self._layout.memmap(c)
        start = (idx - (self._ends[c - 1] if c else 0)) * self.block_size
        return torch.from_numpy(np.array(mm[start:start + self.block_size]))
