"""Writing and reading litdata token shards (the format litdata's `TokensLoader` streams).

`write_token_shard` drives litdata's own `BinaryWriter` in-process (no worker pool), so that the
prepare step, the demo builder and the tests all produce byte-identical litdata shards cheaply.
"""

from __future__ import annotations

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


def read_chunk_tokens(path: str | Path) -> list[np.ndarray]:
    """Every chunk of an uncompressed token shard as a read-only memmap of its tokens, in order.

    The layout is litdata `TokensLoader`'s: a header of 1 + items + 1 uint32, then the tokens.
    """
    from litdata.constants import _NUMPY_DTYPES_MAPPING, _TORCH_DTYPES_MAPPING

    path = Path(path)
    read_shard_index(path)  # clear errors for a missing or corrupt index
    meta = json.loads((path / INDEX_FILENAME).read_text())
    cfg = meta["config"]
    if cfg.get("compression") or cfg.get("encryption"):
        raise ShardError(f"shard {str(path)!r} is compressed or encrypted; only plain token chunks can be read directly")
    serializer, code = cfg["data_format"][0].split(":")
    dtype = _TORCH_DTYPES_MAPPING[int(code)] if serializer == "no_header_tensor" else _NUMPY_DTYPES_MAPPING[int(code)]
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype if isinstance(dtype, torch.dtype) else np.dtype(dtype)
    return [np.memmap(path / c["filename"], dtype=np_dtype, mode="r", offset=(1 + c["chunk_size"] + 1) * 4)
            for c in meta["chunks"]]
