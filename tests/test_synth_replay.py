"""`litgpt-ext synth-replay`: documents sampled from a frozen tiny checkpoint become a typed `s1`
shard whose token count is what `prepare` counts for the kept documents, with no near duplicates
left, that a ShardedMixedDataset mixes as `synth`; the same seed gives the same shard; the
refusals are one-line errors of the real CLI."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.conftest import make_shard
from tests.eval_fixtures import save_checkpoint, tiny_config, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [f"the quick brown fox {i} jumps over the lazy dog near the river bank {i % 7}" for i in range(300)]
PROMPTS = ["the quick brown", "over the lazy dog", "near the river", "jumps"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A tiny model's decode steps are ms each: torch's intra-op threads only contend on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    from litgpt import GPT
    from tokenizers import Tokenizer

    root = tmp_path_factory.mktemp("synth_ckpt")
    tok = train_tokenizer(root / "tok", TEXTS, vocab_size=300)
    n = Tokenizer.from_file(str(tok / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=n, padded_vocab_size=None, padding_multiple=64, block_size=64))
    return save_checkpoint(root / "ckpt", model, tok, wrap=False)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("synth_prompts") / "prompts.txt"
    p.write_text("\n".join(PROMPTS) + "\n\n")
    return p


def run(ckpt: Path, prompts: Path, out: Path, **kw):
    from litgpt_ext.prep.synth_replay import synth_replay

    args = dict(num_docs=10, max_new_tokens=24, temperature=1.0, top_p=0.9, seed=7, device="cpu", dtype="float32")
    args.update(kw)
    return synth_replay(ckpt, prompts, out_dir=out, **args)


@pytest.fixture(scope="module")
def sampled(ckpt, prompts, tmp_path_factory) -> dict:
    data = tmp_path_factory.mktemp("synth_data")
    make_shard(data / "1", 10_000, 1600)  # a main and a math shard beside it: the data folder of a mix
    make_shard(data / "m1", 50_000, 800)
    summary = run(ckpt, prompts, data)
    return {"data": data, "summary": summary, "docs": [json.loads(x) for x in (data / "s1" / "synth_docs.jsonl").open()]}


def test_shard_type_and_token_count(sampled, ckpt):
    from litgpt_ext.data.shard_types import build_registry, discover_shards
    from litgpt_ext.prep.tokenizer import FastTokenizer

    shards = {s.id: s for s in discover_shards(sampled["data"], build_registry())}
    assert shards["s1"].type == "synth"
    docs = sampled["docs"]
    assert sampled["summary"]["sampled"] == 10 and len(docs) == sampled["summary"]["kept"] >= 1
    expected = sum(len(ids) for ids in FastTokenizer(ckpt).encode_docs([d["text"] for d in docs]))  # + EOS each
    meta = json.loads((sampled["data"] / "s1" / "prepare_meta.json").read_text())
    assert shards["s1"].num_tokens == expected == meta["stats"]["tokens"] == sampled["summary"]["tokens"]
    assert meta["settings"]["tokenizer"]  # the tokenizer digest the vocabulary check compares
    for d in docs:  # each document starts with its prompt, cycled in order
        assert d["prompt"] == PROMPTS[d["index"] % len(PROMPTS)] and d["text"].startswith(d["prompt"])
    synth = json.loads((sampled["data"] / "s1" / "synth_meta.json").read_text())
    assert synth["kept"] == len(docs) and synth["settings"]["seed"] == 7


def test_no_near_duplicate_left(ckpt, prompts, tmp_path):
    """Greedy sampling repeats each prompt's continuation: only one per prompt is kept, and no pair of
    kept documents reaches the threshold (MinHash estimate, as clean computes it)."""
    from rensa import RMinHash

    from litgpt_ext.prep.clean import shingles

    summary = run(ckpt, prompts, tmp_path, num_docs=12, temperature=0.0)
    docs = [json.loads(x)["text"] for x in (tmp_path / "s1" / "synth_docs.jsonl").open()]
    assert summary["removed"].get("exact_duplicate", 0) + summary["removed"].get("near_duplicate", 0) == 12 - len(docs)
    assert len(docs) <= len(PROMPTS) and len(set(docs)) == len(docs)

    def mh(t):
        m = RMinHash(num_perm=128, seed=1)
        m.update(shingles(t, 5))
        return m

    sigs = [mh(t) for t in docs]
    assert all(a.jaccard(b) < 0.85 for a, b in itertools.combinations(sigs, 2))


def test_mix_with_synth(sampled):
    from litgpt_ext.data import ShardedMixedDataset

    dm = ShardedMixedDataset(sampled["data"], mix_weights_str="main:0.5,synth:0.3,math:0.2")
    dm.connect(batch_size=4, max_seq_length=7)
    dm.setup()
    assert dm.weights == pytest.approx({"main/1": 0.5, "s1": 0.3, "m1": 0.2})
    rows = [r for b in itertools.islice(iter(dm.train_dataloader()), 25) for r in b]

    def source(r):
        return "m1" if r[0] >= 50_000 else "main/1" if r[0] >= 10_000 else "s1"

    counts = Counter(source(r) for r in rows)
    for sid, w in dm.weights.items():
        assert abs(counts[sid] - w * len(rows)) <= 1, counts


def test_reproducible_with_seed(sampled, ckpt, prompts, tmp_path):
    run(ckpt, prompts, tmp_path / "a")
    run(ckpt, prompts, tmp_path / "b", seed=8)
    run(ckpt, prompts, tmp_path / "c", num_docs=4)
    same = (tmp_path / "a" / "s1" / "synth_docs.jsonl").read_text()
    assert same == (sampled["data"] / "s1" / "synth_docs.jsonl").read_text()
    for chunk in (sampled["data"] / "s1").glob("chunk-*.bin"):
        assert (tmp_path / "a" / "s1" / chunk.name).read_bytes() == chunk.read_bytes()
    assert (tmp_path / "b" / "s1" / "synth_docs.jsonl").read_text() != same
    # document i depends on (seed, i) only: a shorter run is a prefix of the longer one
    first = [json.loads(x) for x in (tmp_path / "c" / "s1" / "synth_docs.jsonl").open()]
    assert first == [d for d in sampled["docs"] if d["index"] < 4]


def test_a_linked_data_folder_and_cut_prompts(sampled, ckpt, prompts, tmp_path):
    """link_shards_from: out_dir links the source's shard folders and gets the synth shard beside them
    (the source is not written to; a rerun onto the links is accepted); prompt_tokens cuts each prompt."""
    from litgpt_ext.checkpoint.loading import load_tokenizer
    from litgpt_ext.data.shard_types import build_registry, discover_shards

    source = tmp_path / "source"
    make_shard(source / "1", 10_000, 1600)
    make_shard(source / "m1", 50_000, 800)
    before = sorted(p.name for p in source.iterdir())
    out = tmp_path / "view"
    run(ckpt, prompts, out, link_shards_from=source, prompt_tokens=2, shard="s2")
    assert sorted(p.name for p in source.iterdir()) == before
    assert all((out / n).is_symlink() and (out / n).resolve() == (source / n).resolve() for n in before)
    assert sorted(s.id for s in discover_shards(out, build_registry())) == ["m1", "main/1", "s2"]
    tok = load_tokenizer(ckpt, None)
    for d in (json.loads(x) for x in (out / "s2" / "synth_docs.jsonl").open()):
        ids = tok.encode(d["prompt"], bos=False, eos=False)
        assert d["text"].startswith(tok.decode(ids[:2]))
    meta = json.loads((out / "s2" / "synth_meta.json").read_text())
    assert meta["settings"]["prompt_tokens"] == 2 and meta["linked_shards_from"] == str(source)
    run(ckpt, prompts, out, link_shards_from=source, shard="s3", num_docs=2)  # a second shard into the same view
    assert (out / "s3" / "synth_meta.json").is_file()


# ---------------------------------------------------------------- refusals

BAD = {
    "existing-shard": ({}, ["already exists", "s1"]),
    "not-synth-shard": ({"--shard": "m2"}, ["'m2'", "synth", "math"]),
    "missing-checkpoint": ({"--checkpoint": "{tmp}/nope"}, ["checkpoint", "nope"]),
    "empty-prompts": ({"--prompts": "{tmp}/empty.txt"}, ["empty.txt", "no prompt"]),
    "num-docs-0": ({"--num_docs": "0"}, ["num_docs=0", ">= 1"]),
    "temperature-neg": ({"--temperature": "-0.5"}, ["temperature=-0.5", ">= 0"]),
    "top-p-0": ({"--top_p": "0"}, ["top_p=0", "(0, 1]"]),
    "top-p-big": ({"--top_p": "1.5"}, ["top_p=1.5", "(0, 1]"]),
    "prompt-tokens-0": ({"--prompt_tokens": "0"}, ["prompt_tokens=0", ">= 1"]),
    "link-missing": ({"--link_shards_from": "{tmp}/nope"}, ["link_shards_from", "nope", "does not exist"]),
    "link-has-the-shard": ({"--link_shards_from": "{data}"}, ["link_shards_from", "already has a shard 's1'"]),
    "out-dir-not-a-view": ({"--link_shards_from": "{tmp}/src", "--out_dir": "{tmp}/dirty"},
                           ["out_dir", "dirty", "holds '1', which is not a link to"]),
}


def _argv(sampled, ckpt, prompts, tmp: Path, over: dict) -> list[str]:
    (tmp / "empty.txt").write_text("\n \n")
    make_shard(tmp / "src" / "1", 10_000, 160)  # a data folder to link, and an out_dir that is not a view of it
    make_shard(tmp / "dirty" / "1", 10_000, 160)
    out = sampled["data"] if not over else tmp / "out"  # an existing s1 is refused before anything else
    args = {"--checkpoint": str(ckpt), "--prompts": str(prompts), "--num_docs": "3", "--out_dir": str(out), **over}
    return ["synth-replay"] + [x for k, v in args.items()
                               for x in (k, v.replace("{tmp}", str(tmp)).replace("{data}", str(sampled["data"])))]


@pytest.mark.parametrize("case", sorted(BAD))
def test_refusals_in_process(case, sampled, ckpt, prompts, tmp_path):
    from litgpt_ext.cli import main

    over, needles = BAD[case]
    before = sorted(p.name for p in sampled["data"].iterdir())
    with pytest.raises(SystemExit) as e:
        main(_argv(sampled, ckpt, prompts, tmp_path, over))
    msg = str(e.value)
    assert msg.count("error:") == 1 and all(n in msg for n in needles), msg
    assert sorted(p.name for p in sampled["data"].iterdir()) == before and not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["existing-shard", "empty-prompts", "top-p-big"])
def test_refusals_real_cli(case, sampled, ckpt, prompts, tmp_path):
    over, needles = BAD[case]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("LITGPT_EXT_TRACEBACK", None)
    proc = subprocess.run([sys.executable, "-m", "litgpt_ext", *_argv(sampled, ckpt, prompts, tmp_path, over)[0:]],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), proc.stderr


def test_near_duplicates_removed(ckpt, prompts, tmp_path, monkeypatch):
    """Documents that differ in their last word (5-gram Jaccard ~0.96) are dropped, distinct ones kept,
    and the shard holds exactly the kept documents' tokens."""
    import litgpt_ext.prep.synth_replay as sr
    from litgpt_ext.prep.tokenizer import FastTokenizer

    words = [f"w{i}" for i in range(60)]
    texts = [" ".join(words), " ".join(words[:-1] + ["changed"]), " ".join(reversed(words)), " ".join(words)]

    def fake(model, tokenizer, prompts_, num_docs, *, bar=None, **kw):
        for i in range(num_docs):
            bar.update(1)
            yield {"index": i, "prompt_index": i % len(prompts_), "text": texts[i], "new_tokens": 1, "eos": True}

    monkeypatch.setattr(sr, "generate_documents", fake)
    summary = run(ckpt, prompts, tmp_path, num_docs=4)
    assert summary["removed"] == {"near_duplicate": 1, "exact_duplicate": 1} and summary["kept"] == 2
    kept = [json.loads(x)["text"] for x in (tmp_path / "s1" / "synth_docs.jsonl").open()]
    assert kept == [texts[0], texts[2]]
    assert summary["tokens"] == sum(len(ids) for ids in FastTokenizer(ckpt).encode_docs(kept))
