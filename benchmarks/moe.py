"""MoE throughput: our grouped MoE block vs litgpt's `LLaMAMoE`, and EP=2 vs EP=1 on 2 processes.

    PYTHONPATH=. python benchmarks/moe.py                 # both parts (CPU, ~2 min on 2 cores)
    PYTHONPATH=. python benchmarks/moe.py --part block    # only the block comparison

Part 1 (one process): forward+backward tokens/s of one MoE feed-forward on the same shapes and
weights, litgpt's mask-per-expert loop as the baseline. Part 2 (2 gloo processes, FSDP2 on the
dense part through `litgpt_ext.train.parallel.parallelize`): tokens/s of a small MoE GPT training step
(forward, backward, clip, AdamW) with experts replicated (EP=1) and split (EP=2), in the same run,
and the share of step time spent inside the expert all-to-alls. Ratios are against the baseline
measured in the same run; absolute numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from litgpt import Config
from litgpt.model import LLaMAMoE

from litgpt_ext.model import MoEArgs, build_model, moe_aux_loss
from litgpt_ext.model.moe import MoEFeedForward

BLOCK_SHAPES = [  # (n_embd, moe_intermediate_size, n_expert, n_expert_per_token, tokens)
    (256, 512, 8, 2, 2048),
    (256, 256, 32, 4, 2048),
    (512, 1024, 8, 2, 1024),
]


def _moe_config(n_embd, inter, n_expert, k, **kw) -> Config:
    base = dict(n_layer=1, n_embd=n_embd, n_head=max(1, n_embd // 64), vocab_size=256, padded_vocab_size=256,
                block_size=512, mlp_class_name="LLaMAMoE", intermediate_size=inter, moe_intermediate_size=inter,
                n_expert=n_expert, n_expert_per_token=k, bias=False, norm_class_name="RMSNorm",
                rotary_percentage=1.0, parallel_residual=False)
    base.update(kw)
    return Config(**base)


def _time_interleaved(fns: list, warmup: int, iters: int) -> list[list[float]]:
    """Run the candidates in alternation (a, b, a, b, ...) so that load changes on a shared machine
    hit both alike; returns each candidate's step times."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(iters):
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return times


def bench_block(warmup: int, iters: int) -> list[dict]:
    rows = []
    for n_embd, inter, n_expert, k, tokens in BLOCK_SHAPES:
        config = _moe_config(n_embd, inter, n_expert, k)
        torch.manual_seed(0)
        ref = LLaMAMoE(config)
        ours = MoEFeedForward(config)
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(tokens // 256, 256, n_embd)

        def step(mod, x=x):  # bound now: the closure runs in this iteration only
            xi = x.detach().requires_grad_(True)
            mod(xi).square().mean().backward()
            mod.zero_grad(set_to_none=True)

        t_ref, t_ours = map(statistics.median, _time_interleaved([lambda ref=ref: step(ref), lambda ours=ours: step(ours)], warmup, iters))
        row = dict(shape=f"C={n_embd} I={inter} E={n_expert} k={k} tokens={tokens}",
                   litgpt=tokens / t_ref, ours=tokens / t_ours, ratio=t_ref / t_ours)
        rows.append(row)
        print(f"  {row['shape']:<40} litgpt LLaMAMoE {row['litgpt']:>9,.0f} tok/s | grouped {row['ours']:>9,.0f} tok/s"
              f" | x{row['ratio']:.2f}", flush=True)
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ep_worker(rank: int, world: int, port: int, args, out) -> None:
    torch.set_num_threads(args.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    from litgpt_ext.model.expert_parallel import clip_grad_norm_, reset_comm_time
    from litgpt_ext.train.parallel import parallelize

    mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    config = _moe_config(args.n_embd, args.inter, args.n_expert, args.k, n_layer=args.n_layer, n_head=4)
    g = torch.Generator().manual_seed(rank)
    batch = torch.randint(0, 256, (args.micro_batch, args.seq + 1), generator=g)
    comm = {1: 0.0, 2: 0.0}

    def make_step(ep):
        torch.manual_seed(0)
        model = build_model(config, MoEArgs(aux_loss_coef=0.01))
        parallelize(model, mesh, expert_parallel_size=ep)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step():
            reset_comm_time()
            logits = model(batch[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            (loss + moe_aux_loss(model)).backward()
            clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            comm[ep] += reset_comm_time()

        return step

    steps = [make_step(1), make_step(2)]  # same run, alternating steps
    dist.barrier()
    times = _time_interleaved(steps, args.warmup, args.iters)
    results = {}
    tokens = args.iters * args.micro_batch * args.seq * world
    for ep, t in zip((1, 2), times):
        stats = torch.tensor([sum(t), comm[ep]])
        dist.all_reduce(stats)  # mean over ranks of the step time and the all-to-all time
        results[ep] = dict(tok_s=tokens / (stats[0].item() / world), a2a_share=stats[1].item() / stats[0].item())
    if rank == 0:
        out.update(results)
    dist.destroy_process_group()


def bench_ep(args) -> dict:
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_ep_worker, args=(2, _free_port(), args, out), nprocs=2, join=True, start_method="fork")
        res = dict(out)
    r1, r2 = res[1], res[2]
    print(f"  EP=1 (experts replicated, FSDP2 over 2 ranks): {r1['tok_s']:>8,.0f} tok/s")
    print(f"  EP=2 (experts split 2 ways, all-to-all):       {r2['tok_s']:>8,.0f} tok/s | x{r2['tok_s'] / r1['tok_s']:.2f}"
          f" vs EP=1 | all-to-all {100 * r2['a2a_share']:.1f}% of step time")
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("all", "block", "ep"), default="all")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process in the EP part")
    p.add_argument("--n_layer", type=int, default=2)
    p.add_argument("--n_embd", type=int, default=256)
    p.add_argument("--inter", type=int, default=512)
    p.add_argument("--n_expert", type=int, default=8)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--micro_batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    if args.part in ("all", "block"):
        print("Part 1: one MoE feed-forward, forward+backward (median of iters)")
        bench_block(args.warmup, args.iters)
    if args.part in ("all", "ep"):
        print(f"Part 2: MoE GPT training step on 2 gloo processes (n_layer={args.n_layer}, C={args.n_embd}, "
              f"I={args.inter}, E={args.n_expert}, k={args.k}, {args.micro_batch}x{args.seq} tokens per rank)")
        bench_ep(args)


if __name__ == "__main__":
    main()
