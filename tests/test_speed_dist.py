"""Speed knobs and sharded checkpoints with 2 real processes (gloo, FSDP2 on a DeviceMesh):
activation checkpointing gives FSDP2 the same gradients, meta-device init gives each rank the
shards of the plain init, a fused AdamW steps DTensor shards, and a DCP checkpoint written by 2
ranks loads in 1 process and consolidates to a lit_model.pth that litgpt's GPT loads."""

from __future__ import annotations

import io
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from litgpt import GPT, Config

from litgpt_ext.checkpoint import dcp as tdcp
from litgpt_ext.model import MoEArgs, build_model
from litgpt_ext.train import speed as sp
from litgpt_ext.train.speed import SpeedArgs


def dense_config() -> Config:
    return Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, padded_vocab_size=64, block_size=16, bias=True)


def moe_config() -> Config:
    return Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, padded_vocab_size=64, block_size=16,
                  mlp_class_name="LLaMAMoE", intermediate_size=48, moe_intermediate_size=24, n_expert=4,
                  n_expert_per_token=2, bias=False, norm_class_name="RMSNorm", n_shared_expert=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loss(model, x):
    logits = model(x[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def _full_sd(model) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _sharded(cfg, moe, mesh, speed=None, seed=None, state=None, ep=1, meta=False):
    from litgpt_ext.train.parallel import parallelize

    with torch.device("meta") if meta else torch.device("cpu"):
        model = build_model(cfg, moe)
    if state is not None:
        model.load_state_dict(state)
    return parallelize(model, mesh, expert_parallel_size=ep, speed=speed, seed=seed)


def _check_ac(rank, world, mesh):
    for cfg, moe in ((dense_config(), None), (moe_config(), MoEArgs(aux_loss_coef=0.01))):
        torch.manual_seed(0)
        state = build_model(cfg, moe).state_dict()
        x = torch.randint(0, 64, (2 * world, 13), generator=torch.Generator().manual_seed(1)).chunk(world)[rank]
        grads = []
        for speed in (None, SpeedArgs(activation_checkpointing=True)):
            model = _sharded(cfg, moe, mesh, speed=speed, state=state)
            _loss(model, x).backward()
            grads.append({n: p.grad.full_tensor() for n, p in model.named_parameters()})
        assert grads[0].keys() == grads[1].keys()
        for n in grads[0]:
            torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)


def _check_meta_init(rank, world, mesh):
    for cfg, moe, ep in ((dense_config(), None, 1), (moe_config(), MoEArgs(), 1), (moe_config(), MoEArgs(), 2)):
        plain = build_model(cfg, moe)
        sp.init_weights(plain, seed=11)
        model = _sharded(cfg, moe, mesh, speed=SpeedArgs(empty_init=True), seed=11, ep=ep, meta=True)
        assert not sp.has_meta(model)
        local = next(model.transformer.h[0].attn.qkv.parameters()).to_local()
        assert local.shape[0] == 3 * cfg.n_embd // world  # really sharded
        full = _full_sd(model)
        for n, t in plain.state_dict().items():
            assert torch.equal(full[n], t), (n, ep)


def _check_dcp(rank, world, mesh, root: Path):
    cfg = dense_config()
    torch.manual_seed(0)
    state = build_model(cfg).state_dict()
    model = _sharded(cfg, None, mesh, state=state)
    kw = sp.optimizer_kwargs("AdamW", SpeedArgs(fused_optimizer=True), torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, **kw)
    x = torch.randint(0, 64, (2 * world, 13), generator=torch.Generator().manual_seed(1)).chunk(world)[rank]
    for _ in range(2):
        _loss(model, x).backward()
        opt.step()
        opt.zero_grad()
    tdcp.write_sharded_checkpoint(root / "step-00000002", model, opt, {"step": 2, "optimizer": "not saved here"},
                                  cfg, {"seed": 0})
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    # copies: the state dicts alias the live optimizer tensors (e.g. `step`), which the next step changes
    full_opt = _roundtrip(get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True)))
    full_model = _roundtrip(_full_sd(model))
    # the next step under 2 ranks, to compare with a step after loading in 1 process
    _loss(model, x).backward()
    opt.step()
    after = _full_sd(model)
    if rank == 0:
        torch.save({"model": full_model, "optimizer": full_opt, "after": after}, root / "reference.pt")
    dist.barrier()


def _worker(rank: int, world: int, port: int, root: str) -> None:
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool (libgomp hangs)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    # the mesh Lightning's ModelParallelStrategy builds
    mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    try:
        _check_ac(rank, world, mesh)
        _check_meta_init(rank, world, mesh)
        _check_dcp(rank, world, mesh, Path(root))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_speed_knobs_and_sharded_checkpoints_two_ranks(tmp_path):
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")

    ckpt_dir = tmp_path / "step-00000002"
    assert tdcp.is_sharded(ckpt_dir) and not list(tmp_path.glob("*.tmp"))
    assert sorted(p.name for p in (ckpt_dir / tdcp.SHARDED_DIR).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    state = torch.load(ckpt_dir / "training_state.pth", weights_only=False)
    assert state == {"step": 2, "checkpoint_format": "sharded"}  # the optimizer lives in the shards
    ref = torch.load(tmp_path / "reference.pt", weights_only=False)

    # 2 ranks -> 1 process (no process group): model and optimizer equal the full state
    cfg = dense_config()
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tdcp.load_sharded(ckpt_dir, model, opt)
    for n, t in ref["model"].items():
        assert torch.equal(model.state_dict()[n], t), n
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    loaded = get_optimizer_state_dict(model, opt)
    assert loaded["state"].keys() == ref["optimizer"]["state"].keys()
    for n, s in ref["optimizer"]["state"].items():
        for k, v in s.items():
            assert torch.equal(loaded["state"][n][k], v), (n, k)
    # and training continues identically: one more step equals the 2-rank step
    x = torch.randint(0, 64, (4, 13), generator=torch.Generator().manual_seed(1))
    _loss(model, x).backward()
    opt.step()
    for n, t in ref["after"].items():
        if n.endswith("attn.qkv.bias"):  # the key bias's gradient is 0 in exact math: Adam scales float noise to ±lr
            continue
        torch.testing.assert_close(model.state_dict()[n], t, rtol=1e-5, atol=1e-6, msg=n)

    # consolidate -> litgpt's GPT loads it strictly
    out = tmp_path / "consolidated"
    path = tdcp.consolidate(ckpt_dir, out)
    assert path == out / "lit_model.pth" and (out / "model_config.yaml").is_file()
    gpt = GPT(Config.from_file(out / "model_config.yaml"))
    gpt.load_state_dict(torch.load(path, weights_only=True), strict=True)
    for n, t in ref["model"].items():
        assert torch.equal(gpt.state_dict()[n], t), n
    with pytest.raises(FileExistsError, match="lit_model.pth' exists; pass --force"):
        tdcp.consolidate(ckpt_dir, out)
    with pytest.raises(FileNotFoundError, match="is not a sharded checkpoint"):
        tdcp.consolidate(out)


def test_consolidate_cli_error_names_the_path(tmp_path, capsys):
    from litgpt_ext.cli import main

    with pytest.raises(SystemExit) as e:
        main(["consolidate", str(tmp_path)])
    assert "is not a sharded checkpoint" in str(e.value) and str(tmp_path) in str(e.value)
