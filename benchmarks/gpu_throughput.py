"""GPU throughput and MFU: `litgpt-ext pretrain` vs `litgpt pretrain`, and grouped_mm vs loop experts.

    PYTHONPATH=$PWD python benchmarks/gpu_throughput.py                  # on a GPU: all parts
    PYTHONPATH=$PWD python benchmarks/gpu_throughput.py --dry-run        # print the configs and commands
    PYTHONPATH=$PWD python benchmarks/gpu_throughput.py --device cpu --tiny   # CPU smoke test (minutes)

Part 1 (per model, pythia-160m and pythia-410m at seq 2048 by default): both training loops run
through their public CLI entry points (a generated YAML each, a fresh process each, the same GPU,
model, precision, micro = global batch (no accumulation), AdamW and random-token litdata shards),
in the same invocation. Steps 1..warmup (compilation, allocator warm-up) are excluded: tokens/s
is measured over steps warmup+1..steps from each loop's own log lines:
  * ours prints `step k/N | ... | R tok/s` with R the rate since its loop started, so the time at
    step k is k * tokens_per_step / R_k and the window's rate follows from two lines;
  * litgpt prints `iter time: X ms` per step (measured after a device sync; it excludes fetching
    the batch, which slightly favours litgpt).
MFU = tokens/s x FLOPs/token / (devices x peak), FLOPs/token from `litgpt_ext.train.speed.flops_per_token`
(6N + attention) and peak from the GPU name (dense bf16 table) or `--peak_flops`.
litgpt's pretrain always `torch.compile`s the model; ours gets `speed: {compile: true,
fused_optimizer: auto}` (--ours_compile off runs it eager). On CPU (`--tiny`) both run eager
(TORCHDYNAMO_DISABLE=1: inductor's C++ build takes minutes); `benchmarks/train_loop.py --compile`
is the CPU "both compiled" comparison.

Part 2: a small MoE feed-forward (8 experts, top-2) forward+backward in bf16, `expert_impl:
grouped_mm` (torch._grouped_mm, CUDA only: on CPU it falls back to the loop) vs `loop`.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
OURS_LINE = re.compile(r"^step (\d+)/\d+ \|.*\| ([\d,]+) tok/s \|", re.M)
LITGPT_LINE = re.compile(r"\| iter (\d+) step (\d+) \|.* iter time: ([\d.]+) ms", re.M)


# ------------------------------------------------------------------------------------------ parsing


def ours_window_rate(log: str, tokens_per_step: int, warmup: int) -> float:
    """tokens/s over steps warmup+1.. from our cumulative `R tok/s` lines (see the module doc)."""
    rows = {int(k): float(r.replace(",", "")) for k, r in OURS_LINE.findall(log)}
    if not rows:
        raise ValueError(f"no `step k/N | ... tok/s` lines in our log:\n{log[-2000:]}")
    last = max(rows)
    if warmup not in rows or last <= warmup:
        raise ValueError(f"our log has steps {sorted(rows)}; need step {warmup} (warmup) and a later one")
    t = {k: k * tokens_per_step / r for k, r in rows.items() if r > 0}
    return (last - warmup) * tokens_per_step / (t[last] - t[warmup])


def litgpt_window_rate(log: str, tokens_per_step: int, warmup: int) -> float:
    """tokens/s over steps warmup+1.. from litgpt's per-step `iter time` lines."""
    times = {int(step): float(ms) / 1000 for _, step, ms in LITGPT_LINE.findall(log)}
    window = [t for s, t in times.items() if s > warmup]
    if not window:
        raise ValueError(f"no litgpt `iter time` lines after step {warmup}:\n{log[-2000:]}")
    return len(window) * tokens_per_step / sum(window)


# ------------------------------------------------------------------------------------------ runs


