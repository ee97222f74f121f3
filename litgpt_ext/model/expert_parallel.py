"""Expert parallelism: shard each MoE layer's experts over the `ep` dimension of a DeviceMesh.

After `apply_expert_parallel`, rank r of the expert-parallel group holds experts
`[r * E/ep, (r + 1) * E/ep)` as DTensors `Shard(0)` on the EP mesh. The router stays replicated
(it is an ordinary parameter, so FSDP shards it with the rest of the dense model). A forward:

1. routes its local tokens and sorts them by global expert id (as in the single-process block);
2. exchanges the per-expert token counts with one `all_to_all_single`, then the tokens with a
   second one (each rank receives the tokens of every rank for its own experts);
3. regroups the received rows by local expert and runs the grouped expert compute;
4. sends the results back with the reverse all-to-all and combines them as usual.

The all-to-alls are autograd functions (backward is the reverse exchange), so gradients of tokens
and of expert weights are exact. Expert weights are kept out of FSDP (pass
`expert_parameters(model)` to `fully_shard(..., ignored_params=...)`): their gradient already sums
the contributions of every rank of the EP group, so it is divided by the data-parallel world size
(FSDP's mean) and, when experts are replicated over several EP groups (world > ep), summed over
the replicas. Because the parameters are DTensors, `get_model_state_dict(full_state_dict=True)` /
Fabric checkpoints gather them into the global `[n_expert, ...]` layout, and distributed
checkpoints reshard across layouts (save under EP=2, load under EP=1 and back).
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from litgpt_ext.model.moe import MoEFeedForward, moe_layers

# seconds spent inside all-to-all calls (forward and backward) since the last reset; for benchmarks
COMM_SECONDS = [0.0]


def reset_comm_time() -> float:
    """Return and zero the time spent in expert-parallel all-to-alls."""
    t, COMM_SECONDS[0] = COMM_SECONDS[0], 0.0
    return t


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> torch.Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    t0 = time.perf_counter()
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    COMM_SECONDS[0] += time.perf_counter() - t0
    return out


class _AllToAll(torch.autograd.Function):
    """all_to_all_single whose backward is the reverse exchange (written out rather than relying on
    functional collectives, which route through ops that gloo may not implement)."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


class _ExpertGrad(torch.autograd.Function):
    """Identity forward; backward sums the expert gradient over replicas and divides by dp size."""

    @staticmethod
    def forward(ctx, w, divisor, replicate_group):
        ctx.divisor, ctx.group = divisor, replicate_group
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        if ctx.group is not None:
            dist.all_reduce(grad, group=ctx.group)
        return grad / ctx.divisor, None, None


def comm_device(group: Any) -> torch.device:
    """The device a process group's collectives take: CUDA (this rank's) for NCCL, CPU for gloo.

    NCCL rejects CPU tensors, so small metadata such as the per-expert token counts must live on
    the GPU there; gloo takes CPU tensors.
    """
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    if "xccl" in backend:
        return torch.device("xpu", torch.xpu.current_device())
    return torch.device("cpu")


