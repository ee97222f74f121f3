"""Parallelize hooks: a model part that needs its own sharding (MoE experts under expert parallelism)
registers a function here; `litgpt_ext.train.parallel.parallelize` runs every hook on the unsharded
model before FSDP2 wraps the blocks. The registry lives with the models, so that they never import
the training code that runs them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

from torch import nn

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

# a hook may return parameters it sharded itself (MoE experts under EP): FSDP2 leaves those alone
ParallelizeHook = Callable[[nn.Module, "DeviceMesh", int], Optional[set]]
_HOOKS: list[ParallelizeHook] = []


def register_parallelize_hook(fn: ParallelizeHook) -> ParallelizeHook:
    """Add `fn(model, dp_mesh, expert_parallel_size)`, run before FSDP2 wraps the blocks."""
    if fn not in _HOOKS:
        _HOOKS.append(fn)
    return fn
