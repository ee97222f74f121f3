"""Forgetting regularizers added to the training loss: EWC and the L2 anchor (L2-SP).

`regularizer: {type: ewc, lambda: λ, reference: <ckpt>, fisher_data: train | <val set>, fisher_batches: N}`
    penalty = λ/2 · Σ_i F_i · (θ_i − θ*_i)²; θ* = the reference checkpoint's weights, F = its diagonal
    Fisher (`fisher_diagonal`), cached in `<out_dir>/ewc/fisher-<key>/` (key: the reference's
    manifest hash, the data, the batches), so a requeue reuses it and a changed key recomputes; θ*
    is cached beside it (`theta-<reference hash>/`), so a requeue loads neither into the model.
`regularizer: {type: l2_anchor, lambda: λ}`
    penalty = λ/2 · Σ_i (θ_i − θ0_i)²; θ0 = the weights this *phase* started from (the checkpoint a
    midtraining run forked or resumed, or `initial_checkpoint_dir`), saved once in
    `<out_dir>/l2_anchor/<phase id>/`, so a requeue (even after kill -9) anchors to the phase's start,
    never to the checkpoint it resumed from. A fresh pretrain has no start weights: an error.

Under FSDP2 every rank holds F, θ*, θ0 only for its own shard of each parameter (the DTensor's local
shard, the same sharding as the parameter), and the caches are DCP folders that reshard on load
(any device count). `Regularizer.backward` differentiates this rank's part of the sum straight into
its shards (their gradients need no reduction: each shard belongs to one rank); the logged value
`reg/<type>` is the all-reduced sum over ranks.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from litgpt_ext import checkpoint as ckpt
from litgpt_ext.train.args import L2_FRESH, RegularizerArgs

_NAME_WRAPPERS = ("_orig_mod.", "_forward_module.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def _module(model: Any) -> torch.nn.Module:
    return getattr(model, "module", model)  # Fabric's wrapper -> the model


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a (DTensor) parameter; a plain tensor is all of it. Differentiable."""
    return t.to_local() if hasattr(t, "to_local") else t


def named_params(model: Any) -> list[tuple[str, torch.nn.Parameter]]:
    """The trainable parameters under litgpt's names (compile / activation-checkpoint wrappers removed)."""
    out = []
    for name, p in _module(model).named_parameters():
        if p.requires_grad:
            for w in _NAME_WRAPPERS:
                name = name.replace(w, "")
            out.append((name, p))
    return out


class Regularizer:
    """λ/2 · Σ w · (θ − anchor)² over this rank's shards (w = the Fisher for EWC, 1 for L2)."""

    def __init__(self, kind: str, lam: float, params: list, anchor: dict, weight: Optional[dict] = None):
        self.kind, self.lam = kind, lam
        self.terms = [(p, _local(anchor[n]).detach().float(),
                       None if weight is None else _local(weight[n]).detach().float()) for n, p in params]
        self.last = torch.zeros(())

    def penalty(self) -> torch.Tensor:
        """This rank's part of the penalty (differentiable w.r.t. its shards); the ranks' parts add up to it."""
        total = torch.zeros((), device=self.terms[0][1].device if self.terms else "cpu")
        for p, a, w in self.terms:
            d = _local(p).float() - a
            total = total + (d * d if w is None else w * d * d).sum()
        return 0.5 * self.lam * total

    def backward(self) -> torch.Tensor:
        """Add the penalty's gradient to the parameters' gradients (after the LM loss's backward)."""
        pen = self.penalty()
        if pen.requires_grad:
            pen.backward()
        self.last = pen.detach()
        return self.last

    def value(self, fabric: Any) -> float:
        """The last penalty, summed over ranks (a collective: every rank calls it)."""
        return float(fabric.all_reduce(self.last, reduce_op="sum")) if fabric.world_size > 1 else float(self.last)

    def log(self, fabric: Any, step: int, loss: float) -> float:
        v = self.value(fabric)
        fabric.log_dict({f"reg/{self.kind}": v, "objective": loss + v}, step=step)
        return v


# ----------------------------------------------------------------------------------------------- Fisher


