"""Models: litgpt's GPT, with our grouped MoE feed-forward in place of litgpt's `LLaMAMoE`."""

from __future__ import annotations

from typing import Optional

from litgpt import GPT, Config
from litgpt.model import LLaMAMoE

from litgpt_ext.model.hooks import register_parallelize_hook
from litgpt_ext.model.moe import (
    MoEArgs,
    MoEFeedForward,
    flatten_moe_stats,
    initialize_moe_weights,
    moe_aux_loss,
    moe_layers,
    moe_stats,
    split_model_config,
    to_litgpt_state_dict,
    update_router_biases,
)

__all__ = [
    "MoEArgs",
    "MoEFeedForward",
    "build_model",
    "flatten_moe_stats",
    "initialize_moe_weights",
    "load_moe_args",
    "moe_aux_loss",
    "moe_layers",
    "moe_stats",
    "split_model_config",
    "to_litgpt_state_dict",
    "update_router_biases",
]


def _expert_parallel_hook(model, dp_mesh, expert_parallel_size):
    from litgpt_ext.model.expert_parallel import expert_parallel_hook

    return expert_parallel_hook(model, dp_mesh, expert_parallel_size)


# `litgpt_ext.train.parallel.parallelize` runs this before FSDP2: experts get sharded over the EP mesh
register_parallelize_hook(_expert_parallel_hook)


def build_model(config: Config, moe: Optional[MoEArgs] = None) -> GPT:
    """litgpt's GPT; every `LLaMAMoE` block (config.n_expert > 0) becomes a `MoEFeedForward`.

    Dense configs come back untouched. `first_k_dense_replace` keeps working because litgpt already
    builds those first blocks with a dense MLP. Call it under `fabric.init_module(empty_init=True)`
    for big configs: litgpt's experts are then created on the meta device and replaced for free.
    """
    model = GPT(config)
    if config.n_expert > 0:
        if config.mlp_class_name != "LLaMAMoE":
            raise ValueError(f"n_expert={config.n_expert} needs mlp_class_name='LLaMAMoE', "
                             f"got {config.mlp_class_name!r}")
        for block in model.transformer.h:
            if isinstance(block.mlp, LLaMAMoE):
                block.mlp = MoEFeedForward(config, moe)
    elif moe is not None:
        raise ValueError("MoE options were given but the model config has n_expert=0 (a dense model)")
    return model


def load_moe_args(checkpoint_dir) -> Optional[MoEArgs]:
    """The `moe:` section a checkpoint was trained with (from its hyperparameters.yaml), or None.

    Checkpoints keep litgpt's `model_config.yaml` untouched (litgpt's `Config` has no MoE extras);
    the MoE options live with the run's other hyperparameters. Evaluation/export of an MoE
    checkpoint: `build_model(Config.from_file(d / "model_config.yaml"), load_moe_args(d))`, then
    `load_state_dict`; `to_litgpt_state_dict` gives litgpt's per-expert `LLaMAMoE` layout.
    """
    from pathlib import Path

    import yaml

    path = Path(checkpoint_dir) / "hyperparameters.yaml"
    if not path.is_file():
        return None
    moe = (yaml.safe_load(path.read_text()) or {}).get("moe")
    return MoEArgs(**moe) if moe else None
