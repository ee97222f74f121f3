"""Tokenize raw text into a typed litdata token shard plus its validation split.

Layout written (the layout `ShardedMixedDataset` discovers):

    <output_dir>/<shard>/          index.json, chunk-*.bin, prepare_meta.json   (train)
    <output_dir>/val/<shard>/      the same for the validation documents

Design points:
* Streaming: documents are read one at a time, tokenized in batches (HF `encode_batch`), and handed
  to `write_token_shard` as a generator; at most a few batches are in memory at any time.
* Workers: with `num_workers > 1`, batches go to a process pool through a bounded window of
  `apply_async` calls consumed in submission order (`Pool.imap` would read the whole input ahead),
  so the output is byte-identical to `num_workers=1`.
* Validation split: a document goes to val when a hash of (seed, document index) falls below
  `val_fraction`, or, with `val_count`, when it is among the first `val_count` documents. Either
  rule depends only on the document's position, never on batching or worker count.
* EOS after every document, as `litgpt.Tokenizer.encode(text, bos=False, eos=True)` does. Empty
  documents are skipped.
* Safe re-runs: output is written into `<shard>.tmp-<id>` folders and renamed into place at the end,
  train last, so a shard with `prepare_meta.json` is always complete. An existing output is refused
  unless `overwrite` (rebuild) or `resume` (skip when complete with the same fingerprint).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import queue
import re
import shutil
import threading
import time
import uuid
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Literal

import numpy as np

from litgpt_ext.data.shard_io import write_token_shard
from litgpt_ext.prep.readers import DocStream, expand_inputs, file_signature
from litgpt_ext.prep.stats import PrepareProgress, PrepareStats
from litgpt_ext.prep.tokenizer import tokenizer_digest

META_FILENAME = "prepare_meta.json"
SHARD_NAME_RE = re.compile(r"^(?:[1-9][0-9]*|[a-z]+[1-9][0-9]*)$")
META_VERSION = 1


class PrepareError(ValueError):
    """Bad arguments or an output that cannot be (re)written safely."""


def validate_shard_name(shard: str) -> str:
    from litgpt_ext.data.shard_types import DEFAULT_SHARD_TYPES

    shard = str(shard)
    known = ", ".join(f"'{p}1' {n}" for n, p in DEFAULT_SHARD_TYPES.items() if p)
    if not SHARD_NAME_RE.match(shard):
        raise PrepareError(
            f"bad shard name {shard!r}: main shards are numbers ('1', '2', ...), typed shards are a lowercase "
            f"type prefix and a number from 1 ({known})"
        )
    prefix = shard.rstrip("0123456789")
    if prefix and prefix not in DEFAULT_SHARD_TYPES.values():
        print(f"prepare {shard}: note: prefix {prefix!r} is not a default shard type ({known}); training needs "
              f"it registered with data.init_args.extra_shard_types", flush=True)
    return shard


def is_val_doc(index: int, seed: int, val_fraction: float, val_count: int | None) -> bool:
    """Whether document number `index` (0-based, in input order) belongs to the validation split."""
    if val_count is not None:
        return index < val_count
    if val_fraction <= 0:
        return False
    h = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64 < val_fraction


# ---------------------------------------------------------------- tokenization (also runs in workers)

_WORKER: dict = {}


def _init_worker(tokenizer_dir: str, single_threaded: bool) -> None:
    if single_threaded:
        # N worker processes already use N cores; tokenizers' own thread pool would oversubscribe.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from litgpt_ext.prep.tokenizer import FastTokenizer

    _WORKER["tok"] = FastTokenizer(tokenizer_dir)


def _encode_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of each text + EOS, concatenated, and the per-document lengths (cheap to pickle)."""
    out = _WORKER["tok"].encode_docs(texts)
    lengths = np.fromiter((len(x) for x in out), dtype=np.int64, count=len(out))
    flat = np.fromiter(itertools.chain.from_iterable(out), dtype=np.int32, count=int(lengths.sum()))
    return flat, lengths


def _ordered_map(batches: Iterator, num_workers: int, tokenizer_dir: str) -> Iterator:
    """Yield (batch_meta, encode_batch(texts)) in input order, with a bounded number in flight."""
    if num_workers <= 1:
        _init_worker(tokenizer_dir, False)
        for meta, texts in batches:
            yield meta, _encode_batch(texts)
        return
    import multiprocessing as mp

    with mp.get_context().Pool(num_workers, initializer=_init_worker, initargs=(tokenizer_dir, True)) as pool:
        window: deque = deque()
        for meta, texts in batches:
            window.append((meta, pool.apply_async(_encode_batch, (texts,))))
            if len(window) >= 2 * num_workers:
                m, r = window.popleft()
                yield m, r.get()
        while window:
            m, r = window.popleft()
            yield m, r.get()