class ExpertParallelDispatcher:
    """Moves expert-sorted tokens to the ranks holding their experts and back (see module doc)."""

    def __init__(self, group: Any, ep_size: int, n_expert: int, grad_divisor: float,
                 replicate_group: Any = None) -> None:
        self.group, self.ep, self.n_expert = group, ep_size, n_expert
        self.local = n_expert // ep_size
        self.grad_divisor, self.replicate_group = grad_divisor, replicate_group
        self.device = comm_device(group)

    def __call__(self, xs: torch.Tensor, counts: list[int], experts: nn.Module) -> torch.Tensor:
        ep, local = self.ep, self.local
        send_counts = torch.tensor(counts, dtype=torch.int64, device=self.device)
        recv_counts = torch.empty_like(send_counts)
        t0 = time.perf_counter()
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)  # equal splits of `local`
        COMM_SECONDS[0] += time.perf_counter() - t0
        recv = recv_counts.view(ep, local)  # recv[j, e]: rows from rank j for my local expert e
        recv = recv.cpu()  # one device->host copy: the splits and the regrouping below need host ints
        in_splits = [sum(counts[j * local : (j + 1) * local]) for j in range(ep)]
        out_splits = recv.sum(1).tolist()
        xr = _AllToAll.apply(xs, out_splits, in_splits, self.group)
        # received rows are ordered (source rank, local expert); regroup them by local expert
        row_expert = torch.arange(local).repeat(ep).repeat_interleave(recv.reshape(-1)).to(xs.device)
        perm = torch.argsort(row_expert, stable=True)
        y = experts(xr[perm], recv.sum(0).tolist())
        y = y[torch.argsort(perm)]
        return _AllToAll.apply(y, in_splits, out_splits, self.group)

    def wrap_weight(self, w: torch.Tensor) -> torch.Tensor:
        return _ExpertGrad.apply(w, self.grad_divisor, self.replicate_group)


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` for gradients that live on different DeviceMeshes.

    torch's version stacks the per-parameter norms, which DTensor refuses across meshes (FSDP
    parameters on the data-parallel mesh, experts on the expert-parallel mesh). Here the norm is
    computed per mesh, made a plain tensor (`full_tensor`), and combined. Returns the total norm.
    """
    from torch.distributed.tensor import DTensor

    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    groups: dict[Any, list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault(g.device_mesh if isinstance(g, DTensor) else None, []).append(g)
    norms = []
    for gs in groups.values():
        n = torch.nn.utils.get_total_norm(gs, norm_type=norm_type)
        norms.append(n.full_tensor() if isinstance(n, DTensor) else n)
    norms = [n.float().to(norms[0].device) for n in norms]
    if math.isinf(norm_type):
        total = torch.stack(norms).max()
    else:
        total = torch.stack(norms).pow(norm_type).sum().pow(1.0 / norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"the total norm of order {norm_type} of the gradients is non-finite ({total.item()})")
    coef = float(max_norm) / (float(total) + 1e-6)
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return total


def expert_parameters(model: nn.Module) -> set[nn.Parameter]:
    """The stacked expert weights of every MoE layer (to keep out of FSDP under expert parallelism)."""
    return {p for _, m in moe_layers(model) for p in m.experts.parameters()}


def apply_expert_parallel(
    model: nn.Module,
    ep_mesh: Any,
    replicate_group: Any = None,
    grad_divisor: Optional[float] = None,
) -> nn.Module:
    """Shard every MoE layer's experts over the 1-D `ep_mesh` (in place; returns the model).

    Args:
        ep_mesh: 1-D DeviceMesh of the expert-parallel group (size ep, dividing n_expert).
        replicate_group: process group of the ranks that hold the same experts (world > ep), whose
            expert gradients are summed; None when world == ep.
        grad_divisor: the data-parallel world size (FSDP averages dense gradients over it); default
            the whole world.
    """
    from torch.distributed.tensor import DTensor, Shard

    if ep_mesh.ndim != 1:
        raise ValueError(f"apply_expert_parallel needs a 1-D expert-parallel mesh, got {ep_mesh.ndim} dims")
    ep = ep_mesh.size()
    rank = ep_mesh.get_local_rank()
    layers = moe_layers(model)
    if not layers:
        raise ValueError("expert_parallel_size > 1 but the model has no MoE layers (n_expert=0)")
    divisor = float(grad_divisor if grad_divisor is not None else dist.get_world_size())
    for _, m in layers:
        if m.n_expert % ep:
            raise ValueError(f"n_expert={m.n_expert} is not divisible by expert_parallel_size={ep}")
        local = m.n_expert // ep
        for name, p in list(m.experts.named_parameters(recurse=False)):
            if isinstance(p, DTensor):
                raise ValueError("apply_expert_parallel was already applied to this model")
            shard = p.detach()[rank * local : (rank + 1) * local].clone()
            dt = DTensor.from_local(shard, ep_mesh, [Shard(0)], run_check=False, shape=p.shape, stride=p.stride())
            setattr(m.experts, name, nn.Parameter(dt, requires_grad=p.requires_grad))
        m.dispatcher = ExpertParallelDispatcher(ep_mesh.get_group(), ep, m.n_expert, divisor, replicate_group)
        m.experts.weight_hook = m.dispatcher.wrap_weight
    return model


def expert_parallel_hook(model: nn.Module, dp_mesh: Any, expert_parallel_size: int) -> set[nn.Parameter]:
    """`litgpt_ext.train.parallel` hook: shard experts before FSDP2 wraps the blocks.

    The data-parallel ranks are laid out as a (world/ep, ep) grid: each row of `ep` consecutive
    ranks is one expert-parallel group holding all experts between them; ranks in a column hold the
    same experts and sum their expert gradients. Returns the parameters FSDP must leave alone.
    With `expert_parallel_size == 1` experts are ordinary parameters that FSDP shards with the rest.
    """
    from torch.distributed.device_mesh import init_device_mesh

    layers = moe_layers(model)
    if expert_parallel_size == 1 or not layers:
        if expert_parallel_size > 1:
            raise ValueError(f"expert_parallel_size={expert_parallel_size} but the model has no MoE layers")
        return set()
    world = dp_mesh.size()
    if world % expert_parallel_size:
        raise ValueError(f"expert_parallel_size={expert_parallel_size} must divide the data-parallel size {world}")
    rows = world // expert_parallel_size
    mesh = init_device_mesh(dp_mesh.device_type, (rows, expert_parallel_size),
                            mesh_dim_names=("expert_replicate", "expert_parallel"))
    replicate_group = mesh.get_group("expert_replicate") if rows > 1 else None
    apply_expert_parallel(model, mesh["expert_parallel"], replicate_group, grad_divisor=world)
    return expert_parameters(model)


__all__ = ["comm_device", "expert_parallel_hook", "clip_grad_norm_", "apply_expert_parallel", "expert_parameters", "reset_comm_time", "ExpertParallelDispatcher",
           "MoEFeedForward"]
