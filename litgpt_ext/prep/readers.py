"""Streaming document readers for `prepare` and `train-tokenizer`.

An input is a file (`.jsonl`/`.json`, `.parquet`, `.txt`/`.md`/`.rst`, optionally `.gz`-compressed
for the text formats), a directory (all supported files below it), or a glob. Inputs are expanded to
a sorted file list so that the document order, and hence the shards, never depend on file-system
listing order. Readers yield one document at a time together with the input bytes consumed so far,
which gives an ETA without ever loading a whole file.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
SUPPORTED = JSONL_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES


class InputError(ValueError):
    """Bad input path, format or field, with the culprit named."""


def _kind(path: str) -> str | None:
    name = path.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES) and not path.lower().endswith(".gz"):
        return "parquet"
    if name.endswith(TEXT_SUFFIXES):
        return "txt"
    return None


def _supported_help() -> str:
    return ", ".join(SUPPORTED) + " (text formats may also end in .gz)"


def expand_inputs(inputs: list[str] | tuple[str, ...] | str) -> list[str]:
    """Files named by `inputs` (files, directories, globs), sorted within each input, de-duplicated."""
    if isinstance(inputs, (str, Path)):
        inputs = [str(inputs)]
    files: list[str] = []
    for spec in inputs:
        spec = os.path.expanduser(str(spec))
        if glob.has_magic(spec):
            matches = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not matches:
                raise InputError(f"input glob {spec!r} matches no files")
            bad = [m for m in matches if _kind(m) is None]
            if bad:
                raise InputError(f"input glob {spec!r} matches unsupported file {bad[0]!r}; supported: {_supported_help()}")
            files.extend(matches)
        elif os.path.isdir(spec):
            found = sorted(
                os.path.join(root, f) for root, _, fs in os.walk(spec) for f in fs if _kind(f) is not None
            )
            if not found:
                raise InputError(f"input directory {spec!r} holds no supported files ({_supported_help()})")
            files.extend(found)
        elif os.path.isfile(spec):
            if _kind(spec) is None:
                raise InputError(f"input {spec!r} has an unsupported extension; supported: {_supported_help()}")
            files.append(spec)
        else:
            raise InputError(f"input {spec!r} does not exist (not a file, directory or matching glob)")
    seen: set[str] = set()
    out = []
    for f in files:
        key = os.path.realpath(f)
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


INVALID_UTF8_MODES = ("error", "replace", "skip")


@dataclass
class InvalidUtf8:
    """What to do with input bytes that are not UTF-8, and how many were met (never silent)."""

    mode: str = "error"
    documents: int = 0
    bytes: int = 0

    def __post_init__(self) -> None:
        if self.mode not in INVALID_UTF8_MODES:
            raise InputError(f"invalid_utf8={self.mode!r}; choose from: {', '.join(INVALID_UTF8_MODES)}")

    def decode(self, data: bytes, where: str) -> str | None:
        """`data` as text; None means: skip this document."""
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            if self.mode == "error":
                raise InputError(
                    f"{where}: invalid UTF-8 at byte {e.start} ({data[e.start:e.start + 4]!r}); pass invalid_utf8=replace "
                    f"(U+FFFD, counted and reported) or invalid_utf8=skip (drop such documents, counted), or fix the encoding"
                ) from None
        escaped = data.decode("utf-8", errors="surrogateescape")
        self.documents += 1
        self.bytes += sum(1 for ch in escaped if "\udc80" <= ch <= "\udcff")
        return None if self.mode == "skip" else data.decode("utf-8", errors="replace")


def _open_bytes(path: str) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")


def _iter_jsonl(path: str, text_field: str, utf8: InvalidUtf8) -> Iterator[tuple[str, int]]:
    gz = path.lower().endswith(".gz")
    with open(path, "rb") as raw:
        f = gzip.GzipFile(fileobj=raw) if gz else raw
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            decoded = utf8.decode(line, f"{path}:{lineno}")
            if decoded is None:
                yield "", (raw.tell() if gz else f.tell())
                continue
            try:
                row = json.loads(decoded)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
            if not isinstance(row, dict) or text_field not in row:
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise InputError(f"{path}:{lineno}: text field {text_field!r} not found; the record has {keys}")
            text = row[text_field]
            if not isinstance(text, str):
                raise InputError(f"{path}:{lineno}: text field {text_field!r} is {type(text).__name__}, not a string")
            # Compressed files: position in the compressed stream keeps the ETA honest.
            yield text, (raw.tell() if gz else f.tell())


def _iter_parquet(path: str, text_field: str, batch_rows: int = 1024) -> Iterator[tuple[str, int]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow ships with datasets/lm-eval
        raise InputError(f"reading {path!r} needs pyarrow: pip install pyarrow") from e
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if text_field not in names:
        raise InputError(f"{path}: text field {text_field!r} not found; columns: {names}")
    size = os.path.getsize(path)
    n_groups = max(pf.num_row_groups, 1)
    for g in range(pf.num_row_groups):  # one row group in memory at a time
        table = pf.read_row_group(g, columns=[text_field])
        done = int(size * (g + 1) / n_groups)
        for batch in table.to_batches(max_chunksize=batch_rows):
            for text in batch.column(0).to_pylist():
                if text is not None and not isinstance(text, str):
                    raise InputError(f"{path}: text field {text_field!r} holds {type(text).__name__}, not strings")
                yield text or "", done


def _iter_txt(path: str, utf8: InvalidUtf8) -> Iterator[tuple[str, int]]:
    with _open_bytes(path) as f:
        data = f.read()
    yield utf8.decode(data, path) or "", os.path.getsize(path)


@dataclass
class DocStream:
    """Documents from files (or a Hugging Face dataset), with progress in input bytes."""

    files: list[str]
    text_field: str = "text"
    hf_dataset: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    invalid_utf8: str = "error"

    def __post_init__(self) -> None:
        self.utf8 = InvalidUtf8(self.invalid_utf8)

    @property
    def total_bytes(self) -> int | None:
        return None if self.hf_dataset else sum(os.path.getsize(f) for f in self.files)

    def __iter__(self) -> Iterator[tuple[str, int]]:
        """Yield (text, input bytes consumed so far, over all files)."""
        if self.hf_dataset:
            yield from self._iter_hf()
            return
        base = 0
        for path in self.files:
            kind = _kind(path)
            if kind == "jsonl":
                it = _iter_jsonl(path, self.text_field, self.utf8)
            elif kind == "parquet":
                it = _iter_parquet(path, self.text_field)
            else:
                it = _iter_txt(path, self.utf8)
            for text, pos in it:
                yield text, base + pos
            base += os.path.getsize(path)

    def _iter_hf(self) -> Iterator[tuple[str, int]]:
        try:
            import datasets
        except ImportError as e:
            raise InputError(
                f"hf_dataset={self.hf_dataset!r} needs the `datasets` package (pip install datasets) and network access"
            ) from e
        try:
            ds = datasets.load_dataset(self.hf_dataset, self.hf_config, split=self.hf_split, streaming=True)
        except Exception as e:
            raise InputError(
                f"could not open Hugging Face dataset {self.hf_dataset!r} (config={self.hf_config!r}, split={self.hf_split!r}): "
                f"{type(e).__name__}: {e}"
            ) from e
        for i, row in enumerate(ds):
            if self.text_field not in row:
                raise InputError(
                    f"hf_dataset {self.hf_dataset!r} row {i}: text field {self.text_field!r} not found; fields: {sorted(row)}"
                )
            yield row[self.text_field] or "", 0


def file_signature(files: list[str]) -> list[list]:
    """(absolute path, size, mtime_ns) per file: cheap change detection for the prepare fingerprint."""
    out = []
    for f in files:
        st = os.stat(f)
        out.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
    return out
