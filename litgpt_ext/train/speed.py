"""Speed knobs for GPU clusters: torch.compile, activation checkpointing, fused AdamW, meta-device
init, sharded checkpoints, and MFU.

The config section (`speed:` in a run's YAML) is `SpeedArgs`. Each knob is applied by one function
with one call point in the loop's setup:

    with empty_init_context(speed):                        # meta-device build (no memory, no RNG)
        model = build_model(config, moe)
    init_weights(model, seed)                             # plain build: seeded init (no-op on meta)
    strategy = build_strategy(..., speed=speed, seed=seed) # FSDP2: AC + compile + materialize per rank
    model = fabric.setup(model)                           # (parallel.parallelize runs apply_speed)
    # one device (strategy "auto"): apply_speed(model, speed, seed, fabric.device) before fabric.setup
    opt = instantiate_torch_optimizer(optimizer, params, **optimizer_kwargs(optimizer, speed, device))

Activation checkpointing and compile replace each block's `forward` (not the module), so
state-dict keys, FSDP2's hooks and checkpoints are the same with and without them.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator, Literal, Optional, Union

import torch
from torch import nn

CHECKPOINT_FORMATS = ("full", "sharded")


@dataclass
class SpeedArgs:
    """Speed and scale options (`speed:` section)."""

    compile: Union[bool, Literal["blocks", "model"]] = False
    """torch.compile: "blocks" compiles each transformer block's forward, "model" the whole model's
    forward; true = "model" on one device, "blocks" under FSDP2 (whose hooks sit between blocks)"""
    compile_backend: str = "inductor"
    """torch.compile backend (inductor; aot_eager traces without generating kernels, for debugging)"""
    activation_checkpointing: bool = False
    """Recompute each transformer block's activations in backward (less memory, ~1/3 more compute)"""
    fused_optimizer: Union[bool, Literal["auto"]] = "auto"
    """torch's fused Adam/AdamW kernel: auto = on GPUs (accelerators) when the optimizer supports it, CPU
    keeps torch's default; true = required (CPU too); false = never"""
    empty_init: bool = False
    """Build the model on the meta device, shard it, then materialize and initialize each rank's shard
    (same values as a full init with the same seed); ignored when weights are loaded"""
    checkpoint_format: Literal["full", "sharded"] = "full"
    """full: rank 0 writes lit_model.pth; sharded: every rank writes its shards with
    torch.distributed.checkpoint (`litgpt-ext consolidate` converts to lit_model.pth)"""
    peak_flops_per_device: Optional[float] = None
    """Peak FLOP/s of one device for MFU (default: looked up from the GPU name for bf16)"""

    def __post_init__(self) -> None:
        if not (isinstance(self.compile, bool) or self.compile in ("blocks", "model")):
            raise ValueError(f"speed.compile must be one of false, true, blocks, model; got {self.compile!r}")
        if not isinstance(self.compile_backend, str) or not self.compile_backend:
            raise ValueError(f"speed.compile_backend must be a torch.compile backend name, got {self.compile_backend!r}")
        if not isinstance(self.activation_checkpointing, bool):
            raise ValueError(f"speed.activation_checkpointing must be true or false, got {self.activation_checkpointing!r}")
        if self.fused_optimizer not in (True, False, "auto"):
            raise ValueError(f"speed.fused_optimizer must be true, false or auto, got {self.fused_optimizer!r}")
        if not isinstance(self.empty_init, bool):
            raise ValueError(f"speed.empty_init must be true or false, got {self.empty_init!r}")
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f"speed.checkpoint_format must be full or sharded, got {self.checkpoint_format!r}")
        p = self.peak_flops_per_device
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not p > 0 or math.isinf(p)):
            raise ValueError(f"speed.peak_flops_per_device must be a positive number of FLOP/s (e.g. 989e12), got {p!r}")

    def compile_scope(self, distributed: bool) -> Optional[str]:
        """None, "blocks" or "model" for this run."""
        if self.compile is False:
            return None
        if self.compile is True:
            return "blocks" if distributed else "model"
        return self.compile


# ------------------------------------------------------------------------------------------ model


