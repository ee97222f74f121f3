"""One Fabric loop for pretraining and midtraining (midtraining == resume with a new blend).

`litgpt-ext pretrain --config run.yaml [--train.max_additional_steps 100 ...]`. Mirrors
`litgpt/pretrain.py` (same `setup`-style signature and argument dataclasses), adding the paper's
budget/schedule keys, named validation sets, exact resume (model, optimizer, data cursors, RNG),
FSDP2 on a DeviceMesh, atomic checkpoints and preemption handling.
"""

from __future__ import annotations

import csv
import dataclasses
import inspect
import math
import random
import signal
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning as L
import numpy as np
import torch
from litgpt.args import LogArgs
from litgpt.config import Config
from litgpt.data import DataModule

from litgpt_ext.model import MoEArgs
from litgpt_ext.train import checkpoint as ckpt
from litgpt_ext.train.args import EvalArgs, TrainArgs
from litgpt_ext.train.schedules import Schedule, warmup_steps_for

PREEMPT_EXIT_CODE = 99
"""Exit status after SIGUSR1/SIGTERM: a checkpoint was saved, requeue the job with `resume: auto`."""
VAL_CSV = "val_metrics.csv"


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
) -> dict:
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
        expert_parallel_size: Expert-parallel group size for MoE models (passed to litgpt_ext.parallel).
        tokenizer_dir: Tokenizer folder; its files are copied into every checkpoint.
        logger_name: tensorboard, csv or wandb.
        seed: Seed for model init (the data order is seeded by data.seed).
        preempt_exit_code: Exit status after a SIGUSR1/SIGTERM checkpoint (requeue me).
    """
    from litgpt_ext.parallel import build_strategy, resolve_devices

    hparams = _hparams(locals())
    if model_config is None:
        if model_name is None:
            raise ValueError("give model_name (a litgpt model name such as pythia-14m) or an inline model_config")
        model_config = Config.from_name(model_name)  # raises naming the valid choices
    if data is None:
        raise ValueError("no data module: set data.class_path (litgpt_ext.data.ShardedMixedDataset) and data.init_args")
    if initial_checkpoint_dir is not None and resume not in (False, None):
        raise ValueError("initial_checkpoint_dir (weights only) and resume (full state) are exclusive; choose one")
    devices, num_nodes = resolve_devices(devices, num_nodes)
    if precision is None:
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        precision = "bf16-mixed" if bf16 else "32-true"
    out_dir = Path(out_dir)

    from litgpt.utils import choose_logger

    resuming = resume not in (False, None) or fork_from is not None
    logger = choose_logger(
        logger_name, out_dir, name=f"pretrain-{model_config.name}", resume=resuming,
        log_interval=train.log_interval, log_args=asdict(log),
    )
    strategy = build_strategy(devices, num_nodes, expert_parallel_size)
    fabric = L.Fabric(devices=devices, num_nodes=num_nodes, strategy=strategy, precision=precision, loggers=[logger])
    fabric.launch()
    return _run(fabric, model_config, out_dir, initial_checkpoint_dir, resume, fork_from, data, train, eval,
                optimizer, tokenizer_dir, seed, preempt_exit_code, hparams, moe)


# ----------------------------------------------------------------------------------------------- setup


def _hparams(args: dict) -> dict:
    """The resolved config in the paper's key format (reloadable with `--config`)."""
    out = {}
    for k, v in args.items():
        if k == "data" and v is not None:
            out[k] = {"class_path": f"{type(v).__module__}.{type(v).__qualname__}", "init_args": _init_args(v)}
        elif dataclasses.is_dataclass(v):
            out[k] = asdict(v)
        else:
            out[k] = v
    return ckpt._jsonable(out)


def _init_args(obj: Any) -> dict:
    """A data module's constructor arguments: dataclass fields, Lightning `save_hyperparameters()`,
    else the attributes named like the parameters."""
    if dataclasses.is_dataclass(obj):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}
    saved = dict(getattr(obj, "hparams", None) or {})
    params = inspect.signature(type(obj).__init__).parameters
    return {n: saved[n] if n in saved else getattr(obj, n) for n in params
            if n != "self" and (n in saved or hasattr(obj, n))}


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _is_distributed(fabric: L.Fabric) -> bool:
    return fabric.world_size > 1