def make_data(root: Path, vocab: int, n_tokens: int) -> None:
    from litgpt_ext.data.shard_io import write_token_shard

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, vocab, size=4096) for _ in range(max(8, n_tokens // 4096 + 1))]
    write_token_shard(root / "lit" / "train", docs, chunk_tokens=1 << 20)
    write_token_shard(root / "lit" / "val", docs[:4], chunk_tokens=1 << 20)
    write_token_shard(root / "ours" / "1", docs, chunk_tokens=1 << 20)


def ours_accepts_speed() -> bool:
    from litgpt_ext.train.loop import pretrain

    return "speed" in inspect.signature(pretrain).parameters


def configs(args, model: dict, root: Path, tag: str) -> tuple[dict, dict]:
    """(ours, litgpt) YAML configs for one model: same model, batch, precision, optimizer."""
    steps, mbs, seq = args.steps, args.micro_batch, args.seq
    common_train = dict(global_batch_size=mbs * args.devices, micro_batch_size=mbs, max_seq_length=seq,
                        log_interval=1, max_norm=1.0, min_lr=3e-5, lr_warmup_steps=2, save_interval=None)
    lr = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-4, "weight_decay": 0.1}}
    ours_opt = json.loads(json.dumps(lr))  # fused on CUDA through speed.fused_optimizer (litgpt fuses on CUDA itself)
    ours = dict(model, out_dir=str(root / f"out-ours-{tag}"), precision=args.precision, devices=args.devices,
                logger_name="csv", seed=42,
                data={"class_path": "litgpt_ext.data.ShardedMixedDataset",
                      "init_args": {"data_path": str(root / "ours"), "num_workers": 2}},
                train=dict(common_train, max_iters=steps),
                eval={"interval": 10**9, "initial_validation": False, "final_validation": False},
                optimizer=ours_opt)
    if ours_accepts_speed():
        ours["speed"] = {"compile": args.device == "cuda" and args.ours_compile == "on", "fused_optimizer": "auto",
                         "activation_checkpointing": args.activation_checkpointing,
                         "peak_flops_per_device": args.peak_flops}
    lit = dict(model, out_dir=str(root / f"out-litgpt-{tag}"), precision=args.precision, devices=args.devices,
               logger_name="csv", seed=42,
               data={"class_path": "litgpt.data.LitData",
                     "init_args": {"data_path": str(root / "lit"), "split_names": ["train", "val"], "num_workers": 2}},
               train=dict(common_train, max_tokens=steps * mbs * args.devices * seq),
               eval={"interval": 10**9, "max_iters": 1, "initial_validation": False, "final_validation": False},
               optimizer=lr)
    return ours, lit


def commands(ours_yaml: Path, lit_yaml: Path) -> dict[str, list[str]]:
    return {"ours": [sys.executable, "-m", "litgpt_ext", "pretrain", "--config", str(ours_yaml)],
            "litgpt": [sys.executable, "-m", "litgpt", "pretrain", "--config", str(lit_yaml)]}


