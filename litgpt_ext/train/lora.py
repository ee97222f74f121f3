"""LoRA continued pretraining in the loop: the `lora:` section of a pretrain/midtrain config.

`setup` (called by `loop.main` once the checkpoint to resume is known) decides the base and returns
a `LoRARun`, whose methods are the loop's hooks: `build` (litgpt's `litgpt.lora.GPT` for the run's
config), `load` (base weights, then the adapter when resuming one), `freeze` (litgpt's
`mark_only_lora_as_trainable`: before FSDP2 shards the model, so every frozen base tensor stays
out of the optimizer and of the gradient norm) and, for the checkpoint writer, `model_file` and
`record` (an adapter-only checkpoint: see `litgpt_ext.checkpoint.lora`).

A LoRA phase starts from a full checkpoint (`fork_from`, `resume` of one, or
`initial_checkpoint_dir`): that checkpoint is the base, the adapter starts fresh (litgpt's init:
B = 0, so step 0 computes the base's function) and so does the optimizer; step, tokens, data cursors
and RNG continue as in any midtraining fork. Resuming an adapter checkpoint loads the recorded base
(checked against its sha256) and the adapter, optimizer, step, data cursors and RNG: bit-exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch

from litgpt_ext.checkpoint import lora as ckl
from litgpt_ext.checkpoint.layout import LORA_FILE
from litgpt_ext.checkpoint.lora import BaseRef, LoRAArgs


@dataclass
class LoRARun:
    args: LoRAArgs
    base: BaseRef
    adapter_from: Optional[Path] = None  # the adapter checkpoint this run resumes (None: a fresh adapter)
    trainable: int = 0

    model_file = LORA_FILE

    def build(self, config: Any) -> torch.nn.Module:
        from litgpt_ext.model.lora import build_lora_model

        return build_lora_model(config, self.args)

    def load(self, model: torch.nn.Module, config: Any) -> None:
        from litgpt_ext.model.lora import load_adapter, load_base

        load_base(model, Path(self.base.path), config)
        if self.adapter_from is not None:
            adapter = torch.load(self.adapter_from / LORA_FILE, map_location="cpu", weights_only=True)
            load_adapter(model, adapter, self.adapter_from / LORA_FILE)

    def freeze(self, model: torch.nn.Module, log: Any = print) -> None:
        from litgpt.lora import mark_only_lora_as_trainable

        mark_only_lora_as_trainable(model)
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        log(f"LoRA ({self.args.describe()}): {self.trainable:,} trainable parameters ({100 * self.trainable / total:.2f}%"
            f" of {total:,}); base {self.base.path} (sha256 {self.base.sha256[:16]}…) frozen"
            + (f"; adapter from {self.adapter_from}" if self.adapter_from else "; a fresh adapter"))

    def record(self) -> dict[str, str]:
        """The files an adapter checkpoint holds beside the adapter weights."""
        return {ckl.LORA_RECORD: ckl.make_record(self.args, self.base, self.trainable)}


def check_args(lora: Optional[LoRAArgs], *, n_expert: int, fresh: bool, sharded: bool, regularizer: Any) -> None:
    """The one-line refusals that need nothing but the run's config (before any work)."""
    if lora is None:
        return
    if n_expert > 0:
        raise ValueError(f"lora: LoRA on a mixture-of-experts model (n_expert={n_expert}) is not supported (our MoE"
                         " blocks are not litgpt's LLaMAMoE); train it without lora:")
    if fresh:
        raise ValueError("lora: LoRA continues a trained model and a fresh pretrain has none: start from a full"
                         " checkpoint (fork_from, resume, or initial_checkpoint_dir), which becomes the frozen base")
    if sharded:
        raise ValueError("lora: with speed.checkpoint_format: sharded; LoRA checkpoints hold the adapter only (small):"
                         " use checkpoint_format: full")
    if regularizer is not None:
        raise ValueError("lora: with regularizer: is not supported (LoRA keeps the base frozen; the penalties are"
                         " defined on the full weights): remove one of the two sections")


