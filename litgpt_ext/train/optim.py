"""Optimizer extensions for forgetting studies: layer-wise LR decay and Muon (+ AdamW).

Two keys of the `optimizer:` mapping, beside `class_path`/`init_args` (also accepted inside
`init_args`, where SFT's flag folding puts them):

    optimizer:
      class_path: torch.optim.AdamW
      init_args: {lr: 3.0e-4, weight_decay: 0.1}
      layer_lr_decay: 0.9        # head x1, block i x d^(L-i), embeddings x d^(L+1)

    optimizer:
      class_path: torch.optim.Muon          # the 2-D matrices of the transformer blocks
      init_args: {lr: 0.02, momentum: 0.95, weight_decay: 0.1, adjust_lr_fn: match_rms_adamw}
      adamw: {lr: 3.0e-4, weight_decay: 0.1}  # embeddings, norms, biases, head (default: Muon's lr, wd)
      muon_params: ["transformer.h.*.attn.*"]  # optional: fnmatch patterns (default: every 2-D block param)

Every param group carries `lr_scale` (its LR over the schedule's LR), `base_lr` (the peak) and a `name` (`embed`,
`block0`, …, `head`; `muon/…`, `adamw/…` for Muon). The loop's schedule sets `lr = schedule(step)
* lr_scale` in every group (`set_lrs`), so any schedule composes with both; the schedule's peak is
`init_args.lr`. A spec without these keys builds exactly the optimizer it built before (one group).

`MuonAdamW` is one `torch.optim.Optimizer` (one `param_groups`, one `state`, keyed like any
optimizer's), so Fabric, clipping, the FQN-keyed checkpoint and DCP treat it as one. Its Muon step
is torch.optim.Muon's (`_single_tensor_muon`) with one difference under FSDP2: Newton-Schulz needs
the whole matrix, so the momentum-blended update of a sharded (DTensor) parameter is all-gathered,
orthogonalized on every rank, and each rank keeps its own rows.
"""

from __future__ import annotations

import fnmatch
import inspect
import math
import re
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

EXT_KEYS = ("layer_lr_decay", "adamw", "muon_params")
MUON_PATH = "torch.optim.Muon"
_BLOCK = re.compile(r"^transformer\.h\.(\d+)\.")
_WRAPPERS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


# ------------------------------------------------------------------------------------------ the spec


def split_spec(spec: Union[str, dict]) -> tuple[Union[str, dict], dict]:
    """(the torch optimizer spec litgpt instantiates, the extension keys), checked. The extension
    keys may sit beside `class_path` or inside `init_args`."""
    if not isinstance(spec, dict):
        return spec, {}
    base = {k: v for k, v in spec.items() if k not in EXT_KEYS}
    init = dict(base.get("init_args") or {})
    ext = {k: spec[k] for k in EXT_KEYS if k in spec}
    for k in EXT_KEYS:
        if k in init:
            ext.setdefault(k, init.pop(k))
    base["init_args"] = init
    check_ext(str(base.get("class_path", "AdamW")), ext)
    return base, ext


def is_muon_path(class_path: str) -> bool:
    return class_path in ("Muon", MUON_PATH)


def _number(value: Any) -> Any:
    if isinstance(value, str):  # a flag: `--optimizer.layer_lr_decay 0.9` arrives as '0.9'
        import yaml

        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
        if isinstance(value, str):
            try:
                return float(value)  # '1e-3', which YAML 1.1 reads as a string
            except ValueError:
                pass
    return value


