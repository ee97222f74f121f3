"""litgpt's LoRA model (`litgpt.lora`) on one of our checkpoints: build it, load the base and the
adapter, merge it back into plain litgpt weights.

The model, its layers, `mark_only_lora_as_trainable`, `lora_filter` and `merge_lora_weights` are
litgpt's. What is ours: the config comes from `LoRAArgs` (litgpt_ext.checkpoint.lora), the base
and adapter loads are checked (a missing or extra tensor is one line, not a model silently half
loaded), and the merge gives a state dict in the base's own keys and dtypes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from litgpt import Config

from litgpt_ext.checkpoint.layout import MODEL_FILE
from litgpt_ext.checkpoint.lora import LoRAArgs


def lora_config(config: Config, args: LoRAArgs):
    """`litgpt.lora.Config`: the base config with the adapter's `lora_*` fields."""
    from litgpt.lora import Config as LoRAConfig

    return LoRAConfig(**{**dataclasses.asdict(config), **args.litgpt_fields()})


def build_lora_model(config: Config, args: LoRAArgs):
    """litgpt's LoRA GPT for `config` (LoRA A: kaiming-uniform, B: zero, as litgpt initializes them)."""
    from litgpt.lora import GPT

    if config.n_expert > 0:
        raise ValueError(f"lora: LoRA on a mixture-of-experts model (n_expert={config.n_expert}) is not supported"
                         " (our MoE blocks are not litgpt's LLaMAMoE); train it without lora:")
    return GPT(lora_config(config, args))


def adapter_names(model: torch.nn.Module) -> list[str]:
    from litgpt.lora import lora_filter

    return [n for n, p in model.state_dict().items() if lora_filter(n, p)]


def load_base(model: torch.nn.Module, base_dir: Path, config: Config, assign: bool = False) -> None:
    """The base weights (plain litgpt keys; litgpt's LoRA modules map them onto `*.linear.*`): every
    tensor but the adapter's must load. `assign`: take the tensors as they are (a meta-device model)."""
    from litgpt_ext.checkpoint.io import load_model_state
    from litgpt_ext.checkpoint.loading import WeightsMismatchError, weights_mismatch

    try:
        missing, unexpected = model.load_state_dict(load_model_state(base_dir), strict=False, assign=assign)
    except RuntimeError as e:
        if "Error(s) in loading state_dict" not in str(e):
            raise
        raise WeightsMismatchError(weights_mismatch(base_dir, config, str(e))) from None
    missing = [k for k in missing if k not in set(adapter_names(model))]
    if missing or unexpected:
        raise WeightsMismatchError(f"the LoRA base {Path(base_dir) / MODEL_FILE} does not fit the model: missing"
                                   f" {missing[:4]}, unexpected {unexpected[:4]}")


def load_adapter(model: torch.nn.Module, adapter: dict, where: Path, assign: bool = False) -> None:
    """Exactly the model's adapter tensors (other settings give other names or shapes: one line)."""
    names = set(adapter_names(model))
    extra, lacking = sorted(set(adapter) - names), sorted(names - set(adapter))
    if extra or lacking:
        raise ValueError(f"the LoRA adapter {where} does not fit lora: settings of this model: it lacks {lacking[:4]}"
                         f" and has {extra[:4]} (r, alpha and targets must be the adapter's)")
    try:
        model.load_state_dict(adapter, strict=False, assign=assign)
    except RuntimeError as e:
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise ValueError(f"the LoRA adapter {where} does not fit this model's lora: settings: {first}") from None


def merged_state_dict(model: torch.nn.Module, dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """W + (alpha / r)·B·A for every adapted weight (litgpt's `merge_lora_weights`, in float32), the
    adapter removed, keys as the base's (`…qkv.linear.weight` -> `…qkv.weight`: litgpt merge_lora's
    renaming) and each tensor in `dtypes[key]` (the base's dtype). Merges `model` in place."""
    from litgpt.lora import lora_filter, merge_lora_weights

    model.float()
    merge_lora_weights(model)
    out = {}
    for k, v in model.state_dict().items():
        if lora_filter(k, v):
            continue
        key = k.replace("linear.", "")
        out[key] = v.detach().to(dtypes.get(key, v.dtype)).clone()
    return out