def setup(fabric: L.Fabric, args: Optional[LoRAArgs], out_dir: Path, resume_dir: Optional[Path],
          initial_checkpoint_dir: Optional[Path], saved: Any) -> Optional[LoRARun]:
    """The run's LoRA (None without `lora:`): its base (resolved, hash-checked and hard-linked into
    out_dir/lora_base by rank 0; every rank gets the verdict) and the adapter to resume."""
    adapter = resume_dir is not None and ckl.is_adapter(resume_dir)
    if args is None:
        if adapter:
            raise ValueError(f"{resume_dir} is a LoRA adapter checkpoint and this run has no lora: section; give the"
                             f" adapter's (lora: {ckl.record_args(ckl.read_record(resume_dir)).describe()}), or merge it"
                             f" (`litgpt-ext merge-lora {resume_dir} <dir>`) and fork the merged checkpoint to train"
                             " every weight")
        return None
    decision, failure = None, None
    if fabric.global_rank == 0:
        try:
            decision = (_decide(args, Path(out_dir), resume_dir, initial_checkpoint_dir, adapter, fabric.print), None)
        except Exception as e:  # every rank stops (none waits at a barrier for rank 0)
            failure, decision = e, (None, (type(e).__name__, str(e)))
    ref, error = fabric.broadcast(decision, src=0)
    if failure is not None:
        raise failure
    if error is not None:
        raise (FileNotFoundError if error[0] == "FileNotFoundError" else ValueError)(error[1])
    if saved is not None and not adapter and saved.optimizer is not None:
        fabric.print(f"LoRA: {resume_dir} is a full checkpoint (the base); the adapter and its optimizer start fresh,"
                     " step, data cursors and RNG continue")
        saved.optimizer = None
    return LoRARun(args, BaseRef(**ref), adapter_from=resume_dir if adapter else None)


def _fork_source(out_dir: Path, start: Path) -> str:
    """The checkpoint `start` came from: a fork's source when `start` is out_dir's fork, else itself."""
    import json

    from litgpt_ext.checkpoint.layout import FORK_RECORD

    try:
        rec = json.loads((out_dir / FORK_RECORD).read_text())
        if rec.get("dst") == start.name and start.parent.resolve() == out_dir.resolve():
            return str(rec["source"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return str(start.resolve())


def _decide(args: LoRAArgs, out_dir: Path, resume_dir: Optional[Path], initial: Optional[Path], adapter: bool,
            log: Any) -> dict:
    from dataclasses import asdict

    if adapter:
        rec = ckl.read_record(resume_dir)
        had = ckl.record_args(rec)
        if had.shape() != args.shape():
            raise ValueError(f"lora: {resume_dir} holds an adapter with {had.describe()}; this run's lora: has"
                             f" {args.describe()}. r, alpha and targets must stay the adapter's (dropout may"
                             " change); for new settings merge it (`litgpt-ext merge-lora`) and fork the merged checkpoint")
        src = ckl.find_base(resume_dir, rec, args.base)
        sha, size, source = rec["base"]["sha256"], rec["base"]["size"], rec["base"].get("source", str(src))
    else:
        if args.base is not None:
            raise ValueError(f"lora.base={str(args.base)!r} relocates the base of an adapter being resumed; this run"
                             " starts a LoRA phase from a full checkpoint (its base): remove lora.base")
        start = resume_dir if resume_dir is not None else initial
        if start is None:  # resume: auto on an empty out_dir, without fork_from
            raise ValueError(f"lora: {out_dir} holds no checkpoint to continue and the run names none: LoRA needs a"
                             " base (fork_from, resume, or initial_checkpoint_dir)")
        src = ckl.base_of_start(start)
        sha, size = ckl.weights_digest(src)
        source = _fork_source(out_dir, src)
    return asdict(ckl.link_base(src, out_dir, sha, size, source, log=log))
