"""The Fabric strategy: plain on one device, FSDP2 (`fully_shard` per transformer block) on a
DeviceMesh otherwise.

Lightning's `FSDPStrategy` (FSDP1) refuses CPU; `ModelParallelStrategy` with `fully_shard` runs on
CPU (gloo) and GPU (nccl) alike, so the same code path is tested here with 2 CPU processes.

Hook for expert parallelism: modules that need their own sharding (MoE experts) register a
function with `litgpt_ext.model.hooks.register_parallelize_hook`; it runs on the unsharded model before the FSDP2 wrapping,
receives the data-parallel mesh and `expert_parallel_size`, and may shard/replace modules
(e.g. `fully_shard` experts over an expert mesh). With no hook registered, `expert_parallel_size`
must be 1.
"""

from __future__ import annotations

import os
from functools import partial
from typing import TYPE_CHECKING, Literal, Optional, Union

import torch
from torch import nn

from litgpt_ext.model import hooks

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from litgpt_ext.train.speed import SpeedArgs

def parallelize(model: nn.Module, device_mesh: "DeviceMesh", expert_parallel_size: int = 1,
                speed: Optional["SpeedArgs"] = None, seed: Optional[int] = None) -> nn.Module:
    """FSDP2: shard every transformer block, then the root (embeddings, head, final norm).

    With `speed` (litgpt_ext.train.speed.SpeedArgs): activation checkpointing before sharding;
    after it, a meta-device model is materialized on this rank's device and initialized (`seed`),
    then compiled per block.
    """
    from torch.distributed.fsdp import fully_shard

    dp_mesh = device_mesh["data_parallel"]
    if expert_parallel_size > 1 and not hooks._HOOKS:
        raise ValueError(
            f"expert_parallel_size={expert_parallel_size} needs an MoE model that registers a parallelize hook"
            " (litgpt_ext.model.hooks.register_parallelize_hook); a dense model takes expert_parallel_size=1"
        )
    if speed is not None and speed.activation_checkpointing:
        from litgpt_ext.train.speed import apply_activation_checkpointing

        apply_activation_checkpointing(model)
    ignored: set = set()
    for hook in hooks._HOOKS:
        ignored |= set(hook(model, dp_mesh, expert_parallel_size) or ())  # params sharded by the hook
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    if blocks is None:
        raise TypeError(f"cannot find transformer blocks (model.transformer.h) in {type(model).__name__}")
    for block in blocks:
        fully_shard(block, mesh=dp_mesh, ignored_params=ignored or None)
    fully_shard(model, mesh=dp_mesh, ignored_params=ignored or None)
    if speed is not None:
        from litgpt_ext.train.speed import apply_speed

        apply_speed(model, speed, seed, _mesh_device(dp_mesh), distributed=True)
    return model


def _count(value: Union[str, None]) -> Union[int, None]:
    """First count of a SLURM per-node list: '2', '2(x3)', '2,1' -> 2."""
    head = (value or "").split(",")[0].split("(")[0]
    return int(head) if head.isdigit() else None


def _mesh_device(mesh: "DeviceMesh") -> torch.device:
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type, getattr(torch, mesh.device_type).current_device())


def slurm_defaults() -> tuple[Union[int, None], Union[int, None]]:
    """(devices per node, nodes) from the SLURM environment, None where SLURM does not say."""
    dev = (_count(os.environ.get("SLURM_NTASKS_PER_NODE")) or _count(os.environ.get("SLURM_TASKS_PER_NODE"))
           or _count(os.environ.get("SLURM_GPUS_ON_NODE")))
    nodes = os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES")
    return dev, (int(nodes) if nodes and nodes.isdigit() else None)


def _slurm_tasks() -> Union[int, None]:
    """SLURM's task count when SLURM launched this process as one rank of a job (as Lightning's
    SLURMEnvironment.detect decides: interactive `salloc` shells named bash/interactive are not)."""
    ntasks = os.environ.get("SLURM_NTASKS", "")
    if not ntasks.isdigit() or os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    return int(ntasks)


def resolve_devices(devices: Union[int, Literal["auto"]], num_nodes: Union[int, None]) -> tuple[int, int]:
    """(devices per node, nodes); under SLURM the world size must equal SLURM's task count."""
    slurm_dev, slurm_nodes = slurm_defaults()
    if devices == "auto" or devices == -1:
        devices = slurm_dev or (torch.cuda.device_count() or 1)
    if not isinstance(devices, int) or devices < 1:
        raise ValueError(f"devices must be a positive int or 'auto', got {devices!r}")
    num_nodes = num_nodes or slurm_nodes or 1
    tasks = _slurm_tasks()
    if tasks is not None and tasks != devices * num_nodes:
        # otherwise every task would run its own independent training into the same out_dir
        per_node = os.environ.get("SLURM_NTASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE") or "?"
        raise ValueError(
            f"SLURM runs {tasks} task(s) (tasks per node {per_node}, {slurm_nodes or 1} node(s)) but this run's world"
            f" size is devices={devices} x num_nodes={num_nodes} = {devices * num_nodes}: one task per device."
            f" Set devices: auto (or {max(tasks // (slurm_nodes or 1), 1)}), or submit with"
            f" --ntasks-per-node={devices} --nodes={num_nodes}"
        )
    return devices, num_nodes


def build_strategy(devices: int, num_nodes: int = 1, expert_parallel_size: int = 1,
                   speed: Optional["SpeedArgs"] = None, seed: Optional[int] = None):
    """'auto' for one process; FSDP2 over all data-parallel ranks otherwise (applying `speed`'s
    activation checkpointing, meta-device materialization and compile around the sharding)."""
    world = devices * num_nodes
    if expert_parallel_size < 1 or world % expert_parallel_size:
        raise ValueError(
            f"expert_parallel_size={expert_parallel_size} must be >= 1 and divide devices x num_nodes = {world}"
        )
    if world == 1:
        return "auto"
    from lightning.fabric.strategies import ModelParallelStrategy

    if expert_parallel_size > 1:
        return _ExpertParallelStrategy(
            parallelize_fn=partial(parallelize, expert_parallel_size=expert_parallel_size, speed=speed, seed=seed),
            data_parallel_size=world,
            tensor_parallel_size=1,
        )
    return ModelParallelStrategy(
        parallelize_fn=partial(parallelize, expert_parallel_size=expert_parallel_size, speed=speed, seed=seed),
        data_parallel_size=world,
        tensor_parallel_size=1,
    )


def _ep_strategy_class():
    from lightning.fabric.strategies import ModelParallelStrategy

    class ExpertParallelStrategy(ModelParallelStrategy):
        """FSDP2 + expert parallelism. Gradient clipping must combine norms from two meshes (FSDP
        parameters on the data-parallel mesh, experts on the expert-parallel mesh), which
        `torch.nn.utils.clip_grad_norm_` refuses to stack."""

        def clip_gradients_norm(self, module, optimizer, max_norm, norm_type=2.0, error_if_nonfinite=True):
            from litgpt_ext.model.expert_parallel import clip_grad_norm_

            self.precision.unscale_gradients(optimizer)
            return clip_grad_norm_(self.precision.main_params(optimizer), max_norm, norm_type, error_if_nonfinite)

    return ExpertParallelStrategy


def _ExpertParallelStrategy(**kw):  # noqa: N802  (lazy: lightning is imported only when needed)
    return _ep_strategy_class()(**kw)
