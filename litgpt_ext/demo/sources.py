"""Offline text sources for the demo corpus: text that ships with Python and the project's packages.

Nothing is downloaded. Sources are found on any machine that has Python and this project's pip
dependencies installed:

* prose (`main`): the Python language reference topics bundled with the standard library
  (`pydoc_data.topics`), documentation files in the environment's site-packages (`*.md`, `*.rst`,
  `*.txt`, the long descriptions in `*.dist-info/METADATA`), then docstrings of site-packages'
  Python files. Paragraphs are kept only when they look like prose, and repeated paragraphs
  (licence boilerplate) are dropped.
* code (`code`): the standard library's own `*.py` files (tests excluded).

Files are listed in sorted order and then, where a budget cuts the list, visited in a seeded random
order, so the collected text depends only on what is installed and the seed.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import random
import re
import site
import sysconfig
import textwrap
from pathlib import Path
from typing import Iterable, Iterator

DOC_SUFFIXES = (".md", ".rst", ".txt")
SKIP_DOC_NAMES = {"top_level.txt", "entry_points.txt", "dependency_links.txt", "SOURCES.txt", "RECORD",
                  "requires.txt", "namespace_packages.txt", "not-zip-safe", "INSTALLER", "REQUESTED", "WHEEL"}
SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages", "test", "tests", "idle_test", "testing", "_vendor",
             "node_modules"}
_CODE_LINE = re.compile(r"^\s*(>>>|\.\.\.|\$ |[{}\[\]()]|def |class |import |from \S+ import|#|//|@|<|\||=|\+-)")
_ASCII_LETTERS_SPACE = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ "
_DOCSTRING = re.compile(r'"""(.*?)"""|\'\'\'(.*?)\'\'\'', re.S)


def site_package_dirs() -> list[Path]:
    """The environment's site-packages folders (venv first), existing ones only, de-duplicated."""
    paths = [sysconfig.get_paths().get("purelib"), sysconfig.get_paths().get("platlib")]
    try:
        paths += site.getsitepackages()
    except AttributeError:  # some embedded interpreters
        pass
    out: list[Path] = []
    for p in paths:
        if p and os.path.isdir(p) and Path(p).resolve() not in [q.resolve() for q in out]:
            out.append(Path(p))
    return out


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_own(dirname: str) -> bool:
    """This project's own package or dist-info: its METADATA is the README, so including it would
    make the demo corpus (and every result trained on it) change with each README edit."""
    return dirname == "litgpt_ext" or dirname.startswith(("litgpt_ext-", "litgpt_ext."))


@functools.lru_cache(maxsize=1)
def dev_tools() -> frozenset[str]:
    """Normalized names of the distributions in this project's `lint` extra (ruff): `make lint` installs
    them into the venv after `make install`, so their docs must not feed the corpus. Measured: with ruff
    in the venv the prose shards had ~2-4% other documents, and the reproduction's base run ended at a
    code val loss of 7.20 instead of 6.68, so a study's numbers depended on whether `make lint` ran
    before it."""
    try:
        reqs = importlib.metadata.requires("litgpt_ext") or []
    except importlib.metadata.PackageNotFoundError:  # run from a source tree without an install: pyproject's list
        return frozenset({"ruff"})
    return frozenset(_canonical(m.group(1)) for m in map(_LINT_REQUIREMENT.match, reqs) if m)


_LINT_REQUIREMENT = re.compile(r"""\s*([A-Za-z0-9][A-Za-z0-9._-]*).*;\s*extra\s*==\s*["']lint["']\s*$""")


def _canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them (`Foo_Bar` and `foo-bar` are one)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def is_dev_tool(dirname: str) -> bool:
    """A top-level site-packages entry of a `dev_tools()` distribution: its package or its dist-info."""
    if dirname.endswith(".dist-info"):
        return _canonical(dirname[: -len(".dist-info")].rpartition("-")[0]) in dev_tools()
    return _canonical(dirname) in dev_tools()


def walk_sorted(root: Path | str, skip_dirs: set[str] = SKIP_DIRS) -> Iterator[str]:
    """All files under root in sorted order (deterministic, unlike os.walk's listing order); this
    project's own files (`is_own`) and, at the top level, the lint tools' (`is_dev_tool`) are skipped."""
    for dirpath, dirnames, filenames in os.walk(root):
        top = dirpath == os.fspath(root)
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.startswith(".") and not is_own(d)
                             and not (top and is_dev_tool(d)))
        for f in sorted(filenames):
            if not f.startswith("__editable__"):  # setuptools' editable-install shims (ours among them)
                yield os.path.join(dirpath, f)


# ---------------------------------------------------------------- prose filtering


def is_prose(paragraph: str, min_chars: int = 80) -> bool:
    """Heuristic: long enough, mostly letters and spaces, word-like tokens, few code-looking lines."""
    p = paragraph.strip()
    if len(p) < min_chars:
        return False
    b = p.encode("utf-8", "replace")
    letters = len(b) - len(b.translate(None, _ASCII_LETTERS_SPACE))  # C speed; English prose is ASCII
    if letters / len(b) < 0.8:
        return False
    words = p.split()
    if len(words) < 12:
        return False
    mean = sum(len(w) for w in words) / len(words)
    if not 3.0 <= mean <= 9.0:
        return False
    lines = p.splitlines()
    if sum(bool(_CODE_LINE.match(line)) for line in lines) > 0.2 * len(lines):
        return False
    if sum("http" in w or "_" in w or "::" in w for w in words) > 0.1 * len(words):
        return False
    return True


