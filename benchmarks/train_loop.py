"""Tokens/s of `litgpt-ext pretrain`'s loop vs `litgpt pretrain` on the same model, data and batch (CPU).

Both read the same litdata token shards (ours through ShardedMixedDataset, litgpt's through
litgpt.data.LitData), train the same inline tiny model in fp32 with the same micro/global batch,
no validation in the timed part and no checkpoint in between. Each loop runs in fresh processes for N1 and N2
optimizer steps, `--repeats` times in alternating order; throughput = (N2 - N1) * tokens_per_step /
(t(N2) - t(N1)), median over repeats, in wall and in process CPU time (runs use 1 torch thread by default, so CPU
time is the compute actually spent, robust to other load on a shared machine); process setup,
model build, litgpt's FLOP measurement and final checkpoint cancel out. By default both run eager
(litgpt's `torch.compile` is replaced by the identity). `--compile`: both compiled with inductor,
litgpt by its own `torch.compile(model)`, ours by `speed: {compile: true}` (the model's forward);
each process compiles once, in both N1 and N2 runs, so compilation cancels too (up to its noise;
one untimed warm-up run per loop fills inductor's cache first).

    PYTHONPATH=$PWD python benchmarks/train_loop.py [--n1 4 --n2 64 --repeats 3 --threads 1] [--compile]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_data(root: Path, vocab: int, n_tokens: int) -> None:
    from litgpt_ext.data.shard_io import write_token_shard

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, vocab, size=256) for _ in range(n_tokens // 256)]
    write_token_shard(root / "lit" / "train", docs, chunk_tokens=1 << 16)
    write_token_shard(root / "lit" / "val", docs[:8], chunk_tokens=1 << 16)
    write_token_shard(root / "ours" / "1", docs, chunk_tokens=1 << 16)


def run_litgpt(root: Path, cfg, steps: int, gbs: int, mbs: int, seq: int, tag: str, compile: bool = False) -> float:
    import litgpt.pretrain as lp
    from litgpt.args import EvalArgs, TrainArgs
    from litgpt.data import LitData

    lp.save_hyperparameters = lambda *a, **k: None  # it re-parses sys.argv (the benchmark's) with litgpt's CLI
    data = LitData(root / "lit", split_names=("train", "val"), num_workers=0)
    train = TrainArgs(save_interval=None, log_interval=steps, global_batch_size=gbs, micro_batch_size=mbs,
                      max_tokens=steps * gbs * seq, max_norm=1.0, min_lr=1e-4, lr_warmup_steps=2,
                      max_seq_length=seq)
    shutil.rmtree(root / f"out-litgpt-{tag}", ignore_errors=True)
    t0 = time.perf_counter()
    lp.setup(model_name=cfg.name, model_config=cfg, out_dir=root / f"out-litgpt-{tag}", precision="32-true",
             data=data, train=train, eval=EvalArgs(interval=10**9, max_iters=1, initial_validation=False,
                                                    final_validation=False),
             optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}}, devices=1,
             logger_name="csv")
    return time.perf_counter() - t0


def run_ours(root: Path, cfg, steps: int, gbs: int, mbs: int, seq: int, tag: str, compile: bool = False) -> float:
    from litgpt_ext.data import ShardedMixedDataset
    from litgpt_ext.train.args import EvalArgs, TrainArgs
    from litgpt_ext.train.loop import pretrain
    from litgpt_ext.train.speed import SpeedArgs

    data = ShardedMixedDataset(root / "ours", num_workers=0)
    train = TrainArgs(save_interval=None, log_interval=1000, global_batch_size=gbs, micro_batch_size=mbs,
                      max_iters=steps, max_norm=1.0, min_lr=1e-4, lr_warmup_steps=2, max_seq_length=seq)
    shutil.rmtree(root / f"out-ours-{tag}", ignore_errors=True)
    t0 = time.perf_counter()
    pretrain(model_config=cfg, out_dir=root / f"out-ours-{tag}", precision="32-true", data=data, train=train,
             eval=EvalArgs(interval=10**9, initial_validation=False, final_validation=False),
             optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}}, devices=1, logger_name="csv",
             speed=SpeedArgs(compile=compile, fused_optimizer=False))  # litgpt's AdamW is unfused on CPU too
    return time.perf_counter() - t0


def _one(args) -> None:
    """Child process: one timed run; prints `[time] <seconds> <optimizer steps done>`."""
    from litgpt.config import Config

    if not args.compile:
        torch.compile = lambda model, *a, **k: model  # see the docstring
    cfg = Config(name="bench", block_size=args.seq, n_layer=args.layers, n_head=4, n_embd=args.embd,
                 vocab_size=args.vocab, padded_vocab_size=args.vocab, bias=True)
    torch.set_num_threads(args.threads)
    fn = run_litgpt if args.child == "litgpt" else run_ours
    c0 = time.process_time()
    t = fn(Path(args.root), cfg, args.steps, args.global_batch, args.micro, args.seq, f"{args.child}-{args.steps}",
           compile=args.compile)
    print(f"[time] {t:.4f} {time.process_time() - c0:.4f}", flush=True)


def _timed(args, which: str, steps: int, root: Path) -> tuple[float, float]:
    import subprocess
    import sys

    cmd = [sys.executable, __file__, "--child", which, "--steps", str(steps), "--root", str(root)]
    for k in ("layers", "embd", "seq", "vocab", "micro", "global_batch", "threads"):
        cmd += [f"--{k}", str(getattr(args, k))]
    if args.compile:
        cmd.append("--compile")
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{which} run failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    text = out.stdout + out.stderr
    done = (f"Done: budget at step {steps}," in text) if which == "ours" else (f"step {steps} |" in text)
    if not done:
        raise RuntimeError(f"{which} did not run {steps} optimizer steps:\n{text[-3000:]}")
    wall, cpu = text.split("[time] ")[1].split()[:2]
    return float(wall), float(cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", choices=["litgpt", "ours"], help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--n1", type=int, default=4)
    ap.add_argument("--n2", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--embd", type=int, default=128)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--global_batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (1: CPU time = compute time)")
    ap.add_argument("--compile", action="store_true", help="both loops torch.compile (inductor) the model")
    args = ap.parse_args()
    if args.child:
        return _one(args)
    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        make_data(root, args.vocab, n_tokens=(args.n2 + 8) * args.global_batch * (args.seq + 1) * 2)
        tokens = (args.n2 - args.n1) * args.global_batch * args.seq
        # rates[loop] = [(tokens/wall-s, tokens/cpu-s) per repeat]; the median over repeats is reported
        # (a shared machine's load only slows runs; with 1 thread the process CPU time resists it)
        rates = {"litgpt": [], "ours": []}
        if args.compile:  # fill inductor's on-disk cache first: a cold compile (minutes) in N1's run only would not cancel
            for name in rates:
                _timed(args, name, args.n1, root)
        for rep in range(args.repeats):
            for name in ("litgpt", "ours") if rep % 2 == 0 else ("ours", "litgpt"):
                (w1, c1), (w2, c2) = _timed(args, name, args.n1, root), _timed(args, name, args.n2, root)
                rates[name].append((tokens / (w2 - w1), tokens / (c2 - c1)))
                print(f"[bench] repeat {rep} {name}: {args.n1} steps {w1:.2f}s wall / {c1:.2f}s cpu,"
                      f" {args.n2} steps {w2:.2f}s wall / {c2:.2f}s cpu -> {rates[name][-1][0]:,.0f} tok/s wall,"
                      f" {rates[name][-1][1]:,.0f} tok/cpu-s", flush=True)
        rate = {n: tuple(float(np.median([r[i] for r in v])) for i in range(2)) for n, v in rates.items()}
        print(f"[bench] model {args.layers}x{args.embd}, seq {args.seq}, vocab {args.vocab}, micro {args.micro},"
              f" global {args.global_batch}, steps {args.n1} vs {args.n2}, torch threads {args.threads},"
              f" {'both compiled (inductor)' if args.compile else 'both eager'}")
        for i, kind in enumerate(("wall", "cpu")):
            lit, ours = rate["litgpt"][i], rate["ours"][i]
            print(f"[bench] tokens/{kind}-second: litgpt pretrain {lit:,.0f} | litgpt-ext pretrain {ours:,.0f}"
                  f" | ratio ours/litgpt = {ours / lit:.3f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
