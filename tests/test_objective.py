"""The loss/batch seam shared by fit and validation: token batches and SFT-style masked batches."""

import torch
import torch.nn.functional as F
from litgpt.config import Config
from litgpt.model import GPT

from litgpt_ext.train.objective import IGNORE_INDEX, next_token_loss


def tiny():
    torch.manual_seed(0)
    return GPT(Config(name="t", block_size=8, n_layer=1, n_head=1, n_embd=8, padded_vocab_size=16, vocab_size=16))


def test_token_batch_is_next_token_cross_entropy():
    model = tiny()
    batch = torch.randint(0, 16, (2, 9), dtype=torch.int32)  # shards hold narrow ints
    loss, n = next_token_loss(model, batch)
    logits = model(batch[:, :-1].long())
    assert n.item() == 2 * 8
    assert torch.allclose(loss, F.cross_entropy(logits.reshape(-1, 16), batch[:, 1:].long().reshape(-1)))


def test_masked_batch_averages_over_unmasked_targets_only():
    model = tiny()
    ids = torch.randint(0, 16, (2, 8))
    labels = ids.clone()
    labels[0, :3] = IGNORE_INDEX  # a masked prompt
    labels[1, 6:] = IGNORE_INDEX  # padding
    loss, n = next_token_loss(model, {"input_ids": ids, "labels": labels})
    logits, targets = model(ids)[:, :-1], labels[:, 1:]
    keep = targets != IGNORE_INDEX
    assert n.item() == keep.sum().item() == 5 + 5  # targets are labels[:, 1:]
    assert torch.allclose(loss, F.cross_entropy(logits[keep], targets[keep]))
