"""The training features on a GPU: each one runs through the real `pretrain` entry point in bf16 and
is timed against plain AdamW in the same process, on the same model, data and batch.

    PYTHONPATH=$PWD python benchmarks/gpu_features.py [--json out.json]        # on a GPU
    PYTHONPATH=$PWD python benchmarks/gpu_features.py --device cpu --tiny      # CPU smoke test (minutes)

Features: Muon (+AdamW half), layer-wise LR decay, EWC and the L2 anchor (from the AdamW run's
checkpoint), online mixing (ODM; DoReMi with that checkpoint as reference), an MoE model with
`expert_impl: grouped_mm` vs `loop`, and LoRA when the loop has it. For each: tokens/s over the
steps after the first (the loop's own `tok/s` lines), peak GPU memory, first and last loss
(finite). Random-token shards: the losses show that the code runs and stays finite, not quality. The first line names the device, torch and the model.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
STEP = re.compile(r"^step (\d+)/\d+ \| loss ([\d.]+) .*\| ([\d,]+) tok/s", re.M)


def make_data(root: Path, vocab: int, n_tokens: int) -> None:
    from litgpt_ext.data.shard_io import write_token_shard

    rng = np.random.default_rng(0)
    for name, hi in (("1", vocab), ("m1", vocab // 8)):  # math: a smaller alphabet, so its loss falls faster
        docs = [rng.integers(0, hi, size=4096) for _ in range(n_tokens // 4096 + 1)]
        write_token_shard(root / "data" / name, docs, chunk_tokens=1 << 20)
        write_token_shard(root / "val" / name, docs[:2], chunk_tokens=1 << 20)


def base_config(args, root: Path) -> dict:
    if args.tiny:
        model = {"name": "tiny", "block_size": args.seq, "n_layer": 2, "n_head": 4, "n_embd": 64, "vocab_size": 512,
                 "padded_vocab_size": 512, "bias": True}
    else:  # pythia-70m's shape
        model = {"name": "p70m", "block_size": args.seq, "n_layer": 6, "n_head": 8, "n_embd": 512, "vocab_size": 50254,
                 "padded_vocab_size": 50304, "rotary_percentage": 0.25, "parallel_residual": True, "bias": True}
    return {"model_config": model, "precision": args.precision, "seed": 42, "logger_name": "csv", "devices": 1,
            "data": {"class_path": "litgpt_ext.data.ShardedMixedDataset",
                     "init_args": {"data_path": str(root / "data"), "num_workers": 2, "seed": 42,
                                   "mix_weights_str": "main:0.8,math:0.2",
                                   "val_data_path": {"general": str(root / "val" / "1"), "math": str(root / "val" / "m1")}}},
            "train": {"max_iters": args.steps, "global_batch_size": args.micro_batch, "micro_batch_size": args.micro_batch,
                      "max_seq_length": args.seq, "log_interval": 1, "save_interval": None, "min_lr": 3e-5,
                      "lr_warmup_steps": 2},
            "eval": {"interval": 10**6, "max_iters": 2, "initial_validation": False},
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3, "weight_decay": 0.1}}}


def variants(args, root: Path) -> dict[str, dict]:
    ref = str(root / "out" / "adamw" / "final")
    muon = {"class_path": "torch.optim.Muon", "init_args": {"lr": 0.02, "momentum": 0.95, "weight_decay": 0.1,
                                                             "adjust_lr_fn": "match_rms_adamw"},
            "adamw": {"lr": 1e-3, "weight_decay": 0.1}}
    moe = {"mlp_class_name": "LLaMAMoE", "n_expert": 8, "n_expert_per_token": 2, "intermediate_size": 256 if args.tiny else 1024,
           "moe_intermediate_size": 256 if args.tiny else 1024}
    out = {
        "adamw": {},
        "muon": {"optimizer": muon},
        "llrd": {"optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3, "weight_decay": 0.1},
                               "layer_lr_decay": 0.8}},
        "ewc": {"fork_from": ref, "regularizer": {"type": "ewc", "lambda": 10.0, "reference": ref, "fisher_data": "general",
                                                  "fisher_batches": 2}},
        "l2_anchor": {"fork_from": ref, "regularizer": {"type": "l2_anchor", "lambda": 1.0}},
        "odm": {"mix_policy": {"type": "odm", "update_every": 2, "epsilon": 0.1}},
        "doremi": {"fork_from": ref, "mix_policy": {"type": "doremi", "update_every": 2, "reference": ref}},
        "moe_loop": {"model_config": moe, "moe": {"expert_impl": "loop"}},
        "moe_grouped_mm": {"model_config": moe, "moe": {"expert_impl": "grouped_mm"}},
    }
    from litgpt_ext.train import loop

    if "lora" in loop.pretrain.__code__.co_varnames[:loop.pretrain.__code__.co_argcount]:
        out["lora"] = {"fork_from": ref, "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}
    if args.only:
        out = {k: v for k, v in out.items() if k in args.only or k == "adamw"}
    return out


def run_one(name: str, cfg: dict, root: Path, device: str) -> dict:
    from litgpt_ext.cli import main as cli_main

    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    buf = io.StringIO()
    t0 = time.perf_counter()
    row: dict = {"feature": name}
    try:
        with contextlib.redirect_stdout(buf):
            cli_main(["pretrain", "--config", str(path), "--out_dir", str(root / "out" / name)])
    except BaseException as e:  # noqa: BLE001 - a feature that fails is a row, not the end of the benchmark
        row["error"] = f"{type(e).__name__}: {e}"[:500]
    row["seconds"] = round(time.perf_counter() - t0, 1)
    steps = [(int(s), float(loss), float(r.replace(",", ""))) for s, loss, r in STEP.findall(buf.getvalue())]
    if steps:
        # the loop's `R tok/s` is the rate since it started: step k is done at (k - start) x tokens/step / R_k
        start, tps = steps[0][0] - 1, cfg["train"]["global_batch_size"] * cfg["train"]["max_seq_length"]
        t = {k: (k - start) * tps / r for k, _, r in steps if r > 0}
        (k0, first, _), (k1, last, _) = steps[0], steps[-1]
        row.update(first_loss=first, last_loss=last, steps=k1 - start,
                   tok_per_s=(k1 - k0) * tps / (t[k1] - t[k0]) if k1 > k0 and t[k1] > t[k0] else None)
        row["finite"] = bool(np.isfinite(last))
    if device == "cuda":
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if "error" in row or not steps or row.get("tok_per_s") is None:
        row.setdefault("error", "no step lines")
        row["log_tail"] = buf.getvalue()[-1500:]
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--steps", type=int, default=None, help="default 30 (6 with --tiny)")
    ap.add_argument("--seq", type=int, default=None, help="default 1024 (64 with --tiny)")
    ap.add_argument("--micro_batch", type=int, default=None, help="default 16 (2 with --tiny)")
    ap.add_argument("--precision", default=None, help="default bf16-true on CUDA, 32-true on CPU")
    ap.add_argument("--only", nargs="*", default=None, help="run only these features (plus adamw)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    args.steps = args.steps or (6 if args.tiny else 30)
    args.seq = args.seq or (64 if args.tiny else 1024)
    args.micro_batch = args.micro_batch or (2 if args.tiny else 16)
    args.precision = args.precision or ("bf16-true" if args.device == "cuda" else "32-true")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: use --device cpu --tiny for a smoke test")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"[features] device {name}, torch {torch.__version__}, seq {args.seq}, batch {args.micro_batch},"
          f" {args.steps} steps, {args.precision}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="gpu-features-"))
    rows = []
    try:
        base = base_config(args, root)
        make_data(root, base["model_config"]["vocab_size"], (args.steps + 4) * args.micro_batch * (args.seq + 1) * 2)
        for feature, extra in variants(args, root).items():
            cfg = copy.deepcopy(base)
            for k, v in extra.items():
                cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
            if feature.startswith("moe"):
                cfg["moe"] = extra["moe"]
            if "fork_from" in extra:  # continues the adamw run's checkpoint for the same number of steps
                cfg["train"].pop("max_iters")
                cfg["train"]["max_additional_steps"] = args.steps
            row = run_one(feature, cfg, root, args.device)
            rows.append(row)
            base_rate = rows[0].get("tok_per_s")
            rel = f" ({row['tok_per_s'] / base_rate:.2f}x adamw)" if row.get("tok_per_s") and base_rate else ""
            rate = f"{row['tok_per_s']:,.0f} tok/s{rel}" if row.get("tok_per_s") else "tok/s n/a"
            print(f"[features] {feature}: " + (f"ERROR {row['error']}" if "error" in row else
                  f"{rate}, loss {row['first_loss']:.3f} -> {row['last_loss']:.3f}"
                  f"{'' if row['finite'] else ' NOT FINITE'}, peak {row.get('peak_gib', 'n/a')} GiB,"
                  f" {row['seconds']} s"), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out = {"device": name, "torch": torch.__version__, "args": {k: v for k, v in vars(args).items() if k != "json"},
           "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return out


if __name__ == "__main__":
    main()