def fisher_diagonal(fabric: Any, model: Any, batches: Iterable, accum: int, n_batches: int,
                    loss_fn: Callable) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher *per batch* at the model's current weights:

        F = 1/N · Σ_{b=1..N} (∇θ L_b)²,   L_b = mean of `loss_fn` over the `accum` micro-batches of batch b

    Each batch b is one global batch (`accum` micro-batches on each rank: `train.global_batch_size`
    sequences, exactly what one training step averages over), and the square is taken of that
    batch's mean gradient (as the optimizer sees it, reduced over ranks), not of each example's.
    Returns {name: F} shaped and sharded like the parameters (DTensor shards under FSDP2)."""
    params = named_params(model)
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params}
    it = iter(batches)
    for p in _module(model).parameters():
        p.grad = None
    for _ in range(n_batches):
        for micro in range(accum):
            batch = fabric.to_device(next(it))
            with fabric.no_backward_sync(model, enabled=micro < accum - 1):
                loss, _ = loss_fn(model, batch)
                fabric.backward(loss / accum)
        with torch.no_grad():
            for n, p in params:
                if p.grad is not None:
                    fisher[n] += p.grad.float() ** 2
                p.grad = None
    with torch.no_grad():
        for f in fisher.values():
            f /= n_batches
    return fisher


# ----------------------------------------------------------------------------------------------- caches (DCP)


def _save_tensors(fabric: Any, path: Path, tensors: dict, record: dict) -> None:
    """Every rank writes its shards of `tensors` into the DCP folder `path` (atomically: .tmp + rename)."""
    import torch.distributed.checkpoint as dcp

    tmp = path.with_name(path.name + ".tmp")
    if fabric.global_rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    fabric.barrier()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"t": dict(tensors)}, storage_writer=dcp.FileSystemWriter(tmp))
    fabric.barrier()
    if fabric.global_rank == 0:
        (tmp / "key.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    fabric.barrier()


def _load_tensors(fabric: Any, path: Path, like: dict) -> Optional[dict]:
    """The tensors of a DCP folder in the layout of `like` (resharded to this world size); None if absent."""
    import torch.distributed.checkpoint as dcp

    if not fabric.broadcast((path / ".metadata").is_file() and (path / "key.json").is_file(), src=0):
        return None
    out = {n: torch.empty_like(t) for n, t in like.items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"t": out}, storage_reader=dcp.FileSystemReader(path))
    return out


def _clone(params: list) -> dict:
    return {n: p.detach().clone() for n, p in params}


# ----------------------------------------------------------------------------------------------- weights


def reference_dir(path: Path) -> Path:
    from litgpt_ext.checkpoint import dcp as tdcp

    path = Path(path)
    return path if tdcp.is_sharded(path) else ckpt.checkpoint_dir_of(path, need="weights")


def _reference_shapes(ref: Path) -> dict[str, tuple]:
    from litgpt_ext.checkpoint import dcp as tdcp

    if tdcp.is_sharded(ref):
        from torch.distributed.checkpoint import FileSystemReader

        meta = FileSystemReader(ref / tdcp.SHARDED_DIR).read_metadata().state_dict_metadata
        return {k[len("model."):]: tuple(getattr(v, "size", ())) for k, v in meta.items() if k.startswith("model.")}
    return {k: tuple(v.shape) for k, v in ckpt.load_model_state(ref).items()}


def check_reference_fits(ref: Path, model: Any, config: Any) -> None:
    """The reference's tensors have the model's names and shapes, else one error naming the differences."""
    from litgpt_ext.checkpoint.loading import WeightsMismatchError, weights_mismatch

    ours = {k: tuple(v.shape) for k, v in _module(model).state_dict().items()}
    theirs = _reference_shapes(ref)
    sizes = [f"size mismatch for {k}: copying a param with shape torch.Size({list(theirs[k])}) from checkpoint,"
             f" the shape in current model is torch.Size({list(s)})." for k, s in ours.items()
             if k in theirs and theirs[k] != s]
    missing, unexpected = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    if sizes or missing or unexpected:
        msg = "Error(s) in loading state_dict\n\t" + ("\n\t".join(sizes) if sizes else
                                                      f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        raise WeightsMismatchError("regularizer.reference: " + weights_mismatch(ref, config, msg))


def load_into(fabric: Any, model: Any, ref: Path) -> None:
    """Load a checkpoint's weights (full or sharded) into the set-up model, in its sharding."""
    from litgpt_ext.checkpoint import dcp as tdcp

    module = _module(model)
    if tdcp.is_sharded(ref):
        tdcp.load_sharded(ref, module)
        return
    sd = ckpt.load_model_state(ref)
    if fabric.world_size == 1:
        module.load_state_dict(sd, strict=True)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, sd, options=StateDictOptions(full_state_dict=True, strict=True))


