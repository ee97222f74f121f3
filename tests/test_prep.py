"""Tokenizer training, prepare (formats, val split, re-runs, workers, errors) and the demo build."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from litgpt_ext.demo.math_gen import generate_problems
from litgpt_ext.prep.prepare import PrepareError, is_val_doc, prepare
from litgpt_ext.prep.readers import InputError
from litgpt_ext.prep.tokenizer import EOS_TOKEN, FastTokenizer, train_tokenizer


def _corpus(n: int = 60) -> list[str]:
    from pydoc_data.topics import topics

    prose = [topics[k][:1500] for k in sorted(topics)[: n // 2]]
    math = [p["text"] for p in list(__import__("itertools").islice(generate_problems(7), n - len(prose)))]
    docs = [d for pair in zip(prose, math) for d in pair]
    docs[3] = "Ünïcødé, émojis 😀 and\ttabs  and   spaces\n\n\nend"
    return docs


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return _corpus()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, docs) -> Path:
    d = tmp_path_factory.mktemp("tok")
    src = d / "train.jsonl"
    src.write_text("".join(json.dumps({"body": t}) + "\n" for t in docs))
    return train_tokenizer([str(src)], d / "tokenizer", vocab_size=512, text_field="body")


def _stream(path: Path) -> np.ndarray:
    from litdata import StreamingDataset
    from litdata.streaming.item_loader import TokensLoader

    ds = StreamingDataset(str(path), item_loader=TokensLoader(block_size=1))
    return np.array([int(x[0]) for x in ds], dtype=np.int64)


def _expected(tok_dir: Path, docs: list[str]) -> list[np.ndarray]:
    from litgpt import Tokenizer

    tok = Tokenizer(tok_dir)
    return [tok.encode(d, bos=False, eos=True).numpy().astype(np.int64) for d in docs]


def test_tokenizer_loads_in_litgpt_and_round_trips(tok_dir, docs):
    from litgpt import Tokenizer

    tok = Tokenizer(tok_dir)
    eos = tok.token_to_id(EOS_TOKEN)
    assert tok.eos_id == eos and tok.bos_id == eos
    assert tok.use_bos is False
    assert 300 < tok.vocab_size <= 512
    for text in docs[:6] + ["x = 12345 + 0.5", "  leading spaces", "trailing\n"]:
        ids = tok.encode(text, eos=True)
        assert int(ids[-1]) == eos
        assert tok.decode(ids) == text
    # digits are split one by one
    assert len(tok.encode("12345")) == 5
    # our litgpt-free tokenizer gives exactly litgpt's ids
    fast = FastTokenizer(tok_dir)
    assert (fast.bos_id, fast.eos_id) == (tok.bos_id, tok.eos_id)
    assert fast.encode_docs(docs) == [tok.encode(d, bos=False, eos=True).tolist() for d in docs]


def _write_inputs(root: Path, docs: list[str]) -> tuple[list[str], list[str]]:
    """docs[0:20] jsonl, docs[20:40] parquet (3 row groups), docs[40:] txt files via a glob."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    (root / "a.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(docs[:20])))
    pq.write_table(pa.table({"text": docs[20:40], "n": list(range(20))}), root / "b.parquet", row_group_size=7)
    (root / "txt").mkdir()
    for i, t in enumerate(docs[40:]):
        (root / "txt" / f"doc{i:03d}.txt").write_text(t, encoding="utf-8")
    return [str(root / "a.jsonl"), str(root / "b.parquet"), str(root / "txt" / "*.txt")], docs


