"""Expert parallelism with 2 real processes (gloo): EP=2 equals the single-process model."""

from __future__ import annotations

import io
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
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool (libgomp hangs)
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


def _fsdp_ep_model(config, moe, mesh, state_dict):
    from torch.distributed.fsdp import fully_shard

    from litgpt_ext.model.expert_parallel import expert_parallel_hook

    model = build_model(config, moe)
    model.load_state_dict(state_dict)
    ignored = expert_parallel_hook(model, mesh, 2)  # what litgpt_ext.train.parallel does before FSDP2
    assert ignored == expert_parameters(model)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    return model


def _roundtrip(obj):
    """Through bytes, as a checkpoint file would (state dicts alias live optimizer tensors)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _step(model, opt, idx, clip):
    _loss(model, idx).backward()
    clip(model.parameters(), 0.5)
    opt.step()
    opt.zero_grad()


LR = 1e-2


def _close_after_adam(actual, expected, steps: int, msg: str) -> None:
    """Weights after `steps` AdamW steps from the same start. Gradients from another reduction order
    differ in the last bits, and Adam divides by sqrt(v): where a gradient is tiny that rounding
    moves an update by a visible fraction of the lr, by an amount that depends on the CPU's kernels
    (1 of 3072 elements off by 3e-5 on an AMD EPYC). So the tolerance is a fraction of the largest
    possible movement (about lr per step): a wrong layout or a missing gradient reduction moves
    weights by the order of lr or of the weights themselves, far outside it."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=0.05 * LR * steps, msg=msg)


def _fsdp_worker(rank: int, world: int, port: int) -> None:
    """FSDP2 on the data-parallel mesh + EP=2 on experts: training steps and checkpoints that move
    between EP=2 and EP=1 (full state dicts in the global expert layout)."""
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool (libgomp hangs)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh

    from litgpt_ext.model.expert_parallel import clip_grad_norm_

    full = StateDictOptions(full_state_dict=True)  # every rank gets the full dict (cpu_offload: rank 0 only)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",))
    try:
        torch.manual_seed(0)
        config, moe = tiny_config(), MoEArgs(aux_loss_coef=0.01)
        ref = build_model(config, moe)
        model = _fsdp_ep_model(config, moe, mesh, ref.state_dict())
        ropt = torch.optim.AdamW(ref.parameters(), lr=LR)
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        g = torch.Generator().manual_seed(1)
        batches = [torch.randint(0, config.vocab_size, (4, 13), generator=g) for _ in range(3)]

        def ref_step(m, o, batch):  # one data-parallel step of the single-process model
            (sum(_loss(m, h) for h in batch.chunk(world)) / world).backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
            o.step()
            o.zero_grad()

        for batch in batches[:2]:
            ref_step(ref, ropt, batch)
            _step(model, opt, batch.chunk(world)[rank], clip_grad_norm_)
        sd = get_model_state_dict(model, options=full)
        assert sd["transformer.h.0.mlp.experts.fc_1"].shape == (4, 24, 32)  # global layout
        for k, v in ref.state_dict().items():
            _close_after_adam(sd[k], v, steps=2, msg=k)

        # save under EP=2 -> resume under EP=1 (a plain single-process model)
        osd = _roundtrip(get_optimizer_state_dict(model, opt, options=full))
        ep1 = build_model(config, moe)
        ep1.load_state_dict(_roundtrip(sd))
        ep1_opt = torch.optim.AdamW(ep1.parameters(), lr=LR)
        set_optimizer_state_dict(ep1, ep1_opt, osd)
        # save under EP=1 -> resume under EP=2 (+FSDP2)
        ep2 = _fsdp_ep_model(config, moe, mesh, build_model(config, moe).state_dict())  # other weights
        ep2_opt = torch.optim.AdamW(ep2.parameters(), lr=LR)
        load = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
        set_model_state_dict(ep2, _roundtrip(ref.state_dict()), options=load)
        set_optimizer_state_dict(ep2, ep2_opt, _roundtrip(get_optimizer_state_dict(ref, ropt)), options=load)
        ref_step(ref, ropt, batches[2])
        ref_step(ep1, ep1_opt, batches[2])
        _step(ep2, ep2_opt, batches[2].chunk(world)[rank], clip_grad_norm_)
        ep2_sd = get_model_state_dict(ep2, options=full)
        for k, v in ref.state_dict().items():
            _close_after_adam(ep1.state_dict()[k], v, steps=3, msg=k)  # loaded the EP=2 weights: 2 + 1 steps
            _close_after_adam(ep2_sd[k], v, steps=1, msg=k)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ep2_with_fsdp2_trains_and_checkpoints_across_layouts():
    mp.start_processes(_fsdp_worker, args=(2, _free_port()), nprocs=2, join=True, start_method="fork")