class _Swapped:
    """Temporarily put a checkpoint's weights into the model (restored exactly on exit)."""

    def __init__(self, fabric: Any, model: Any, ref: Path):
        self.fabric, self.model, self.ref = fabric, model, ref

    def __enter__(self):
        self.saved = {k: v.detach().clone() for k, v in _module(self.model).state_dict().items()}
        load_into(self.fabric, self.model, self.ref)
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for k, v in _module(self.model).state_dict().items():
                v.copy_(self.saved[k])
        self.saved = None


# ----------------------------------------------------------------------------------------------- setup


def _file_hash(ref: Path, out_dir: Optional[Path] = None) -> str:
    """The reference's identity: its manifest's hash, else its weights file's. A weights file without
    a manifest is hashed once per (path, size, mtime) and remembered in `<out_dir>/ewc/reference_hashes.json`,
    so a requeue of a run with a large reference does not read it all again."""
    from litgpt_ext.checkpoint.layout import _sha256

    man = ref / ckpt.MANIFEST_FILE
    if man.is_file():
        return _sha256(man)
    weights = ref / ckpt.MODEL_FILE
    if out_dir is None:
        return _sha256(weights)
    st = weights.stat()
    stamp = {"path": str(weights.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    memo = Path(out_dir) / "ewc" / "reference_hashes.json"
    known = json.loads(memo.read_text()) if memo.is_file() else []
    for entry in known:
        if {k: entry.get(k) for k in stamp} == stamp:
            return entry["sha256"]
    digest = _sha256(weights)
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(memo.name + ".tmp")
    tmp.write_text(json.dumps(known + [{**stamp, "sha256": digest}], indent=1) + "\n")
    tmp.replace(memo)
    return digest


def _fisher_source(args: RegularizerArgs, data: Any, val_loaders: dict) -> tuple[Any, dict]:
    """The batches the Fisher averages over and what identifies them (for the cache key)."""
    name = args.fisher_data
    if name == "train":
        return data.train_dataloader(), {"train": getattr(data, "resolved_mix", None), "seed": getattr(data, "seed", None)}
    if name in val_loaders:
        paths = getattr(data, "val_data_path", None)
        return val_loaders[name], {"val": name, "path": paths.get(name) if isinstance(paths, dict) else paths}
    if Path(name).exists() and hasattr(data, "val_data_path") and callable(getattr(data, "val_dataloaders", None)):
        import copy

        other = copy.copy(data)  # the same block size, batch size and rank sharding, another val set
        other.val_data_path = {"fisher": name}
        return other.val_dataloaders()["fisher"], {"path": str(Path(name).resolve())}
    raise ValueError(f"regularizer.fisher_data={name!r} is neither 'train' (the run's mix) nor one of the run's"
                     f" validation sets {sorted(val_loaders)} nor an existing token-shard folder")


def setup_regularizer(fabric: Any, args: Optional[RegularizerArgs], model: Any, *, data: Any, val_loaders: dict,
                      out_dir: Path, plan: Any, new_phase: bool, has_start_weights: bool, accum: int,
                      global_batch_size: int, seq_len: int, model_config: Any,
                      loss_fn: Callable) -> Optional[Regularizer]:
    """The run's regularizer, its anchor and Fisher restored from (or computed and written to) out_dir."""
    if args is None:
        return None
    params = named_params(model)
    if args.type == "l2_anchor":
        return Regularizer("l2_anchor", args.lam, params, _l2_anchor(fabric, model, params, out_dir, plan,
                                                                      new_phase, has_start_weights))
    ref = reference_dir(args.reference)
    check_reference_fits(ref, model, model_config)
    batches, source = _fisher_source(args, data, val_loaders)
    ref_hash = fabric.broadcast(_file_hash(ref, out_dir) if fabric.global_rank == 0 else None, src=0)
    record = {"reference": str(ref.resolve()), "reference_hash": ref_hash, "fisher_data": source,
              "fisher_batches": args.fisher_batches, "global_batch_size": global_batch_size, "seq_len": seq_len}
    key = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = Path(out_dir) / "ewc" / f"fisher-{key}"
    theta_path = Path(out_dir) / "ewc" / f"theta-{ref_hash[:16]}"  # θ*, in the model's sharding
    like = _clone(params)
    theta_star, fisher = _load_tensors(fabric, theta_path, like), _load_tensors(fabric, path, like)
    if theta_star is not None and fisher is not None:  # a requeue: nothing to load into the model
        fabric.print(f"EWC: reusing θ* and the Fisher cached in {theta_path} and {path}")
        return Regularizer("ewc", args.lam, params, theta_star, fisher)
    with _Swapped(fabric, model, ref):  # θ* and the Fisher at θ*
        theta_star = _clone(params)
        if fisher is None:
            fabric.print(f"EWC: computing the diagonal Fisher of {ref} on {source} ({args.fisher_batches} batches)")
            fisher = fisher_diagonal(fabric, model, _need(fabric, batches, args.fisher_batches * accum, args),
                                     accum, args.fisher_batches, loss_fn)
            _save_tensors(fabric, path, fisher, record)
        else:
            fabric.print(f"EWC: reusing the Fisher cached in {path}")
        _save_tensors(fabric, theta_path, theta_star, {"reference": str(ref.resolve()), "reference_hash": ref_hash})
    return Regularizer("ewc", args.lam, params, theta_star, fisher)


def _need(fabric: Any, batches: Any, n: int, args: RegularizerArgs) -> list:
    """The first n micro-batches on this rank; too few on any rank is an error on every rank."""
    import itertools

    got = list(itertools.islice(iter(batches), n))
    short = torch.tensor(float(len(got) < n), device=fabric.device)  # NCCL reduces device tensors only
    if float(fabric.all_reduce(short, reduce_op="sum") if fabric.world_size > 1 else short) > 0:
        raise ValueError(f"regularizer.fisher_data={args.fisher_data!r} has {len(got)} micro-batches on rank"
                         f" {fabric.global_rank}, fewer than fisher_batches={args.fisher_batches} x {n // args.fisher_batches}"
                         " micro-batches per global batch: lower fisher_batches or use a larger set")
    return got


def _l2_anchor(fabric: Any, model: Any, params: list, out_dir: Path, plan: Any, new_phase: bool,
               has_start_weights: bool) -> dict:
    path = Path(out_dir) / "l2_anchor" / str(plan.phase_id)
    anchor = None if new_phase else _load_tensors(fabric, path, _clone(params))
    if anchor is not None:
        return anchor
    start = Path(out_dir) / ckpt.step_dir_name(plan.start_step)
    if not new_phase and fabric.broadcast(ckpt.is_complete(start, need="weights") or _is_sharded(start), src=0):
        with _Swapped(fabric, model, start):  # the phase began without the regularizer: its start checkpoint
            anchor = _clone(params)
    elif not new_phase:
        raise ValueError(f"regularizer l2_anchor: no anchor saved for this phase ({path}) and its start checkpoint"
                         f" {start} is gone; begin a new phase (train.new_phase: true) to anchor to the resumed weights")
    elif not has_start_weights:
        raise ValueError(L2_FRESH)
    else:
        anchor = _clone(params)  # this phase's start weights
    _save_tensors(fabric, path, anchor, {"phase_id": plan.phase_id, "start_step": plan.start_step})
    return anchor


def _is_sharded(path: Path) -> bool:
    from litgpt_ext.checkpoint import dcp as tdcp

    return tdcp.is_sharded(path)
