"""The SFT loss (the loop's `loss_fn(model, batch)` seam) and the SFT validation pass.

A batch is `SFTData`'s dict: `input_ids` [B, T] and `labels` [B, T] with `ignore_index` on prompt
(when masked) and padding. As in litgpt's `finetune_full`, the model reads all of `input_ids` and
position t predicts `labels[t + 1]`.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch

IGNORE_INDEX = -100


def sft_loss(model: torch.nn.Module, batch: Mapping[str, Any], chunk_size: int = 128,
             ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean next-token loss over the non-ignored targets, number of those targets).

    The mean is litgpt's `chunked_cross_entropy` (as `finetune_full` computes it; 0, not NaN, for a
    batch without targets). The count lets callers weight micro-batches or validation batches by
    tokens: `loss * count` is the exact sum.
    """
    from litgpt.utils import chunked_cross_entropy

    input_ids, labels = batch["input_ids"], batch["labels"]
    logits = model(input_ids)
    targets = labels[..., 1:]
    loss = chunked_cross_entropy(logits[..., :-1, :], targets, chunk_size=chunk_size, ignore_index=ignore_index)
    return loss, (targets != ignore_index).sum()


@torch.no_grad()
def validate_sft(model: torch.nn.Module, loader: Iterable[Mapping[str, Any]], fabric=None,
                 ignore_index: int = IGNORE_INDEX) -> dict[str, float]:
    """A full pass: {loss: token-weighted mean over every target token of the set, tokens, ppl}.

    litgpt's `validate` averages per-batch means, which over-weights short batches; here every
    target token counts once. With `fabric`, sums are all-reduced over ranks (the loader splits
    the set so that each token is seen by exactly one rank).
    """
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    count = torch.zeros((), dtype=torch.int64)
    device = None
    for batch in loader:
        if fabric is not None:
            batch = {k: fabric.to_device(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        loss, n = sft_loss(model, batch, ignore_index=ignore_index)
        device = loss.device
        total += loss.detach().double().cpu() * n.cpu()
        count += n.cpu()
    if fabric is not None and fabric.world_size > 1:
        both = torch.stack([total, count.double()]).to(device or fabric.device)
        both = fabric.all_reduce(both, reduce_op="sum")
        total, count = both[0].cpu(), both[1].cpu().round().long()
    model.train(was_training)
    n = int(count)
    if n == 0:
        raise ValueError("the SFT validation set has no target token (all labels are ignore_index)")
    mean = float(total) / n
    return {"loss": mean, "tokens": n, "ppl": math.exp(min(mean, 50.0))}


def token_val_loaders(val_data_path: Mapping[str, Any], max_seq_length: int, batch_size: int, rank: int = 0,
                      world_size: int = 1, max_samples: int | None = None) -> dict[str, Iterable[torch.Tensor]]:
    """Named token-shard validation sets (`{general: data/demo/val/1, ...}`) as pretraining reads them.

    After SFT, the `general` set's loss is the paper's forgetting measure; reading it through
    `ShardedMixedDataset` (same samples of max_seq_length + 1 tokens) keeps it comparable with the
    losses logged during pretraining and midtraining.
    """
    from litgpt_ext.data import ShardedMixedDataset

    dm = ShardedMixedDataset(data_path=None, val_data_path=dict(val_data_path), val_max_samples=max_samples)
    dm.connect(batch_size=batch_size, max_seq_length=max_seq_length)
    dm.rank, dm.world_size = rank, world_size  # setup() would also discover train shards, which SFT has none of
    return dm.val_dataloaders()
