import pytest

from litgpt_ext.model import hooks
from litgpt_ext.train import parallel


def test_strategy_choice_and_errors():
    from lightning.fabric.strategies import ModelParallelStrategy

    assert parallel.build_strategy(1, 1) == "auto"
    assert isinstance(parallel.build_strategy(2, 1), ModelParallelStrategy)
    with pytest.raises(ValueError, match="expert_parallel_size=3 must be >= 1 and divide devices x num_nodes = 4"):
        parallel.build_strategy(2, 2, expert_parallel_size=3)
    with pytest.raises(ValueError, match="expert_parallel_size=2 must be >= 1 and divide devices x num_nodes = 1"):
        parallel.build_strategy(1, 1, expert_parallel_size=2)


def test_devices_default_from_slurm(monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    assert parallel.resolve_devices("auto", None) == (4, 2)
    assert parallel.resolve_devices(1, 1) == (1, 1)  # explicit values win
    with pytest.raises(ValueError, match="devices must be a positive int or 'auto', got 0"):
        parallel.resolve_devices(0, None)


def test_parallelize_hook_registry(monkeypatch, tmp_path):
    import torch.distributed as dist
    from litgpt.config import Config
    from litgpt.model import GPT
    from torch.distributed.device_mesh import init_device_mesh

    monkeypatch.setattr(hooks, "_HOOKS", [])
    calls = []
    hook = hooks.register_parallelize_hook(lambda m, mesh, ep: calls.append((type(m).__name__, mesh.size(), ep)))
    hooks.register_parallelize_hook(hook)  # idempotent
    assert hooks._HOOKS == [hook]
    # parallelize runs the registered hook exactly once, before FSDP2 wraps the blocks
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("data_parallel",))
        model = GPT(Config(name="t", block_size=8, n_layer=1, n_head=1, n_embd=8, padded_vocab_size=16))
        parallel.parallelize(model, mesh, expert_parallel_size=1)
        assert calls == [("GPT", 1, 1)]
        assert type(model.transformer.h[0]).__name__.startswith("FSDP")
    finally:
        dist.destroy_process_group()