def check_ext(class_path: str, ext: dict) -> None:
    """Raise a one-line ValueError for a bad extension key (the value and what is valid)."""
    if "layer_lr_decay" in ext:
        d = ext["layer_lr_decay"] = _number(ext["layer_lr_decay"])
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not (0 < d <= 1) or math.isnan(d):
            raise ValueError(f"optimizer.layer_lr_decay={d!r} is not valid: give a number in (0, 1] (0.9: each block"
                             f" below the head trains at 0.9x the LR of the one above; 1: no decay)")
    is_muon = is_muon_path(class_path)
    for key in ("adamw", "muon_params"):
        if key in ext and not is_muon:
            raise ValueError(f"optimizer.{key} is only for class_path {MUON_PATH} (it sets the AdamW half / the Muon"
                             f" parameters); this optimizer is {class_path!r}")
    if "adamw" in ext:
        a = ext["adamw"]
        if a is None:
            a = ext["adamw"] = {}
        if not isinstance(a, dict):
            raise ValueError(f"optimizer.adamw={a!r} must be a mapping of torch.optim.AdamW arguments"
                             f" (e.g. {{lr: 3.0e-4, weight_decay: 0.1}})")
        a = ext["adamw"] = {k: _number(v) for k, v in a.items()}
        valid = [n for n in inspect.signature(torch.optim.AdamW).parameters if n != "params"]
        unknown = sorted(set(a) - set(valid))
        if unknown:
            raise ValueError(f"optimizer.adamw takes no argument {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}")
        lr = a.get("lr", 1.0)
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ValueError(f"optimizer.adamw.lr={lr!r}: the AdamW part's peak learning rate must be a number > 0")
    if "muon_params" in ext:
        pats = ext["muon_params"]
        if isinstance(pats, str):
            pats = ext["muon_params"] = [pats]
        if not isinstance(pats, list) or not pats or not all(isinstance(p, str) for p in pats):
            raise ValueError(f"optimizer.muon_params={pats!r} must be a non-empty list of parameter-name patterns"
                             f" (fnmatch, e.g. 'transformer.h.*.mlp.*')")


# ------------------------------------------------------------------------------------------ grouping


def _clean(name: str) -> str:
    for w in _WRAPPERS:
        name = name.replace(w, "")
    return name


def named_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    module = getattr(model, "module", model)  # Fabric's wrapper
    return [(_clean(n), p) for n, p in module.named_parameters() if p.requires_grad]


def n_blocks(model: nn.Module, why: str) -> int:
    module = getattr(model, "module", model)
    blocks = getattr(getattr(module, "transformer", None), "h", None)
    if blocks is None:
        raise ValueError(f"{why} needs transformer blocks at model.transformer.h (litgpt's GPT);"
                         f" {type(module).__name__} has none")
    return len(blocks)


def layer_of(name: str) -> str:
    """'embed', 'block<i>' or 'head' (lm_head, the final norm and anything outside the blocks)."""
    if name.startswith("transformer.wte."):
        return "embed"
    m = _BLOCK.match(name)
    return f"block{m.group(1)}" if m else "head"


def layer_scale(layer: str, n_layer: int, decay: float) -> float:
    """The head x1, block i (0-based) x d^(L-i), the embeddings x d^(L+1)."""
    if layer == "head":
        return 1.0
    if layer == "embed":
        return decay ** (n_layer + 1)
    return decay ** (n_layer - int(layer[len("block"):]))


def _rank(layer: str) -> float:
    return -1 if layer == "embed" else math.inf if layer in ("head", "all") else int(layer[len("block"):])


def _groups(named: list[tuple[str, nn.Parameter]], decay: Optional[float], n_layer: int, prefix: str = "",
            scale: float = 1.0) -> list[dict]:
    """Param groups in model order, one per layer (LLRD) or one for all, with `name` and `lr_scale`."""
    order: dict[str, list] = {}
    for n, p in named:
        order.setdefault(layer_of(n) if decay is not None else "all", []).append(p)
    out = []
    for layer, params in sorted(order.items(), key=lambda kv: _rank(kv[0])):
        s = scale * (layer_scale(layer, n_layer, decay) if decay is not None else 1.0)
        name = prefix.rstrip("/") if layer == "all" else prefix + layer
        out.append({"params": params, "name": name or "all", "lr_scale": s})
    return out


def muon_split(named: list[tuple[str, nn.Parameter]], patterns: Optional[list[str]]) -> tuple[list, list]:
    """(Muon's (name, param), AdamW's): by default every 2-D parameter of a transformer block; with
    `patterns` the parameters they match, each of which must be 2-D."""
    if patterns is None:
        muon = [(n, p) for n, p in named if _BLOCK.match(n) and p.ndim == 2]
    else:
        for pat in patterns:
            if not any(fnmatch.fnmatchcase(n, pat) for n, _ in named):
                raise ValueError(f"optimizer.muon_params pattern {pat!r} matches no parameter; names look like"
                                 f" {', '.join(n for n, _ in named[:3])}, …")
        muon = [(n, p) for n, p in named if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]
        bad = [(n, tuple(p.shape)) for n, p in muon if p.ndim != 2]
        if bad:
            n, shape = bad[0]
            raise ValueError(f"optimizer.muon_params puts {n} (shape {shape}) into Muon, which updates 2-D matrices"
                             f" only ({len(bad)} such parameter(s)); narrow the patterns (default: every 2-D"
                             f" parameter of transformer.h) and leave the rest to optimizer.adamw")
    ids = {id(p) for _, p in muon}
    return muon, [(n, p) for n, p in named if id(p) not in ids]


