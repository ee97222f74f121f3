"""SFT tokens/s: `litgpt-ext sft` vs litgpt's `finetune_full` on the same checkpoint, data and batch (CPU).

One source checkpoint (a tiny dense model written by our checkpoint writer; `finetune_full` reads it
as is), one instruction set in litgpt's JSON format (a folder with train.json and val.json), the
`alpaca` prompt style, prompt masked in both, the same micro/global batch and max_seq_length, fp32,
AdamW. Each trainer runs in fresh processes for E1 and E2 epochs, `--repeats` times in alternating
order; throughput = (E2 - E1) * (prompt + response tokens of the train set) / (t(E2) - t(E1)),
median over repeats, in wall and in process CPU time (1 torch thread by default, so CPU time is the
compute actually spent, robust to other load on a shared machine). Setup, model load, the final
validation and the final checkpoint cancel out; both count the same non-padding tokens.

    PYTHONPATH=$PWD python benchmarks/sft_throughput.py [--e1 1 --e2 4 --repeats 3 --threads 1]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

WORDS = ("the a cat dog sat ran on under mat log red blue quickly slowly sum of plus minus equals answer question"
         " how many apples does she have left after giving some to her friend").split()


def make_data(root: Path, n: int, vocab: int, layers: int, embd: int, block: int) -> None:
    """train.json/val.json, a tokenizer, and a source checkpoint `root/src/final`."""
    from litgpt import GPT, Config

    from litgpt_ext import checkpoint as ckpt
    from litgpt_ext.prep.tokenizer import train_tokenizer_from_texts
    from litgpt_ext.train.state import TrainingState

    r = random.Random(0)

    def rec() -> dict:
        a, b = r.randint(0, 99), r.randint(0, 99)
        return {"instruction": f"Question: {' '.join(r.choices(WORDS, k=r.randint(8, 40)))} {a} plus {b}?",
                "input": "", "output": f"{' '.join(r.choices(WORDS, k=r.randint(8, 60)))} #### {a + b}"}

    (root / "data").mkdir(parents=True)
    rows = [rec() for _ in range(n)]
    (root / "data" / "train.json").write_text(json.dumps(rows))
    (root / "data" / "val.json").write_text(json.dumps([rec() for _ in range(16)]))
    tok = train_tokenizer_from_texts([json.dumps(x) for x in rows], root / "tok", vocab_size=vocab, min_frequency=1)
    torch.manual_seed(0)
    cfg = Config(name="bench", block_size=block, n_layer=layers, n_head=4, n_embd=embd, vocab_size=vocab,
                 padded_vocab_size=vocab, bias=True)
    ckpt.write_checkpoint(root / "src" / "final", GPT(cfg).state_dict(), TrainingState().to_dict(), cfg, {}, tok)


def run_litgpt(root: Path, args, epochs: int, tag: str) -> float:
    import litgpt.finetune.full as ff
    from litgpt.args import EvalArgs, TrainArgs
    from litgpt.data import JSON

    ff.save_hyperparameters = lambda *a, **k: None  # it re-parses sys.argv (the benchmark's) with litgpt's CLI
    data = JSON(json_path=root / "data", mask_prompt=True, prompt_style="alpaca", num_workers=0, seed=1)
    train = TrainArgs(save_interval=None, log_interval=10**6, global_batch_size=args.global_batch,
                      micro_batch_size=args.micro, lr_warmup_steps=1, epochs=epochs, max_seq_length=args.block,
                      min_lr=0.0)
    out = root / f"out-litgpt-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    ff.setup(checkpoint_dir=root / "src" / "final", out_dir=out, precision="32-true", devices=1, data=data,
             train=train, eval=EvalArgs(interval=10**9, max_iters=1, max_new_tokens=1, initial_validation=False,
                                                          final_validation=True),
             optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-4}}, logger_name="csv", seed=1)
    return time.perf_counter() - t0


def run_ours(root: Path, args, epochs: int, tag: str) -> float:
    from litgpt_ext.sft.config import SFTEvalArgs, SFTTrainArgs
    from litgpt_ext.sft.data import SFTData
    from litgpt_ext.sft.run import sft

    data = SFTData(train_path=root / "data", prompt_style="alpaca", mask_prompt=True)
    train = SFTTrainArgs(epochs=epochs, global_batch_size=args.global_batch, micro_batch_size=args.micro,
                         lr_warmup_fraction=0.0, max_seq_length=args.block, log_interval=10**6)
    out = root / f"out-ours-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    sft(checkpoint_dir=root / "src" / "final", out_dir=out, data=data, train=train,
        eval=SFTEvalArgs(interval=10**6, initial_validation=False),
        optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-4}}, resume=False,
        precision="32-true", devices=1, logger_name="csv", seed=1)
    return time.perf_counter() - t0


def _one(args) -> None:
    torch.set_num_threads(args.threads)
    fn = run_litgpt if args.child == "litgpt" else run_ours
    c0 = time.process_time()
    t = fn(Path(args.root), args, args.epochs, f"{args.child}-{args.epochs}")
    print(f"[time] {t:.4f} {time.process_time() - c0:.4f}", flush=True)


def _timed(args, which: str, epochs: int, root: Path) -> tuple[float, float]:
    cmd = [sys.executable, __file__, "--child", which, "--epochs", str(epochs), "--root", str(root)]
    for k in ("micro", "global_batch", "threads", "block"):
        cmd += [f"--{k}", str(getattr(args, k))]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0 or "[time] " not in out.stdout:
        raise RuntimeError(f"{which} run failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    wall, cpu = out.stdout.split("[time] ")[1].split()[:2]
    return float(wall), float(cpu)


def _train_tokens(root: Path, block: int) -> int:
    """Prompt + response tokens of the train set (no padding), as both trainers see them."""
    from litgpt import Tokenizer

    from litgpt_ext.sft.data import SFTData

    dm = SFTData(train_path=root / "data", prompt_style="alpaca", mask_prompt=True, seed=1)
    dm.connect(Tokenizer(root / "src" / "final"), batch_size=1, max_seq_length=block)
    dm.setup(rank=0, world_size=1)
    return dm.stats["train"]["tokens"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", choices=["litgpt", "ours"], help=argparse.SUPPRESS)
    ap.add_argument("--epochs", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--e1", type=int, default=1)
    ap.add_argument("--e2", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--embd", type=int, default=128)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--global_batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (1: CPU time = compute time)")
    args = ap.parse_args()
    if args.child:
        return _one(args)
    root = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    try:
        make_data(root, args.examples, args.vocab, args.layers, args.embd, args.block)
        tokens = (args.e2 - args.e1) * _train_tokens(root, args.block)
        rates = {"litgpt": [], "ours": []}
        for rep in range(args.repeats):
            for name in ("litgpt", "ours") if rep % 2 == 0 else ("ours", "litgpt"):
                (w1, c1), (w2, c2) = _timed(args, name, args.e1, root), _timed(args, name, args.e2, root)
                rates[name].append((tokens / (w2 - w1), tokens / (c2 - c1)))
                print(f"[bench] repeat {rep} {name}: {args.e1} epochs {w1:.2f}s wall / {c1:.2f}s cpu, {args.e2} epochs"
                      f" {w2:.2f}s wall / {c2:.2f}s cpu -> {rates[name][-1][0]:,.0f} tok/s wall,"
                      f" {rates[name][-1][1]:,.0f} tok/cpu-s", flush=True)
        rate = {n: tuple(float(np.median([r[i] for r in v])) for i in range(2)) for n, v in rates.items()}
        print(f"[bench] model {args.layers}x{args.embd}, max_seq_length {args.block}, vocab {args.vocab},"
              f" {args.examples} examples, micro {args.micro}, global {args.global_batch}, epochs {args.e1} vs"
              f" {args.e2}, torch threads {args.threads}")
        for i, kind in enumerate(("wall", "cpu")):
            lit, ours = rate["litgpt"][i], rate["ours"][i]
            print(f"[bench] tokens/{kind}-second: litgpt finetune_full {lit:,.0f} | litgpt-ext sft {ours:,.0f}"
                  f" | ratio ours/litgpt = {ours / lit:.3f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
