"""`litgpt-ext sft`: supervised fine-tuning on the pretraining loop (`litgpt_ext.train.loop.main`/`fit`).

    litgpt-ext sft --config midtrain_configs/sft/demo_math.yaml [--optimizer.init_args.lr 1e-4] [--seed 2]

What SFT changes, and how it reaches the shared loop (no second loop):
- weights only from `checkpoint_dir` (fresh optimizer, step 0): `main(initial_checkpoint_dir=)`;
  model config and tokenizer from that folder too;
- the budget: `sft_plan` (epochs over the SFT set, warmup fraction then cosine to `min_lr`) becomes a
  `TrainArgs` with `max_iters` = the plan's steps, so the phase machinery (plan fixed when the run
  begins, kept across requeues) is the pretraining one;
- the batches: SFTData's padded, prompt-masked dicts through `next_token_loss`;
- validation: the SFT val set (a full pass, token-weighted) plus named token-shard sets
  (`eval.val_data_path`, forgetting) through the pretraining `Validator`;
- at the end, rank 0 writes `out_dir/sft_metrics.json` (`litgpt_ext.sft.metrics`).
Resume and preemption are the loop's: `resume: auto` continues the latest `step-*` of out_dir.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional, Union

from litgpt_ext.sft.config import SFTConfig, SFTEvalArgs, SFTTrainArgs, sft_plan
from litgpt_ext.sft.data import SFTData
from litgpt_ext.sft.metrics import FILE_NAME, SFTMetrics, source_identity, write_sft_metrics
from litgpt_ext.train.args import RegularizerConfig  # noqa: E402  (jsonargparse reads the annotation)

if TYPE_CHECKING:
    from litgpt_ext.train.launch import RunResult

SFT_VAL_SET = "sft"
"""The SFT validation set's name in val_metrics.csv, TensorBoard and the loop's val history."""


def sft(
    checkpoint_dir: Path,
    out_dir: Path,
    data: Optional[SFTData] = None,
    train: SFTTrainArgs = SFTTrainArgs(),
    eval: SFTEvalArgs = SFTEvalArgs(),
    optimizer: Union[str, dict] = "AdamW",
    resume: Union[bool, Literal["auto"], Path] = "auto",
    precision: Optional[Literal["bf16-true", "bf16-mixed", "32-true"]] = None,
    devices: Union[int, Literal["auto"]] = "auto",
    num_nodes: Optional[int] = None,
    logger_name: Literal["tensorboard", "csv", "wandb"] = "csv",
    seed: int = 42,
    regularizer: Optional[RegularizerConfig] = None,
) -> Optional["RunResult"]:
    """Fully fine-tune a checkpoint on instruction or plain-text data (the paper's post-training stage).

    Args:
        checkpoint_dir: The source checkpoint (`step-*`, `final`, a fork, a converted litgpt model):
            weights only (fresh optimizer, step 0); its model_config.yaml and tokenizer are used.
        out_dir: This SFT run's folder: step-*/final checkpoints, val_metrics.csv, sft_metrics.json.
        data: `litgpt_ext.sft.data.SFTData` (JSON/JSONL instruction or plain-text records, prompt
            style, mask_prompt). Its `seed` defaults to the run's `seed`.
        train: Epochs, batch sizes, warmup fraction, min LR, max_seq_length, save/log intervals.
        eval: Validation interval (default once per epoch), named token-shard sets
            (`val_data_path: {general: data/demo/val/1}`) and their batch limit.
        optimizer: {class_path, init_args: {lr, ...}}; `init_args.lr` (the peak LR) is required.
        resume: auto (default): continue the latest step-* in out_dir, else start from
            checkpoint_dir; true: that, but error if none; false: start over.
        precision: bf16-true, bf16-mixed or 32-true (default: bf16-mixed on GPUs with bf16, else 32-true).
        devices: Devices per node (default: SLURM_NTASKS_PER_NODE, else all GPUs, else 1).
        num_nodes: Nodes (default: SLURM_JOB_NUM_NODES, else 1).
        logger_name: tensorboard, csv or wandb.
        seed: Model-side seed and, unless data.seed is set, the data order's seed.
        regularizer: A forgetting penalty on the SFT loss, as in pretraining (`litgpt_ext.train.regularize`):
            {type: l2_anchor, lambda} toward the source checkpoint's weights, or {type: ewc, lambda,
            reference, fisher_data, fisher_batches}.

    Returns the loop's result with `sft_metrics` added, or None when out_dir already holds a
    finished run (its sft_metrics.json) of the same config (another config is refused, naming the
    differing keys); exits with the preemption code after SIGUSR1/SIGTERM. Bad records, data
    without target tokens and a peak LR <= 0 are refused before any model is built.
    """
    args = dict(locals())  # first: the arguments exactly as given
    from litgpt_ext.train.hparams import resolved_hparams

    args["optimizer"] = optimizer_spec(optimizer)
    hparams = resolved_hparams(args)
    if data is None:
        raise ValueError("no SFT data: set data.class_path: litgpt_ext.sft.data.SFTData and data.init_args.train_path")
    cfg = SFTConfig(**hparams)  # the SFT-specific checks (class path, out_dir vs source run, ...)
    cfg.peak_lr  # noqa: B018  (raises now, before any work, when optimizer.init_args.lr is missing)
    return run_sft(cfg, data, hparams)


def optimizer_spec(optimizer: Union[str, dict]) -> Union[str, dict]:
    """{class_path, init_args} with flag overrides folded in: jsonargparse turns
    `--optimizer.init_args.lr 1e-4` (or `--optimizer.lr 1e-4`) into a top-level string `lr: '1e-4'`."""
    if not isinstance(optimizer, dict):
        return optimizer
    out = {k: v for k, v in optimizer.items() if k in ("class_path", "init_args")}
    init = dict(out.get("init_args") or {})
    for k, v in optimizer.items():
        if k not in ("class_path", "init_args"):
            if isinstance(v, str):
                try:
                    v = float(v) if any(c in v for c in ".eE") else int(v)
                except ValueError:
                    pass
            init[k] = v
    out["init_args"] = init
    return out


def finished(out_dir: Path) -> bool:
    """An SFT run is finished when its `final/` checkpoint and `sft_metrics.json` both exist."""
    from litgpt_ext import checkpoint as ckpt

    return (Path(out_dir) / FILE_NAME).is_file() and ckpt.is_complete(Path(out_dir) / "final")


def run_sft(cfg: SFTConfig, data: SFTData, hparams: dict) -> Optional["RunResult"]:
    """The command's body for a parsed config (the grid calls it in-process for every cell)."""
    import torch
    from litgpt import Tokenizer
    from litgpt.config import Config

    from litgpt_ext.sft.checks import refuse_changed_rerun, save_prompt_style
    from litgpt_ext.train.launch import launch
    from litgpt_ext.train.loop import main
    from litgpt_ext.train.parallel import build_strategy, resolve_devices

    src, out_dir = cfg.checkpoint_dir, cfg.out_dir
    if finished(out_dir) and cfg.resume not in (False, None):
        refuse_changed_rerun(out_dir, hparams)  # another LR/seed/data/... into a finished run: refuse
        save_prompt_style(out_dir, data.style)  # runs finished before checkpoints carried it
        print(f"SFT run {out_dir} is finished ({FILE_NAME} and final/ exist, same config): nothing to do")
        return None
    if cfg.resume in ("auto", True):  # a requeue continues the latest step-*: with the config it began with
        from litgpt_ext import checkpoint as ckpt

        latest = ckpt.latest_checkpoint(out_dir) if out_dir.is_dir() else None
        if latest is not None:
            refuse_changed_rerun(out_dir, hparams, checkpoint=latest)
    if not (src / "model_config.yaml").is_file():
        raise FileNotFoundError(f"checkpoint_dir {str(src)!r} has no model_config.yaml (expected a litgpt_ext or"
                                " litgpt checkpoint folder)")
    model_config = Config.from_file(src / "model_config.yaml")
    moe = source_moe_args(src)
    if data.seed is None:
        data.seed = cfg.seed
    seq_len = cfg.train.max_seq_length or model_config.block_size
    if seq_len > model_config.block_size:
        raise ValueError(f"train.max_seq_length={seq_len} exceeds the model's block_size={model_config.block_size}"
                         f" ({src / 'model_config.yaml'})")
    # read, check and encode the data before any model is built: bad records, no target token, fused
    # prompt/response boundaries are reported here (the loop's data.setup reuses the encoded examples)
    data.preflight(Tokenizer(src), seq_len, model_config.block_size, show=_launcher_rank() == 0)
    devices, num_nodes = resolve_devices(cfg.devices if cfg.devices is not None else "auto", cfg.num_nodes)
    precision = cfg.precision
    if precision is None:
        precision = "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
    world_size = devices * num_nodes
    plan = sft_plan(data.num_train_examples(), cfg.train, cfg.eval, world_size, cfg.peak_lr)
    train, eval_ = loop_args(cfg.train, cfg.eval, plan, seq_len)

    strategy = build_strategy(devices, num_nodes, 1)
    from litgpt_ext.train.args import RegularizerArgs

    reg = RegularizerArgs.parse(cfg.regularizer, fresh=False)  # the source checkpoint is the L2 anchor

    def body(fabric) -> RunResult:
        count_real_tokens(fabric, data, plan.accumulation)
        fabric.print(f"SFT {data.name}: {plan.total_steps} steps ({cfg.train.epochs} epochs of {plan.batches_per_epoch}"
                     f" micro-batches per rank, {plan.accumulation} per step), warmup {plan.warmup_steps}, cosine"
                     f" {cfg.peak_lr:g} -> {cfg.train.min_lr:g}; validation every {plan.eval_interval} steps")
        return main(fabric, model_config=model_config, out_dir=out_dir, data=data, train=train, eval=eval_,
                    optimizer=cfg.optimizer, hparams=hparams, initial_checkpoint_dir=src, resume=cfg.resume,
                    tokenizer_dir=src, seed=cfg.seed, moe=moe, regularizer=reg,
                    val_loaders=lambda dm: sft_val_loaders(dm, cfg.eval, seq_len))

    # the shared launch path: a preempted SFT run exits like pretraining (marker, every rank, exit 99)
    try:
        fabric, result = launch(body, out_dir=out_dir, run_name=f"sft-{model_config.name}", devices=devices,
                                num_nodes=num_nodes, precision=precision, strategy=strategy,
                                logger_name=cfg.logger_name, resume=cfg.resume not in (False, None),
                                log_interval=train.log_interval)
    finally:  # also for a preemption exit: its step-* carries the prompt style too
        save_prompt_style(out_dir, data.style)
    metrics = sft_metrics_of(result, cfg, data, plan.accumulation)
    if fabric.global_rank == 0:
        path = write_sft_metrics(out_dir, metrics)
        fabric.print(f"SFT {data.name}: val loss {metrics.sft_val_loss:.4f}"
                     + "".join(f", {k} {v:.4f}" for k, v in metrics.val_losses.items())
                     + f"; trained on {metrics.train_tokens:,} real tokens ({metrics.train_tokens_padded:,} padded,"
                     f" {metrics.train_target_tokens:,} with loss; the loop's 'tokens' above is its budget) -> {path}")
    fabric.barrier()
    result.metrics = metrics
    return result


