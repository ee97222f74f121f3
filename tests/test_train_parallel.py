import pytest

from litgpt_ext import parallel


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


def test_parallelize_hook_registry(monkeypatch):
    monkeypatch.setattr(parallel, "_HOOKS", [])
    calls = []
    hook = parallel.register_parallelize_hook(lambda m, mesh, ep: calls.append(ep))
    parallel.register_parallelize_hook(hook)  # idempotent
    assert parallel._HOOKS == [hook]
