"""Tokens/s streamed by ShardedMixedDataset (3 sources) vs litdata baselines, same run.

Baselines: one litdata `StreamingDataset` over one shard, and litdata's `CombinedStreamingDataset`
over the same 3 shards with the same weights (what the paper's code uses). All read the same
on-disk litdata token shards with `TokensLoader`, through a torch/litdata DataLoader with the same
batch size and worker count. Runs are interleaved and the best of `--repeats` is kept, so a busy
machine hurts every contender alike.

    python benchmarks/data_stream.py [--tokens_per_shard 4000000] [--seq 2048] [--batch 8] [--workers 0]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from litgpt_ext.data.shard_io import write_token_shard  # noqa: E402


def build(root: Path, tokens: int) -> None:
    rng = np.random.default_rng(0)
    for name in ("1", "c1", "m1"):
        docs = (rng.integers(0, 50_000, size=int(rng.integers(200, 4000)), dtype=np.int32) for _ in itertools.count())
        out, n = [], 0
        for d in docs:
            out.append(d)
            n += len(d)
            if n >= tokens:
                break
        write_token_shard(root / name, out, chunk_tokens=2**22)


def rate(make_iter, batches: int, tokens_per_batch: int) -> float:
    it = iter(make_iter())
    next(it)  # start-up (worker spawn, first chunk open) is not streaming rate
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * tokens_per_batch / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens_per_shard", type=int, default=4_000_000)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--batches", type=int, default=150)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    from litdata.streaming import CombinedStreamingDataset, StreamingDataLoader, StreamingDataset
    from litdata.streaming.item_loader import TokensLoader

    from litgpt_ext.data import ShardedMixedDataset

    block = args.seq + 1
    weights = {"1": 0.6, "c1": 0.3, "m1": 0.1}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root, args.tokens_per_shard)

        def single():
            ds = StreamingDataset(str(root / "1"), item_loader=TokensLoader(block_size=block), shuffle=True, seed=1)
            return StreamingDataLoader(ds, batch_size=args.batch, num_workers=args.workers)

        def combined():
            parts = [StreamingDataset(str(root / n), item_loader=TokensLoader(block_size=block), shuffle=True, seed=1)
                     for n in weights]
            ds = CombinedStreamingDataset(parts, seed=1, weights=list(weights.values()), iterate_over_all=False)
            return StreamingDataLoader(ds, batch_size=args.batch, num_workers=args.workers)

        def ours():
            dm = ShardedMixedDataset(root, literal_weights_str="main/1:0.6,c1:0.3,m1:0.1", num_workers=args.workers)
            dm.connect(batch_size=args.batch, max_seq_length=args.seq)
            dm.setup()
            return dm.train_dataloader()

        contenders = {"litdata StreamingDataset (1 shard)": single,
                      "litdata CombinedStreamingDataset (3)": combined,
                      "ShardedMixedDataset (3)": ours}
        best = {k: 0.0 for k in contenders}
        for _ in range(args.repeats):
            for name, fn in contenders.items():
                best[name] = max(best[name], rate(fn, args.batches, args.batch * block))
    base = best["litdata StreamingDataset (1 shard)"]
    print(f"seq={args.seq} batch={args.batch} workers={args.workers} batches={args.batches} best of {args.repeats}")
    print(f"{'loader':<40} {'tokens/s':>14} {'vs single':>10}")
    for name, r in best.items():
        print(f"{name:<40} {r:>14,.0f} {r / base:>9.2f}x")


if __name__ == "__main__":
    main()
