"""Representation analyses: linear CKA, weight distance per block, embedding-based dataset similarity."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from litgpt import GPT

sys.path.insert(0, str(Path(__file__).parent))
from eval_fixtures import arithmetic_docs, save_checkpoint, tiny_config, train_tokenizer  # noqa: E402

from litgpt_ext.checkpoint import load_model_state  # noqa: E402
from litgpt_ext.study.cka import cka, cka_matrix, linear_cka, parse_pairs, weight_distance  # noqa: E402
from litgpt_ext.study.representations import embedding_measures, sample_positions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROSE = ["the cat sat on the mat and looked at the door", "a dog ran down the road to the old farm",
         "rain fell on the quiet town all night long", "she read the letter twice before she slept"]
VOCAB = 300


@pytest.fixture(scope="module")
def texts():
    return [d["text"] for d in arithmetic_docs(30, seed=1)] + [f"{p} {i}" for i in range(8) for p in PROSE]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, texts):
    return train_tokenizer(tmp_path_factory.mktemp("tok"), texts * 3, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def data_jsonl(tmp_path_factory, texts):
    path = tmp_path_factory.mktemp("data") / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def make_ckpt(path: Path, tok_dir: Path, seed: int, **cfg) -> Path:
    torch.manual_seed(seed)
    return save_checkpoint(path, GPT(tiny_config("pythia", vocab_size=VOCAB, **cfg)), tok_dir)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tok_dir):
    root = tmp_path_factory.mktemp("ckpts")
    return make_ckpt(root / "a", tok_dir, 0), make_ckpt(root / "b", tok_dir, 1)


# --------------------------------------------------------------------------------------------- CKA values


def test_linear_cka_self_rotation_scaling_and_independence():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 16, generator=g) @ torch.randn(16, 16, generator=g)  # correlated features
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-9)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    y = x.double() @ q
    assert linear_cka(x, y) == pytest.approx(1.0, abs=1e-9)  # orthogonal rotation
    assert linear_cka(x, 7.5 * x) == pytest.approx(1.0, abs=1e-9)  # isotropic scaling
    assert linear_cka(x, 3.0 * y + 2.0) == pytest.approx(1.0, abs=1e-9)  # both, plus a shift (centering)
    # not invariant to an anisotropic scaling: a sanity check that the measure can move
    assert linear_cka(x, x * torch.linspace(0.1, 10, 16)) < 0.99
    # independent features: E[CKA] ~ d/n for n >> d; near 0
    a, b = torch.randn(20_000, 8, generator=g), torch.randn(20_000, 8, generator=g)
    assert linear_cka(a, b) < 0.01
    # the n x n (n < 2d) and d x d forms agree
    small_a, small_b = torch.randn(20, 16, generator=g), torch.randn(20, 16, generator=g)
    xa, xb = small_a - small_a.mean(0), small_b - small_b.mean(0)
    by_features = float((xb.T @ xa).norm() ** 2 / ((xa.T @ xa).norm() * (xb.T @ xb).norm()))
    assert linear_cka(small_a, small_b) == pytest.approx(by_features, rel=1e-6)
    assert math.isnan(linear_cka(torch.ones(10, 3), a[:10]))  # no variance
    with pytest.raises(ValueError, match="same samples"):
        linear_cka(a[:10], b[:11])
    mat = cka_matrix([x, y], [x, a[:500]])
    assert mat.shape == (2, 2) and mat[0, 0] == pytest.approx(1.0) and mat[1, 0] == pytest.approx(1.0)


def test_sample_positions_are_seeded_and_bounded():
    lens = [5, 0, 7, 3]
    full = sample_positions(lens, 100)
    assert [list(p) for p in full] == [list(range(n)) for n in lens]
    part = sample_positions(lens, 6, seed=3)
    assert sum(len(p) for p in part) == 6 and all((p < n).all() for p, n in zip(part, lens) if len(p))
    assert all(np.array_equal(a, b) for a, b in zip(part, sample_positions(lens, 6, seed=3)))


def test_parse_pairs():
    labels = ["base", "arm", "base_sft", "arm_sft"]
    assert parse_pairs("base:base_sft,arm:arm_sft", labels) == [(0, 2), (1, 3)]
    assert parse_pairs("0:2, 1:3", labels) == [(0, 2), (1, 3)]
    assert parse_pairs(None, labels[:3]) == [(0, 1), (0, 2), (1, 2)]
    with pytest.raises(ValueError, match="neither a label"):
        parse_pairs("base:nope", labels)
    with pytest.raises(ValueError, match="is not `a:b`"):
        parse_pairs("base-arm", labels)


# --------------------------------------------------------------------------------------------- weights


def test_weight_distance_zero_and_hand_computed(ckpts):
    sd = load_model_state(ckpts[0])
    same = weight_distance(sd, {k: v.clone() for k, v in sd.items()})
    assert all(v["l2"] == 0.0 and v["relative"] == 0.0 for v in same.values())
    assert {"embeddings", "block 0", "block 1", "final_norm", "head", "total"} <= set(same)
    # a known perturbation: +0.1 on every entry of one tensor of block 1
    key = "transformer.h.1.mlp.proj.weight"
    other = {k: v.clone() for k, v in sd.items()}
    other[key] += 0.1
    wd = weight_distance(sd, other)
    norm_block1 = math.sqrt(sum(float((v.double() ** 2).sum()) for k, v in sd.items() if k.startswith("transformer.h.1.")))
    expected = 0.1 * math.sqrt(sd[key].numel())
    assert wd["block 1"]["l2"] == pytest.approx(expected, rel=1e-6)
    assert wd["block 1"]["relative"] == pytest.approx(expected / norm_block1, rel=1e-6)
    assert wd["block 0"]["relative"] == 0.0 and wd["head"]["relative"] == 0.0
    # a two-number case: a = (3, 4), b = (3, 9): ||a - b|| = 5 = ||a||
    toy = weight_distance({"transformer.h.0.w": torch.tensor([3.0, 4.0])}, {"transformer.h.0.w": torch.tensor([3.0, 9.0])})
    assert toy["block 0"] == {"l2": 5.0, "norm": 5.0, "relative": 1.0}
    with pytest.raises(ValueError, match="shape of"):
        weight_distance({"transformer.h.0.w": torch.zeros(2)}, {"transformer.h.0.w": torch.zeros(3)})


# --------------------------------------------------------------------------------------------- the command


def test_block_features_of_a_model_with_itself_give_cka_one(ckpts, data_jsonl, tok_dir):
    from litgpt import Tokenizer

    from litgpt_ext.study.representations import block_features, load_checkpoint, read_texts_or_docs

    docs = read_texts_or_docs(data_jsonl, Tokenizer(tok_dir), num_docs=8)
    pos = sample_positions([len(d) for d in docs], 80)
    model, _, _ = load_checkpoint(ckpts[0], "cpu")
    fa = block_features(model, docs, pos, batch_size=3)
    head = block_features(model, docs[:5], pos[:5], batch_size=5)  # other batches: other padding
    fb = [torch.cat([h, x[len(h):]]) for h, x in zip(head, fa)]
    assert [f.shape for f in fa] == [torch.Size([80, 64])] * 3
    assert np.allclose(np.diag(cka_matrix(fa, fb)), 1.0, atol=1e-6)
    other, _, _ = load_checkpoint(ckpts[1], "cpu")
    fo = block_features(other, docs, pos)
    assert all(0 < linear_cka(x, y) < 0.999 for x, y in zip(fa, fo))


@pytest.mark.slow
def test_cka_of_a_model_with_itself_is_one(tmp_path, ckpts, data_jsonl, tok_dir):
    a, b = ckpts
    out = cka([a, a, b], data_jsonl, num_docs=12, labels=["a", "a2", "b"], pairs="a:a2,a:b",
              max_tokens=100, out_dir=tmp_path / "out", device="cpu")
    assert out["layers"] == ["embed", "block 0", "block 1"] and out["samples"] == 100
    self_cka = out["cka"]["a vs a2"]
    assert all(abs(v - 1.0) < 1e-6 for v in self_cka["per_layer"].values())
    assert np.allclose(np.diag(self_cka["matrix"]), 1.0, atol=1e-6)
    other = out["cka"]["a vs b"]["per_layer"]
    assert all(0.0 <= v <= 1.0 + 1e-9 for v in other.values()) and min(other.values()) < 0.999
    assert out["weight_distance"]["a vs a2"]["total"]["relative"] == 0.0
    wd = out["weight_distance"]["a vs b"]
    assert wd["last_block"]["group"] == "block 1" and wd["last_block"]["relative"] > 0.1
    saved = json.loads((tmp_path / "out" / "cka.json").read_text())
    assert saved["pairs"] == [["a", "a2"], ["a", "b"]]
    mean = cka([a, b], data_jsonl, num_docs=12, features="mean", out_dir=tmp_path / "mean", device="cpu")
    assert mean["samples"] == 12 and mean["pairs"] == [["a", "b"]]


def test_bad_inputs_are_named(tmp_path, ckpts, data_jsonl, tok_dir):
    a, _ = ckpts
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cka([a, tmp_path / "missing"], data_jsonl, out_dir=tmp_path / "o")
    deep = make_ckpt(tmp_path / "deep", tok_dir, 0, n_layer=3)
    with pytest.raises(ValueError, match=r"different architectures.*n_layer: 2 vs 3"):
        cka([a, deep], data_jsonl, out_dir=tmp_path / "o")
    with pytest.raises(ValueError, match="num_docs must be >= 1"):
        cka([a, a], data_jsonl, num_docs=0, labels=["x", "y"], out_dir=tmp_path / "o")
    with pytest.raises(ValueError, match="two or more"):
        cka([a], data_jsonl, out_dir=tmp_path / "o")
    with pytest.raises(ValueError, match="one distinct name"):
        cka([a, a], data_jsonl, labels=["x", "x"], out_dir=tmp_path / "o")


@pytest.mark.slow
def test_cka_cli_writes_json_and_pngs(tmp_path, ckpts, data_jsonl):
    a, b = ckpts
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "litgpt_ext", "cka", "--checkpoints", f"[{a},{b},{a}]",
                        "--labels", "[a,b,a_again]", "--pairs", "a:a_again,a:b", "--data", str(data_jsonl),
                        "--num_docs", "10", "--max_tokens", "200", "--device", "cpu", "--out_dir", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "cka.json").read_text())
    assert all(abs(v - 1) < 1e-6 for v in res["cka"]["a vs a_again"]["per_layer"].values())
    assert res["weight_distance"]["a vs a_again"]["total"]["l2"] == 0.0
    assert 0 < res["cka"]["a vs b"]["per_layer"]["block 1"] < 1
    for png in ("cka_heatmap.png", "weight_distance.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
    bad = subprocess.run([sys.executable, "-m", "litgpt_ext", "cka", "--checkpoints", f"[{a},{tmp_path / 'nope'}]",
                          "--data", str(data_jsonl), "--out_dir", str(tmp_path / "bad")],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode != 0
    lines = [line for line in bad.stderr.strip().splitlines() if "error" in line]
    assert len(lines) == 1 and "does not exist" in lines[0], bad.stderr[-2000:]
    assert not (tmp_path / "bad").exists()


# --------------------------------------------------------------------------------------------- embeddings


def test_embedding_measures_of_a_set_with_itself():
    mu = np.array([0.3, -1.0, 2.0])
    assert embedding_measures(mu, mu) == {"embedding_cosine": pytest.approx(1.0), "embedding_mmd_linear": 0.0}
    other = embedding_measures(mu, np.array([0.3, -1.0, 0.0]))
    assert other["embedding_mmd_linear"] == pytest.approx(4.0) and other["embedding_cosine"] < 1


def _shards(root: Path, tok_dir: Path, texts: list[str]) -> Path:
    from litgpt import Tokenizer

    from litgpt_ext.data.shard_io import write_token_shard

    tok = Tokenizer(tok_dir)
    enc = [tok.encode(t, bos=False, eos=True).tolist() for t in texts]
    # one chunk each, so every document is sampled; the piece before the first EOS is never a whole
    # document (it may continue one from the previous chunk): a dummy one goes there
    dummy = tok.encode("x", bos=False, eos=True).tolist()
    write_token_shard(root / "1", [dummy, *enc[:30]], chunk_tokens=100_000)  # arithmetic: "main"
    write_token_shard(root / "m1", [dummy, *enc[30:]], chunk_tokens=100_000)  # prose: "math" here
    return root


def test_checkpoint_embeddings_of_a_dataset_with_itself(ckpts, texts):
    from litgpt_ext.study.representations import TextEmbedder

    embed = TextEmbedder(checkpoint=ckpts[0], max_tokens=32, batch_size=4, device="cpu")
    e1, e2 = embed(texts[30:]), embed(list(reversed(texts[30:])))
    assert e1.shape == (32, 64)
    same = embedding_measures(e1.mean(0), e2.mean(0))
    assert same["embedding_cosine"] == pytest.approx(1.0, abs=1e-6) and same["embedding_mmd_linear"] < 1e-8
    assert embedding_measures(e1.mean(0), embed(texts[:30]).mean(0))["embedding_cosine"] < 1 - 1e-6


@pytest.mark.slow
def test_similarity_embedding_keys_beside_the_old_ones(tmp_path, ckpts, tok_dir, texts):
    from litgpt_ext.study.similarity import similarity

    data = _shards(tmp_path / "shards", tok_dir, texts)
    sft = tmp_path / "sft.json"
    sft.write_text(json.dumps([{"instruction": t, "input": "", "output": ""} for t in texts[30:]]))
    sets = {"general": "main:1.0", "mix": "main:0.5,math:0.5", "prose": "math:1.0"}
    base = similarity(data, tok_dir, sets, {"prose_sft": sft}, num_docs=1000, out_dir=tmp_path / "plain")
    emb = similarity(data, tok_dir, sets, {"prose_sft": sft}, num_docs=1000, out_dir=tmp_path / "emb",
                     embedding_checkpoint=ckpts[0])
    assert "embedding" not in base
    assert {k: v for k, v in emb.items() if k != "embedding"} == base  # the existing outputs are unchanged
    assert (tmp_path / "plain" / "similarity.csv").read_text() == (tmp_path / "emb" / "similarity.csv").read_text()
    e = emb["embedding"]
    assert e["source"].startswith("checkpoint:") and e["dim"] == 64
    cos, mmd = e["sim"]["embedding_cosine"], e["sim"]["embedding_mmd_linear"]
    # the prose shard's documents are the SFT set's texts: the same dataset, so cosine 1, MMD 0
    assert cos["prose"]["prose_sft"] == pytest.approx(1.0, abs=1e-6)
    assert mmd["prose"]["prose_sft"] == pytest.approx(0.0, abs=1e-8)
    assert cos["general"]["prose_sft"] < cos["mix"]["prose_sft"] < 1.0  # the blend sits between
    assert e["pa"]["embedding_mmd_linear"]["prose"]["prose_sft"] > 0  # closer than general: positive
    saved = json.loads((tmp_path / "emb" / "similarity.json").read_text())
    assert saved["embedding"]["sim"] == e["sim"]
    assert (tmp_path / "emb" / "similarity_embedding.csv").is_file()
    assert (tmp_path / "emb" / "similarity_embedding_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "plain" / "similarity_embedding.csv").exists()


def test_sentence_model_without_the_package_is_refused(tmp_path, ckpts, tok_dir):
    from litgpt_ext.study.representations import TextEmbedder

    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="needs the sentence-transformers package"):
            TextEmbedder(sentence_model=tmp_path)
    else:
        pytest.skip("sentence-transformers is installed: the missing-package error cannot be shown")
    with pytest.raises(ValueError, match="exactly one of"):
        TextEmbedder(checkpoint=ckpts[0], sentence_model=tmp_path)


def test_sentence_model_embeds(tmp_path):
    pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed (optional; not "
                        "downloaded here): the sentence-model path is tested where it and a local model exist")
    pytest.skip("no local sentence-transformers model folder in this offline environment")
