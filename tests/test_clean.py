"""`clean`: Gopher quality rules, exact and MinHash near-duplicate removal, on generated documents."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from litgpt_ext.prep.clean import QualityRules, clean_documents

ROOT = Path(__file__).resolve().parents[1]
VOCAB = ("the of and to that have with river mountain city library garden engine theory music ocean "
         "forest winter summer student teacher market bridge window letter story history science").split()


def prose(rng: random.Random, n: int = 200) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(n)) + "."


def edit(text: str, rng: random.Random, k: int) -> str:
    """Replace k words with a word from outside the vocabulary."""
    words = text.split()
    for i in rng.sample(range(len(words)), k):
        words[i] = f"zz{rng.randint(0, 10**6)}"
    return " ".join(words)


@pytest.fixture
def corpus():
    rng = random.Random(0)
    base = [prose(rng) for _ in range(6)]
    docs = list(base)  # 0..5 originals
    docs.append(edit(base[0], rng, 2))           # 6: near duplicate of 0 (~0.95)
    docs.append("  " + base[1].replace(" ", "  "))  # 7: exact duplicate of 1 (whitespace only)
    docs.append(edit(base[2], rng, 60))          # 8: heavily edited: a different document
    docs.append(edit(base[0], rng, 3))           # 9: near duplicate of 0 (not of 6, which was removed)
    docs.append("too short to keep")             # 10: min_words
    docs.append(" ".join(["#tag"] * 30 + VOCAB * 2))  # 11: symbols
    docs.append(" ".join(["alpha", "beta", "gamma", "delta"] * 20))  # 12: no stop words
    docs.append("")                              # 13: empty
    return docs


def test_clean_removes_the_right_documents(corpus):
    gen = clean_documents(corpus, QualityRules(), dedup=True, n_examples=5)
    kept = []
    while True:
        try:
            kept.append(next(gen))
        except StopIteration as stop:
            report = stop.value
            break
    assert kept == [corpus[i] for i in (0, 1, 2, 3, 4, 5, 8)]
    assert report.removed == {"near_duplicate": 2, "exact_duplicate": 1, "min_words": 1,
                              "max_symbol_word_ratio": 1, "min_stop_words": 1, "empty": 1}
    assert [(e["doc"], e["duplicate_of"]) for e in report.examples["near_duplicate"]] == [(6, 0), (9, 0)]
    assert all(0.85 <= e["similarity"] < 1.0 for e in report.examples["near_duplicate"])
    assert report.examples["exact_duplicate"][0]["duplicate_of"] == 1


def test_rules_can_be_disabled_one_by_one(corpus):
    rules = QualityRules(min_words=None, min_stop_words=None, max_symbol_word_ratio=None)
    kept = list(clean_documents(corpus, rules, dedup=False))
    assert corpus[10] in kept and corpus[12] in kept and corpus[11] in kept and corpus[6] in kept


@pytest.mark.slow
def test_clean_cli_is_deterministic_and_reports(tmp_path, corpus):
    src = tmp_path / "raw.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus))
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name / "clean.jsonl"
        p = subprocess.run([sys.executable, "-m", "litgpt_ext", "clean", "--inputs", f"[{src}]", "--output", str(out)],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert p.returncode == 0, p.stderr
        assert "kept 7 of 14" in p.stdout and "near_duplicate" in p.stdout
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    report = json.loads((tmp_path / "a" / "clean.report.json").read_text())
    assert report["removed"]["near_duplicate"] == 2 and report["settings"]["threshold"] == 0.85
    p = subprocess.run([sys.executable, "-m", "litgpt_ext", "clean", "--inputs", f"[{src}]", "--output", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode != 0 and "exists" in p.stderr and "Traceback" not in p.stderr