def _blocks(model: nn.Module) -> nn.ModuleList:
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    if blocks is None:
        raise TypeError(f"cannot find transformer blocks (model.transformer.h) in {type(model).__name__}")
    return blocks


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Non-reentrant checkpointing of every transformer block (in place; keys unchanged).

    Call before FSDP2's `fully_shard`: FSDP2 unshards a block's parameters in its pre-backward hook,
    which runs before the recomputation. torch's `checkpoint_wrapper` would add
    `_checkpoint_wrapped_module.` to every key; wrapping `forward` keeps litgpt's checkpoint layout.
    """
    from torch.utils.checkpoint import checkpoint

    for block in _blocks(model):
        if getattr(block, "_litgpt_ext_ac", False):
            continue
        block.forward = partial(checkpoint, block.forward, use_reentrant=False)
        block._litgpt_ext_ac = True
    return model


def apply_compile(model: nn.Module, scope: str, backend: str = "inductor") -> nn.Module:
    """torch.compile each block's forward ("blocks") or the model's forward ("model"), in place.

    Module hooks (FSDP2's all-gathers) stay outside the compiled code, and keys stay litgpt's
    (`torch.compile(module)` would prefix them with `_orig_mod.`).
    """
    if scope not in ("blocks", "model"):
        raise ValueError(f"compile scope must be blocks or model, got {scope!r}")
    targets = list(_blocks(model)) if scope == "blocks" else [model]
    for m in targets:
        if not getattr(m, "_litgpt_ext_compiled", False):
            m.forward = torch.compile(m.forward, backend=backend)
            m._litgpt_ext_compiled = True
    return model


def apply_speed(model: nn.Module, speed: SpeedArgs, seed: Optional[int] = None,
                device: Optional[torch.device] = None, distributed: bool = False) -> nn.Module:
    """Activation checkpointing, then (meta models) materialize + init on `device`, then compile.

    One device: call on the model before `fabric.setup`. FSDP2: `parallel.parallelize` calls the
    AC part before `fully_shard` and the rest after it (see `parallel.parallelize`).
    """
    if speed.activation_checkpointing:
        apply_activation_checkpointing(model)
    if has_meta(model):
        if seed is None:
            raise ValueError("speed.empty_init: materializing a meta-device model needs the run's seed")
        materialize_(model, device or torch.device("cpu"), seed)
    scope = speed.compile_scope(distributed)
    if scope:
        apply_compile(model, scope, speed.compile_backend)
    return model


# --------------------------------------------------------------------------- init / meta device


@contextlib.contextmanager
def empty_init_context(speed: Optional[SpeedArgs]) -> Iterator[None]:
    """Build under this: on the meta device when `speed.empty_init`, else as usual."""
    if speed is not None and speed.empty_init:
        with torch.device("meta"):
            yield
    else:
        yield


def has_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def install_init(model: nn.Module) -> None:
    """Point every module's `reset_parameters` at litgpt's GPT-NeoX pretraining init
    (`litgpt.pretrain.initialize_weights`, incl. proj = 1/sqrt(C)/n_layer) and our MoE modules at
    `initialize_moe_weights`' stds, without running it."""
    from litgpt.model import CausalSelfAttention, LLaMAMLP

    from litgpt_ext.model.moe import GroupedExperts, Router

    cfg = model.config
    std, proj_std = math.sqrt(2.0 / 5 / cfg.n_embd), 1 / math.sqrt(cfg.n_embd) / cfg.n_layer

    def normal(module: nn.Module, std: float) -> None:
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)

    for mod in model.modules():
        if isinstance(mod, (nn.Embedding, nn.Linear, Router)):
            mod.reset_parameters = partial(normal, mod, std=std)
        elif isinstance(mod, GroupedExperts):
            mod.reset_parameters = partial(GroupedExperts.reset_parameters, mod, std=std, proj_std=proj_std)
    for mod in model.modules():
        if isinstance(mod, (LLaMAMLP, CausalSelfAttention)):
            mod.proj.reset_parameters = partial(normal, mod.proj, std=proj_std)


def _modules_with_state(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules()
            if any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))]


@torch.no_grad()
def init_weights(model: nn.Module, seed: int) -> None:
    """Seeded litgpt init of a plain (unsharded, materialized) model: the reference `materialize_`
    reproduces. Reseeds so that the values do not depend on what the constructor drew."""
    install_init(model)
    torch.manual_seed(seed)
    for mod in _modules_with_state(model):
        if callable(getattr(mod, "reset_parameters", None)):
            mod.reset_parameters()


