"""One Fabric loop for pretraining and midtraining (midtraining == resume with a new blend).

`litgpt-ext pretrain --config run.yaml [--train.max_additional_steps 100 ...]`. Mirrors
`litgpt/pretrain.py`: `pretrain` (the CLI entry: parse, Fabric) -> `main` (model and optimizer: `build`; data,
resume state, run plan) -> `fit` (the step loop). Each concern lives in its own module:
`state` (TrainingState, checkpoint writer), `plan` (stop step and LR schedule of a phase),
`objective` (the loss/batch seam), `validation` (named sets, baseline, CSV, early stop),
`metrics` (step logging), `phase` (keep or begin a phase), `regularize` (EWC / L2-anchor
penalties). `fit` takes a `loss_fn`, so another objective (SFT) reuses the loop.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import lightning as L
import torch
from litgpt.args import LogArgs
from litgpt.config import Config
from litgpt.data import DataModule

from litgpt_ext import checkpoint as ckpt
from litgpt_ext.checkpoint import dcp as tdcp
from litgpt_ext.checkpoint.lora import LoRAArgs
from litgpt_ext.mix_policy import MixPolicyArgs, MixPolicyConfig
from litgpt_ext.model import MoEArgs
from litgpt_ext.preempt import PREEMPT_EXIT_CODE
from litgpt_ext.preempt import PreemptFlag as _PreemptFlag
from litgpt_ext.train import optim
from litgpt_ext.train.args import EvalArgs, RegularizerArgs, RegularizerConfig, TrainArgs
from litgpt_ext.train.build import setup_model, setup_optimizer
from litgpt_ext.train.hparams import resolved_hparams
from litgpt_ext.train.launch import RunResult, check_data_module, launch, preempt_requested, preemption
from litgpt_ext.train.metrics import StepLogger, continue_log_stream
from litgpt_ext.train.mixing import MixController, identity_of, setup_mix_policy
from litgpt_ext.train.objective import LossFn, next_token_loss
from litgpt_ext.train.phase import phase_plan as _phase_plan
from litgpt_ext.train.plan import RunPlan, record_phase
from litgpt_ext.train.regularize import Regularizer, setup_regularizer
from litgpt_ext.train.speed import SpeedArgs, speed_summary, throughput_of
from litgpt_ext.train.state import CheckpointWriter, TrainingState, rng_neutral
from litgpt_ext.train.validate import check_pretrain_inputs, check_shards_fit_model
from litgpt_ext.train.validation import VAL_CSV, Validator, val_loaders_of

__all__ = ["pretrain", "main", "fit", "PREEMPT_EXIT_CODE", "VAL_CSV"]


def pretrain(
    model_name: Optional[str] = None,
    model_config: Optional[Config] = None,
    moe: Optional[MoEArgs] = None,
    out_dir: Path = Path("out/pretrain"),
    precision: Optional[Literal["bf16-true", "bf16-mixed", "32-true"]] = None,
    initial_checkpoint_dir: Optional[Path] = None,
    resume: Union[bool, Literal["auto"], Path] = False,
    fork_from: Optional[Path] = None,
    data: Optional[DataModule] = None,
    train: TrainArgs = TrainArgs(
        save_interval=1000, log_interval=1, global_batch_size=512, micro_batch_size=4, max_norm=1.0, min_lr=4e-5
    ),
    eval: EvalArgs = EvalArgs(),
    log: LogArgs = LogArgs(),
    optimizer: Union[str, dict] = "AdamW",
    devices: Union[int, Literal["auto"]] = "auto",
    num_nodes: Optional[int] = None,
    expert_parallel_size: int = 1,
    tokenizer_dir: Optional[Path] = None,
    logger_name: Literal["tensorboard", "csv", "wandb"] = "tensorboard",
    seed: int = 42,
    preempt_exit_code: int = PREEMPT_EXIT_CODE,
    speed: SpeedArgs = SpeedArgs(),
    regularizer: Optional[RegularizerConfig] = None,
    mix_policy: Optional[MixPolicyConfig] = None,
    lora: Optional[LoRAArgs] = None,
) -> RunResult:
    """Pretrain a model, or midtrain one: resume from a checkpoint with a new data blend.

    Args:
        model_name: A litgpt model name (e.g. pythia-160m); ignored for the architecture when `model_config` is given.
        model_config: An inline litgpt `Config` (e.g. a tiny model for CPU runs). MoE models set
            `mlp_class_name: LLaMAMoE`, `n_expert`, `n_expert_per_token` (and optionally
            `moe_intermediate_size`, `n_shared_expert`, ...) as in litgpt.
        moe: MoE options beyond litgpt's Config (gate, aux_loss_coef, bias_update_rate,
            capacity_factor, ...; see `litgpt_ext.model.MoEArgs`). Only for models with n_expert > 0.
        out_dir: Run directory: step-XXXXXXXX/ and final/ checkpoints, logs, val_metrics.csv.
        precision: bf16-true, bf16-mixed or 32-true (default: bf16-mixed on GPUs with bf16, else 32-true).
        initial_checkpoint_dir: Load weights only from this checkpoint (fresh optimizer, step 0).
        resume: true: the latest step-* in out_dir (error if none); auto: latest or start fresh;
            a path: that checkpoint (folder or file). Restores model, optimizer, step, data cursors, RNG.
        fork_from: When out_dir holds no checkpoint yet, fork this checkpoint into it
            (`litgpt-ext fork`) and resume from it: a midtraining run that requeues safely.
        data: The data module, normally `litgpt_ext.data.ShardedMixedDataset`.
        train: Training arguments (budget, batch sizes, schedule, checkpointing).
        eval: Evaluation arguments (interval, batches per named val set, early stop).
        log: Logger arguments (wandb project/run/group).
        optimizer: A torch.optim class name or {class_path, init_args}; its lr is the peak LR.
        devices: Devices per node (default: SLURM_NTASKS_PER_NODE, else all GPUs, else 1).
        num_nodes: Nodes (default: SLURM_JOB_NUM_NODES, else 1).
        expert_parallel_size: Expert-parallel group size for MoE models (passed to litgpt_ext.train.parallel).
        tokenizer_dir: Tokenizer folder; its files are copied into every checkpoint.
        logger_name: tensorboard, csv or wandb.
        seed: Seed for model init (the data order is seeded by data.seed).
        preempt_exit_code: Exit status after a SIGUSR1/SIGTERM checkpoint (requeue me).
        speed: Speed and scale (compile, activation checkpointing, fused optimizer, meta-device init,
            sharded checkpoints, peak FLOP/s for MFU; see `litgpt_ext.train.speed.SpeedArgs`).
        regularizer: A forgetting penalty added to the training loss: {type: ewc, lambda, reference,
            fisher_data, fisher_batches} or {type: l2_anchor, lambda} (see `litgpt_ext.train.regularize`).
        mix_policy: Online data mixing: {type: fixed | odm | doremi, update_every, ...}: the blend's weights
            chosen during training from per-source training losses (see `litgpt_ext.mix_policy.args`).
        lora: LoRA continued pretraining: {r, alpha, dropout, targets}; the checkpoint the run starts from is
            the frozen base and checkpoints hold the adapter only (see `litgpt_ext.train.lora`).
    """
    hparams = resolved_hparams(locals())  # first: the arguments exactly as given, before any local name exists
    from litgpt_ext.train.parallel import build_strategy, resolve_devices

    # CLI overrides folded into optimizer.init_args (jsonargparse leaves `--optimizer.init_args.lr` beside
    # them), lr > 0, the tokenizer loads; the saved config records the optimizer actually used
    optimizer = check_pretrain_inputs(optimizer, tokenizer_dir, num_nodes, None if model_config else model_name)
    hparams["optimizer"] = resolved_hparams({"optimizer": optimizer})["optimizer"]
    if model_config is None:
        if model_name is None:
            raise ValueError("give model_name (a litgpt model name such as pythia-14m) or an inline model_config")
        model_config = Config.from_name(model_name)  # raises naming the valid choices
    if data is None:
        raise ValueError("no data module: set data.class_path (litgpt_ext.data.ShardedMixedDataset) and data.init_args")
    check_data_module(data)
    regularizer = RegularizerArgs.parse(regularizer, fresh=resume in (False, None) and fork_from is None
                                        and initial_checkpoint_dir is None)  # bad values: one line, no work done
    mix_policy = MixPolicyArgs.parse(mix_policy)  # None for type: fixed
    if initial_checkpoint_dir is not None and resume not in (False, None):
        raise ValueError("initial_checkpoint_dir (weights only) and resume (full state) are exclusive; choose one")
    from litgpt_ext.train.lora import check_args as check_lora

    lora = LoRAArgs.parse(lora)
    hparams["lora"] = resolved_hparams({"lora": lora})["lora"]  # the checked settings (a dict given in Python too)
    check_lora(lora, n_expert=model_config.n_expert, fresh=resume in (False, None) and fork_from is None
               and initial_checkpoint_dir is None, sharded=speed.checkpoint_format == "sharded", regularizer=regularizer)
    devices, num_nodes = resolve_devices(devices, num_nodes)
    if precision is None:
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        precision = "bf16-mixed" if bf16 else "32-true"
    out_dir = Path(out_dir)

    resuming = resume not in (False, None) or fork_from is not None
    strategy = build_strategy(devices, num_nodes, expert_parallel_size, speed=speed, seed=seed)

    def body(fabric: L.Fabric) -> RunResult:
        return main(fabric, model_config=model_config, moe=moe, out_dir=out_dir, data=data, train=train, eval=eval,
                    optimizer=optimizer, initial_checkpoint_dir=initial_checkpoint_dir, resume=resume,
                    fork_from=fork_from, tokenizer_dir=tokenizer_dir, seed=seed, hparams=hparams, speed=speed,
                    regularizer=regularizer, mix_policy=mix_policy, lora=lora)

    _, result = launch(body, out_dir=out_dir, run_name=f"pretrain-{model_config.name}", devices=devices,
                       num_nodes=num_nodes, precision=precision, strategy=strategy, logger_name=logger_name,
                       resume=resuming, log_interval=train.log_interval, log_args=asdict(log),
                       preempt_exit_code=preempt_exit_code)
    return result


# ----------------------------------------------------------------------------------------------- main


def main(
    fabric: L.Fabric,
    *,
    model_config: Config,
    out_dir: Path,
    data: DataModule,
    train: TrainArgs,
    eval: EvalArgs,
    optimizer: Union[str, dict],
    hparams: dict,
    moe: Optional[MoEArgs] = None,
    initial_checkpoint_dir: Optional[Path] = None,
    resume: Union[bool, Literal["auto"], Path] = False,
    fork_from: Optional[Path] = None,
    tokenizer_dir: Optional[Path] = None,
    seed: int = 42,
    loss_fn: LossFn = next_token_loss,
    val_loaders: Callable[[Any], dict] = val_loaders_of,
    speed: Optional[SpeedArgs] = None,
    regularizer: Optional[RegularizerArgs] = None,
    mix_policy: Optional[MixPolicyArgs] = None,
    lora: Optional[LoRAArgs] = None,
) -> RunResult:
    """Build the model, optimizer and data, restore a checkpoint, fix the phase's plan, then `fit`.

    `val_loaders(data)` gives the named validation loaders (after `data.setup`); SFT adds its own
    set to the token-shard sets there.
    """
    with _writer_lock(fabric, out_dir):  # one writer per out_dir: a double submit is refused clearly
        resume_dir = _resolve_resume(fabric, out_dir, resume, fork_from)
        saved = TrainingState.load(resume_dir) if resume_dir else None
        from litgpt_ext.train.lora import setup as setup_lora

        lora_run = setup_lora(fabric, lora, out_dir, resume_dir, initial_checkpoint_dir, saved)  # None without lora:
        continue_log_stream(fabric, resumed=resume not in (False, None) or fork_from is not None,
                            step=saved.step if saved else None)  # one TensorBoard/CSV stream per run

        seq_len = train.max_seq_length or model_config.block_size
        if seq_len > model_config.block_size:
            raise ValueError(f"train.max_seq_length={seq_len} exceeds the model's block_size={model_config.block_size}")
        accum = train.accumulation_steps(fabric.world_size)
        tokens_per_step = train.global_batch_size * seq_len

        speed = speed or SpeedArgs()
        weights_from = resume_dir or initial_checkpoint_dir
        model = setup_model(fabric, model_config, moe, seq_len, weights_from=weights_from, seed=seed, speed=speed,
                             lora=lora_run)
        opt = setup_optimizer(fabric, model, optimizer, speed)
        fabric.print(speed_summary(model, opt, speed))
        peak_lr = optim.peak_lr(opt)  # init_args.lr (layer_lr_decay / Muon groups hold scaled LRs)
        if saved is None and weights_from is not None and tdcp.is_sharded(weights_from):  # weights only
            tdcp.load_sharded(weights_from, model.module)  # every rank reads its shards (any world size)
        state = TrainingState()
        if saved is not None:  # a sharded checkpoint: model + optimizer shards load here, together
            saved.restore(fabric, model, opt, sharded_from=resume_dir if tdcp.is_sharded(resume_dir) else None)
            state = dataclasses.replace(saved, optimizer=None, data=None)  # its RNG: `fit` restores it
            fabric.print(f"Resumed from {resume_dir} at step {state.step} ({state.tokens:,} tokens)")

        plan, what = _phase_plan(fabric, out_dir, train, peak_lr, tokens_per_step, state, saved)
        if saved is not None and what == "kept" and state.step >= plan.stop_step:
            fabric.print(f"Already finished: {resume_dir} is at step {state.step}, where this phase's plan stops"
                         f" ({plan.describe()}); nothing to do (train.new_phase: true with a new budget continues it)")
            return RunResult("finished", state.step, state.tokens, val_start=state.val_start,
                             schedule=asdict(plan.schedule), plan=plan.to_dict())
        if saved is not None and train.pause_at_step is not None and state.step >= train.pause_at_step:
            fabric.print(f"Paused: {resume_dir} is at step {state.step}, at or past train.pause_at_step="
                         f"{train.pause_at_step}; nothing to do in this job (the next segment's config continues)")
            return RunResult("paused", state.step, state.tokens, val_start=state.val_start,
                             schedule=asdict(plan.schedule), plan=plan.to_dict())
        if mix_policy is not None:  # before the loader state loads: the checkpoint's online weights continue
            data.online_policy = identity_of(mix_policy, plan.phase_id)
        loader = _setup_data(fabric, data, train, seq_len, tokenizer_dir, saved, plan)
        mixer = setup_mix_policy(fabric, mix_policy, data, loader, out_dir, plan, train.global_batch_size,
                                 saved.mix_policy if saved else None, new_phase=what != "kept", config=hparams,
                                 build_reference=lambda p: setup_model(fabric, model_config, moe, seq_len, p, seed))
        check_shards_fit_model(data, model_config, tokenizer_dir)  # token ids < vocab, same tokenizer: before step 1
        state.mix = getattr(data, "resolved_mix", None)
        vals = val_loaders(data)  # EWC's Fisher may read one; with its cache and the L2 anchor in out_dir
        reg = setup_regularizer(fabric, regularizer, model, data=data, val_loaders=vals, out_dir=out_dir, plan=plan,
                                new_phase=what != "kept", has_start_weights=weights_from is not None, accum=accum,
                                global_batch_size=train.global_batch_size, seq_len=seq_len, model_config=model_config,
                                loss_fn=loss_fn)
        if saved is not None:  # restored: do not hold a second copy of the optimizer state during training
            saved.optimizer = saved.rng = saved.data = None

        if plan.phase_id != state.phase_id:
            state.val_start = None  # a new phase measures its own baseline
        state.set_plan(plan)
        if state.lr is None or saved is None:
            state.lr = plan.schedule(state.step)
        fabric.print(f"Schedule {plan.schedule}; this run: steps {state.step} -> {plan.stop_step}, {accum} micro-batches"
                     f" of {train.micro_batch_size} x {fabric.world_size} ranks per step, {tokens_per_step:,} tokens/step")

        validator = Validator(fabric, vals, eval, out_dir, baseline=state.val_start, loss_fn=loss_fn)
        writer = CheckpointWriter(out_dir, model_config, hparams, tokenizer_dir, train.keep_last_k,
                                  sharded=speed.checkpoint_format == "sharded", lora=lora_run)
        throughput = throughput_of(fabric, model_config, seq_len, speed)
        if what != "kept" and fabric.global_rank == 0:
            record_phase(out_dir, plan, str(resume_dir) if resume_dir else None)
        with preemption() as flag:
            return fit(fabric, model, opt, loader, state, plan, train, validator=validator, writer=writer,
                       loss_fn=loss_fn, preempt=flag, throughput=throughput, regularizer=reg, mixer=mixer)


def _resolve_resume(fabric: L.Fabric, out_dir: Path, resume: Any, fork_from: Optional[Path]) -> Optional[Path]:
    """The checkpoint to resume (forking `fork_from` into an empty out_dir first)."""
    if fabric.global_rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.prune_checkpoints(out_dir, None)  # leftover *.tmp of a killed save
        ckpt.set_aside_newer(resume, out_dir, log=fabric.print)  # resuming an older step abandons newer ones
        if fork_from is not None and not ckpt.list_checkpoints(out_dir, final=True):
            ckpt.fork(fork_from, out_dir)
    fabric.barrier()
    if fork_from is not None and resume in (False, None):
        resume = "auto"
    return ckpt.resolve_resume(resume, out_dir, log=fabric.print)


def _setup_data(fabric: L.Fabric, data: Any, train: TrainArgs, seq_len: int, tokenizer_dir: Optional[Path],
                saved: Optional[TrainingState], plan: RunPlan):
    from litgpt import Tokenizer

    tokenizer = Tokenizer(tokenizer_dir) if tokenizer_dir is not None else None
    data.connect(tokenizer=tokenizer, batch_size=train.micro_batch_size, max_seq_length=seq_len)
    with fabric.rank_zero_first():
        data.prepare_data()
    data.setup(rank=fabric.global_rank, world_size=fabric.world_size)
    if callable(getattr(data, "set_phase", None)):  # mix schedules and repetition caps need the phase's budget
        data.set_phase(plan.start_step, plan.stop_step, train.global_batch_size)
    loader = data.train_dataloader()
    for method in ("state_dict", "load_state_dict"):
        if not callable(getattr(loader, method, None)):
            raise ValueError(f"{type(data).__name__}.train_dataloader() returned {type(loader).__name__} without"
                             f" {method}(): the loop cannot checkpoint its position (use ShardedMixedDataset)")
    if saved is not None and saved.data is not None:
        new_mix = getattr(data, "resolved_mix", None)
        if saved.mix is not None and new_mix is not None and saved.mix != new_mix:
            fabric.print(f"New blend for this run:\n  checkpoint mix: {saved.mix}\n  new mix:        {new_mix}")
        loader.load_state_dict(saved.data)
    return loader


@contextmanager
def _writer_lock(fabric: L.Fabric, out_dir: Path):
    """Rank 0 holds out_dir/.run.lock (host, pid, SLURM job) for the whole run; every rank raises if
    another live writer holds it."""
    lock = ckpt.hold_run_lock(fabric, out_dir)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


# ----------------------------------------------------------------------------------------------- fit


def fit(
    fabric: L.Fabric,
    model: Any,
    optimizer: Any,
    loader: Any,
    state: TrainingState,
    plan: RunPlan,
    train: TrainArgs,
    *,
    validator: Validator,
    writer: CheckpointWriter,
    loss_fn: LossFn = next_token_loss,
    preempt: Optional["_PreemptFlag"] = None,
    throughput: Optional[dict] = None,
    regularizer: Optional[Regularizer] = None,
    mixer: Optional[MixController] = None,
) -> RunResult:
    """Train from `state.step` to `plan.stop_step`: one optimizer step per `accum` micro-batches of
    `loss_fn`, validation every `eval.interval`, checkpoints every `save_interval`, early stop and
    preemption at step boundaries. Returns what happened (stopped, step, tokens, losses, val)."""
    from litgpt_ext.model import moe_aux_loss, update_router_biases

    accum = train.accumulation_steps(fabric.world_size)
    tokens_per_step = train.global_batch_size * (train.max_seq_length or model.max_seq_length)
    step_logger = StepLogger(fabric, tokens_per_step, state.step, plan.stop_step, **(throughput or {}))
    losses: dict[int, float] = {}
    stopped = "budget"
    if validator and validator.eval.initial_validation and validator.baseline is None:
        if validator.run(model, state.step, state.tokens):
            stopped = "early_stop"
        state.val_start = validator.baseline
    it = rng_neutral(loader)  # data loading never draws from the training RNG (dropout masks)
    state.restore_rng(fabric)  # resumed: the checkpoint's RNG, after every draw of the setup
    while state.step < plan.stop_step and stopped == "budget":
        loss_sum = torch.zeros((), device=fabric.device)
        for micro in range(accum):
            batch = fabric.to_device(next(it))
            with fabric.no_backward_sync(model, enabled=micro < accum - 1):
                loss, _ = (mixer.loss if mixer is not None else loss_fn)(model, batch)  # mixer: + per-source signals
                aux = moe_aux_loss(model)  # 0 for dense models
                fabric.backward((loss + aux) / accum)
            loss_sum += loss.detach()
            state.iter_num += 1
        if regularizer is not None:  # λ/2 Σ F(θ − θ*)² of this rank's shards: its gradient goes straight into them
            regularizer.backward()
        state.lr = plan.schedule(state.step + 1)
        optim.set_lrs(optimizer, state.lr)  # x each group's lr_scale (layer_lr_decay, Muon's AdamW half)
        grad_norm = fabric.clip_gradients(model, optimizer, max_norm=train.max_norm or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_router_biases(model)  # aux-loss-free balancing (no-op unless moe.bias_update_rate > 0)
        state.step += 1
        state.tokens += tokens_per_step
        if mixer is not None:  # online mixing: new weights at this step boundary when due
            state.mix_policy = mixer.after_step(state.step)

        last = state.step >= plan.stop_step
        if state.step % train.log_interval == 0 or last:
            loss_val = float(fabric.all_reduce(loss_sum / accum, reduce_op="mean"))
            gn = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            losses[state.step] = loss_val
            step_logger.log(model, loader, step=state.step, tokens=state.tokens, loss=loss_val, lr=state.lr,
                            grad_norm=float(gn), lrs=optim.group_lrs(optimizer))
            if regularizer is not None:  # reg/<type> (summed over ranks) and objective = loss + penalty
                regularizer.log(fabric, state.step, loss_val)
        if validator.due(state.step, last) and validator.run(model, state.step, state.tokens) is not None:
            stopped = "early_stop"
        state.val_start = validator.baseline
        if preempt is not None and preempt_requested(fabric, preempt):
            stopped = "preempted"
        elif stopped == "budget" and not last and state.step == train.pause_at_step:
            stopped = "paused"  # a segment of the phase: checkpoint here, no final/, exit 0
        saving = train.save_interval is not None and state.step % train.save_interval == 0
        if saving or stopped != "budget":
            writer.save(fabric, ckpt.step_dir_name(state.step), model, optimizer, loader, state)
    if stopped not in ("preempted", "paused"):
        writer.save(fabric, "final", model, optimizer, loader, state)
    fabric.print(f"Done: {stopped} at step {state.step}, {state.tokens:,} tokens")
    return RunResult(stopped, state.step, state.tokens, losses=losses, val=validator.history,
                     val_start=validator.baseline, schedule=asdict(plan.schedule), plan=plan.to_dict(),
                     signal=preempt.signum if preempt is not None else None)


