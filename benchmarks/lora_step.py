"""Cost of a LoRA training step vs a full one on the demo model (CPU), and checkpoint sizes.

    PYTHONPATH=$PWD python benchmarks/lora_step.py [--steps 10 --repeats 5 --threads 1 --r 8]
    PYTHONPATH=$PWD python benchmarks/lora_step.py --device cuda --model pythia-160m --seq 2048 --bf16   # a GPU

The demo config's model (midtrain_configs/demo/pretrain.yaml: 4 layers x 128, 4 heads, vocab 4096,
seq 128, micro batch 8, fp32): forward, litgpt's chunked cross-entropy, backward, AdamW step, as the
loop runs them. "full" trains litgpt's GPT; "lora" trains litgpt's LoRA GPT (`litgpt_ext.model.lora`,
the loop's `lora:` path: base frozen by `mark_only_lora_as_trainable`, AdamW over the adapter only)
with the settings of midtrain_configs/demo/midtrain_math_lora.yaml (r 8 on query, key, value,
projection, mlp; "lora_nodrop": the same without dropout) and with litgpt finetune_lora's default
targets ("lora_qv": query, value). Blocks of `--steps` steps
alternate between the variants, `--repeats` times; per variant the median tokens per CPU-second and
per wall-second, and the median of per-repeat ratios to "full" (each block ran back to back, so slow
drifts in machine load cancel).

On a GPU (`--device cuda`): the same, timed with CUDA synchronization, `--bf16` runs the forward
under bf16 autocast (the loop's bf16-mixed), and each variant's peak memory above what was allocated
before its block (activations, gradients, transients) is reported too.

Sizes: what a checkpoint writes for the model and the optimizer (lit_model.pth / lit_model.pth.lora
and training_state.pth's AdamW state, serialized with torch.save as the writer does).
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import torch


def _bytes(obj) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", choices=["demo", "pythia-160m"], default="demo")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default: the model's block size, 128 for demo)")
    ap.add_argument("--bf16", action="store_true", help="forward under bf16 autocast")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from litgpt import GPT, Config
    from litgpt.lora import mark_only_lora_as_trainable
    from litgpt.utils import chunked_cross_entropy

    from litgpt_ext.checkpoint.lora import LoRAArgs
    from litgpt_ext.model.lora import build_lora_model, load_base
    from litgpt_ext.train.optim import build_optimizer

    if args.model == "demo":
        cfg = Config(name="demo-tiny", block_size=128, n_layer=4, n_head=4, n_embd=128, vocab_size=4096,
                     padded_vocab_size=4096, bias=True)
    else:
        cfg = Config.from_name(args.model)
    seq = args.seq or cfg.block_size
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    full = GPT(cfg)
    import tempfile
    from pathlib import Path

    tmp = Path(tempfile.mkdtemp())
    torch.save(full.state_dict(), tmp / "lit_model.pth")
    variants = {"full": full}
    settings = {"lora": LoRAArgs(r=args.r, alpha=2 * args.r, dropout=0.05,
                                 targets=["query", "key", "value", "projection", "mlp"]),
                "lora_nodrop": LoRAArgs(r=args.r, alpha=2 * args.r, dropout=0.0,
                                        targets=["query", "key", "value", "projection", "mlp"]),
                "lora_qv": LoRAArgs(r=args.r, alpha=2 * args.r, dropout=0.05, targets=["query", "value"])}
    for name, s in settings.items():
        m = build_lora_model(cfg, s)
        load_base(m, tmp, cfg)
        mark_only_lora_as_trainable(m)
        variants[name] = m
    for m in variants.values():
        m.to(device)
        m.max_seq_length = seq
    spec = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3, "weight_decay": 0.0}}
    opts = {k: build_optimizer(spec, m, log=lambda s: None) for k, m in variants.items()}
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (args.micro, seq + 1), generator=g).to(device) for _ in range(8)]

    def step(name: str, i: int) -> None:
        b = batches[i % len(batches)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            logits = variants[name](b[:, :-1])
        loss = chunked_cross_entropy(logits.float(), b[:, 1:])
        loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)

    for name in variants:  # warm-up (and the optimizer state exists for the sizes below)
        step(name, 0)
    tokens = args.steps * args.micro * seq
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    wall: dict[str, list[float]] = {k: [] for k in variants}
    peak: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for rep in range(args.repeats):
        for name in (names if rep % 2 == 0 else names[::-1]):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            c, t = time.process_time(), time.perf_counter()
            for i in range(args.steps):
                step(name, i)
            if cuda:
                torch.cuda.synchronize()
                peak[name].append((torch.cuda.max_memory_allocated() - before) / 2**30)
            cpu[name].append(tokens / (time.process_time() - c))
            wall[name].append(tokens / (time.perf_counter() - t))
        print(f"[bench] repeat {rep}: " + " | ".join(f"{k} {cpu[k][-1]:,.0f} tok/cpu-s" for k in names), flush=True)
    for k in names:
        trainable = sum(p.numel() for p in variants[k].parameters() if p.requires_grad)
        ratio_cpu = statistics.median(a / b for a, b in zip(cpu[k], cpu["full"]))
        ratio_wall = statistics.median(a / b for a, b in zip(wall[k], wall["full"]))
        model = variants[k].state_dict()
        if k != "full":
            model = {n: t for n, t in model.items() if "lora_" in n}
        size = _bytes(model) + _bytes(opts[k].state_dict())
        print(f"[bench] {k}: {trainable:,} trainable parameters | {statistics.median(cpu[k]):,.0f} tok/cpu-s,"
              f" {statistics.median(wall[k]):,.0f} tok/wall-s (medians of {args.repeats}) | step speed vs full:"
              f" {ratio_cpu:.3f}x per CPU-second, {ratio_wall:.3f}x wall | checkpoint weights + AdamW state:"
              f" {size / 2**20:.2f} MiB ({_bytes(model) / 2**20:.2f} MiB weights)"
              + (f" | peak memory above the block's start {statistics.median(peak[k]):.2f} GiB" if cuda else ""))
    print(f"[bench] {cfg.name} ({cfg.n_layer}x{cfg.n_embd}) seq {seq} micro {args.micro}, {'bf16 autocast' if args.bf16 else 'fp32'},"
          f" {args.device}, {args.threads} CPU thread(s), r={args.r}")


if __name__ == "__main__":
    main()
