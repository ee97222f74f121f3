"""Expert parallelism sends its token counts on the process group's device: NCCL rejects CPU tensors."""

import pytest
import torch
import torch.distributed as dist

from litgpt_ext.model import expert_parallel as ep


def test_comm_device_follows_the_backend(monkeypatch):
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert ep.comm_device(None) == torch.device("cpu")
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert ep.comm_device(None) == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "cpu:gloo,cuda:nccl")  # mixed: the GPU one
    assert ep.comm_device(None) == torch.device("cuda", 3)


def test_dispatcher_sends_counts_on_the_group_device(monkeypatch):
    """The counts exchange gets device tensors (meta stands in for CUDA, which this machine lacks)."""
    monkeypatch.setattr(ep, "comm_device", lambda group: torch.device("meta"))
    seen = []

    def fake_all_to_all(out, inp, *args, **kwargs):
        seen.append((out.device, inp.device))
        raise RuntimeError("stop after the counts exchange")

    monkeypatch.setattr(dist, "all_to_all_single", fake_all_to_all)
    d = ep.ExpertParallelDispatcher(group=None, ep_size=2, n_expert=4, grad_divisor=2.0)
    with pytest.raises(RuntimeError, match="stop after the counts exchange"):
        d(torch.zeros(3, 8), [1, 0, 2, 0], experts=None)
    assert seen == [(torch.device("meta"), torch.device("meta"))]