# ---------------------------------------------------------------- progress


# ---------------------------------------------------------------- output folders and fingerprint


def _read_meta(path: Path) -> dict | None:
    try:
        return json.loads((path / META_FILENAME).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _remove_stale_tmp(parent: Path, shard: str) -> None:
    for p in parent.glob(f"{shard}.tmp-*"):
        print(f"prepare {shard}: removing leftover temporary folder {p} from an interrupted run", flush=True)
        shutil.rmtree(p, ignore_errors=True)


def _chunk_count(path: Path) -> int:
    try:
        return len(json.loads((path / "index.json").read_text())["chunks"])
    except (OSError, json.JSONDecodeError, KeyError):
        return 0


# ---------------------------------------------------------------- the command


def prepare(
    inputs: list[str] | None = None,
    output_dir: Path = Path("data"),
    shard: str = "1",
    tokenizer_dir: Path = Path("data/demo/tokenizer"),
    text_field: str = "text",
    val_fraction: float = 0.0,
    val_count: int | None = None,
    num_workers: int = 1,
    batch_size: int = 1000,
    chunk_tokens: int = 2**20,
    max_docs: int | None = None,
    skip_docs: int = 0,
    hf_dataset: str | None = None,
    hf_config: str | None = None,
    hf_split: str = "train",
    overwrite: bool = False,
    resume: bool = False,
    seed: int = 42,
    log_interval_s: float = 10.0,
    invalid_utf8: Literal["error", "replace", "skip"] = "error",
) -> PrepareStats:
    """Tokenize raw text into a litdata token shard `<output_dir>/<shard>` and `<output_dir>/val/<shard>`.

    Args:
        inputs: Files, directories or globs: .jsonl/.json (one JSON object per line), .parquet, .txt/.md/.rst
            (one document per file); text formats may be .gz. Read in sorted order.
        output_dir: The data folder that holds shard folders.
        shard: Shard folder name: a number for main shards ('1', '2'), or type prefix + number ('c1', 'm1').
        tokenizer_dir: A folder `litgpt.Tokenizer` loads (e.g. from `litgpt-ext train-tokenizer`).
        text_field: JSON field / Parquet column / HF dataset field holding the document text.
        val_fraction: Fraction of documents (chosen by a seeded hash of the document index) for the val split.
        val_count: Instead of val_fraction: the first `val_count` documents form the val split.
        num_workers: Tokenizer processes (1: in-process, using tokenizers' own threads).
        batch_size: Documents per tokenization batch.
        chunk_tokens: Tokens per litdata chunk file (chunks hold whole documents).
        max_docs: Stop after this many documents (after `skip_docs`), counting empty ones.
        skip_docs: Skip this many documents first (to cut one input into several shards).
        hf_dataset: A Hugging Face dataset name to stream instead of files (needs `datasets` and network).
        hf_config: The HF dataset's configuration name.
        hf_split: The HF dataset split.
        overwrite: Delete an existing output shard and rebuild it.
        resume: Skip when the existing output is complete with the same fingerprint; rebuild an incomplete one.
        seed: Seed of the val split hash.
        log_interval_s: Seconds between progress lines.
        invalid_utf8: Input bytes that are not UTF-8: error (refuse, naming file and byte), replace (U+FFFD)
            or skip (drop the document); replaced/skipped ones are counted in the summary and prepare_meta.json.
    """
    t_start = time.perf_counter()
    shard = validate_shard_name(shard)
    if val_count is not None and val_fraction:
        raise PrepareError(f"give val_fraction ({val_fraction}) or val_count ({val_count}), not both")
    if not 0.0 <= val_fraction < 1.0:
        raise PrepareError(f"val_fraction={val_fraction} must be in [0, 1)")
    if val_count is not None and val_count < 0:
        raise PrepareError(f"val_count={val_count} must be >= 0")
    for name, value in (("batch_size", batch_size), ("chunk_tokens", chunk_tokens), ("num_workers", num_workers)):
        if value < 1:
            raise PrepareError(f"{name}={value} must be >= 1")
    if overwrite and resume:
        raise PrepareError("give overwrite or resume, not both")
    if skip_docs < 0 or (max_docs is not None and max_docs < 1):
        raise PrepareError(f"skip_docs={skip_docs} must be >= 0 and max_docs={max_docs} >= 1 (or null: all)")
    if log_interval_s < 0:
        raise PrepareError(f"log_interval_s={log_interval_s} must be >= 0 (0: a line per batch)")
    inputs = list(inputs or [])
    if not inputs and not hf_dataset:
        raise PrepareError("no inputs: give files/globs in `inputs` or a Hugging Face dataset in `hf_dataset`")
    if inputs and hf_dataset:
        raise PrepareError(f"give either inputs ({inputs}) or hf_dataset ({hf_dataset!r}), not both")
    from litgpt_ext.prep.tokenizer import FastTokenizer, check_tokenizer_dir

    try:
        tokenizer_dir = check_tokenizer_dir(tokenizer_dir)
    except ValueError as e:
        raise PrepareError(str(e)) from None

    tokenizer = FastTokenizer(tokenizer_dir)
    if tokenizer.eos_id is None:
        raise PrepareError(f"tokenizer in {str(tokenizer_dir)!r} has no EOS token (eos_token in tokenizer_config.json)")

    files = expand_inputs(inputs) if inputs else []
    stream = DocStream(files, text_field=text_field, hf_dataset=hf_dataset, hf_config=hf_config, hf_split=hf_split,
                       invalid_utf8=invalid_utf8)
    with_val = val_fraction > 0 or bool(val_count)
    settings = {
        "version": META_VERSION,
        "inputs": file_signature(files),
        "hf_dataset": [hf_dataset, hf_config, hf_split] if hf_dataset else None,
        "tokenizer": tokenizer_digest(tokenizer_dir),
        "text_field": text_field,
        "val_fraction": val_fraction,
        "val_count": val_count,
        "chunk_tokens": chunk_tokens,
        "max_docs": max_docs,
        "skip_docs": skip_docs,
        "seed": seed,
        **({"invalid_utf8": invalid_utf8} if invalid_utf8 != "error" else {}),  # old fingerprints stay valid
    }
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise PrepareError(f"output_dir {str(output_dir)!r} is a file; give a folder (it holds the shard folders)")
    train_dir = output_dir / shard
    val_dir = output_dir / "val" / shard
    outputs = [train_dir] + ([val_dir] if with_val else [])
    _remove_stale_tmp(output_dir, shard)
    if (output_dir / "val").is_dir():
        _remove_stale_tmp(output_dir / "val", shard)
    existing = [p for p in (train_dir, val_dir) if p.exists()]
    if existing:
        if overwrite:
            pass  # removed just before the new output is renamed into place
        elif resume:
            metas = [_read_meta(p) for p in outputs]
            if all(m is not None and m.get("complete") for m in metas):
                if all(m["fingerprint"] == fingerprint for m in metas) and not (val_dir.exists() and not with_val):
                    stats = PrepareStats(**{**metas[0]["stats"], "skipped": True})
                    print(f"prepare {shard}: output {train_dir} is complete (fingerprint {fingerprint}); skipping", flush=True)
                    return stats
                raise PrepareError(
                    f"output shard {str(train_dir)!r} was prepared from different inputs/settings "
                    f"(fingerprint {metas[0]['fingerprint']} != {fingerprint}); pass overwrite=True to rebuild it"
                )
            print(f"prepare {shard}: existing output {[str(p) for p in existing]} is incomplete; rebuilding", flush=True)
        else:
            raise PrepareError(
                f"output shard {', '.join(repr(str(p)) for p in existing)} already exists; pass overwrite=True to "
                "delete and rebuild it, or resume=True to keep it when it is complete"
            )

    tag = f"tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_train = output_dir / f"{shard}.{tag}"
    tmp_val = output_dir / "val" / f"{shard}.{tag}"
    stats = PrepareStats(shard=shard)
    progress = PrepareProgress(shard, stream.total_bytes, max_docs, log_interval_s)
    print(
        f"prepare {shard}: {f'{len(files)} input file(s)' if files else f'HF dataset {hf_dataset!r}'} -> {train_dir}"
        + (f" (+ val {val_dir})" if with_val else ""),
        flush=True,
    )

    def batches() -> Iterator:
        docs = itertools.islice(iter(stream), skip_docs, None if max_docs is None else skip_docs + max_docs)
        index = 0
        while True:
            block = list(itertools.islice(docs, batch_size))
            if not block:
                return
            keep = [(index + i, text) for i, (text, _) in enumerate(block) if text]
            stats.skipped_empty += len(block) - len(keep)
            meta = ([i for i, _ in keep], block[-1][1], len(block))
            index += len(block)
            yield meta, [t for _, t in keep]

    def tokenized() -> Iterator[tuple[bool, np.ndarray]]:
        for (indices, done_bytes, n_block), (flat, lengths) in _ordered_map(batches(), num_workers, str(tokenizer_dir)):
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            for j, doc_index in enumerate(indices):
                yield is_val_doc(doc_index, seed, val_fraction, val_count), flat[offsets[j] : offsets[j + 1]]
            stats.documents += n_block
            stats.tokens += int(lengths.sum())
            if flat.size:
                stats.max_token_id = max(stats.max_token_id, int(flat.max()))
            progress.maybe_log(stats.documents, stats.tokens, done_bytes)

    try:
        _write_split(tokenized(), tmp_train, tmp_val if with_val else None, chunk_tokens, stats)
        stats.seconds = time.perf_counter() - t_start
        if stats.train_tokens == 0:
            raise PrepareError(
                f"prepare {shard}: no training tokens (documents read: {stats.documents}, empty: {stats.skipped_empty}, "
                f"val: {stats.val_documents}); check inputs {inputs or hf_dataset} and text_field {text_field!r}"
            )
        stats.invalid_utf8_documents, stats.invalid_utf8_bytes = stream.utf8.documents, stream.utf8.bytes
        if stats.invalid_utf8_documents:
            print(f"prepare {shard}: warning: {stats.invalid_utf8_documents:,} documents held "
                  f"{stats.invalid_utf8_bytes:,} bytes that are not UTF-8: "
                  + ("replaced by U+FFFD" if invalid_utf8 == "replace" else "those documents were skipped"), flush=True)
        stats.train_chunks = _chunk_count(tmp_train)
        stats.val_chunks = _chunk_count(tmp_val) if with_val else 0
        meta = {
            "complete": True,
            "fingerprint": fingerprint,
            "settings": settings,
            "inputs": [str(f) for f in files] if files else None,
            "tokenizer_dir": str(tokenizer_dir),
            "eos_id": tokenizer.eos_id,
            "max_token_id": stats.max_token_id,  # checked against the model's vocabulary before training
            "stats": asdict(stats),
        }
        # Rename val first, train last: a train shard with prepare_meta.json means the whole run finished.
        renames = [(tmp_train, train_dir, "train")]
        if with_val and stats.val_tokens > 0:
            renames.insert(0, (tmp_val, val_dir, "val"))
        elif with_val:
            print(f"prepare {shard}: warning: the val split got no documents; no val shard written", flush=True)
        for tmp, _, split in renames:
            (tmp / META_FILENAME).write_text(json.dumps({**meta, "split": split}, indent=2) + "\n")
        for p in (val_dir, train_dir):
            if p.exists():
                shutil.rmtree(p)
        for tmp, final, _ in renames:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
    finally:
        for tmp in (tmp_train, tmp_val):
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    progress.maybe_log(stats.documents, stats.tokens, stream.total_bytes or 0, force=True)
    stats.seconds = time.perf_counter() - t_start
    print(stats.summary(), flush=True)
    return stats


def _write_split(
    docs: Iterator[tuple[bool, np.ndarray]], train_dir: Path, val_dir: Path | None, chunk_tokens: int, stats: PrepareStats
) -> None:
    """Stream train docs into one shard writer and val docs, through a bounded queue, into another."""
    if val_dir is None:

        def train_only() -> Iterator[np.ndarray]:
            for _is_val, toks in docs:
                stats.train_documents += 1
                stats.train_tokens += len(toks)
                yield toks

        write_token_shard(train_dir, train_only(), chunk_tokens)
        return

    done = object()
    q: queue.Queue = queue.Queue(maxsize=256)
    errors: list[BaseException] = []
    finished = {"sent": False, "seen": False}

    def val_docs() -> Iterator[np.ndarray]:
        while (item := q.get()) is not done:
            yield item
        finished["seen"] = True

    def val_writer() -> None:
        try:
            write_token_shard(val_dir, val_docs(), chunk_tokens)
        except BaseException as e:  # surfaced in the main thread
            errors.append(e)
            while not finished["seen"] and q.get() is not done:  # drain so the producer never blocks
                pass

    def send_done() -> None:
        if not finished["sent"]:
            finished["sent"] = True
            q.put(done)

    thread = threading.Thread(target=val_writer, name="val-shard-writer", daemon=True)
    thread.start()

    def train_docs() -> Iterator[np.ndarray]:
        for is_val, toks in docs:
            if is_val:
                stats.val_documents += 1
                stats.val_tokens += len(toks)
                q.put(toks)
            else:
                stats.train_documents += 1
                stats.train_tokens += len(toks)
                yield toks
        send_done()

    try:
        write_token_shard(train_dir, train_docs(), chunk_tokens)
    finally:
        send_done()
        thread.join()
    if errors:
        raise errors[0]