def test_prepare_all_formats_exact_token_stream_and_val_split(tmp_path, tok_dir, docs, capsys):
    inputs, ordered = _write_inputs(tmp_path / "in", docs)
    stats = prepare(inputs, tmp_path / "data", "c1", tok_dir, val_fraction=0.25, chunk_tokens=500, batch_size=8, seed=3,
                    log_interval_s=0)
    log = capsys.readouterr().out
    assert "docs/s" in log and "tok/s" in log and "ETA" in log and f"{len(ordered)} documents" in log
    enc = _expected(tok_dir, ordered)
    is_val = [is_val_doc(i, 3, 0.25, None) for i in range(len(ordered))]
    assert 0 < sum(is_val) < len(ordered)
    train = np.concatenate([e for e, v in zip(enc, is_val) if not v])
    val = np.concatenate([e for e, v in zip(enc, is_val) if v])
    np.testing.assert_array_equal(_stream(tmp_path / "data" / "c1"), train)
    np.testing.assert_array_equal(_stream(tmp_path / "data" / "val" / "c1"), val)
    assert stats.documents == len(ordered) and stats.val_documents == sum(is_val)
    assert (stats.train_tokens, stats.val_tokens) == (len(train), len(val))
    assert stats.train_chunks > 1
    meta = json.loads((tmp_path / "data" / "c1" / "prepare_meta.json").read_text())
    assert meta["complete"] and meta["stats"]["train_tokens"] == len(train) and len(meta["inputs"]) == 2 + 20
    from litgpt_ext.data.shard_io import read_shard_index

    assert read_shard_index(tmp_path / "data" / "c1").num_tokens == len(train)
    # a different seed picks different val documents
    assert [is_val_doc(i, 4, 0.25, None) for i in range(len(ordered))] != is_val


def test_prepare_val_count_skip_and_max_docs(tmp_path, tok_dir, docs):
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs) + json.dumps({"text": ""}) + "\n")
    stats = prepare([str(src)], tmp_path / "data", "2", tok_dir, val_count=3, skip_docs=10, max_docs=20)
    enc = _expected(tok_dir, docs[10:30])
    np.testing.assert_array_equal(_stream(tmp_path / "data" / "val" / "2"), np.concatenate(enc[:3]))
    np.testing.assert_array_equal(_stream(tmp_path / "data" / "2"), np.concatenate(enc[3:]))
    assert (stats.documents, stats.val_documents, stats.train_documents) == (20, 3, 17)
    # the empty document at the end is skipped, no EOS-only document is written
    stats = prepare([str(src)], tmp_path / "data", "3", tok_dir, skip_docs=len(docs) - 1)
    assert (stats.documents, stats.skipped_empty, stats.train_documents) == (2, 1, 1)
    np.testing.assert_array_equal(_stream(tmp_path / "data" / "3"), _expected(tok_dir, docs[-1:])[0])
    assert not (tmp_path / "data" / "val" / "3").exists()


def test_prepare_rerun_refuse_resume_overwrite(tmp_path, tok_dir, docs, capsys):
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[:30]))
    out = tmp_path / "data"
    kw = dict(val_fraction=0.2, chunk_tokens=400)
    prepare([str(src)], out, "m1", tok_dir, **kw)
    index = out / "m1" / "index.json"
    before = json.loads(index.read_text())["chunks"]
    with pytest.raises(PrepareError, match=r"m1.*already exists.*overwrite=True"):
        prepare([str(src)], out, "m1", tok_dir, **kw)
    # resume: complete with the same fingerprint -> skipped, untouched
    mtime = index.stat().st_mtime_ns
    stats = prepare([str(src)], out, "m1", tok_dir, resume=True, **kw)
    assert stats.skipped and index.stat().st_mtime_ns == mtime
    # resume with other settings refuses instead of mixing runs
    with pytest.raises(PrepareError, match="different inputs/settings"):
        prepare([str(src)], out, "m1", tok_dir, resume=True, val_fraction=0.2, chunk_tokens=300)
    # an interrupted run's temp folder is removed; an incomplete shard is rebuilt under resume
    (out / "m1.tmp-123-dead").mkdir()
    (out / "m1.tmp-123-dead" / "chunk-0-0.bin").write_bytes(b"junk")
    (out / "m1" / "prepare_meta.json").unlink()
    stats = prepare([str(src)], out, "m1", tok_dir, resume=True, **kw)
    assert not stats.skipped and not (out / "m1.tmp-123-dead").exists()
    assert json.loads(index.read_text())["chunks"] == before
    # overwrite rebuilds with new settings; old chunks are gone, not mixed in
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[:10]))
    stats = prepare([str(src)], out, "m1", tok_dir, overwrite=True, chunk_tokens=10**6)
    assert sorted(p.name for p in (out / "m1").iterdir()) == ["chunk-0-0.bin", "index.json", "prepare_meta.json"]
    np.testing.assert_array_equal(_stream(out / "m1"), np.concatenate(_expected(tok_dir, docs[:10])))
    assert not (out / "val" / "m1").exists()
    assert not [p for p in out.rglob("*.tmp-*")]


