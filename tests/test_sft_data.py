"""SFTData on a real byte-level BPE: litgpt parity, masks, padding, truncation, epochs, sharding, exact resume."""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from litgpt import Tokenizer
from litgpt.data import SFTDataset
from litgpt.prompts import Alpaca

from litgpt_ext.prep.tokenizer import train_tokenizer_from_texts
from litgpt_ext.sft.data import Plain, SFTData, encode_record, epoch_batches, get_prompt_style, split_records

WORDS = "the a cat dog sat ran on under mat log red blue quickly slowly sum of plus minus equals answer question".split()


def _records(n: int, seed: int = 0) -> list[dict]:
    """Instruction records of varied length, some with an input, one plain-text record per 5."""
    r = random.Random(seed)
    rows = []
    for i in range(n):
        if i % 5 == 4:
            rows.append({"text": " ".join(r.choices(WORDS, k=r.randint(3, 12)))})
            continue
        a, b = r.randint(0, 99), r.randint(0, 99)
        row = {"instruction": f"Question: what is {a} plus {b}? " + " ".join(r.choices(WORDS, k=r.randint(0, 8))),
               "output": f" {a + b}"}
        if i % 3 == 0:
            row["input"] = " ".join(r.choices(WORDS, k=r.randint(1, 6)))
        rows.append(row)
    return rows


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    texts = [json.dumps(r) for r in _records(400, seed=7)] + [" ".join(WORDS)] * 20
    return train_tokenizer_from_texts(texts, tmp_path_factory.mktemp("tok"), vocab_size=300, min_frequency=1)


@pytest.fixture(scope="session")
def tokenizer(tok_dir) -> Tokenizer:
    return Tokenizer(tok_dir)


