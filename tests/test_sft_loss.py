"""sft_loss and validate_sft against a hand-computed cross-entropy over exactly the output tokens."""

from __future__ import annotations

import math

import pytest
import torch
from litgpt import GPT, Config
from test_sft_data import make_dm, tok_dir, tokenizer  # noqa: F401  (fixtures)

from litgpt_ext.sft.loss import sft_loss, token_val_loaders, validate_sft


@pytest.fixture()
def model(tokenizer):
    torch.manual_seed(0)
    cfg = Config(name="t", n_layer=1, n_head=2, n_embd=16, block_size=128, vocab_size=tokenizer.vocab_size,
                 padded_vocab_size=tokenizer.vocab_size, rotary_percentage=1.0, bias=True)
    return GPT(cfg).eval()


def hand_ce(model, examples) -> tuple[float, int]:
    """Sum of -log p(label[t+1] | ids[:t+1]) over non-masked labels, one example at a time, no padding."""
    total, n = 0.0, 0
    with torch.no_grad():
        for ids, labels in examples:
            logp = torch.log_softmax(model(ids[None])[0].double(), dim=-1)
            for t in range(len(ids) - 1):
                if labels[t + 1] != -100:
                    total -= float(logp[t, labels[t + 1]])
                    n += 1
    return total, n


def test_loss_is_ce_over_output_tokens_only(tmp_path, tokenizer, model):
    dm = make_dm(tmp_path, tokenizer, batch_size=6)
    loader = dm.train_dataloader()
    batch = next(iter(loader))
    idx = loader.batches(0)[0]
    examples = [dm.train_examples[i] for i in idx]
    with torch.no_grad():
        loss, n = sft_loss(model, batch)
    total, count = hand_ce(model, examples)
    # the count is the output tokens (response + EOS) of masked records and all but the first token of text records
    expected = 0
    for i in idx:
        ids, labels = dm.train_examples[i]
        expected += int((labels != -100).sum()) - int(labels[0] != -100)
    assert int(n) == count == expected
    assert float(loss) == pytest.approx(total / count, rel=1e-5)


def test_mask_changes_the_loss_as_expected(tmp_path, tokenizer, model):
    masked = make_dm(tmp_path / "m", tokenizer, batch_size=5, mask_prompt=True)
    unmasked = make_dm(tmp_path / "u", tokenizer, batch_size=5, mask_prompt=False)
    bm, bu = next(iter(masked.train_dataloader())), next(iter(unmasked.train_dataloader()))
    assert torch.equal(bm["input_ids"], bu["input_ids"])
    with torch.no_grad():
        (lm, nm), (lu, nu) = sft_loss(model, bm), sft_loss(model, bu)
    idx = unmasked.train_dataloader().batches(0)[0]
    lengths = [len(unmasked.train_examples[i][0]) for i in idx]
    T = bu["labels"].shape[1]
    padding = torch.tensor([[t >= n for t in range(T)] for n in lengths])
    assert torch.equal(bu["labels"] == -100, padding)  # unmasked: exactly the padding is ignored
    assert int(nm) < int(nu) == sum(n - 1 for n in lengths)
    for dm, loss, n in ((masked, lm, nm), (unmasked, lu, nu)):
        total, count = hand_ce(model, [dm.train_examples[i] for i in idx])
        assert int(n) == count and float(loss) == pytest.approx(total / count, rel=1e-5)


def test_validation_is_token_weighted_and_independent_of_batching(tmp_path, tokenizer, model):
    total, count = hand_ce(model, make_dm(tmp_path / "r", tokenizer).val_examples)
    for bs in (1, 2, 9):
        res = validate_sft(model, make_dm(tmp_path / str(bs), tokenizer, batch_size=bs).val_dataloader())
        assert res["tokens"] == count
        assert res["loss"] == pytest.approx(total / count, rel=1e-5)
        assert res["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    # two ranks: each sees part of the set (plus a padding batch with no targets); sums combine exactly
    parts = [validate_sft(model, make_dm(tmp_path / f"w{r}", tokenizer, batch_size=2, rank=r, world_size=2)
                          .val_dataloader()) for r in (0, 1)]
    assert sum(p["tokens"] for p in parts) == count
    assert sum(p["loss"] * p["tokens"] for p in parts) / count == pytest.approx(total / count, rel=1e-5)
    assert not model.training


def test_named_token_shard_sets_read_as_in_pretraining(shard_root):
    loaders = token_val_loaders({"general": shard_root / "val" / "1", "math": shard_root / "val" / "m1"},
                                max_seq_length=15, batch_size=4)
    batches = {name: list(loader) for name, loader in loaders.items()}
    assert set(batches) == {"general", "math"}
    assert all(b.shape[1] == 16 for bs in batches.values() for b in bs)
    assert sum(len(b) for b in batches["general"]) == 400 // 16 and int(batches["math"][0][0, 0]) >= 95_000