def test_prepare_bad_inputs_name_the_culprit(tmp_path, tok_dir):
    good = tmp_path / "a.jsonl"
    good.write_text(json.dumps({"content": "hello"}) + "\n")
    out = tmp_path / "data"
    with pytest.raises(InputError, match="nope.jsonl"):
        prepare([str(tmp_path / "nope.jsonl")], out, "1", tok_dir)
    with pytest.raises(InputError, match=r"glob .*\*\.zzz.* matches no files"):
        prepare([str(tmp_path / "*.zzz")], out, "1", tok_dir)
    for bad in ("x", "1a", "c", "C1", "c0", "01", "../1"):
        with pytest.raises(PrepareError, match=f"bad shard name {bad!r}"):
            prepare([str(good)], out, bad, tok_dir)
    with pytest.raises(InputError, match=r"text field 'text' not found; the record has \['content'\]"):
        prepare([str(good)], out, "1", tok_dir)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a b c"]}), tmp_path / "p.parquet")
    with pytest.raises(InputError, match=r"text field 'text' not found; columns: \['body'\]"):
        prepare([str(tmp_path / "p.parquet")], out, "1", tok_dir)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(InputError, match=r"x\.csv.*unsupported extension"):
        prepare([str(tmp_path / "x.csv")], out, "1", tok_dir)
    with pytest.raises(PrepareError, match="tokenizer_dir"):
        prepare([str(good)], out, "1", tmp_path / "no_tokenizer", text_field="content")
    with pytest.raises(PrepareError, match="val_fraction"):
        prepare([str(good)], out, "1", tok_dir, text_field="content", val_fraction=1.5)
    assert not out.exists() or not any(p.name == "1" for p in out.iterdir())


def test_prepare_num_workers_output_identical(tmp_path, tok_dir, docs):
    inputs, _ = _write_inputs(tmp_path / "in", docs)
    for name, workers in (("a", 1), ("b", 2)):
        prepare(inputs, tmp_path / name, "1", tok_dir, val_fraction=0.3, num_workers=workers, batch_size=3,
                chunk_tokens=600)
    for sub in ("1", "val/1"):
        a, b = tmp_path / "a" / sub, tmp_path / "b" / sub
        names = sorted(p.name for p in a.iterdir() if p.name != "prepare_meta.json")
        assert names == sorted(p.name for p in b.iterdir() if p.name != "prepare_meta.json")
        for n in names:
            if n == "index.json":  # litdata stamps the write time into it
                assert json.loads((a / n).read_text())["chunks"] == json.loads((b / n).read_text())["chunks"]
            else:
                assert (a / n).read_bytes() == (b / n).read_bytes(), n


@pytest.mark.slow
def test_build_demo_tiny_is_deterministic(tmp_path, capsys):
    from litgpt_ext.demo.corpus import build_demo

    kw = dict(vocab_size=400, main_tokens=30_000, code_tokens=12_000, math_tokens=8_000, heldout_docs=5,
              tokenizer_sample_chars=150_000, chunk_tokens=4096, val_fraction=0.1, seed=5)
    a = build_demo(tmp_path / "a", **kw)
    build_demo(tmp_path / "b", **kw)
    assert [r["shard"] for r in a["shards"]] == ["1", "2", "c1", "m1"]
    for r in a["shards"]:
        assert r["train_tokens"] > 0 and r["val_tokens"] > 0
        for sub in (r["shard"], f"val/{r['shard']}"):
            ia = json.loads((tmp_path / "a" / sub / "index.json").read_text())
            ib = json.loads((tmp_path / "b" / sub / "index.json").read_text())
            assert [c["dim"] for c in ia["chunks"]] == [c["dim"] for c in ib["chunks"]]
            np.testing.assert_array_equal(_stream(tmp_path / "a" / sub), _stream(tmp_path / "b" / sub))
    for name in ("main", "code", "math", "main_heldout", "code_heldout", "math_heldout"):
        fa, fb = tmp_path / "a" / "raw" / f"{name}.jsonl", tmp_path / "b" / "raw" / f"{name}.jsonl"
        assert fa.read_bytes() == fb.read_bytes(), name
    heldout = [json.loads(l) for l in (tmp_path / "a" / "raw" / "math_heldout.jsonl").read_text().splitlines()]
    assert len(heldout) == 5 and all(h["question"] and h["answer"] and h["answer"] in h["text"] for h in heldout)
    train_questions = {json.loads(l)["question"] for l in (tmp_path / "a" / "raw" / "math.jsonl").read_text().splitlines()}
    assert not train_questions & {h["question"] for h in heldout}
    main_train = set((tmp_path / "a" / "raw" / "main.jsonl").read_text().splitlines())
    assert not main_train & set((tmp_path / "a" / "raw" / "main_heldout.jsonl").read_text().splitlines())
    assert (tmp_path / "a" / "tokenizer" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer" / "tokenizer.json").read_bytes()
    # shard 1 and 2 hold different documents
    assert not np.array_equal(_stream(tmp_path / "a" / "1")[:200], _stream(tmp_path / "a" / "2")[:200])
    capsys.readouterr()
    build_demo(tmp_path / "a", **kw)
    assert "demo data up to date" in capsys.readouterr().out
    # a foreign non-empty folder is never wiped
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "mine.txt").write_text("keep")
    with pytest.raises(Exception, match="holds no demo build"):
        build_demo(tmp_path / "c", **kw)
    assert (tmp_path / "c" / "mine.txt").exists()