def _launcher_rank() -> int:
    """This process's rank before Fabric exists (launched ranks carry it in the environment)."""
    for k in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(k, "").isdigit():
            return int(os.environ[k])
    return 0


TOKENS_RE = re.compile(r"\| tokens [\d,]+ \|")


def count_real_tokens(fabric, data: SFTData, accum: int) -> None:
    """The step log of an SFT run: `tokens` = real tokens (prompt included, no padding) over all ranks,
    `tokens_padded` = what the padded batches held, `target_tokens` = tokens carrying loss, and
    `tokens_budget` = the loop's own counter (steps x global_batch_size x max_seq_length), in the
    logger's metrics and the printed step line (`litgpt_ext.sft.tokens`)."""
    from litgpt_ext.sft.tokens import TokenCounter

    counter: list = []
    log_dict, print_ = fabric.log_dict, fabric.print

    def counts(step: int) -> dict:
        if not counter:
            counter.append(TokenCounter(data))  # after data.setup: the loop logs only after its first step
        return counter[0].after(step * accum)

    def sft_log_dict(metrics, step=None):
        if "grad_norm" in metrics and "step" in metrics and "tokens" in metrics:
            metrics = {**metrics, "tokens_budget": metrics["tokens"], **counts(int(metrics["step"]))}
        return log_dict(metrics, step=step)

    def sft_print(*args, **kwargs):
        line = args[0] if args else None
        if isinstance(line, str) and (m := re.match(r"step (\d+)/", line)) and (t := TOKENS_RE.search(line)):
            c = counts(int(m.group(1)))
            line = (line[:t.start()] + f"| tokens {c['tokens']:,} (padded {c['tokens_padded']:,}, target "
                    f"{c['target_tokens']:,}) |" + line[t.end():])
            args = (line,) + args[1:]
        return print_(*args, **kwargs)

    fabric.log_dict, fabric.print = sft_log_dict, sft_print


