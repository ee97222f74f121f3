"""The offline demo corpus: real text that ships with Python and its packages, tokenized into shards.

    <out_dir>/raw/{main,code,math}.jsonl               the documents behind the shards ({"text": ...})
    <out_dir>/raw/{main,code,math}_heldout.jsonl       documents in no shard, for evaluation
                                                       (math lines also carry "question" and "answer")
    <out_dir>/tokenizer/                               byte-level BPE trained on a sample of the raw text
    <out_dir>/1, 2, c1, m1                             train shards (main, code, math)
    <out_dir>/val/1, 2, c1, m1                         their validation splits
    <out_dir>/DONE.json                                settings + summary; a rerun with the same settings is a no-op

Sources (see `litgpt_ext.demo.sources`): prose from the Python docs bundled with the standard library and the
environment's package documentation and docstrings; code from the standard library's sources;
math from a seeded generator of worked problems. Token budgets are approximate: documents are
selected by characters, using the characters-per-token ratio measured with the trained tokenizer.
Everything is a function of the seed and of what is installed.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from litgpt_ext.demo.math_gen import generate_problems
from litgpt_ext.demo.sources import collect_code, collect_prose
from litgpt_ext.prep.prepare import prepare
from litgpt_ext.prep.tokenizer import FastTokenizer, train_tokenizer_from_texts

DEMO_VERSION = 1
# First guesses of characters per token, only to size the raw collection before the tokenizer exists.
CHARS_PER_TOKEN_GUESS = {"main": 4.5, "code": 3.5, "math": 2.5}
SHARD_PREFIX = {"main": "", "code": "c", "math": "m"}


class DemoError(RuntimeError, ValueError):  # ValueError: the CLI shows it without a traceback
    pass


@dataclass
class _TypePlan:
    kind: str
    tokens: int
    shards: int
    docs: list  # list[str] (main, code) or list[dict] (math)
    heldout: list


def _text(d) -> str:
    return d["text"] if isinstance(d, dict) else d


def _write_jsonl(path: Path, docs: list) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            row = {"text": d["text"], "question": d["question"], "answer": d["answer"], "kind": d["kind"]} if isinstance(d, dict) else {"text": d}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _split_counts(lengths: list[int], parts: int) -> list[tuple[int, int]]:
    """(skip, count) ranges cutting documents into `parts` runs of about equal characters."""
    total = sum(lengths)
    ranges, start, acc, k = [], 0, 0, 1
    for i, n in enumerate(lengths):
        acc += n
        if k < parts and acc >= total * k / parts:
            ranges.append((start, i + 1 - start))
            start, k = i + 1, k + 1
    ranges.append((start, len(lengths) - start))
    return [r for r in ranges if r[1] > 0]


def _chars_per_token(tok: FastTokenizer, docs: list, sample: int = 400) -> float:
    texts = [_text(d) for d in docs[:sample]]
    n_tokens = sum(len(ids) for ids in tok.encode_docs(texts))
    return sum(map(len, texts)) / max(n_tokens, 1)


def _take_budget(docs: list, tokens: int, cpt: float) -> list:
    """The first documents whose characters, at `cpt` characters per token, fit `tokens`."""
    limit, acc = tokens * cpt, 0
    for i, d in enumerate(docs):
        acc += len(_text(d))
        if acc > limit:
            return docs[: max(i, 1)]
    return docs


def build_demo(
    out_dir: Path = Path("data/demo"),
    vocab_size: int = 4096,
    main_tokens: int = 2_500_000,
    code_tokens: int = 1_000_000,
    math_tokens: int = 1_000_000,
    main_shards: int = 2,
    code_shards: int = 1,
    math_shards: int = 1,
    heldout_docs: int = 300,
    seed: int = 42,
    val_fraction: float = 0.05,
    tokenizer_sample_chars: int = 6_000_000,
    chunk_tokens: int = 2**18,
    max_doc_chars: int = 6000,
    num_workers: int = 1,
    min_fraction: float = 0.5,
    force: bool = False,
) -> dict:
    """Build the offline demo corpus, tokenizer and shards (no downloads; about a minute on 2 cores).

    Args:
        out_dir: Where to write raw/, tokenizer/, the shard folders, val/ and DONE.json.
        vocab_size: Vocabulary size of the BPE tokenizer trained on the demo text.
        main_tokens: Approximate tokens of general prose, split over `main_shards` shards named 1, 2, ...
        code_tokens: Approximate tokens of Python standard-library code, in shards c1, c2, ...
        math_tokens: Approximate tokens of generated worked math problems, in shards m1, m2, ...
        main_shards: Number of main shards.
        code_shards: Number of code shards (0 drops code).
        math_shards: Number of math shards (0 drops math).
        heldout_docs: Documents per type kept out of all shards, in raw/<type>_heldout.jsonl.
        seed: Seed for document order, math problems and the val split.
        val_fraction: Fraction of each shard's documents in its val split (val/<shard>): the shard's first
            round(val_fraction * docs) documents (at least one), which are a random sample since documents are shuffled.
        tokenizer_sample_chars: Characters of raw text the tokenizer is trained on.
        chunk_tokens: Tokens per litdata chunk file.
        max_doc_chars: Longer prose and code files are cut at blank lines into documents of about this size.
        num_workers: Tokenizer processes for `prepare` (1 uses tokenizers' own threads).
        min_fraction: Fail when a type's text found is below this fraction of its token budget (a stripped environment).
        force: Rebuild even when DONE.json says the corpus is up to date.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    settings = {k: v for k, v in locals().items() if k not in ("force", "out_dir", "t0")}
    settings["version"] = DEMO_VERSION
    if main_shards < 1:
        raise DemoError(f"main_shards={main_shards} must be >= 1")
    for name, v in (("main_tokens", main_tokens), ("chunk_tokens", chunk_tokens), ("num_workers", num_workers),
                    ("tokenizer_sample_chars", tokenizer_sample_chars), ("max_doc_chars", max_doc_chars)):
        if v < 1:
            raise DemoError(f"{name}={v} must be >= 1")
    for name, v in (("code_tokens", code_tokens), ("math_tokens", math_tokens)):
        if v < 0:
            raise DemoError(f"{name}={v} must be >= 0")
    if not 0 < val_fraction < 1:
        raise DemoError(f"val_fraction={val_fraction} must be in (0, 1): every shard gets a val split")
    if not 0 <= min_fraction <= 1:
        raise DemoError(f"min_fraction={min_fraction} must be in [0, 1]")
    if vocab_size < 257:
        raise DemoError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least 257 (256 bytes + EOS)")
    for name, v in (("code_shards", code_shards), ("math_shards", math_shards), ("heldout_docs", heldout_docs)):
        if v < 0:
            raise DemoError(f"{name}={v} must be >= 0")
    done_path = out_dir / "DONE.json"
    if done_path.is_file() and not force:
        done = json.loads(done_path.read_text())
        if done.get("settings") == settings and all((out_dir / s["shard"] / "index.json").is_file() for s in done["shards"]):
            print(f"demo data up to date in {out_dir} (force=True rebuilds)", flush=True)
            if done.get("environment") != _environment():
                print("demo: note: the installed packages changed since this corpus was built; its prose would differ "
                      "if rebuilt (force=True). Keeping the existing data so that runs stay comparable.", flush=True)
            return done
        print(f"demo data in {out_dir} was built with other settings; rebuilding", flush=True)
    _clear_out_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "BUILDING.json").write_text(json.dumps({"settings": settings}, indent=2) + "\n")

    # 1. collect raw documents, shuffled (seeded) so that every shard samples all sources
    rng = random.Random(seed)
    plans: list[_TypePlan] = []
    t = time.perf_counter()
    specs = [("main", main_tokens, main_shards), ("code", code_tokens, code_shards), ("math", math_tokens, math_shards)]
    for kind, tokens, shards in specs:
        if shards == 0 or tokens <= 0:
            continue
        target = int(tokens * CHARS_PER_TOKEN_GUESS[kind] * 1.15)
        if kind == "math":
            docs = list(islice(_math_until(seed, target), 10**9))
            taken = {d["question"] for d in docs}
            heldout = list(islice((p for p in generate_problems(seed + 1_000_003) if p["question"] not in taken), heldout_docs))
        else:
            collect = collect_prose if kind == "main" else collect_code
            docs = collect(target + heldout_docs * max_doc_chars, seed=seed, max_doc_chars=max_doc_chars)
            rng.shuffle(docs)
            heldout, docs = docs[:heldout_docs], docs[heldout_docs:]
        chars = sum(len(_text(d)) for d in docs)
        print(f"demo: collected {len(docs):,} {kind} documents ({chars / 1e6:.1f}M chars) + {len(heldout)} held out "
              f"[{time.perf_counter() - t:.1f}s]", flush=True)
        plans.append(_TypePlan(kind, tokens, shards, docs, heldout))

    # 2. tokenizer on a sample of the training documents, shared out evenly between types
    per_type = tokenizer_sample_chars // len(plans)
    sample: list[str] = []
    for p in plans:
        acc = 0
        for d in p.docs:
            if acc >= per_type:
                break
            sample.append(_text(d))
            acc += len(_text(d))
    tok_dir = out_dir / "tokenizer"
    train_tokenizer_from_texts(sample, tok_dir, vocab_size=vocab_size, meta={"source": "litgpt-ext build-demo", "seed": seed})
    tok = FastTokenizer(tok_dir)
    print(f"demo: trained tokenizer (vocab {vocab_size}) on {sum(map(len, sample)) / 1e6:.1f}M chars "
          f"[{time.perf_counter() - t:.1f}s]", flush=True)

    # 3. trim to the token budgets, write raw jsonl
    raw = out_dir / "raw"
    raw.mkdir(exist_ok=True)
    for p in plans:
        cpt = _chars_per_token(tok, p.docs)
        p.docs = _take_budget(p.docs, p.tokens, cpt)
        found = sum(len(_text(d)) for d in p.docs) / cpt
        if found < min_fraction * p.tokens:
            source = {"main": "package documentation and docstrings in site-packages", "code": "standard library sources"}
            raise DemoError(
                f"found only ~{int(found):,} tokens of {p.kind} text for a budget of {p.tokens:,} (min_fraction="
                f"{min_fraction}); this Python environment lacks the {source.get(p.kind, 'text')} the demo is built "
                f"from. Lower {p.kind}_tokens or install the project's dependencies into this environment"
            )
        _write_jsonl(raw / f"{p.kind}.jsonl", p.docs)
        _write_jsonl(raw / f"{p.kind}_heldout.jsonl", p.heldout)

    # 4. shards
    rows = []
    for p in plans:
        ranges = _split_counts([len(_text(d)) for d in p.docs], p.shards)
        for i, (skip, count) in enumerate(ranges, 1):
            shard = f"{SHARD_PREFIX[p.kind]}{i}"
            st = prepare(
                inputs=[str(raw / f"{p.kind}.jsonl")], output_dir=out_dir, shard=shard, tokenizer_dir=tok_dir,
                val_count=max(1, round(val_fraction * count)) if val_fraction > 0 else None, num_workers=num_workers, chunk_tokens=chunk_tokens, skip_docs=skip,
                max_docs=count, overwrite=True, seed=seed, log_interval_s=30.0,
            )
            rows.append({"shard": shard, "type": p.kind, "docs": st.documents, "train_tokens": st.train_tokens,
                         "val_tokens": st.val_tokens, "chunks": st.train_chunks})

    elapsed = time.perf_counter() - t0
    done = {"settings": settings, "environment": _environment(), "shards": rows, "seconds": round(elapsed, 1),
            "heldout": {p.kind: len(p.heldout) for p in plans}}
    (out_dir / "DONE.json").write_text(json.dumps(done, indent=2) + "\n")
    (out_dir / "BUILDING.json").unlink(missing_ok=True)
    _print_table(rows, elapsed, out_dir)
    return done


