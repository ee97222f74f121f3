"""Expert parallelism with 2 real processes (gloo): EP=2 equals the single-process model."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from litgpt import Config

from litgpt_ext.model import MoEArgs, build_model, moe_aux_loss
from litgpt_ext.model.expert_parallel import apply_expert_parallel, expert_parameters


def tiny_config(**kw) -> Config:
    base = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=64, padded_vocab_size=64, block_size=16,
                mlp_class_name="LLaMAMoE", intermediate_size=48, moe_intermediate_size=24, n_expert=4,
                n_expert_per_token=2, bias=False, norm_class_name="RMSNorm", rotary_percentage=1.0,
                parallel_residual=False, n_shared_expert=1)
    base.update(kw)
    return Config(**base)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loss(model, idx):
    logits = model(idx[:, :-1])
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))
    return ce + moe_aux_loss(model)


def _worker(rank: int, world: int, port: int, cases: list) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    try:
        for cfg_kw, moe_kw in cases:
            torch.manual_seed(0)
            config, moe = tiny_config(**cfg_kw), MoEArgs(**moe_kw)
            ref = build_model(config, moe)
            model = build_model(config, moe)
            model.load_state_dict(ref.state_dict())
            apply_expert_parallel(model, mesh)
            g = torch.Generator().manual_seed(1)
            batch = torch.randint(0, config.vocab_size, (4, 13), generator=g)  # the global batch
            halves = batch.chunk(world)

            # reference: the single-process model on the same global batch (each rank's half is a
            # micro-batch, as data parallelism sees it; the loss is their mean)
            ref_loss = sum(_loss(ref, h) for h in halves) / world
            ref_loss.backward()

            loss = _loss(model, halves[rank])
            loss.backward()
            dist_loss = loss.detach().clone()
            dist.all_reduce(dist_loss)
            torch.testing.assert_close(dist_loss / world, ref_loss.detach(), rtol=1e-5, atol=1e-6)

            experts = expert_parameters(model)
            ref_params = dict(ref.named_parameters())
            n_checked = 0
            for name, p in model.named_parameters():
                if p in experts:  # DTensor shard: gather the global [n_expert, ...] gradient
                    grad = p.grad.full_tensor()
                    assert p.to_local().shape[0] == config.n_expert // world
                else:  # replicated: average like data parallelism (FSDP) would
                    grad = p.grad.clone()
                    dist.all_reduce(grad)
                    grad /= world
                torch.testing.assert_close(grad, ref_params[name].grad, rtol=1e-4, atol=1e-6, msg=name)
                n_checked += 1
            assert n_checked == len(ref_params)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ep2_matches_single_process():
    cases = [
        ({}, dict(aux_loss_coef=0.01)),  # softmax top-2 + shared expert + aux loss
        ({"n_shared_expert": None}, dict(gate="sigmoid", capacity_factor=1.0, bias_update_rate=0.01)),
    ]
    # fork: the children inherit the imported torch/litgpt (importing lightning costs ~10 s a process)
    mp.start_processes(_worker, args=(2, _free_port(), cases), nprocs=2, join=True, start_method="fork")
