import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from litgpt_ext.data.shard_io import write_token_shard  # noqa: E402

# Each shard's tokens live in their own range, so a sample's first token names its shard.
SHARD_BASE = {"1": 0, "2": 10_000, "3": 20_000, "c1": 30_000, "c2": 40_000, "m1": 50_000, "w1": 60_000}


def make_shard(path: Path, base: int, num_tokens: int, doc_len: int = 50, chunk_tokens: int = 800) -> None:
    docs = [np.arange(base + i, base + min(i + doc_len, num_tokens)) for i in range(0, num_tokens, doc_len)]
    write_token_shard(path, docs, chunk_tokens=chunk_tokens)


@pytest.fixture(scope="session")
def shard_root(tmp_path_factory) -> Path:
    """Shards 1, 2 (main), c1, c2 (code), m1 (math) with tokens tagged by shard; plus val sets."""
    root = tmp_path_factory.mktemp("shards")
    sizes = {"1": 3200, "2": 1600, "c1": 1600, "c2": 800, "m1": 800}
    for name, n in sizes.items():
        make_shard(root / name, SHARD_BASE[name], n)
    make_shard(root / "val" / "1", 90_000, 400)
    make_shard(root / "val" / "m1", 95_000, 240)
    return root


def shard_of(sample) -> str:
    first = int(sample[0])
    return max((b, n) for n, b in SHARD_BASE.items() if b <= first)[1]