def prose_paragraphs(text: str, seen: set[bytes] | None = None) -> list[str]:
    """The prose paragraphs of a text, skipping those already in `seen` (updated in place)."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        if len(para) < 80:
            continue
        para = textwrap.dedent(para).strip()
        if not is_prose(para):
            continue
        if seen is not None:
            key = hashlib.blake2b(para.encode("utf-8", "replace"), digest_size=12).digest()
            if key in seen:
                continue
            seen.add(key)
        out.append(para)
    return out


def split_long(text: str, max_chars: int) -> list[str]:
    """Cut a document at paragraph boundaries into pieces of at most ~max_chars."""
    if len(text) <= max_chars:
        return [text]
    pieces, cur, size = [], [], 0
    for para in re.split(r"(?<=\n)\n", text):
        if cur and size + len(para) > max_chars:
            pieces.append("".join(cur).strip("\n"))
            cur, size = [], 0
        cur.append(para + "\n")
        size += len(para) + 1
    if cur:
        pieces.append("".join(cur).strip("\n"))
    return [p for p in pieces if p.strip()]


# ---------------------------------------------------------------- prose sources


def _pydoc_topics() -> Iterator[tuple[str, str]]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # stripped-down Python builds
        return
    for name in sorted(topics):
        yield f"pydoc_data.topics:{name}", topics[name]


def _read_small(path: str, max_file_bytes: int) -> str | None:
    """The file's text, or None when it is larger than `max_file_bytes` or unreadable."""
    try:
        if os.path.getsize(path) > max_file_bytes:
            return None
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _doc_files(roots: Iterable[Path], max_file_bytes: int) -> Iterator[tuple[str, str]]:
    for root in roots:
        for path in walk_sorted(root, skip_dirs={"__pycache__", ".git"}):
            name = os.path.basename(path)
            if name in SKIP_DOC_NAMES or not (name.endswith(DOC_SUFFIXES) or name == "METADATA"):
                continue
            text = _read_small(path, max_file_bytes)
            if text is None:
                continue
            if name == "METADATA":  # headers, a blank line, then the long description
                text = text.partition("\n\n")[2]
            yield str(path), text


def _read_shuffled(files: list[str], seed: int, max_file_bytes: int) -> Iterator[tuple[str, str]]:
    """(path, text) of each file no larger than `max_file_bytes`, in a seeded order (so a token
    budget samples every package or module, not the first few by name); unreadable files are skipped."""
    files = list(files)
    random.Random(seed).shuffle(files)
    for path in files:
        text = _read_small(path, max_file_bytes)
        if text is not None:
            yield path, text


def _docstrings(roots: Iterable[Path], max_file_bytes: int, seed: int) -> Iterator[tuple[str, str]]:
    # Files in a seeded random order, so that a budget samples all packages, not the first few by name.
    files = [p for root in roots for p in walk_sorted(root) if p.endswith(".py")]
    for path, src in _read_shuffled(files, seed, max_file_bytes):
        # A regex instead of `ast`: 50x faster and the prose filter removes the odd false hit.
        parts = [a or b for a, b in _DOCSTRING.findall(src)]
        parts = [textwrap.dedent(p) for p in parts if len(p) > 200]
        if parts:
            yield path, "\n\n".join(parts)


def collect_prose(
    target_chars: int,
    roots: list[Path] | None = None,
    seed: int = 0,
    max_doc_chars: int = 6000,
    min_doc_chars: int = 300,
    max_file_bytes: int = 2_000_000,
) -> list[str]:
    """Prose documents totalling at least `target_chars` (fewer if not enough is installed)."""
    roots = site_package_dirs() if roots is None else roots
    seen: set[bytes] = set()
    docs: list[str] = []
    total = 0
    sources = [_pydoc_topics(), _doc_files(roots, max_file_bytes), _docstrings(roots, max_file_bytes, seed)]
    for source in sources:
        for _, text in source:
            paras = prose_paragraphs(text, seen)
            if not paras:
                continue
            doc = "\n\n".join(paras)
            if len(doc) < min_doc_chars:
                continue
            for piece in split_long(doc, max_doc_chars):
                if len(piece) >= min_doc_chars:
                    docs.append(piece)
                    total += len(piece)
            if total >= target_chars:
                return docs
    return docs


def collect_code(
    target_chars: int,
    root: Path | None = None,
    seed: int = 0,
    max_doc_chars: int = 6000,
    min_doc_chars: int = 200,
    max_file_bytes: int = 400_000,
    skip_dirs: set[str] = SKIP_DIRS | {"pydoc_data", "lib2to3", "turtledemo", "idlelib", "ensurepip"},
) -> list[str]:
    """Standard-library Python sources (files in seeded order), cut at blank lines into documents."""
    root = stdlib_dir() if root is None else root
    files = [p for p in walk_sorted(root, skip_dirs=skip_dirs) if p.endswith(".py")]
    docs: list[str] = []
    total = 0
    for _path, text in _read_shuffled(files, seed, max_file_bytes):
        for piece in split_long(text, max_doc_chars):
            if len(piece) >= min_doc_chars:
                docs.append(piece)
                total += len(piece)
        if total >= target_chars:
            break
    return docs
