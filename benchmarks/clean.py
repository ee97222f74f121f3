"""Docs/s of `clean` (Gopher rules + exact + MinHash near-dup) vs plain `prepare`, same run, same corpus.

The corpus is generated prose (~300 words a document, real English words so that the quality
rules pass), 10% of it near duplicates (a few words edited) and 2% exact duplicates. Both commands
run in-process, single worker, on the same JSONL; the best of `--repeats` is kept for each, runs
interleaved so a busy machine hurts both alike. Also times MinHash signatures alone with rensa and
datasketch when datasketch is importable (it is not a dependency).

    python benchmarks/clean.py [--docs 20000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from litgpt_ext.prep.clean import clean, shingles  # noqa: E402
from litgpt_ext.prep.prepare import prepare  # noqa: E402
from litgpt_ext.prep.tokenizer import train_tokenizer_from_texts  # noqa: E402

WORDS = ("the of and to that have with in is was for on as by at from it this which be are were not "
         "river mountain city library garden engine theory music ocean forest winter summer student "
         "teacher market bridge window letter story history science village harbour railway museum "
         "language question answer number system method result process energy water light").split()


def corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        r = rng.random()
        if docs and r < 0.10:
            words = rng.choice(docs).split()
            for j in rng.sample(range(len(words)), 3):
                words[j] = rng.choice(WORDS)
            docs.append(" ".join(words))
        elif docs and r < 0.12:
            docs.append(rng.choice(docs))
        else:
            docs.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(150, 450))) + ".")
    return docs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    docs = corpus(args.docs)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        raw = tmp / "raw.jsonl"
        raw.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        tok = train_tokenizer_from_texts(docs[:2000], tmp / "tok", vocab_size=2048)
        best = {"prepare": float("inf"), "clean": float("inf")}
        kept = None
        for r in range(args.repeats):
            t = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                prepare(inputs=[str(raw)], output_dir=tmp / f"out{r}", shard="1", tokenizer_dir=tok, log_interval_s=1e9)
            best["prepare"] = min(best["prepare"], time.perf_counter() - t)
            t = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                rep = clean(inputs=[str(raw)], output=tmp / f"clean{r}.jsonl")
            best["clean"] = min(best["clean"], time.perf_counter() - t)
            kept = rep.kept
        sh = [shingles(d, 5) for d in docs[:3000]]
        sig = {}
        from rensa import RMinHash

        t = time.perf_counter()
        for s in sh:
            RMinHash(num_perm=128, seed=1).update(s)
        sig["rensa"] = len(sh) / (time.perf_counter() - t)
        try:
            import datasketch

            t = time.perf_counter()
            for s in sh:
                datasketch.MinHash(num_perm=128, seed=1).update_batch([x.encode() for x in s])
            sig["datasketch"] = len(sh) / (time.perf_counter() - t)
        except ImportError:
            pass
    n = len(docs)
    print(f"corpus: {n} docs, clean kept {kept}")
    print(f"prepare (tokenize + write shards): {n / best['prepare']:,.0f} docs/s")
    print(f"clean (rules + exact + MinHash LSH): {n / best['clean']:,.0f} docs/s")
    print(f"clean / prepare throughput: {best['prepare'] / best['clean']:.2f}x")
    print("MinHash signatures alone (128 perms, 5-gram shingles): "
          + ", ".join(f"{k} {v:,.0f} docs/s" for k, v in sig.items()))


if __name__ == "__main__":
    main()