def test_cli_help_lists_prep_commands(capsys):
    from litgpt_ext.cli import main

    for command in ("build-demo", "prepare", "train-tokenizer"):
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--main_tokens" in out and "--val_fraction" in out and "--vocab_size" in out


def test_build_demo_fails_clearly_when_too_little_text(tmp_path, monkeypatch):
    import litgpt_ext.demo.corpus as demo

    monkeypatch.setattr(demo, "collect_prose", lambda target, **kw: ["A short paragraph of prose. " * 20] * 30)
    with pytest.raises(demo.DemoError, match=r"found only ~[\d,]+ tokens of main text for a budget of 100,000"):
        demo.build_demo(tmp_path / "d", vocab_size=300, main_tokens=100_000, code_shards=0, math_shards=0,
                        heldout_docs=2, tokenizer_sample_chars=20_000)


THEIRS = "These are the documented words of another installed package, written for its users. " * 3


def _prose_of_site(root, files: dict) -> str:
    """The demo's prose collected from a made-up site-packages folder holding `files` (path: text)."""
    from litgpt_ext.demo.sources import collect_prose

    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return "\n".join(collect_prose(10**9, roots=[root], min_doc_chars=10))


def test_demo_prose_leaves_out_this_projects_own_files(tmp_path):
    """Our dist-info METADATA is the README: if the corpus read it, every README edit would change
    the demo data and every result trained on it (seen: the reproduction's numbers moved)."""
    para = " ".join(["word"] * 3 + ["prose"] * 20)
    ours = "This paragraph comes from the README of litgpt ext and must never reach the corpus text. " * 3
    text = _prose_of_site(tmp_path, {"pkg-1.0.dist-info/METADATA": f"Name: x\n\n{THEIRS}\n\n{para}\n",
                                     "litgpt_ext-0.1.0.dist-info/METADATA": f"Name: x\n\n{ours}\n\n{para}\n",
                                     "litgpt_ext/notes.md": ours})
    assert "another installed package" in text and "README of litgpt ext" not in text


def test_demo_prose_leaves_out_the_lint_tools(tmp_path):
    """`make lint` installs ruff into the venv after `make install`: if the corpus read its docs, a
    study's numbers would depend on whether lint ran first (seen: the reproduction's base run ended at
    code val loss 7.20 with ruff installed, 6.68 without). A folder named like a tool deeper down stays."""
    from litgpt_ext.demo.sources import is_dev_tool

    assert is_dev_tool("ruff") and is_dev_tool("ruff-0.17.6.dist-info") and not is_dev_tool("ruffle-1.0.dist-info")
    tool = "This paragraph is the long description of the linter, which only make lint installs here. " * 3
    nested = "This paragraph sits in a folder that another package happens to name after the linter. " * 3
    text = _prose_of_site(tmp_path, {"pkg-1.0.dist-info/METADATA": f"Name: x\n\n{THEIRS}\n",
                                     "ruff-0.17.6.dist-info/METADATA": f"Name: x\n\n{tool}\n",
                                     "ruff/README.md": tool, "pkg/ruff/notes.md": nested})
    assert "another installed package" in text and "name after the linter" in text
    assert "only make lint installs" not in text