def source_moe_args(src: Path):
    """The source run's MoE options (gate, aux loss, ...) from its hyperparameters.yaml, if any:
    model_config.yaml holds litgpt's fields only."""
    import dataclasses

    import yaml

    from litgpt_ext.model import MoEArgs

    path = src / "hyperparameters.yaml"
    moe = (yaml.safe_load(path.read_text()) or {}).get("moe") if path.is_file() else None
    if not moe:
        return None
    names = {f.name for f in dataclasses.fields(MoEArgs)}
    return MoEArgs(**{k: v for k, v in moe.items() if k in names})


def loop_args(train: SFTTrainArgs, eval: SFTEvalArgs, plan, seq_len: int):
    """The loop's TrainArgs/EvalArgs for an SFT plan: `max_iters` = the plan's steps and its warmup,
    cosine to min_lr (the same `Schedule` as `plan.schedule`)."""
    from litgpt_ext.train.args import EvalArgs, TrainArgs

    t = TrainArgs(save_interval=train.save_interval, log_interval=train.log_interval,
                  global_batch_size=train.global_batch_size, micro_batch_size=train.micro_batch_size,
                  max_iters=plan.total_steps, lr_warmup_steps=plan.warmup_steps, lr_scheduler="cosine",
                  min_lr=train.min_lr, max_seq_length=seq_len, max_norm=train.max_norm,
                  keep_last_k=train.keep_last_k, max_tokens=None)
    e = EvalArgs(interval=plan.eval_interval, max_iters=eval.max_iters or 2**62,
                 initial_validation=eval.initial_validation, final_validation=True)
    return t, e