def _run(cmd: list[str], cpu: bool) -> str:
    import os

    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if cpu:  # smoke test: 1 thread, and litgpt's torch.compile off (inductor's C++ build takes minutes)
        env.update(OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
    text = out.stdout + out.stderr
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{text[-4000:]}")
    return text


def bench_models(args, root: Path) -> list[dict]:
    from litgpt import Config

    from litgpt_ext.train.speed import SpeedArgs, device_peak_flops, flops_per_token

    if args.tiny:
        models = {"tiny": {"model_name": "tiny", "model_config": dict(
            name="tiny", block_size=args.seq, n_layer=2, n_head=4, n_embd=64, vocab_size=512,
            padded_vocab_size=512, bias=True)}}
    else:
        models = {name: {"model_name": name} for name in args.models}
    vocab = max(Config(**m["model_config"]).vocab_size if "model_config" in m else Config.from_name(m["model_name"]).vocab_size
                for m in models.values())
    if not args.dry_run:
        make_data(root, vocab, n_tokens=(args.steps + 2) * args.micro_batch * args.devices * (args.seq + 1) * 2)
    peak = args.peak_flops or device_peak_flops(SpeedArgs(), torch.device(args.device))
    results = []
    for tag, model in models.items():
        cfg = Config(**model["model_config"]) if "model_config" in model else Config.from_name(model["model_name"])
        ours, lit = configs(args, model, root, tag)
        ours_yaml, lit_yaml = root / f"ours-{tag}.yaml", root / f"litgpt-{tag}.yaml"
        ours_yaml.write_text(yaml.safe_dump(ours, sort_keys=False))
        lit_yaml.write_text(yaml.safe_dump(lit, sort_keys=False))
        cmds = commands(ours_yaml, lit_yaml)
        if args.dry_run:
            for name in ("ours", "litgpt"):
                print(f"# {tag} / {name}: {' '.join(cmds[name])}\n{yaml.safe_dump(ours if name == 'ours' else lit, sort_keys=False)}")
            continue
        tps = args.micro_batch * args.devices * args.seq
        fpt = flops_per_token(cfg, args.seq)
        row = {"model": tag, "seq": args.seq, "tokens_per_step": tps, "flops_per_token": fpt,
               "ours_compiled": bool(ours.get("speed", {}).get("compile"))}
        for rep in range(args.repeats):
            for name in (("litgpt", "ours") if rep % 2 == 0 else ("ours", "litgpt")):
                t0 = time.perf_counter()
                log = _run(cmds[name], cpu=args.device == "cpu")
                rate = (ours_window_rate if name == "ours" else litgpt_window_rate)(log, tps, args.warmup)
                row.setdefault(name, []).append(rate)
                print(f"[bench] {tag} {name} repeat {rep}: {rate:,.0f} tok/s (steps {args.warmup + 1}-{args.steps};"
                      f" process {time.perf_counter() - t0:.0f}s)", flush=True)
        for name in ("ours", "litgpt"):
            row[name] = statistics.median(row[name])
            row[f"{name}_mfu"] = (row[name] * fpt / (args.devices * peak)) if peak else None
        row["ratio"] = row["ours"] / row["litgpt"]
        results.append(row)
        mfu = lambda v: f"{100 * v:.1f}%" if v is not None else "n/a (no peak: --peak_flops)"  # noqa: E731
        print(f"[bench] {tag}: ours {row['ours']:,.0f} tok/s (MFU {mfu(row['ours_mfu'])}) | litgpt {row['litgpt']:,.0f}"
              f" tok/s (MFU {mfu(row['litgpt_mfu'])}) | ours/litgpt {row['ratio']:.3f}"
              + ("" if row["ours_compiled"] or args.device == "cpu" else " | NOTE: ours ran eager (--ours_compile off)"),
              flush=True)
    return results


# ------------------------------------------------------------------------------------------ MoE


def bench_moe(args) -> Optional[dict]:
    from litgpt import Config

    from litgpt_ext.model import MoEArgs
    from litgpt_ext.model.moe import MoEFeedForward

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n_embd, inter, tokens = (64, 128, 512) if args.tiny else (1024, 2816, 16384)
    cfg = Config(n_layer=1, n_embd=n_embd, n_head=max(1, n_embd // 64), vocab_size=256, padded_vocab_size=256,
                 block_size=512, mlp_class_name="LLaMAMoE", intermediate_size=inter, moe_intermediate_size=inter,
                 n_expert=8, n_expert_per_token=2, bias=False, norm_class_name="RMSNorm")
    if args.dry_run:
        print(f"# MoE: 8 experts top-2, n_embd {n_embd}, expert size {inter}, {tokens} tokens, {dtype}, grouped_mm vs loop")
        return None
    torch.manual_seed(0)
    blocks = {}
    for impl in ("loop", "grouped_mm"):
        torch.manual_seed(0)
        blocks[impl] = MoEFeedForward(cfg, MoEArgs(expert_impl=impl)).to(device=device, dtype=dtype)
    x = torch.randn(tokens, n_embd, device=device, dtype=dtype)

    def step(m):
        y = m(x.view(1, tokens, n_embd))
        y.float().square().mean().backward()

    def timed(m, n):
        for _ in range(2):
            step(m)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            step(m)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return n * tokens / (time.perf_counter() - t0)

    rates = {"loop": [], "grouped_mm": []}
    for rep in range(args.repeats):
        for impl in (("loop", "grouped_mm") if rep % 2 == 0 else ("grouped_mm", "loop")):
            rates[impl].append(timed(blocks[impl], args.moe_iters))
    res = {k: statistics.median(v) for k, v in rates.items()}
    res["ratio"] = res["grouped_mm"] / res["loop"]
    note = "" if device.type == "cuda" else " (CPU: grouped_mm falls back to the loop, so ~1.0 is expected)"
    print(f"[bench] MoE 8 experts top-2, {dtype}: grouped_mm {res['grouped_mm']:,.0f} tok/s | loop {res['loop']:,.0f}"
          f" tok/s | grouped_mm/loop {res['ratio']:.2f}{note}", flush=True)
    return res


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model, seq 64, few steps: a CPU smoke test")
    ap.add_argument("--dry-run", action="store_true", help="write and print the configs and commands, run nothing")
    ap.add_argument("--models", nargs="+", default=["pythia-160m", "pythia-410m"])
    ap.add_argument("--part", choices=["all", "loop", "moe"], default="all")
    ap.add_argument("--seq", type=int, default=None, help="default 2048 (64 with --tiny)")
    ap.add_argument("--micro_batch", type=int, default=None, help="per device; default 8 (2 with --tiny)")
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run; default 30 (6 with --tiny)")
    ap.add_argument("--warmup", type=int, default=None, help="steps excluded; default 10 (2 with --tiny)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--moe_iters", type=int, default=20)
    ap.add_argument("--precision", default=None, help="default bf16-true on CUDA, 32-true on CPU")
    ap.add_argument("--peak_flops", type=float, default=None, help="peak FLOP/s per device (default: from the GPU name)")
    ap.add_argument("--ours_compile", choices=["on", "off"], default="on", help="speed.compile for ours on CUDA")
    ap.add_argument("--activation_checkpointing", action="store_true", help="speed.activation_checkpointing for ours")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    tiny = args.tiny
    args.seq = args.seq or (64 if tiny else 2048)
    args.micro_batch = args.micro_batch or (2 if tiny else 8)
    args.steps = args.steps or (6 if tiny else 30)
    args.warmup = args.warmup if args.warmup is not None else (2 if tiny else 10)
    args.precision = args.precision or ("bf16-true" if args.device == "cuda" else "32-true")
    if args.warmup >= args.steps:
        raise SystemExit(f"--warmup {args.warmup} must be below --steps {args.steps}")
    if args.device == "cuda" and not torch.cuda.is_available() and not args.dry_run:
        raise SystemExit("no CUDA device here: use --device cpu --tiny for a smoke test, or --dry-run")
    if args.device == "cuda" and torch.cuda.is_available():
        print(f"[bench] device: {torch.cuda.get_device_name()} x {args.devices}, torch {torch.__version__}")
    root = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    out: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "args": vars(args)}
    try:
        if args.part in ("all", "loop"):
            out["loops"] = bench_models(args, root)
        if args.part in ("all", "moe"):
            out["moe"] = bench_moe(args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return out


if __name__ == "__main__":
    main()