@torch.no_grad()
def materialize_(model: nn.Module, device: torch.device, seed: int) -> nn.Module:
    """Allocate a meta-device (possibly FSDP2/EP-sharded) model on `device` and initialize it with
    exactly the values `init_weights(plain_model, seed)` gives.

    Lightning's materialization calls `reset_parameters` on each rank's shards, which draws
    different numbers than a full init. Here each module's init runs on full-size temporaries (one
    module at a time, so peak extra memory is the largest module, e.g. the embedding) and each rank
    keeps its slice: ranks stay in lockstep on the RNG without communicating.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    install_init(model)
    model.to_empty(device=device)
    for buf in model.buffers():  # MoE load counters and router biases start at 0; rope is recomputed below
        buf.zero_()
    torch.manual_seed(seed)
    for mod in _modules_with_state(model):
        reset = getattr(mod, "reset_parameters", None)
        if not callable(reset):
            continue
        sharded = {n: p for n, p in mod.named_parameters(recurse=False) if isinstance(p, DTensor)}
        full = {n: nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device), p.requires_grad)
                for n, p in sharded.items()}
        for n, t in full.items():
            mod._parameters[n] = t
        try:
            reset()
        finally:
            for n, p in sharded.items():
                mod._parameters[n] = p
        for n, p in sharded.items():
            local = distribute_tensor(full[n].data, p.device_mesh, p.placements, src_data_rank=None).to_local()
            p.to_local().copy_(local)
    return model


# ------------------------------------------------------------------------------------------ optimizer

_FUSED = {"Adam", "AdamW", "SGD", "Adagrad"}  # torch optimizers that take `fused=True`


def optimizer_kwargs(optimizer: Union[str, dict], speed: SpeedArgs, device: torch.device,
                     dtype: torch.dtype = torch.float32) -> dict:
    """Extra kwargs for `litgpt.utils.instantiate_torch_optimizer`: `{"fused": True}` or `{}`."""
    if speed.fused_optimizer is False:
        return {}
    if speed.fused_optimizer == "auto" and torch.device(device).type == "cpu":
        return {}  # auto fuses on accelerators; CPU keeps torch's default (same numbers as before the knob)
    path = optimizer if isinstance(optimizer, str) else str(optimizer.get("class_path", ""))
    name = path.rsplit(".", 1)[-1]
    from torch.optim.optimizer import _get_fused_kernels_supported_devices  # torch's own capability list

    reasons = []
    if name not in _FUSED:
        reasons.append(f"optimizer {path!r} has no fused kernel (torch fuses {', '.join(sorted(_FUSED))})")
    if torch.device(device).type not in _get_fused_kernels_supported_devices():
        reasons.append(f"device {str(device)!r} has no fused optimizer kernels")
    if not dtype.is_floating_point or dtype == torch.float64 and torch.device(device).type == "mps":
        reasons.append(f"parameters of dtype {dtype} cannot use the fused kernel")
    if not reasons:
        return {"fused": True}
    if speed.fused_optimizer is True:
        raise ValueError("speed.fused_optimizer=true but " + "; ".join(reasons) + " (use auto or false)")
    return {}


# ------------------------------------------------------------------------------------------ MFU

# Dense bf16 tensor-core peak FLOP/s per device (no 2:4 sparsity), from NVIDIA's datasheets.
# Lightning's table (lightning.fabric.utilities.throughput) lists H200 at its sparse 2 PFLOP/s;
# MFU must use the dense figure. Matched against torch.cuda.get_device_name(), most specific first.
PEAK_BF16_FLOPS: list[tuple[tuple[str, ...], float]] = [
    (("gh200",), 989e12),
    (("h200", "nvl"), 835e12),
    (("h200",), 989e12),
    (("h100", "nvl"), 835e12),
    (("h100", "pcie"), 756e12),
    (("h100",), 989e12),  # SXM / HBM3
    (("h800", "pcie"), 756e12),
    (("h800",), 989e12),
    (("b200",), 2250e12),
    (("a100",), 312e12),
    (("a800",), 312e12),
    (("l40s",), 362e12),
    (("l40",), 181e12),
    (("l4",), 121e12),
    (("a10g",), 70e12),
    (("a6000",), 155e12),
]


def peak_flops_for(device_name: str) -> Optional[float]:
    """Dense bf16 peak FLOP/s for a GPU name (e.g. 'NVIDIA H100 80GB HBM3'), or None if unknown."""
    name = device_name.lower()
    for keys, flops in PEAK_BF16_FLOPS:
        if all(k in name for k in keys):
            return flops
    return None


def device_peak_flops(speed: Optional[SpeedArgs], device: torch.device) -> Optional[float]:
    """The config's `peak_flops_per_device`, else the table's bf16 figure for this GPU, else None (CPU)."""
    if speed is not None and speed.peak_flops_per_device:
        return float(speed.peak_flops_per_device)
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        return peak_flops_for(torch.cuda.get_device_name(device))
    return None


def flops_per_token(config: Any, seq_len: int, training: bool = True) -> float:
    """Model FLOPs per token: 2 x (active matmul parameters) + attention scores, x3 for training.

    Matmul parameters are every Linear weight a token goes through: attention qkv and proj, the
    MLP (for MoE the router, the top-k routed experts and the shared experts; dense layers of
    `first_k_dense_replace` too) and the LM head. Embedding lookups, norms and biases are not
    matmuls. Attention: QK^T and AV cost 2 x 2 x seq x (n_head x head_size) per token and layer,
    counted over the full sequence (no causal halving: what the kernels compute and what torch's
    FlopCounter and PaLM's MFU count). Backward = 2 x forward.
    """
    c = config
    d, hs = c.n_embd, c.head_size
    attn_w = d * (c.n_head + 2 * c.n_query_groups) * hs + c.n_head * hs * d
    mults = {"GptNeoxMLP": 2, "GemmaMLP": 3, "LLaMAMLP": 3, "LLaMAMoE": 3}
    if c.mlp_class_name not in mults:
        raise ValueError(f"flops_per_token does not know mlp_class_name={c.mlp_class_name!r}; known: {', '.join(mults)}")
    dense_mlp = (2 if c.mlp_class_name == "GptNeoxMLP" else 3) * d * c.intermediate_size
    per_layer = []
    for i in range(c.n_layer):
        if c.mlp_class_name == "LLaMAMoE" and i >= (getattr(c, "first_k_dense_replace", None) or 0):
            inter = c.moe_intermediate_size or c.intermediate_size
            mlp = d * c.n_expert + 3 * d * inter * (c.n_expert_per_token + (c.n_shared_expert or 0))
        else:
            mlp = 3 * d * c.intermediate_size if c.mlp_class_name == "LLaMAMoE" else dense_mlp
        per_layer.append(attn_w + mlp)
    n_matmul = sum(per_layer) + d * c.padded_vocab_size
    attn = c.n_layer * 4 * seq_len * c.n_head * hs
    fwd = 2 * n_matmul + attn
    return float(3 * fwd if training else fwd)


def mfu(tokens_per_sec: float, flops_per_token: float, n_devices: int, peak_flops_per_device: Optional[float]) -> Optional[float]:
    """Model FLOPs utilization in [0, 1]: achieved model FLOP/s over the devices' peak (None if unknown)."""
    if not peak_flops_per_device or n_devices < 1:
        return None
    return tokens_per_sec * flops_per_token / (n_devices * peak_flops_per_device)


def speed_summary(model: Any, opt: Any, speed: SpeedArgs) -> str:
    """What the speed knobs did, read back from the model and optimizer (not from the config)."""
    module = getattr(model, "module", model)
    blocks = list(getattr(getattr(module, "transformer", None), "h", []))
    compiled = ("model" if getattr(module, "_litgpt_ext_compiled", False)
                else "blocks" if blocks and all(getattr(b, "_litgpt_ext_compiled", False) for b in blocks) else None)
    inner = getattr(opt, "optimizer", opt)
    parts = [f"compile {compiled} ({speed.compile_backend})" if compiled else "eager",
             "activation checkpointing" if blocks and all(getattr(b, "_litgpt_ext_ac", False) for b in blocks) else None,
             f"fused {type(inner).__name__}" if inner.defaults.get("fused") else f"unfused {type(inner).__name__}",
             f"{speed.checkpoint_format} checkpoints"]
    return "Speed: " + ", ".join(p for p in parts if p)


def throughput_of(fabric: Any, config: Any, seq_len: int, speed: SpeedArgs) -> dict:
    """Model FLOPs per token and the devices' peak, once, for the MFU StepLogger reports."""
    try:
        fpt = flops_per_token(config, seq_len)
    except ValueError as e:  # an MLP class the FLOP count does not know: train anyway, without MFU
        fabric.print(f"MFU n/a: {e}")
        return {}
    peak = device_peak_flops(speed, fabric.device)
    if peak is None:
        fabric.print(f"MFU n/a: no peak FLOP/s known for {fabric.device} (set speed.peak_flops_per_device);"
                     f" model FLOPs/token {fpt:.3g}")
    return {"flops_per_token": fpt, "peak_flops_per_device": peak, "n_devices": fabric.world_size}
