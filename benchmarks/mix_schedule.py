"""Cost per sample of the exact blend with a mixture schedule vs a constant mix, same run.

Two measures, contenders interleaved, best of `--repeats` kept:
  1. the blend alone (`Blend.next` vs `ScheduledBlend.next`) for S shards: µs per sample, with the
     schedule inside a linear ramp (its most expensive part: a quadratic per eligible shard);
  2. ShardedMixedDataset streaming tokens/s over 3 litdata shards, `mix_weights_str` vs the
     continued-pretraining guide's recipe as `mix_schedule` (50% -> 80% domain between 10% and 50%).

    PYTHONPATH=. python benchmarks/mix_schedule.py [--samples 200000] [--seq 2048] [--batch 8]
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

from litgpt_ext.data.blend import Blend, ScheduledBlend  # noqa: E402
from litgpt_ext.data.schedule import curve_pieces  # noqa: E402


def blend_cost(make, n: int) -> float:
    b = make()
    t0 = time.perf_counter()
    for _ in range(n):
        b.next()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=200_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=150)
    p.add_argument("--tokens_per_shard", type=int, default=4_000_000)
    args = p.parse_args()

    print("1. blend alone, µs per sample (schedule measured inside its ramp)")
    for S in (3, 8):
        ids = [f"s{i}" for i in range(S)]
        start = {s: 1.0 / S for s in ids}
        end = {s: (0.5 if i == 0 else 0.5 / (S - 1)) for i, s in enumerate(ids)}
        rec = {"knots": [0.0, 1e12], "weights": [start, end], "ramps": ["constant", "linear"]}
        const = lambda S=S: Blend([1.0 / S] * S)  # noqa: E731
        sched = lambda rec=rec, ids=ids: ScheduledBlend(curve_pieces(rec, ids, 0.0, 1.0))  # noqa: E731
        best = {"constant": float("inf"), "schedule": float("inf")}
        for _ in range(args.repeats):
            best["constant"] = min(best["constant"], blend_cost(const, args.samples))
            best["schedule"] = min(best["schedule"], blend_cost(sched, args.samples))
        print(f"   S={S}: constant {best['constant']:.2f} µs, schedule {best['schedule']:.2f} µs, "
              f"ratio {best['schedule'] / best['constant']:.2f}x")

    from litgpt_ext.data import ShardedMixedDataset
    from litgpt_ext.data.shard_io import write_token_shard

    print(f"2. ShardedMixedDataset streaming, batches of {args.batch} x {args.seq + 1} tokens, workers 0")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rng = np.random.default_rng(0)
        for name in ("1", "2", "m1"):
            out, n = [], 0
            while n < args.tokens_per_shard:
                d = rng.integers(0, 50_000, size=int(rng.integers(200, 4000)), dtype=np.int32)
                out.append(d)
                n += len(d)
            write_token_shard(root / name, out, chunk_tokens=2**22)

        def loader(**mix):
            dm = ShardedMixedDataset(root, **mix)
            dm.connect(batch_size=args.batch, max_seq_length=args.seq)
            dm.setup()
            dm.set_phase(0, args.batches * 2, args.batch)  # the ramp spans the timed batches
            return dm.train_dataloader()

        recipe = [{"at_fraction": 0.0, "mix_weights_str": "main:0.5,math:0.5"},
                  {"at_fraction": 1.0, "mix_weights_str": "main:0.2,math:0.8", "ramp": "linear"}]
        contenders = {"constant": dict(mix_weights_str="main:0.5,math:0.5"), "schedule": dict(mix_schedule=recipe)}
        best = {k: 0.0 for k in contenders}
        for _ in range(args.repeats):
            for name, mix in contenders.items():
                it = iter(loader(**mix))
                next(it)
                t0 = time.perf_counter()
                for _ in itertools.islice(it, args.batches):
                    pass
                best[name] = max(best[name], args.batches * args.batch * (args.seq + 1) / (time.perf_counter() - t0))
        for name, r in best.items():
            print(f"   {name:<9} {r / 1e6:8.2f}M tokens/s")
        print(f"   schedule / constant: {best['schedule'] / best['constant']:.3f}x")


if __name__ == "__main__":
    main()
