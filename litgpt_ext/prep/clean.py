"""`litgpt-ext clean`: quality-filter and deduplicate raw documents before `prepare` tokenizes them.

Three stages, in this order, each document meeting the first rule that removes it:
1. quality rules (Gopher, Rae et al. 2021, "Scaling Language Models", App. A: word count, mean
   word length, symbol/word ratio, bullet and ellipsis lines, alphabetic words, stop words,
   duplicated lines). They are tuned for web prose: turn them off (`--quality_filter false`) or
   loosen single rules (a threshold of `null` disables it) for code and math.
2. exact duplicates (same whitespace-normalised text);
3. near duplicates: MinHash over word 5-grams with LSH (banding) candidates, then a check of the
   estimated Jaccard similarity against `threshold` (0.85, as the paper's pipelines).

The first occurrence (in the sorted input order `prepare` also uses) is kept, so the output is
deterministic. MinHash/LSH come from `rensa` (Rust, one 0.5 MB wheel, no dependencies); see
docs/data.md "Cleaning" for why not datatrove or datasketch.

Output: a JSONL of the kept documents (`{"<text_field>": ...}`, input order) to feed `prepare`,
and a JSON report (counts per rule, a few examples of each) beside it.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from litgpt_ext.prep.readers import DocStream, expand_inputs

# a whitespace-separated word with no letter in it (digits, underscores and punctuation only)
_NON_ALPHA_WORD = re.compile(r"(?<!\S)(?:[^\w\s]|[\d_])+(?!\S)")
STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")  # Gopher's list
_STOP_SET = frozenset(STOP_WORDS)
_STOP = re.compile(r"\b(" + "|".join(STOP_WORDS) + r")\b")


@dataclass
class QualityRules:
    """Gopher thresholds; `None` disables a rule.

    Args:
        min_words / max_words: words per document.
        min_mean_word_len / max_mean_word_len: mean word length in characters.
        max_symbol_word_ratio: ('#' + '...' / '…') occurrences per word.
        max_bullet_lines: share of lines that start with a bullet (•, -, *).
        max_ellipsis_lines: share of lines that end with an ellipsis.
        min_alpha_words: share of words with at least one letter.
        min_stop_words: distinct English stop words (the, be, to, of, and, that, have, with).
        max_dup_line_frac: share of lines (non-empty) that repeat an earlier line.
    """

    min_words: int | None = 50
    max_words: int | None = 100_000
    min_mean_word_len: float | None = 3.0
    max_mean_word_len: float | None = 10.0
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_lines: float | None = 0.9
    max_ellipsis_lines: float | None = 0.3
    min_alpha_words: float | None = 0.8
    min_stop_words: int | None = 2
    max_dup_line_frac: float | None = 0.3

    def check(self, text: str) -> str | None:
        """The name of the first rule `text` breaks, or None."""
        words = text.split()
        n = len(words)
        if self.min_words is not None and n < self.min_words:
            return "min_words"
        if self.max_words is not None and n > self.max_words:
            return "max_words"
        if n == 0:
            return None
        mean_len = sum(map(len, words)) / n
        if self.min_mean_word_len is not None and mean_len < self.min_mean_word_len:
            return "min_mean_word_len"
        if self.max_mean_word_len is not None and mean_len > self.max_mean_word_len:
            return "max_mean_word_len"
        if self.max_symbol_word_ratio is not None:
            symbols = text.count("#") + text.count("...") + text.count("…")
            if symbols / n > self.max_symbol_word_ratio:
                return "max_symbol_word_ratio"
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if lines and self.max_bullet_lines is not None:
            if sum(ln.startswith(("•", "-", "*")) for ln in lines) / len(lines) > self.max_bullet_lines:
                return "max_bullet_lines"
        if lines and self.max_ellipsis_lines is not None:
            if sum(ln.endswith(("...", "…")) for ln in lines) / len(lines) > self.max_ellipsis_lines:
                return "max_ellipsis_lines"
        if self.min_alpha_words is not None and 1 - len(_NON_ALPHA_WORD.findall(text)) / n < self.min_alpha_words:
            return "min_alpha_words"
        if self.min_stop_words is not None:
            lower = text.lower()
            found = len(_STOP_SET.intersection(lower.split()))  # fast path; the regex also sees "the,"
            if found < self.min_stop_words and len(set(_STOP.findall(lower))) < self.min_stop_words:
                return "min_stop_words"
        if lines and self.max_dup_line_frac is not None:
            if (len(lines) - len(set(lines))) / len(lines) > self.max_dup_line_frac:
                return "max_dup_line_frac"
        return None


def shingles(text: str, n: int) -> list[str]:
    """Distinct lower-cased word n-grams (the whole text if it has fewer than n words)."""
    words = text.lower().split()
    if len(words) <= n:
        return [" ".join(words)]
    return list(set(map(" ".join, zip(*(words[i:] for i in range(n))))))  # MinHash ignores order


class NearDupIndex:
    """MinHash + LSH over the kept documents; `add` returns the kept doc a new one duplicates."""

    def __init__(self, threshold: float, num_perm: int, num_bands: int, ngram: int, seed: int) -> None:
        try:
            from rensa import RMinHash, RMinHashLSH
        except ImportError as e:  # a dependency, but say how to fix a partial install
            raise ImportError("near-duplicate removal needs rensa: pip install 'rensa>=0.5'") from e
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold={threshold} must be in (0, 1]")
        if num_perm % num_bands:
            raise ValueError(f"num_perm={num_perm} must be a multiple of num_bands={num_bands}")
        self._minhash = lambda: RMinHash(num_perm=num_perm, seed=seed)
        self.lsh = RMinHashLSH(threshold=threshold, num_perm=num_perm, num_bands=num_bands)
        self.threshold, self.ngram = threshold, ngram
        self.kept: dict[int, Any] = {}

    def add(self, idx: int, text: str) -> tuple[int, float] | None:
        m = self._minhash()
        m.update(shingles(text, self.ngram))
        best = None
        for cand in sorted(self.lsh.query(m)):  # sorted: the earliest kept doc wins ties
            sim = m.jaccard(self.kept[cand])
            if sim >= self.threshold and (best is None or sim > best[1]):
                best = (cand, sim)
        if best is None:
            self.lsh.insert(idx, m)
            self.kept[idx] = m
        return best


@dataclass
class CleanReport:
    documents: int = 0
    kept: int = 0
    removed: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[dict]] = field(default_factory=dict)
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    def remove(self, rule: str, idx: int, text: str, n_examples: int, **extra) -> None:
        self.removed[rule] = self.removed.get(rule, 0) + 1
        ex = self.examples.setdefault(rule, [])
        if len(ex) < n_examples:
            ex.append({"doc": idx, "text": text[:200], **extra})

    def summary(self) -> str:
        rate = self.documents / self.seconds if self.seconds > 0 else 0.0
        lines = [f"clean: kept {self.kept:,} of {self.documents:,} documents in {self.seconds:.1f}s ({rate:,.0f} docs/s)"]
        for rule, n in sorted(self.removed.items(), key=lambda kv: -kv[1]):
            first = self.examples[rule][0]
            lines.append(f"  removed {n:,} by {rule}, e.g. doc {first['doc']}: {first['text'][:70]!r}"
                         + (f" (duplicate of doc {first['duplicate_of']})" if "duplicate_of" in first else ""))
        return "\n".join(lines)


def clean_documents(
    docs: Iterable[str], quality: QualityRules | None, dedup: bool, threshold: float = 0.85,
    num_perm: int = 128, num_bands: int = 16, ngram: int = 5, seed: int = 1, n_examples: int = 3,
    progress_bar: Any = None,
):
    """Yield the kept documents; fill and return the report through `StopIteration.value`."""
    report = CleanReport()
    seen: dict[bytes, int] = {}
    near = NearDupIndex(threshold, num_perm, num_bands, ngram, seed) if dedup else None
    for idx, text in enumerate(docs):
        report.documents += 1
        if progress_bar is not None:
            progress_bar.update(1)
        if not text.strip():
            report.remove("empty", idx, text, n_examples)
            continue
        if quality is not None and (rule := quality.check(text)):
            report.remove(rule, idx, text, n_examples)
            continue
        if dedup:
            key = hashlib.blake2b(" ".join(text.split()).encode(), digest_size=16).digest()
            if key in seen:
                report.remove("exact_duplicate", idx, text, n_examples, duplicate_of=seen[key])
                continue
            seen[key] = idx
            if (hit := near.add(idx, text)) is not None:
                report.remove("near_duplicate", idx, text, n_examples, duplicate_of=hit[0], similarity=round(hit[1], 3))
                continue
        report.kept += 1
        yield text
    return report


def clean(
    inputs: list[str],
    output: Path,
    text_field: str = "text",
    dedup: bool = True,
    threshold: float = 0.85,
    num_perm: int = 128,
    num_bands: int = 16,
    ngram: int = 5,
    quality_filter: bool = True,
    rules: QualityRules = QualityRules(),
    seed: int = 1,
    examples: int = 3,
    overwrite: bool = False,
) -> CleanReport:
    """Quality-filter and deduplicate documents into one JSONL for `prepare`.

    Args:
        inputs: files, directories or globs, as `prepare` reads them (.jsonl/.json, .parquet, .txt/.md/.rst).
        output: the cleaned `.jsonl` (one `{"<text_field>": ...}` per kept document, input order);
            the report goes to `<output>.report.json`.
        text_field: JSON field / Parquet column holding the text (and the field written).
        dedup: remove exact and near duplicates (MinHash LSH); the first occurrence is kept.
        threshold: estimated Jaccard similarity of word n-gram sets at or above which a document
            is a near duplicate of an earlier kept one.
        num_perm: MinHash permutations (precision of the similarity estimate).
        num_bands: LSH bands (`num_perm / num_bands` rows each); more bands find more candidates
            below the threshold, which the similarity check then rejects.
        ngram: words per shingle.
        quality_filter: apply `rules` (Gopher heuristics for web prose).
        rules: the quality thresholds (`--rules.min_words 20`, `--rules.min_stop_words null`, ...).
        seed: MinHash seed.
        examples: examples per removal rule kept in the report.
        overwrite: replace an existing output.

    Returns:
        The report (also written as JSON and printed).
    """
    from litgpt_ext.progress import progress

    output = Path(output)
    if output.suffix != ".jsonl":
        raise ValueError(f"output {str(output)!r} must be a .jsonl file (what `prepare` reads)")
    if output.exists() and not overwrite:
        raise FileExistsError(f"output {str(output)!r} exists; pass --overwrite true to replace it")
    files = expand_inputs(inputs)
    if any(Path(f).resolve() == output.resolve() for f in files):
        raise ValueError(f"output {str(output)!r} is also an input")
    stream = DocStream(files, text_field=text_field)
    settings = dict(inputs=files, text_field=text_field, dedup=dedup, threshold=threshold, num_perm=num_perm,
                    num_bands=num_bands, ngram=ngram, quality_filter=quality_filter,
                    rules=asdict(rules) if quality_filter else None, seed=seed)
    t0 = time.perf_counter()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".jsonl.tmp")
    with progress(desc="clean", unit="doc") as bar, open(tmp, "w", encoding="utf-8") as f:
        gen = clean_documents((t for t, _ in stream), rules if quality_filter else None, dedup, threshold,
                              num_perm, num_bands, ngram, seed, examples, progress_bar=bar)
        while True:
            try:
                f.write(json.dumps({text_field: next(gen)}, ensure_ascii=False) + "\n")
            except StopIteration as stop:
                report = stop.value
                break
    tmp.replace(output)
    report.seconds = time.perf_counter() - t0
    report.settings = settings
    report_path = output.with_suffix(".report.json")
    report_path.write_text(json.dumps(asdict(report), indent=2, ensure_ascii=False))
    print(report.summary(), flush=True)
    print(f"clean: wrote {output} and {report_path}", flush=True)
    return report