# ------------------------------------------------------------------------------------------ build


def build_optimizer(spec: Union[str, dict], model: nn.Module, extra: Optional[dict] = None,
                    log: Callable[[str], Any] = print) -> torch.optim.Optimizer:
    """The run's optimizer for `model` (`extra`: e.g. {"fused": True} from the speed knobs)."""
    from litgpt.utils import instantiate_torch_optimizer

    base, ext = split_spec(spec)
    extra = dict(extra or {})
    path = base if isinstance(base, str) else str(base.get("class_path", "AdamW"))
    if is_muon_path(path):
        return _build_muon(base, ext, model, extra, log)
    if not ext:  # the trainable parameters (all of them, but under LoRA: the adapter's)
        return instantiate_torch_optimizer(base, [p for p in model.parameters() if p.requires_grad], **extra)
    decay = ext["layer_lr_decay"]
    L = n_blocks(model, f"optimizer.layer_lr_decay={decay}")
    named = named_params(model)
    groups = _groups(named, decay, L)
    lr = _init_args(base).get("lr", _default(path, "lr"))
    for g in groups:
        g["lr"], g["base_lr"] = lr * g["lr_scale"], lr
    opt = instantiate_torch_optimizer(base, groups, **extra)
    log(describe(opt, f"{type(opt).__name__} with layer_lr_decay {decay}"))
    return opt


def fusable_spec(spec: Union[str, dict]) -> Union[str, dict]:
    """The spec whose fused kernel the speed knob asks for: Muon's AdamW half, else the spec itself."""
    base, _ = split_spec(spec)
    path = base if isinstance(base, str) else str(base.get("class_path", "AdamW"))
    return {"class_path": "torch.optim.AdamW"} if is_muon_path(path) else base


def _init_args(base: Union[str, dict]) -> dict:
    return dict(base.get("init_args") or {}) if isinstance(base, dict) else {}


def _default(path: str, arg: str) -> Any:
    import importlib

    module, _, cls = path.rpartition(".")
    p = inspect.signature(getattr(importlib.import_module(module or "torch.optim"), cls)).parameters.get(arg)
    return None if p is None else p.default


def _build_muon(base: Union[str, dict], ext: dict, model: nn.Module, extra: dict, log: Callable) -> "MuonAdamW":
    muon_args = _init_args(base)
    decay = ext.get("layer_lr_decay")
    L = n_blocks(model, f"optimizer.class_path {MUON_PATH}" if decay is None else f"optimizer.layer_lr_decay={decay}")
    named = named_params(model)
    muon, adamw = muon_split(named, ext.get("muon_params"))
    if not muon:
        raise ValueError(f"optimizer {MUON_PATH}: the model has no 2-D parameter in transformer.h for Muon")
    lr = muon_args.get("lr", _default(MUON_PATH, "lr"))
    adamw_args = {"lr": lr, "weight_decay": muon_args.get("weight_decay", _default(MUON_PATH, "weight_decay"))}
    adamw_args.update(ext.get("adamw") or {})
    adamw_args.update({k: v for k, v in extra.items() if k in ("fused", "foreach")})  # Muon has no fused kernel
    groups = _groups(muon, decay, L, "muon/") + _groups(adamw, decay, L, "adamw/", adamw_args["lr"] / lr)
    for g in groups:
        g["lr"], g["base_lr"] = lr * g["lr_scale"], lr
    opt = MuonAdamW(groups, muon_args, {k: v for k, v in adamw_args.items() if k != "lr"})
    what = "Muon + AdamW" + (f" with layer_lr_decay {decay}" if decay is not None else "")
    n_m, n_a = sum(p.numel() for _, p in muon), sum(p.numel() for _, p in adamw)
    log(f"Optimizer split: Muon {len(muon)} matrices ({n_m:,} parameters), AdamW {len(adamw)} tensors"
        f" ({n_a:,} parameters: embeddings, norms, biases, head)")
    log(describe(opt, what))
    return opt


