"""A grouped mixture-of-experts feed-forward that replaces litgpt's `LLaMAMoE`.

litgpt's `LLaMAMoE` loops over experts with a boolean mask per expert and has no load balancing,
no statistics and no expert parallelism. `MoEFeedForward` keeps litgpt's routing semantics (it is
numerically the same block for softmax top-k gates, pinned by a test) and adds:

* tokens sorted by expert and one matmul per expert group on a contiguous slice (or one
  `torch._grouped_mm` call on CUDA), never a loop over tokens;
* softmax or sigmoid gates, optional shared experts, litgpt's group-limited routing;
* an auxiliary load-balancing loss (Switch / DeepSeek form) and auxiliary-loss-free balancing with
  a per-expert selection bias (DeepSeek-V3), updated after each optimizer step;
* an optional capacity factor (dropless by default) with dropped-token counts;
* per-layer statistics of the last forward (tokens per expert, max/mean imbalance, aux loss, drops);
* a hook for expert parallelism (`expert_parallel.py` installs a dispatcher that moves tokens to the
  ranks holding their experts).

Expert weights are stacked, `experts.fc_1: [n_expert, I, C]`, `experts.fc_2: [n_expert, I, C]`,
`experts.proj: [n_expert, C, I]` (each expert's slice has `nn.Linear`'s [out, in] layout), so that
grouped matmuls and sharding over experts act on one tensor. The router keeps litgpt's keys
(`gate.weight`, and `gate.e_score_correction_bias` as in litgpt's `GroupedTopkRouter`) and shared
experts keep litgpt's `shared_experts.*` keys. State dicts in litgpt's per-expert layout
(`experts.{i}.fc_1.weight`, ...) load directly (a load hook stacks them); `to_litgpt_state_dict`
converts back for export.

Configuration: the expert shapes are litgpt `Config` fields (`mlp_class_name: LLaMAMoE`, `n_expert`,
`n_expert_per_token`, `moe_intermediate_size`, `n_shared_expert`, ...), so litgpt's MoE configs
(Mixtral, ...) work unchanged. Options litgpt has no field for live in `MoEArgs`, which `pretrain`
takes as its own `moe:` section (a dataclass, so jsonargparse gives `--moe.gate sigmoid` etc.);
`split_model_config` also accepts them inside a plain `model_config` dict (`moe:` or `moe_*` keys).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from litgpt import Config
from litgpt.model import LLaMAMLP

GATES = ("softmax", "sigmoid")
EXPERT_IMPLS = ("loop", "grouped_mm")


@dataclass
class MoEArgs:
    """MoE knobs that litgpt's `Config` has no field for.

    The expert shapes come from litgpt's `Config` (`n_expert`, `n_expert_per_token`,
    `moe_intermediate_size`, `n_shared_expert`, `n_expert_groups`, `n_topk_groups`,
    `n_topk_scores_per_group`, `routed_scaling_factor`, `first_k_dense_replace`).

    Args:
        gate: 'softmax' (Mixtral, litgpt's LLaMAMoE) or 'sigmoid' (DeepSeek-V3) expert scores.
            Default: what litgpt does for the config, sigmoid with group-limited routing
            (`n_expert_groups`), softmax otherwise.
        normalize_gates: renormalise the selected top-k scores to sum to 1. Default: litgpt's
            behaviour, always for softmax (softmax over the top-k logits, exactly litgpt's
            LLaMAMoE), `config.norm_topk_prob` for sigmoid.
        aux_loss_coef: weight of the auxiliary load-balancing loss
            `n_expert * sum_i f_i * P_i` (f_i: share of routed slots taken by expert i, P_i: mean
            normalised score of expert i); 1.0 under perfectly uniform routing. 0 turns it off.
        bias_update_rate: auxiliary-loss-free balancing (DeepSeek-V3): after each optimizer step
            every expert's selection bias moves by this amount towards balance
            (+rate if under-loaded, -rate if over-loaded). The bias only changes which experts are
            selected, never the gate values. 0 turns it off.
        capacity_factor: None is dropless. Otherwise each expert takes at most
            `ceil(capacity_factor * tokens * n_expert_per_token / n_expert)` tokens per forward (per
            rank) in token order; the rest of its assignments are dropped and counted.
        expert_impl: 'loop' (one matmul per expert on its contiguous token slice; works
            everywhere) or 'grouped_mm' (one `torch._grouped_mm` call; CUDA only).
    """

    gate: Optional[Literal["softmax", "sigmoid"]] = None
    normalize_gates: Optional[bool] = None
    aux_loss_coef: float = 0.0
    bias_update_rate: float = 0.0
    capacity_factor: Optional[float] = None
    expert_impl: Literal["loop", "grouped_mm"] = "loop"

    def __post_init__(self) -> None:
        if self.gate is not None and self.gate not in GATES:
            raise ValueError(f"unknown MoE gate {self.gate!r}; choose one of {', '.join(GATES)}")
        if self.expert_impl not in EXPERT_IMPLS:
            raise ValueError(f"unknown expert_impl {self.expert_impl!r}; choose one of {', '.join(EXPERT_IMPLS)}")
        if self.aux_loss_coef < 0:
            raise ValueError(f"aux_loss_coef must be >= 0, got {self.aux_loss_coef}")
        if self.bias_update_rate < 0:
            raise ValueError(f"bias_update_rate must be >= 0, got {self.bias_update_rate}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 or None (dropless), got {self.capacity_factor}")


MOE_ARG_NAMES = tuple(MoEArgs.__dataclass_fields__)


def split_model_config(model_config: dict[str, Any]) -> tuple[dict[str, Any], Optional[MoEArgs]]:
    """Split a YAML `model_config` into litgpt `Config` kwargs and `MoEArgs`.

    MoE extras may sit in a nested `moe:` mapping or flat with a `moe_` prefix
    (`moe_gate: sigmoid`, `moe_aux_loss_coef: 0.01`), so one `model_config` block describes the whole
    model while litgpt's `Config` still receives only its own fields.
    """
    cfg = dict(model_config)
    moe: dict[str, Any] = dict(cfg.pop("moe", None) or {})
    for key in list(cfg):
        if key.startswith("moe_") and key != "moe_intermediate_size":
            name = key[len("moe_"):]
            if name not in MOE_ARG_NAMES:
                raise ValueError(f"unknown MoE key {key!r} in model_config; known: "
                                 + ", ".join("moe_" + n for n in MOE_ARG_NAMES))
            moe[name] = cfg.pop(key)
    unknown = set(moe) - set(MOE_ARG_NAMES)
    if unknown:
        raise ValueError(f"unknown MoE key(s) {sorted(unknown)} in model_config.moe; known: {', '.join(MOE_ARG_NAMES)}")
    return cfg, (MoEArgs(**moe) if moe else None)


class GroupedExperts(nn.Module):
    """`n_expert` SwiGLU experts (litgpt's LLaMAMLP) with stacked weights.

    The first dimension may hold only this rank's experts (expert parallelism); the parameters may
    then be DTensors sharded on dim 0, and `forward` uses their local shard.
    """

    def __init__(self, n_expert: int, n_embd: int, intermediate_size: int, bias: bool, impl: str = "loop") -> None:
        super().__init__()
        self.n_expert, self.n_embd, self.intermediate_size, self.impl = n_expert, n_embd, intermediate_size, impl
        self.fc_1 = nn.Parameter(torch.empty(n_expert, intermediate_size, n_embd))
        self.fc_2 = nn.Parameter(torch.empty(n_expert, intermediate_size, n_embd))
        self.proj = nn.Parameter(torch.empty(n_expert, n_embd, intermediate_size))
        if bias:
            self.fc_1_bias = nn.Parameter(torch.empty(n_expert, intermediate_size))
            self.fc_2_bias = nn.Parameter(torch.empty(n_expert, intermediate_size))
            self.proj_bias = nn.Parameter(torch.empty(n_expert, n_embd))
        else:
            self.fc_1_bias = self.fc_2_bias = self.proj_bias = None
        # expert parallelism sets this to fix up gradients of the local shard (see expert_parallel.py)
        self.weight_hook = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: Optional[float] = None, proj_std: Optional[float] = None) -> None:
        """nn.Linear's default init per expert, or normal(0, std) like litgpt's pretraining init."""
        for name in ("fc_1", "fc_2", "proj"):
            w = getattr(self, name)
            if w.is_meta:
                continue
            s = proj_std if (name == "proj" and proj_std is not None) else std
            if s is None:
                bound = 1 / math.sqrt(w.shape[-1])  # == nn.Linear's kaiming_uniform(a=sqrt(5)) bound
                nn.init.uniform_(w, -bound, bound)
            else:
                nn.init.normal_(w, mean=0.0, std=s)
            b = getattr(self, name + "_bias")
            if b is not None:
                nn.init.zeros_(b)

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x: tokens sorted by (local) expert, counts[e] rows per expert; returns the same layout."""
        hook = self.weight_hook or (lambda t: t)
        fc_1, fc_2, proj = (hook(_local(p)) for p in (self.fc_1, self.fc_2, self.proj))
        biases = tuple(hook(_local(b)) if b is not None else None
                       for b in (self.fc_1_bias, self.fc_2_bias, self.proj_bias))
        if len(counts) != fc_1.shape[0]:
            raise ValueError(f"got token counts for {len(counts)} experts but this module holds {fc_1.shape[0]}")
        if self.impl == "grouped_mm" and x.is_cuda and biases[0] is None:
            offs = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
            h = F.silu(torch._grouped_mm(x, fc_1.transpose(-2, -1), offs=offs))
            h = h * torch._grouped_mm(x, fc_2.transpose(-2, -1), offs=offs)
            return torch._grouped_mm(h, proj.transpose(-2, -1), offs=offs)
        # unbind once: its backward stacks the per-expert gradients in one go, where indexing
        # `fc_1[e]` per expert would materialise (and add) a full-size zero gradient per expert
        fc_1, fc_2, proj = fc_1.unbind(0), fc_2.unbind(0), proj.unbind(0)
        biases = tuple(b.unbind(0) if b is not None else None for b in biases)
        outs, start = [], 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            xe = x[start : start + n]
            start += n
            a = F.linear(xe, fc_1[e], biases[0][e] if biases[0] is not None else None)
            b = F.linear(xe, fc_2[e], biases[1][e] if biases[1] is not None else None)
            outs.append(F.linear(F.silu(a) * b, proj[e], biases[2][e] if biases[2] is not None else None))
        if not outs:  # no tokens at all: keep the graph connected so every rank's backward matches
            return x.new_zeros(0, self.n_embd) + 0 * sum(w.sum() for w in (*fc_1, *fc_2, *proj))
        return torch.cat(outs)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (differentiable), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class Router(nn.Module):
    """Linear router with litgpt's keys (`gate.weight`, `gate.e_score_correction_bias`)."""

    def __init__(self, n_embd: int, n_expert: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_expert, n_embd))
        # the aux-loss-free balancing bias: persistent, so it is checkpointed with the model
        self.register_buffer("e_score_correction_bias", torch.zeros(n_expert))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            bound = 1 / math.sqrt(self.weight.shape[1])
            nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # routing in float32, as litgpt's GroupedTopkRouter and DeepSeek/Mixtral reference code do
        return F.linear(x.float(), self.weight.float())


class MoEFeedForward(nn.Module):
    """Drop-in replacement for litgpt's `LLaMAMoE` (see module docstring)."""

    def __init__(self, config: Config, moe: Optional[MoEArgs] = None) -> None:
        super().__init__()
        moe = replace(moe or MoEArgs())  # a copy: the defaults are resolved against this config
        if moe.gate is None:
            moe.gate = "sigmoid" if config.n_expert_groups else "softmax"
        if moe.normalize_gates is None:
            moe.normalize_gates = True if moe.gate == "softmax" else bool(config.norm_topk_prob)
        if config.n_expert <= 0 or not (0 < config.n_expert_per_token <= config.n_expert):
            raise ValueError(f"MoE needs n_expert > 0 and 0 < n_expert_per_token <= n_expert, got "
                             f"n_expert={config.n_expert}, n_expert_per_token={config.n_expert_per_token}")
        self.config, self.moe = config, moe
        self.n_expert, self.top_k = config.n_expert, config.n_expert_per_token
        inter = config.moe_intermediate_size or config.intermediate_size
        self.gate = Router(config.n_embd, config.n_expert)
        self.experts = GroupedExperts(config.n_expert, config.n_embd, inter, config.bias, moe.expert_impl)
        if config.n_shared_expert:
            self.shared_experts = LLaMAMLP(config, intermediate_size=inter * config.n_shared_expert)
        # routed slots per expert since the last `update_router_biases` (summed over micro-batches)
        self.register_buffer("load_since_update", torch.zeros(config.n_expert), persistent=False)
        # expert parallelism: set by `expert_parallel.apply_expert_parallel`
        self.dispatcher = None
        self.last_stats: dict[str, Any] = {}
        self.last_aux_loss: Optional[torch.Tensor] = None
        self.register_load_state_dict_pre_hook(_stack_litgpt_experts)

    # ---- routing -------------------------------------------------------------------------------
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, C) -> (scores (N, E) fp32, top-k expert ids (N, k), gate weights (N, k) fp32)."""
        cfg = self.config
        logits = self.gate(x)
        scores = logits.softmax(dim=-1) if self.moe.gate == "softmax" else logits.sigmoid()
        with torch.no_grad():
            # the selection bias: aux-free balancing's, or loaded with litgpt/DeepSeek-V3 weights; 0 otherwise
            choice = scores + self.gate.e_score_correction_bias.float()
            if cfg.n_expert_groups:  # litgpt / DeepSeek-V3 group-limited routing
                g = cfg.n_expert_groups
                grouped = choice.view(-1, g, self.n_expert // g)
                group_scores = grouped.topk(cfg.n_topk_scores_per_group, dim=-1)[0].sum(-1)
                keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(cfg.n_topk_groups, dim=-1)[1], 1.0)
                choice = choice.masked_fill(~keep.bool().repeat_interleave(self.n_expert // g, dim=1), 0.0)  # as litgpt
            idx = choice.topk(self.top_k, dim=-1)[1]
        weights = scores.gather(1, idx)
        if self.moe.normalize_gates:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        if cfg.routed_scaling_factor != 1.0:
            weights = weights * cfg.routed_scaling_factor
        return scores, idx, weights

    def aux_loss(self, scores: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """`n_expert * sum_i f_i * P_i` (Switch Transformer eq. 4, DeepSeek's per-batch form)."""
        n = scores.shape[0]
        f = torch.bincount(idx.reshape(-1), minlength=self.n_expert).float() / max(n * self.top_k, 1)
        p = scores / scores.sum(dim=-1, keepdim=True) if self.moe.gate == "sigmoid" else scores
        return self.n_expert * (f * p.mean(dim=0)).sum()

    def _capacity_keep(self, expert_sorted: torch.Tensor, counts: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """Mask over expert-sorted assignments: the first `capacity` per expert (token order) survive."""
        cap = math.ceil(self.moe.capacity_factor * n_tokens * self.top_k / self.n_expert)
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.arange(expert_sorted.numel(), device=expert_sorted.device) - starts[expert_sorted]
        return pos < cap

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        flat = x.reshape(-1, C)
        n = flat.shape[0]
        scores, idx, weights = self.route(flat)

        expert_ids = idx.reshape(-1)  # (n*k,) slot -> expert
        order = torch.argsort(expert_ids, stable=True)  # slots grouped by expert, token order within
        expert_sorted = expert_ids[order]
        counts = torch.bincount(expert_ids, minlength=self.n_expert)
        routed = counts
        dropped = 0
        if self.moe.capacity_factor is not None:
            keep = self._capacity_keep(expert_sorted, counts, n)
            dropped = int((~keep).sum())
            order, expert_sorted = order[keep], expert_sorted[keep]
            counts = torch.bincount(expert_sorted, minlength=self.n_expert)
        token_of_slot = order // self.top_k
        xs = flat[token_of_slot]
        counts_list = counts.tolist()
        if self.dispatcher is None:
            ys = self.experts(xs, counts_list)
        else:
            ys = self.dispatcher(xs, counts_list, self.experts)
        ys = ys * weights.reshape(-1)[order].unsqueeze(-1).to(ys.dtype)
        y = torch.zeros_like(flat).index_add_(0, token_of_slot, ys.to(flat.dtype))
        y = y.view(B, T, C)
        if self.config.n_shared_expert:
            y = y + self.shared_experts(x)

        if not self.training:  # evaluation: no aux loss, no balancing or statistics bookkeeping
            self.last_aux_loss = None
            return y
        # bookkeeping: stats of this forward, aux loss, load for bias updates
        with torch.no_grad():
            self.load_since_update += counts.to(self.load_since_update.dtype)
            c = routed.float()
            self.last_stats = {
                "tokens_per_expert": routed.detach().cpu(),
                "imbalance": float(c.max() / c.mean().clamp_min(1e-9)),
                "dropped_tokens": dropped,
                "routed_slots": int(n * self.top_k),
            }
        self.last_aux_loss = self.aux_loss(scores, idx) if self.moe.aux_loss_coef > 0 else None
        if self.last_aux_loss is not None:
            self.last_stats["aux_loss"] = float(self.last_aux_loss.detach())
        return y

    @torch.no_grad()
    def update_bias(self, group: Any = None) -> None:
        """DeepSeek-V3 aux-loss-free step: bias += rate * sign(mean load - load)."""
        load = self.load_since_update
        if group is not None or (torch.distributed.is_available() and torch.distributed.is_initialized()):
            load = load.clone()
            torch.distributed.all_reduce(load, group=group)  # every rank sees the global load: biases stay equal
        if load.sum() > 0 and self.moe.bias_update_rate > 0:
            bias = self.gate.e_score_correction_bias
            bias += self.moe.bias_update_rate * torch.sign(load.mean() - load).to(bias.dtype)
        self.load_since_update.zero_()


def _stack_litgpt_experts(module, state_dict, prefix, *args, **kwargs) -> None:
    """Load hook: litgpt's `experts.{i}.fc_1.weight` ... -> our stacked `experts.fc_1`."""
    first = f"{prefix}experts.0.fc_1.weight"
    if first not in state_dict:
        return
    n = module.n_expert
    for name in ("fc_1", "fc_2", "proj"):
        for kind, suffix in (("weight", ""), ("bias", "_bias")):
            keys = [f"{prefix}experts.{i}.{name}.{kind}" for i in range(n)]
            if keys[0] in state_dict:
                state_dict[f"{prefix}experts.{name}{suffix}"] = torch.stack([state_dict.pop(k) for k in keys])
    bias_key = f"{prefix}gate.e_score_correction_bias"
    if bias_key not in state_dict:  # litgpt's plain nn.Linear gate has no bias buffer
        state_dict[bias_key] = torch.zeros(n)


def to_litgpt_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our stacked expert layout -> litgpt's `LLaMAMoE` per-expert layout (for export/HF conversion).

    The aux-free bias buffer is dropped: litgpt's LLaMAMoE has no such buffer (its router is a plain
    Linear), so a model trained with `bias_update_rate > 0` routes slightly differently there.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        head, _, leaf = key.rpartition(".")
        if (head == "experts" or head.endswith(".experts")) and leaf in ("fc_1", "fc_2", "proj", "fc_1_bias", "fc_2_bias", "proj_bias"):
            name, kind = (leaf[:-5], "bias") if leaf.endswith("_bias") else (leaf, "weight")
            for i, w in enumerate(value):
                out[f"{head}.{i}.{name}.{kind}"] = w.clone()
        elif key == "gate.e_score_correction_bias" or key.endswith(".gate.e_score_correction_bias"):
            continue
        else:
            out[key] = value
    return out


# ---- model-level helpers ----------------------------------------------------------------------
def moe_layers(model: nn.Module) -> list[tuple[int, MoEFeedForward]]:
    """(block index, MoE module) for every MoE block of a litgpt GPT (FSDP-wrapped or not)."""
    blocks = model.transformer.h if hasattr(model, "transformer") else model.module.transformer.h
    return [(i, b.mlp) for i, b in enumerate(blocks) if isinstance(b.mlp, MoEFeedForward)]


def moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the per-layer auxiliary losses of the last forward, times `aux_loss_coef`; 0 if none."""
    total = None
    for _, m in moe_layers(model):
        if m.last_aux_loss is not None:
            term = m.moe.aux_loss_coef * m.last_aux_loss
            total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total


def moe_stats(model: nn.Module) -> dict[int, dict[str, Any]]:
    """Per MoE layer: tokens per expert, max/mean imbalance, aux loss, dropped tokens (last forward)."""
    return {i: dict(m.last_stats) for i, m in moe_layers(model) if m.last_stats}


def flatten_moe_stats(stats: dict[int, dict[str, Any]]) -> dict[str, float]:
    """`moe_stats` as flat scalars for a logger: `moe/l{i}/imbalance`, `moe/l{i}/tokens_e{j}`, ..."""
    out: dict[str, float] = {}
    for i, s in stats.items():
        for key, value in s.items():
            if key == "tokens_per_expert":
                for j, c in enumerate(value.tolist()):
                    out[f"moe/l{i}/tokens_e{j}"] = float(c)
            else:
                out[f"moe/l{i}/{key}"] = float(value)
    if stats:
        out["moe/imbalance_max"] = max(s["imbalance"] for s in stats.values())
        out["moe/dropped_tokens"] = float(sum(s["dropped_tokens"] for s in stats.values()))
    return out


def update_router_biases(model: nn.Module, group: Any = None) -> None:
    """Aux-loss-free balancing step for every MoE layer; call after each optimizer step.

    Loads are all-reduced over `group` (default: the whole world when torch.distributed is
    initialised) so that every rank keeps identical biases.
    """
    for _, m in moe_layers(model):
        if m.moe.bias_update_rate > 0:
            m.update_bias(group)
        else:
            m.load_since_update.zero_()


@torch.no_grad()
def initialize_moe_weights(model: nn.Module, n_layer: int, n_embd: int) -> None:
    """litgpt's GPT-NeoX pretraining init (`litgpt.pretrain.initialize_weights`) for our MoE weights.

    litgpt's initializer only knows `nn.Linear`; call this after it so that the router and the
    stacked experts get the same std as litgpt's LLaMAMoE would (proj: 1/sqrt(C)/n_layer).
    """
    std = math.sqrt(2.0 / 5 / n_embd)
    for _, m in moe_layers(model):
        if not m.gate.weight.is_meta:
            nn.init.normal_(m.gate.weight, mean=0.0, std=std)
        m.experts.reset_parameters(std=std, proj_std=1 / math.sqrt(n_embd) / n_layer)