def _state_dict_options(fabric: L.Fabric, for_save: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    dist = _is_distributed(fabric)
    if for_save:
        return StateDictOptions(full_state_dict=dist, cpu_offload=dist)
    return StateDictOptions(full_state_dict=dist, broadcast_from_rank0=False)


def _plan(train: TrainArgs, peak_lr: float, step: int, tokens_per_step: int, prev: Optional[dict],
          same_run: bool, resumed_lr: Optional[float]) -> tuple[Schedule, int]:
    """This invocation's LR schedule and the step it stops at.

    The run's total is `min(max_iters, max_tokens // tokens_per_step)`. Whole-run schedules
    (cosine, wsd, constant) span 0 -> total, and `max_additional_steps` only stops this invocation
    early. Phase schedules (decay, rewarmup_cosine) start at an anchor, the step this phase began
    from, and end at `anchor + max_additional_steps` (or the total). A requeued run of the same
    phase (same out_dir, same schedule name) keeps its saved anchor; anything else anchors here.
    """
    name = train.lr_scheduler
    anchored = name in ("decay", "rewarmup_cosine")
    if prev is not None and same_run and prev.get("name") == name:
        anchor, anchor_lr = prev["start_step"], prev.get("start_lr")
    else:
        anchor, anchor_lr = step, resumed_lr
    totals = []
    if train.max_iters is not None:
        totals.append(train.max_iters)
    if train.max_tokens is not None:
        totals.append(train.max_tokens // tokens_per_step)
    ends = list(totals)
    if train.max_additional_steps is not None:
        ends.append((anchor if anchored else step) + train.max_additional_steps)
    if not ends:
        raise ValueError("no training budget: set train.max_iters, train.max_tokens or train.max_additional_steps")
    stop = min(ends)
    end = stop if (anchored or not totals) else min(totals)
    begin = anchor if anchored else 0
    warmup = warmup_steps_for(name, end - begin, train.lr_warmup_steps, train.lr_warmup_fraction)
    schedule = Schedule(name=name, peak_lr=peak_lr, min_lr=train.min_lr, end_step=end, warmup_steps=warmup,
                        stable_steps=train.stable_steps, start_step=begin,
                        start_lr=anchor_lr if name == "decay" else None)
    return schedule, stop


class _PreemptFlag:
    """SIGUSR1/SIGTERM set a flag; the loop checkpoints at the next step boundary and exits."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._old = {}
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a worker thread): no handler
                pass

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ----------------------------------------------------------------------------------------------- run


def _run(fabric, config, out_dir, initial_checkpoint_dir, resume, fork_from, data, train, eval, optimizer,
         tokenizer_dir, seed, preempt_exit_code, hparams, moe=None) -> dict:
    from litgpt.pretrain import initialize_weights

    from litgpt_ext.model import build_model, initialize_moe_weights
    from litgpt.utils import instantiate_torch_optimizer, num_parameters

    lock = ckpt.hold_run_lock(fabric, out_dir)  # one writer per out_dir: rank 0 holds it, a second run is refused
    if fabric.global_rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.prune_checkpoints(out_dir, None)  # leftover *.tmp of a killed save
        ckpt.set_aside_newer(resume, out_dir, log=fabric.print)  # resuming an older step: newer -> abandoned-*/
        if fork_from is not None and not ckpt.list_checkpoints(out_dir, final=True):
            ckpt.fork(fork_from, out_dir)
            resume = "auto" if resume in (False, None) else resume
    fabric.barrier()
    if fork_from is not None and resume in (False, None):
        resume = "auto"
    resume_dir = ckpt.resolve_resume(resume, out_dir, log=fabric.print)
    state = ckpt.load_training_state(resume_dir) if resume_dir else None

    seq_len = train.max_seq_length or config.block_size
    if seq_len > config.block_size:
        raise ValueError(f"train.max_seq_length={seq_len} exceeds the model's block_size={config.block_size}")
    accum = train.accumulation_steps(fabric.world_size)
    tokens_per_step = train.global_batch_size * seq_len

    fabric.seed_everything(seed)  # same init on every rank before sharding
    t0 = time.perf_counter()
    model = build_model(config, moe)  # litgpt's GPT; MoE blocks become litgpt_ext.model.MoEFeedForward
    initialize_weights(fabric, model, n_layer=config.n_layer, n_embd=config.n_embd)
    initialize_moe_weights(model, n_layer=config.n_layer, n_embd=config.n_embd)  # litgpt's init only sees nn.Linear
    model.max_seq_length = seq_len
    weights_from = resume_dir or initial_checkpoint_dir
    if weights_from is not None:
        model.load_state_dict(ckpt.load_model_state(weights_from), strict=True)
        model.max_seq_length = seq_len
    fabric.print(f"Model {config.name}: {num_parameters(model):,} parameters, built in {time.perf_counter() - t0:.2f}s"
                 + (f", weights from {weights_from}" if weights_from else ""))
    model = fabric.setup(model)
    opt = instantiate_torch_optimizer(optimizer, model.parameters())
    opt = fabric.setup_optimizers(opt)
    fresh_groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    peak_lr = float(fresh_groups[0]["lr"])

    step, tokens, iter_num, resumed_lr = 0, 0, 0, None
    if state is not None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(model.module, opt.optimizer, state["optimizer"],
                                 options=_state_dict_options(fabric, for_save=False))
        for g, fresh in zip(opt.param_groups, fresh_groups):  # this config's hyperparameters win
            g.update(fresh)
        step, tokens, iter_num = int(state["step"]), int(state["tokens"]), int(state["iter_num"])
        resumed_lr = state.get("lr")
        same_world = state.get("world_size") == fabric.world_size
        if state.get("rng") and same_world:
            _set_rng_state(state["rng"][fabric.global_rank])
        fabric.print(f"Resumed from {resume_dir} at step {step} ({tokens:,} tokens)")

    # data
    from litgpt import Tokenizer

    tokenizer = Tokenizer(tokenizer_dir) if tokenizer_dir is not None else None
    data.connect(tokenizer=tokenizer, batch_size=train.micro_batch_size, max_seq_length=seq_len)
    with fabric.rank_zero_first():
        data.prepare_data()
    try:
        data.setup(rank=fabric.global_rank, world_size=fabric.world_size)
    except TypeError:  # a plain litgpt DataModule: setup(stage)
        data.setup()
    loader = data.train_dataloader()
    if state is not None and state.get("data") is not None:
        old_mix = state.get("mix")
        new_mix = getattr(data, "resolved_mix", None)
        if old_mix is not None and new_mix is not None and old_mix != new_mix:
            fabric.print(f"New blend for this run:\n  checkpoint mix: {old_mix}\n  new mix:        {new_mix}")
        loader.load_state_dict(state["data"])
    val_loaders = _val_loaders(data)
    if eval.early_stop:
        unknown = sorted(set(eval.early_stop) - set(val_loaders))
        if unknown:
            raise ValueError(f"eval.early_stop names unknown validation sets {unknown}; known: {sorted(val_loaders)}")

    same_run = state is not None and Path(state.get("out_dir", "")).resolve() == out_dir.resolve()
    prev = state.get("schedule") if state else None
    schedule, horizon = _plan(train, peak_lr, step, tokens_per_step, prev, same_run, resumed_lr)
    fabric.print(f"Schedule {schedule}; this run: steps {step} -> {horizon}, {accum} micro-batches of {train.micro_batch_size}"
                 f" x {fabric.world_size} ranks per step, {tokens_per_step:,} tokens/step")

    if resume_dir is not None and resume_dir.name == "final" and step >= horizon:
        fabric.print(f"Already finished: {resume_dir} is at step {step}, the plan's last step is {horizon}; nothing to do")
        if lock is not None:
            lock.release()
        return {"stopped": "finished", "step": step, "tokens": tokens, "losses": {}, "val": [],
                "val_start": state.get("val_start"), "schedule": asdict(schedule)}
    loop = _Loop(fabric, model, opt, loader, val_loaders, train, eval, out_dir, config, tokenizer_dir, hparams,
                 schedule, data, step, tokens, iter_num, accum, seq_len, horizon)
    loop.val_start = state.get("val_start") if (same_run and state) else None
    loop.lr = resumed_lr if resumed_lr is not None else schedule(step)
    flag = _PreemptFlag()
    try:
        result = loop.fit(flag)
    finally:
        flag.restore()
        if lock is not None:
            lock.release()
        for lg in fabric.loggers:
            lg.finalize("success")
    if result["stopped"] == "preempted":
        fabric.print(f"Preempted (signal {flag.signum}): checkpoint saved at step {loop.step}; exit {preempt_exit_code}")
        raise SystemExit(preempt_exit_code)
    return result


def _val_loaders(data) -> dict:
    if hasattr(data, "val_dataloaders"):
        loaders = data.val_dataloaders() or {}
    else:
        one = data.val_dataloader() if hasattr(data, "val_dataloader") else None
        loaders = {"val": one} if one is not None else {}
    return dict(loaders)


class _Loop:
    def __init__(self, fabric, model, opt, loader, val_loaders, train, eval, out_dir, config, tokenizer_dir, hparams,
                 schedule, data, step, tokens, iter_num, accum, seq_len, horizon):
        self.__dict__.update(locals())
        del self.__dict__["self"]
        self.losses: dict[int, float] = {}
        self.val_history: list[dict] = []
        self.val_start: Optional[dict] = None
        self.lr: float = 0.0

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        from litgpt.utils import chunked_cross_entropy

        fabric, model = self.fabric, self.model
        model.eval()
        out = {}
        for name, loader in self.val_loaders.items():
            total = torch.zeros(2, dtype=torch.float64, device=fabric.device)
            for k, batch in enumerate(loader):
                if k >= self.eval.max_iters:
                    break
                batch = batch.to(fabric.device, non_blocking=True).long()
                logits = model(batch[:, :-1])
                loss = chunked_cross_entropy(logits, batch[:, 1:])
                total += torch.stack([loss.detach().double() * batch.shape[0],
                                      torch.tensor(float(batch.shape[0]), dtype=torch.float64, device=fabric.device)])
            total = fabric.all_reduce(total, reduce_op="sum")
            out[name] = float(total[0] / total[1]) if total[1] > 0 else float("nan")
        model.train()
        return out

    def record_val(self, losses: dict[str, float]) -> Optional[str]:
        """Log, append to val_metrics.csv, and return the name of a set past its early-stop limit."""
        fabric = self.fabric
        if self.val_start is None:
            self.val_start = dict(losses)
        metrics, parts = {}, []
        for name, loss in losses.items():
            ppl = math.exp(min(loss, 50.0))
            delta = loss - self.val_start.get(name, loss)
            metrics.update({f"val/{name}/loss": loss, f"val/{name}/ppl": ppl, f"val/{name}/delta": delta})
            parts.append(f"{name} {loss:.4f} (ppl {ppl:.2f}, {delta:+.4f} vs start)")
            self.val_history.append({"step": self.step, "tokens": self.tokens, "set": name, "loss": loss, "ppl": ppl})
        fabric.log_dict(metrics, step=self.step)
        fabric.print(f"val step {self.step}: " + " | ".join(parts))
        if fabric.global_rank == 0:
            path = self.out_dir / VAL_CSV
            new = not path.exists()
            with open(path, "a", newline="") as f:
                w = csv.writer(f)
                if new:
                    w.writerow(["step", "tokens", "set", "loss", "ppl"])
                for name, loss in losses.items():
                    w.writerow([self.step, self.tokens, name, f"{loss:.6f}", f"{math.exp(min(loss, 50.0)):.6f}"])
        for name, limit in (self.eval.early_stop or {}).items():
            if losses[name] - self.val_start[name] > limit:
                return name
        return None

    # -- checkpointing ----------------------------------------------------------------------------
    def save(self, name: str) -> None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        fabric = self.fabric
        opts = _state_dict_options(fabric, for_save=True)
        model_sd = get_model_state_dict(self.model.module, options=opts)
        opt_sd = get_optimizer_state_dict(self.model.module, self.opt.optimizer, options=opts)
        rng = self._gather_rng()
        loader_state = self.loader.state_dict()
        if fabric.global_rank == 0:
            state = {
                "step": self.step, "tokens": self.tokens, "iter_num": self.iter_num, "lr": self.lr,
                "optimizer": opt_sd, "data": loader_state, "rng": rng, "world_size": fabric.world_size,
                "mix": getattr(self.data, "resolved_mix", None), "schedule": asdict(self.schedule),
                "out_dir": str(self.out_dir.resolve()), "val_start": self.val_start, "config": self.hparams,
            }
            path = ckpt.write_checkpoint(self.out_dir / name, model_sd, state, self.config, self.hparams,
                                         self.tokenizer_dir)
            if name.startswith("step-"):
                ckpt.prune_checkpoints(self.out_dir, self.train.keep_last_k)
            fabric.print(f"Saved {path}")
        fabric.barrier()

    def _gather_rng(self) -> list:
        if not _is_distributed(self.fabric):
            return [_rng_state()]
        import torch.distributed as dist

        out = [None] * self.fabric.world_size
        dist.all_gather_object(out, _rng_state())
        return out

    # -- training ---------------------------------------------------------------------------------
    def _log(self, loss: float, grad_norm: float, t_start: float, step_start: int) -> None:
        fabric = self.fabric
        elapsed = time.perf_counter() - t_start
        done = self.step - step_start
        tok_s = done * self.train.global_batch_size * self.seq_len / max(elapsed, 1e-9)
        eta = elapsed / max(done, 1) * (self.horizon - self.step)
        metrics = {"loss": loss, "lr": self.lr, "grad_norm": grad_norm, "tokens": self.tokens,
                   "tokens_per_sec": tok_s, "step": self.step}
        stats = self.loader.stats() if hasattr(self.loader, "stats") else None
        if stats:
            for sid, s in stats.get("shards", {}).items():
                metrics[f"data/shard/{sid}/tokens"] = s.get("tokens", 0)
                metrics[f"data/shard/{sid}/epochs"] = s.get("epochs", 0)
            for t, s in stats.get("types", {}).items():
                metrics[f"data/mix/{t}/target"] = s.get("target", 0.0)
                metrics[f"data/mix/{t}/realized"] = s.get("realized", 0.0)
        from litgpt_ext.model import flatten_moe_stats, moe_stats

        moe = moe_stats(self.model)  # last micro-batch on this rank, per MoE layer
        if moe:
            metrics.update(flatten_moe_stats(moe))
        fabric.log_dict(metrics, step=self.step)
        moe_msg = ""
        if moe:
            aux = [s["aux_loss"] for s in moe.values() if "aux_loss" in s]
            moe_msg = (f" | moe imbalance {metrics['moe/imbalance_max']:.2f}"
                       + (f" aux {sum(aux):.3f}" if aux else "")
                       + (f" dropped {int(metrics['moe/dropped_tokens'])}" if metrics["moe/dropped_tokens"] else ""))
        fabric.print(f"step {self.step}/{self.horizon} | loss {loss:.4f} | lr {self.lr:.3e} | gnorm {grad_norm:.3f}"
                     f" | {tok_s:,.0f} tok/s | tokens {self.tokens:,} | ETA {timedelta(seconds=int(eta))}{moe_msg}")

    def fit(self, flag: _PreemptFlag) -> dict:
        from litgpt.utils import chunked_cross_entropy

        from litgpt_ext.model import moe_aux_loss, update_router_biases

        fabric, model, opt, train = self.fabric, self.model, self.opt, self.train
        stopped = "budget"
        if self.val_loaders and (self.eval.initial_validation and self.val_start is None):
            if self.record_val(self.validate()):
                stopped = "early_stop"
        it = iter(self.loader)
        t_start, step_start = time.perf_counter(), self.step
        while self.step < self.horizon and stopped == "budget":
            loss_sum = torch.zeros((), device=fabric.device)
            for micro in range(self.accum):
                batch = next(it).to(fabric.device, non_blocking=True).long()
                with fabric.no_backward_sync(model, enabled=micro < self.accum - 1):
                    logits = model(batch[:, :-1])
                    loss = chunked_cross_entropy(logits, batch[:, 1:])
                    aux = moe_aux_loss(model)  # 0 for dense models
                    fabric.backward((loss + aux) / self.accum)
                loss_sum += loss.detach()
                self.iter_num += 1
            self.lr = self.schedule(self.step + 1)
            for g in opt.param_groups:
                g["lr"] = self.lr
            grad_norm = fabric.clip_gradients(model, opt, max_norm=train.max_norm or float("inf"))
            opt.step()
            opt.zero_grad(set_to_none=True)
            update_router_biases(model)  # aux-loss-free balancing (no-op unless moe.bias_update_rate > 0)
            self.step += 1
            self.tokens += train.global_batch_size * self.seq_len

            last = self.step >= self.horizon
            if self.step % train.log_interval == 0 or last:
                loss_val = float(fabric.all_reduce(loss_sum / self.accum, reduce_op="mean"))
                gn = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                self.losses[self.step] = loss_val
                self._log(loss_val, float(gn), t_start, step_start)
            if self.val_loaders and (self.step % self.eval.interval == 0 or (last and self.eval.final_validation)):
                bad = self.record_val(self.validate())
                if bad is not None:
                    fabric.print(f"Early stop: validation set {bad!r} rose more than {self.eval.early_stop[bad]}"
                                 f" above its start value")
                    stopped = "early_stop"
            preempted = self._preempt_requested(flag)
            if preempted:
                stopped = "preempted"
            saving = train.save_interval is not None and self.step % train.save_interval == 0
            if saving or stopped != "budget":
                self.save(ckpt.step_dir_name(self.step))
        if stopped != "preempted":
            self.save("final")
        fabric.print(f"Done: {stopped} at step {self.step}, {self.tokens:,} tokens")
        return {"stopped": stopped, "step": self.step, "tokens": self.tokens, "losses": self.losses,
                "val": self.val_history, "val_start": self.val_start, "schedule": asdict(self.schedule)}

    def _preempt_requested(self, flag: _PreemptFlag) -> bool:
        if not _is_distributed(self.fabric):
            return flag.signum is not None
        t = torch.tensor(1.0 if flag.signum is not None else 0.0, device=self.fabric.device)
        return bool(self.fabric.all_reduce(t, reduce_op="max") > 0)