def describe(opt: torch.optim.Optimizer, what: str) -> str:
    parts = [f"{g['name']} {sum(p.numel() for p in g['params']):,} x{g['lr_scale']:.4g}" for g in opt.param_groups]
    return f"Optimizer {what}: {len(parts)} param groups (name, parameters, LR scale): " + ", ".join(parts)


# ------------------------------------------------------------------------------------------ the loop's side


def set_lrs(optimizer: Any, lr: float) -> None:
    """The schedule's LR for this step into every group, times the group's `lr_scale`."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g["lr_scale"] if "lr_scale" in g else lr


def peak_lr(optimizer: Any) -> float:
    """The schedule's peak (`init_args.lr`; every scaled group keeps it exactly as `base_lr`)."""
    g = optimizer.param_groups[0]
    return float(g.get("base_lr", g["lr"]))


def group_lrs(optimizer: Any) -> dict[str, float]:
    """`lr/<group name>` for every named group (nothing for a plain one-group optimizer)."""
    groups = [g for g in optimizer.param_groups if "name" in g]
    if len(groups) < 2:
        return {}
    return {f"lr/{g['name']}": float(g["lr"]) for g in groups}


# ------------------------------------------------------------------------------------------ Muon + AdamW


class MuonAdamW(torch.optim.Optimizer):
    """torch.optim.Muon on the groups named `muon/…`, torch.optim.AdamW on the others: one optimizer.

    The AdamW half is a real `torch.optim.AdamW` that shares this object's groups and `state` (it
    is re-pointed at them before every step, so `load_state_dict` needs no care); the Muon half is
    torch's own update (`torch.optim._muon`), with the all-gather a sharded parameter needs.
    """

    def __init__(self, groups: list[dict], muon_args: dict, adamw_args: dict) -> None:
        muon = [g for g in groups if g["name"].startswith("muon")]
        adamw = [g for g in groups if not g["name"].startswith("muon")]
        for g in muon:
            g["algorithm"] = "muon"
        for g in adamw:
            g["algorithm"] = "adamw"
        torch.optim.Muon(muon, **muon_args)  # torch's checks; fills Muon's defaults into the groups (same dicts)
        self._adamw = torch.optim.AdamW(adamw, **adamw_args)  # likewise for AdamW's
        super().__init__(muon + adamw, {})
        self._adamw.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, then drop a parameter's state that belongs to the other algorithm (a run that
        switched optimizers at a fork: AdamW moments of a matrix Muon now trains start it afresh)."""
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for g, f in zip(self.param_groups, fresh):  # a checkpoint of another optimizer lacks Muon's keys
            g.update({k: v for k, v in f.items() if k not in g or k == "algorithm"})
        keep = {"muon": {"momentum_buffer"}, "adamw": {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}}
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if st and (set(st) - keep[group["algorithm"]] or group["algorithm"] == "adamw" and "step" not in st):
                    del self.state[p]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["algorithm"] == "muon":
                _muon_group(self.state, group)
        self._adamw.param_groups = [g for g in self.param_groups if g["algorithm"] == "adamw"]
        self._adamw.state = self.state
        self._adamw.step()
        return loss


def _muon_group(state: dict, group: dict) -> None:
    """torch.optim.Muon's `_single_tensor_muon` for one group; a DTensor's update is gathered for
    Newton-Schulz (the whole matrix) and redistributed like its parameter."""
    from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

    lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
    for p in group["params"]:
        if p.grad is None:
            continue
        grad = p.grad
        if p.ndim != 2:
            raise ValueError(f"Muon updates 2-D matrices only; got a parameter of shape {tuple(p.shape)}")
        st = state[p]
        if "momentum_buffer" not in st:
            st["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        buf = st["momentum_buffer"]
        buf.lerp_(grad, 1 - momentum)
        update = grad.lerp(buf, momentum) if group["nesterov"] else buf
        placements = getattr(update, "placements", None)
        if placements is not None:  # FSDP2: the whole matrix on every rank
            from torch.distributed.tensor import distribute_tensor

            mesh = update.device_mesh
            full = _zeropower_via_newtonschulz(update.full_tensor(), group["ns_coefficients"], group["ns_steps"],
                                               group["eps"])
            update = distribute_tensor(full, mesh, placements, src_data_rank=None)  # this rank's rows, no comm
        else:
            update = _zeropower_via_newtonschulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
        p.mul_(1 - lr * wd)
        p.add_(update, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))