def _environment() -> dict:
    """What the raw text depends on besides the settings: Python and the installed distributions."""
    import platform

    from litgpt_ext.demo.sources import is_dev_tool, site_package_dirs

    dists = sorted(p.name for d in site_package_dirs() for p in d.iterdir()
                   if p.name.endswith(".dist-info") and not is_dev_tool(p.name))
    return {"python": platform.python_version(), "distributions": dists}


def _math_until(seed: int, target_chars: int):
    acc = 0
    for p in generate_problems(seed):
        if acc >= target_chars:
            return
        acc += len(p["text"])
        yield p


GENERATED = ("raw", "tokenizer", "val", "DONE.json", "BUILDING.json")


def _clear_out_dir(out_dir: Path) -> None:
    """Remove a previous build; refuse to touch a folder that is not a demo build."""
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not ((out_dir / "DONE.json").exists() or (out_dir / "BUILDING.json").exists()):
        raise DemoError(f"out_dir {str(out_dir)!r} is not empty and holds no demo build (DONE.json/BUILDING.json); "
                        "choose an empty or new folder")
    for entry in out_dir.iterdir():
        name = entry.name.split(".tmp-")[0]
        if entry.name in GENERATED or name.isdigit() or (name[:1] in "cm" and name[1:].isdigit()):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def _print_table(rows: list[dict], elapsed: float, out_dir: Path) -> None:
    print(f"\ndemo corpus in {out_dir} ({elapsed:.1f}s)")
    print(f"{'shard':<7}{'type':<6}{'docs':>9}{'train tokens':>15}{'val tokens':>12}{'chunks':>8}")
    for r in rows:
        print(f"{r['shard']:<7}{r['type']:<6}{r['docs']:>9,}{r['train_tokens']:>15,}{r['val_tokens']:>12,}{r['chunks']:>8}")
    print(f"{'total':<13}{sum(r['docs'] for r in rows):>9,}{sum(r['train_tokens'] for r in rows):>15,}"
          f"{sum(r['val_tokens'] for r in rows):>12,}", flush=True)
