"""A run's model and optimizer, built and set up on its Fabric: init or checkpoint weights, LoRA's
frozen base, the speed knobs, FSDP2 (`parallel.parallelize`), and the optimizer's parameter groups
(layer-wise LR decay, Muon's split: `optim`). Used by the training loop (`loop.main`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
from litgpt.config import Config

from litgpt_ext.checkpoint import dcp as tdcp
from litgpt_ext.model import MoEArgs
from litgpt_ext.train import optim
from litgpt_ext.train.speed import SpeedArgs


def setup_model(fabric: L.Fabric, config: Config, moe: Optional[MoEArgs], seq_len: int,
                 weights_from: Optional[Path], seed: int, speed: Optional[SpeedArgs] = None, lora: Any = None):
    """Build, initialize or load, apply the speed knobs, and set up (FSDP2: `parallel.parallelize`
    applies them around the sharding). A sharded checkpoint's weights are loaded by `main` after
    the optimizer exists (DCP loads model and optimizer shards together). `lora`
    (litgpt_ext.train.lora.LoRARun): litgpt's LoRA GPT, its base and adapter loaded, the base frozen."""
    from litgpt.pretrain import initialize_weights
    from litgpt.utils import num_parameters

    from litgpt_ext.model import build_model, initialize_moe_weights
    from litgpt_ext.train import speed as sp

    speed = speed or SpeedArgs()
    fabric.seed_everything(seed)  # same init on every rank before sharding
    t0 = time.perf_counter()
    with sp.empty_init_context(speed if weights_from is None else None):  # meta device: no memory, no RNG
        model = build_model(config, moe) if lora is None else lora.build(config)  # litgpt's GPT (MoE: ours) / LoRA GPT
    if not sp.has_meta(model) and lora is None:  # LoRA: the base is loaded below, the adapter has litgpt's init
        if speed.empty_init:  # the init materialize_ reproduces on meta shards; off: today's path, same numbers
            sp.init_weights(model, seed)
        else:
            initialize_weights(fabric, model, n_layer=config.n_layer, n_embd=config.n_embd)
            initialize_moe_weights(model, n_layer=config.n_layer, n_embd=config.n_embd)  # litgpt's sees nn.Linear only
    model.max_seq_length = seq_len
    if lora is not None:
        lora.load(model, config)
        lora.freeze(model, log=fabric.print)
    elif weights_from is not None and not tdcp.is_sharded(weights_from):
        from litgpt_ext.checkpoint.loading import load_weights  # shapes that differ: one line naming the fields

        load_weights(model, weights_from, config)
        model.max_seq_length = seq_len
    fabric.print(f"Model {config.name}: {num_parameters(model):,} parameters, built in {time.perf_counter() - t0:.2f}s"
                 + (" on the meta device" if sp.has_meta(model) else "")
                 + (f", weights from {weights_from}" if weights_from else ""))
    if fabric.world_size == 1:  # FSDP2: parallel.parallelize applies them (AC before, the rest after sharding)
        sp.apply_speed(model, speed, seed, fabric.device)
    return fabric.setup(model)


def setup_optimizer(fabric: L.Fabric, model, optimizer: Union[str, dict], speed: Optional[SpeedArgs] = None):
    from litgpt_ext.train.speed import optimizer_kwargs

    fusable = optim.fusable_spec(optimizer)  # Muon's AdamW half (layer_lr_decay, Muon: litgpt_ext.train.optim)
    extra = optimizer_kwargs(fusable, speed or SpeedArgs(), fabric.device) if speed is not None else {}
    return fabric.setup_optimizers(optim.build_optimizer(optimizer, model, extra, log=fabric.print))
