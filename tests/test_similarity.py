"""The bridge analysis: similarity measures, mixture-aware sets, PA and its correlation."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from litgpt_ext.data.shard_io import write_token_shard
from litgpt_ext.study.similarity import (
    TextStats,
    cosine,
    jaccard,
    js_similarity,
    pearson,
    read_sft_texts,
    sample_shard_docs,
    similarity,
)
from tests.eval_fixtures import train_tokenizer


def test_measures_on_hand_computed_distributions():
    p, q = {"a": 0.5, "b": 0.5}, {"b": 0.5, "c": 0.5}
    assert cosine(p, p) == pytest.approx(1.0)
    assert cosine(p, q) == pytest.approx(0.5)  # (0.25) / (sqrt(.5) * sqrt(.5))
    assert cosine({"a": 1.0}, {"c": 1.0}) == 0.0
    assert js_similarity(p, p) == pytest.approx(1.0)
    assert js_similarity({"a": 1.0}, {"c": 1.0}) == pytest.approx(0.0)
    # JSD(p, q) with m = {a: .25, b: .5, c: .25}: 0.5 * (0.5*log2(2) + 0) * 2 = 0.5 bits
    assert js_similarity(p, q) == pytest.approx(0.5)
    assert jaccard(p, q) == pytest.approx(1 / 3)


def test_mixture_equals_stats_of_the_blended_corpus():
    a = TextStats.of(["ab"], [[1, 2]], ngram_max=2)
    b = TextStats.of(["cc"], [[3, 3]], ngram_max=2)
    m = TextStats.mixture([(0.75, a), (0.25, b)])
    assert m.unigrams == pytest.approx({1: 0.375, 2: 0.375, 3: 0.25})
    assert m.ngrams[0] == pytest.approx({"a": 0.375, "b": 0.375, "c": 0.25})
    assert m.ngrams[1] == pytest.approx({"ab": 0.75, "cc": 0.25})
    assert sum(m.unigrams.values()) == pytest.approx(1.0)


def test_pearson_and_fit():
    c = pearson([0, 1, 2, 3], [1, 3, 5, 7])
    assert c["r"] == pytest.approx(1.0) and c["slope"] == pytest.approx(2.0) and c["intercept"] == pytest.approx(1.0)
    assert pearson([0, 1, 2], [2, 1, 0])["r"] == pytest.approx(-1.0)
    assert math.isnan(pearson([1, 1, 1], [0, 1, 2])["r"])


def test_sample_shard_docs_returns_whole_documents(tmp_path):
    eos = 7
    docs = [np.array([100 + i] * (3 + i % 5) + [eos]) for i in range(60)]
    write_token_shard(tmp_path / "1", docs, chunk_tokens=40)
    got = sample_shard_docs(tmp_path / "1", eos, num_docs=20, seed=0)
    assert len(got) == 20
    for d in got:  # each sampled doc is one whole document: one repeated id, right length, no EOS
        assert len(set(d.tolist())) == 1 and eos not in d.tolist()
        i = int(d[0]) - 100
        assert len(d) == 3 + i % 5
    assert [d.tolist() for d in got] == [d.tolist() for d in sample_shard_docs(tmp_path / "1", eos, 20, seed=0)]


def test_read_sft_texts_formats_and_errors(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "Add", "input": "1 2", "output": "3"}, {"text": "t"}]))
    assert read_sft_texts(tmp_path / "a.json") == ["Add\n1 2\n3", "t"]
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n\n{"text": "y"}\n')
    assert read_sft_texts(tmp_path / "b.jsonl") == ["x", "y"]
    (tmp_path / "c.json").write_text(json.dumps([{"question": "q"}]))
    with pytest.raises(ValueError, match="record 0 has neither"):
        read_sft_texts(tmp_path / "c.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_sft_texts(tmp_path / "nope.json")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Prose-like main shards and an arithmetic math shard written with a real tokenizer."""
    root = tmp_path_factory.mktemp("sim")
    rng = random.Random(0)
    words = "the river runs past old stone houses while people walk and talk about the weather".split()
    prose = [" ".join(rng.choice(words) for _ in range(30)) for _ in range(120)]
    math_docs = [f"Question: what is {a} plus {b}? Answer: {a + b}" for a, b in
                 ((rng.randint(0, 99), rng.randint(0, 99)) for _ in range(120))]
    tok_dir = train_tokenizer(root / "tok", prose + math_docs, vocab_size=300)
    from litgpt import Tokenizer

    tok = Tokenizer(tok_dir)
    enc = lambda texts: [tok.encode(t, bos=False, eos=True).numpy() for t in texts]  # noqa: E731
    write_token_shard(root / "data" / "1", enc(prose[:100]), chunk_tokens=2000)
    write_token_shard(root / "data" / "m1", enc(math_docs[:100]), chunk_tokens=2000)
    sft = root / "sft"
    sft.mkdir()
    (sft / "math.json").write_text(json.dumps([{"instruction": d.split(" Answer")[0], "input": "",
                                                "output": "Answer" + d.split(" Answer")[1]} for d in math_docs[100:]]))
    (sft / "prose.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in prose[100:]))
    return root, tok_dir


@pytest.mark.slow
def test_similarity_command_pa_and_correlation(corpus, tmp_path):
    root, tok_dir = corpus
    imp = tmp_path / "imp.csv"
    imp.write_text("set,sft,rel_improvement\nmath_mix,math,0.30\nmath_mix,prose,-0.01\nmath_heavy,math,0.5\n"
                   "math_heavy,prose,-0.05\n")
    out = tmp_path / "out"
    rep = similarity(data_path=root / "data", tokenizer_dir=tok_dir,
                     sets={"general": "main:1.0", "math_mix": "main:0.8,math:0.2", "math_heavy": "main/1:0.5,m1:0.5"},
                     sft={"math": sft_path(root, "math.json"), "prose": sft_path(root, "prose.jsonl")},
                     num_docs=50, ngram_max=3, improvements=imp, out_dir=out)
    for m in ("unigram_cosine", "unigram_js", "char_ngram_cosine"):
        s = rep["sim"][m]
        # the math SFT set is closer to the math-heavy mix than to the light one, and both beat general
        assert s["math_heavy"]["math"] > s["math_mix"]["math"] > s["general"]["math"]
        # general text is closest to the prose SFT set
        assert s["general"]["prose"] > s["math_mix"]["prose"] > s["math_heavy"]["prose"]
        assert rep["pa"][m]["math_mix"]["math"] == pytest.approx(s["math_mix"]["math"] - s["general"]["math"])
        assert rep["correlation"][m]["n"] == 4 and rep["correlation"][m]["r"] > 0.9
    assert "general" not in rep["pa"]["unigram_cosine"]
    for f in ("similarity.json", "similarity.csv", "similarity_heatmap.png", "pa_vs_improvement.png"):
        assert (out / f).stat().st_size > 0
    rows = list(csv.DictReader(open(out / "similarity.csv")))
    assert len(rows) == 6 and {r["set"] for r in rows} == {"general", "math_mix", "math_heavy"}


def sft_path(root: Path, name: str) -> Path:
    return root / "sft" / name


def test_similarity_refuses_bad_inputs(corpus, tmp_path):
    root, tok_dir = corpus
    sft = {"math": sft_path(root, "math.json")}
    with pytest.raises(ValueError, match="general='base' is not one of the sets"):
        similarity(root / "data", tok_dir, {"general": "main:1.0"}, sft, general="base", out_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown shard type 'mth'"):
        similarity(root / "data", tok_dir, {"general": "main:1.0", "x": "mth:1.0"}, sft, out_dir=tmp_path)
    with pytest.raises(ValueError, match="no SFT sets"):
        similarity(root / "data", tok_dir, {"general": "main:1.0"}, {}, out_dir=tmp_path)
