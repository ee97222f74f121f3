"""The loss/batch seam: one next-token loss for training and validation, pretraining and SFT.

`fit` and validation call `loss_fn(model, batch) -> (mean loss, number of target tokens)` and
never look inside a batch, so a new kind of batch (SFT's padded, prompt-masked examples) only
needs a new `loss_fn`, not a new loop.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from litgpt.utils import chunked_cross_entropy

IGNORE_INDEX = -100
LossFn = Callable[[torch.nn.Module, Any], "tuple[torch.Tensor, torch.Tensor]"]


def next_token_loss(model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy and the number of targets it averages over.

    `batch` is either a `(B, T+1)` tensor of token ids (pretraining shards: inputs are `[:, :-1]`,
    targets `[:, 1:]`), or litgpt's SFT mapping `{"input_ids": (B, T), "labels": (B, T)}` whose
    labels are `IGNORE_INDEX` on padding and masked prompt tokens (targets are `labels[:, 1:]`).
    """
    if isinstance(batch, Mapping):
        input_ids, labels = batch["input_ids"].long(), batch["labels"].long()
        logits = model(input_ids)[:, :-1]
        targets = labels[:, 1:]
    else:
        batch = batch.long()
        logits = model(batch[:, :-1])
        targets = batch[:, 1:]
    loss = chunked_cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
    return loss, (targets != IGNORE_INDEX).sum()


def token_losses(model: torch.nn.Module, batch: torch.Tensor, chunk_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`next_token_loss` of a token-shard batch plus each target's loss, `(B, T)`, detached.

    The mean is computed exactly as litgpt's `chunked_cross_entropy` computes it (the same chunks,
    the same sum and division), so a run that also needs per-token losses (an online mixing policy
    attributing losses to sources) trains on bit-identical losses to one that does not.
    """
    batch = batch.long()
    logits = model(batch[:, :-1])
    targets = batch[:, 1:]
    flat = logits.reshape(-1, logits.size(-1))
    flat_targets = targets.reshape(-1)
    per_token = torch.cat([
        torch.nn.functional.cross_entropy(lc, tc, ignore_index=IGNORE_INDEX, reduction="none")
        for lc, tc in zip(flat.split(chunk_size), flat_targets.split(chunk_size))
    ])
    n = (targets != IGNORE_INDEX).sum()
    loss = per_token.sum() / n.maximum(torch.ones_like(n))
    return loss, n, per_token.detach().view_as(targets)