def write_json(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return path


def make_dm(tmp_path, tokenizer, n=37, batch_size=4, max_seq_length=None, rank=0, world_size=1, seed=3, **kw) -> SFTData:
    train = write_json(tmp_path / "train.json", _records(n))
    val = write_json(tmp_path / "val.json", _records(9, seed=1))
    dm = SFTData(train_path=train, val_path=val, seed=seed, **kw)
    dm.connect(tokenizer, batch_size=batch_size, max_seq_length=max_seq_length)
    dm.setup(rank=rank, world_size=world_size)
    return dm


def test_prompt_styles():
    assert Plain().apply("Solve: 2+2", input="show work") == "Solve: 2+2\nshow work"
    assert Plain().apply("Solve: 2+2", input="") == "Solve: 2+2"
    assert isinstance(get_prompt_style("alpaca"), Alpaca)
    assert get_prompt_style("default").apply("x", input="ignored") == "x"
    with pytest.raises(ValueError, match="unknown prompt_style 'gsm'.*plain.*alpaca"):
        get_prompt_style("gsm")


@pytest.mark.parametrize("style", ["plain", "alpaca", "default"])
@pytest.mark.parametrize("mask", [True, False])
def test_encoding_matches_litgpt_sftdataset(tokenizer, style, mask):
    rows = [r for r in _records(20) if "output" in r]
    ours = [encode_record(r, tokenizer, get_prompt_style(style), mask) for r in rows]
    ref = SFTDataset(rows, tokenizer, get_prompt_style(style), mask_prompt=mask)
    for (ids, labels), exp in zip(ours, ref):
        assert torch.equal(ids, exp["input_ids"])
        assert torch.equal(labels, exp["labels"])


def test_mask_covers_exactly_the_prompt(tokenizer):
    row = {"instruction": "Question: what is 2 plus 3?", "input": "the cat", "output": " 5"}
    ids, labels = encode_record(row, tokenizer, Plain(), mask_prompt=True)
    prompt = tokenizer.encode("Question: what is 2 plus 3?\nthe cat")
    response = tokenizer.encode(" 5", bos=False, eos=True)
    assert torch.equal(ids, torch.cat([prompt, response]).long())
    assert labels[: len(prompt)].tolist() == [-100] * len(prompt)
    assert torch.equal(labels[len(prompt):], response.long())
    assert int(response[-1]) == tokenizer.eos_id
    # plain text: everything is a target
    ids, labels = encode_record({"text": "the cat sat"}, tokenizer, Plain(), mask_prompt=True)
    assert torch.equal(ids, labels) and torch.equal(ids, tokenizer.encode("the cat sat", bos=False, eos=True).long())


def test_padding_carries_ignore_index(tmp_path, tokenizer):
    dm = make_dm(tmp_path, tokenizer, batch_size=5, pad_id=7)
    batch = next(iter(dm.train_dataloader()))
    idx = dm.train_dataloader().batches(0)[0]
    T = max(len(dm.train_examples[i][0]) for i in idx)
    assert batch["input_ids"].shape == batch["labels"].shape == (5, T)
    for row, i in enumerate(idx):
        ids, labels = dm.train_examples[i]
        n = len(ids)
        assert torch.equal(batch["input_ids"][row, :n], ids) and torch.equal(batch["labels"][row, :n], labels)
        assert batch["input_ids"][row, n:].tolist() == [7] * (T - n)
        assert batch["labels"][row, n:].tolist() == [-100] * (T - n)


def test_truncation_is_counted_and_logged(tmp_path, tokenizer, caplog):
    rows = _records(37)
    full = [len(encode_record(r, tokenizer, Plain(), True)[0]) for r in rows]
    limit = sorted(full)[len(full) // 2]
    with caplog.at_level(logging.WARNING, logger="litgpt_ext.sft.data"):
        dm = make_dm(tmp_path, tokenizer, max_seq_length=limit)
    expected = sum(n > limit for n in full)
    assert expected > 0 and dm.stats["train"]["truncated"] == expected
    assert dm.stats["train"]["longest"] == max(full)
    assert all(len(ids) <= limit for ids, _ in dm.train_examples) and dm.longest_seq_length == limit
    assert f"{expected} of 37 examples are longer than max_seq_length={limit}" in caplog.text
    with pytest.raises(ValueError, match="longer than max_seq_length"):
        make_dm(tmp_path, tokenizer, max_seq_length=limit, truncation="error")


def test_epoch_batches_cover_every_example_once_plus_padding():
    lengths = [random.Random(i).randint(3, 40) for i in range(23)]
    for grouped in (False, True):
        b0 = epoch_batches(lengths, 4, 2, seed=5, epoch=0, length_grouped=grouped, group_batches=2)
        assert len(b0) == 6 and all(len(b) == 4 for b in b0)  # ceil(23 / 8) = 3 rounds of 2 ranks
        flat = Counter(i for b in b0 for i in b)
        assert set(flat) == set(range(23)) and sum(flat.values()) == 24  # one example repeated as padding
        assert b0 == epoch_batches(lengths, 4, 2, seed=5, epoch=0, length_grouped=grouped, group_batches=2)
        assert b0 != epoch_batches(lengths, 4, 2, seed=5, epoch=1, length_grouped=grouped, group_batches=2)
        assert b0 != epoch_batches(lengths, 4, 2, seed=6, epoch=0, length_grouped=grouped, group_batches=2)
    # grouping cuts padding: the sum over batches of (longest - each) length
    def pad(bs):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)
    plain = sum(pad(epoch_batches(lengths, 4, 1, 5, e)) for e in range(5))
    grouped = sum(pad(epoch_batches(lengths, 4, 1, 5, e, True, 8)) for e in range(5))
    assert grouped < plain


def test_ranks_split_each_round(tmp_path, tokenizer):
    seen = []
    for rank in (0, 1):
        dm = make_dm(tmp_path / str(rank), tokenizer, n=37, batch_size=4, rank=rank, world_size=2)
        loader = dm.train_dataloader()
        assert len(loader) == 5  # ceil(37 / 8)
        it = iter(loader)
        seen.append([next(it)["input_ids"] for _ in range(len(loader))])
        assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["cursor"] == 0
    # together the two ranks' first epoch is every example (+3 repeats), as epoch_batches lays it out
    dm = make_dm(tmp_path / "ref", tokenizer, n=37, batch_size=4, rank=0, world_size=2)
    order = dm.train_dataloader().batches(0)
    for k, b in enumerate(order):
        got = seen[k % 2][k // 2]
        for row, i in enumerate(b):
            ids = dm.train_examples[i][0]
            assert torch.equal(got[row, : len(ids)], ids)


@pytest.mark.parametrize("world_size,rank,stop", [(1, 0, 3), (1, 0, 10), (1, 0, 17), (2, 1, 4), (2, 0, 5)])
@pytest.mark.parametrize("grouped", [False, True])
def test_exact_resume(tmp_path, tokenizer, world_size, rank, stop, grouped):
    kw = dict(n=37, batch_size=4, rank=rank, world_size=world_size, length_grouped=grouped, group_batches=2)
    it = iter(make_dm(tmp_path, tokenizer, **kw).train_dataloader())
    ref = [next(it) for _ in range(stop + 12)]  # crosses one or more epoch boundaries

    first = make_dm(tmp_path, tokenizer, **kw).train_dataloader()
    it = iter(first)
    for _ in range(stop):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    resumed = make_dm(tmp_path, tokenizer, **kw).train_dataloader()
    resumed.load_state_dict(state)
    it = iter(resumed)
    for k in range(stop, stop + 12):
        b = next(it)
        assert torch.equal(b["input_ids"], ref[k]["input_ids"]) and torch.equal(b["labels"], ref[k]["labels"])


def test_resume_refuses_changed_data_or_layout(tmp_path, tokenizer):
    loader = make_dm(tmp_path, tokenizer, batch_size=4).train_dataloader()
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    other = make_dm(tmp_path, tokenizer, batch_size=4, mask_prompt=False).train_dataloader()
    with pytest.raises(ValueError, match="training data changed"):
        other.load_state_dict(state)
    other = make_dm(tmp_path, tokenizer, batch_size=2).train_dataloader()
    with pytest.raises(ValueError, match=r"batch_size \(checkpoint 4, now 2\)"):
        other.load_state_dict(state)
    state["cursor"], state["epoch"] = 0, 2  # at an epoch boundary the layout may change
    other.load_state_dict(state)
    assert (other.epoch, other.cursor) == (2, 0)


def test_run_seed_orders_data_but_not_the_split(tmp_path, tokenizer):
    path = write_json(tmp_path / "all.json", _records(40))
    dms = []
    for run_seed in (1, 2):
        dm = SFTData(train_path=path, val_split_fraction=0.25)
        dm.connect(tokenizer, batch_size=4, seed=run_seed)
        dm.setup()
        dms.append(dm)
    assert dms[0].seed == 1 and dms[1].seed == 2
    assert [e[0].tolist() for e in dms[0].val_examples] == [e[0].tolist() for e in dms[1].val_examples]
    assert dms[0].train_dataloader().batches(0) != dms[1].train_dataloader().batches(0)
    assert len(dms[0].val_examples) == 10 and len(dms[0].train_examples) == 30


def test_split_records_is_seeded_and_complete():
    rows = [{"text": str(i)} for i in range(50)]
    tr, va = split_records(rows, 0.1, seed=3)
    assert len(va) == 5 and sorted(r["text"] for r in tr + va) == sorted(r["text"] for r in rows)
    assert (tr, va) == split_records(rows, 0.1, seed=3) and va != split_records(rows, 0.1, seed=4)[1]
    with pytest.raises(ValueError, match="leaves no training record"):
        split_records(rows[:1], 0.5, seed=0)


def test_folder_layout_and_bad_inputs(tmp_path, tokenizer):
    write_json(tmp_path / "d" / "train.json", _records(8))
    (tmp_path / "d" / "val.jsonl").write_text("\n".join(json.dumps(r) for r in _records(3)) + "\n")
    dm = SFTData(train_path=tmp_path / "d", seed=0)
    dm.connect(tokenizer, batch_size=2)
    dm.setup()
    assert (len(dm.train_examples), len(dm.val_examples)) == (8, 3)
    with pytest.raises(ValueError, match="no SFT validation data"):
        dm = SFTData(train_path=tmp_path / "d" / "train.json", seed=0)
        dm.connect(tokenizer)
        dm.setup()
    write_json(tmp_path / "bad.json", [{"instruction": "x", "answer": "y"}])
    with pytest.raises(ValueError, match=r"record 0: has 'answer' but no 'output': rename.*\['answer', 'instruction'\]"):
        dm = SFTData(train_path=tmp_path / "bad.json", val_split_fraction=0.5, seed=0)
        dm.connect(tokenizer)
        dm.setup()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dm = SFTData(train_path=tmp_path / "nope.json", val_split_fraction=0.5, seed=0)
        dm.connect(tokenizer)
        dm.setup()


def test_val_loader_splits_across_ranks_with_empty_padding_batches(tmp_path, tokenizer):
    per_rank = []
    for rank in (0, 1):
        dm = make_dm(tmp_path / str(rank), tokenizer, batch_size=2, rank=rank, world_size=2)  # 9 val -> 5 batches
        batches = list(dm.val_dataloader())
        assert len(batches) == len(dm.val_dataloader()) == 3
        per_rank.append(batches)
    assert int((per_rank[1][2]["labels"] != -100).sum()) == 0  # the 6th batch is padding: no targets
    real = [per_rank[k % 2][k // 2] for k in range(5)]
    got = [row[: len(e[0])].tolist() for k, b in enumerate(real)
           for row, e in zip(b["input_ids"], dm.val_examples[2 * k: 2 * k + 2])]
    assert got == [e[0].tolist() for e in dm.val_examples]