def sft_val_loaders(data: SFTData, eval: SFTEvalArgs, seq_len: int) -> dict:
    """{"sft": the SFT val set (read in full), **named token-shard sets (at most eval.max_iters batches)}."""
    from litgpt_ext.sft.loss import token_val_loaders

    val = data.val_dataloader()
    val.full_pass = True  # Validator: ignore eval.max_iters for this set
    loaders = {SFT_VAL_SET: val}
    if eval.val_data_path:
        loaders.update(token_val_loaders(eval.val_data_path, seq_len, data.batch_size, data.rank, data.world_size))
    return loaders


def _source_step(src: Path) -> Optional[int]:
    """The source checkpoint's training step (its TrainingState), or None for a converted model."""
    from litgpt_ext import checkpoint as ckpt

    if not ckpt.is_complete(src):
        return None
    return int(ckpt.load_training_state(src).get("step", 0))


def sft_metrics_of(result: "RunResult", cfg: SFTConfig, data: SFTData, accum: int = 1) -> SFTMetrics:
    """sft_metrics.json from the loop's validation history (the last entry = after SFT)."""
    by_step: dict[int, dict[str, float]] = {}
    for row in result.val:
        by_step.setdefault(row["step"], {})[row["set"]] = row["loss"]
    if not by_step:
        raise ValueError("SFT finished without a validation (eval: no SFT val set?)")

    def entry(step: int) -> dict:
        losses = dict(by_step[step])
        return {"step": step, "sft_val_loss": losses.pop(SFT_VAL_SET), "val_losses": losses}

    steps = sorted(by_step)
    last = entry(steps[-1])
    # "initial" means before the first SFT step: the validator's baseline (kept across requeues) is its
    # *first* validation, which is the final one when eval.initial_validation is off: then there is none
    initial = result.val_start if cfg.eval.initial_validation else None
    initial = ({"sft_val_loss": initial.get(SFT_VAL_SET),
                "val_losses": {k: v for k, v in initial.items() if k != SFT_VAL_SET}} if initial else None)
    run, name, step = source_identity(cfg.checkpoint_dir, _source_step(cfg.checkpoint_dir))
    from litgpt_ext.sft.tokens import TokenCounter

    n_val = sum(int((lab[1:] != data.ignore_index).sum()) for _, lab in data.val_examples)
    seen = TokenCounter(data).after(result.step * accum)  # every rank's batches, exact after resumes
    return SFTMetrics(
        sft_set=data.name, sft_val_loss=last["sft_val_loss"], sft_val_tokens=n_val, lr=cfg.peak_lr, seed=cfg.seed,
        source_checkpoint=str(cfg.checkpoint_dir), source_run=run, source_checkpoint_name=name, source_step=step,
        step=result.step, epochs=cfg.train.epochs, train_tokens=seen["tokens"],
        train_tokens_padded=seen["tokens_padded"], train_target_tokens=seen["target_tokens"],
        val_losses=last["val_losses"], initial=initial,
        history=[entry(s) for s in steps], out_dir=str(cfg.out_dir))

