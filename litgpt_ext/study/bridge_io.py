"""The bridge's inputs and small outputs, shared by the n-gram/token similarity (`similarity`) and the
embedding similarity (`representations`): documents sampled from token shards and SFT sets, Pearson r
with its p-value, the improvements file, and the similarity heat map."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

MEASURES = ("unigram_cosine", "unigram_js", "vocab_jaccard", "char_ngram_cosine")


def pearson(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Pearson r, its two-sided p-value (t-test with n-2 df; None without scipy) and the least-squares
    line y = slope * x + intercept (NaN r for < 3 points or no spread)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or np.ptp(x) == 0:
        return {"n": len(x), "r": float("nan"), "p": None, "slope": float("nan"), "intercept": float("nan")}
    slope, intercept = np.polyfit(x, y, 1)
    r = float(np.corrcoef(x, y)[0, 1]) if len(x) >= 3 and np.ptp(y) > 0 else float("nan")
    return {"n": len(x), "r": r, "p": pearson_p(r, len(x)), "slope": float(slope), "intercept": float(intercept)}


def pearson_p(r: float, n: int) -> Optional[float]:
    """Two-sided p of H0: rho = 0 (t = r sqrt((n-2)/(1-r^2)), n-2 df); None without scipy or for n < 3."""
    if n < 3 or math.isnan(r):
        return None
    try:
        from scipy.stats import t as t_dist
    except ImportError:  # scipy is optional, as for the SFT grid's t-tests
        return None
    if abs(r) >= 1:
        return 0.0
    t = r * math.sqrt((n - 2) / (1 - r * r))
    return float(2 * t_dist.sf(abs(t), n - 2))


def sample_shard_docs(path: Path, eos_id: int, num_docs: int, seed: int) -> list[np.ndarray]:
    """Up to `num_docs` whole documents (EOS removed) from one token shard, seeded."""
    from litgpt_ext.data.shard_io import read_chunk_tokens

    rng = np.random.default_rng(seed)
    chunks = list(read_chunk_tokens(path))
    docs: list[np.ndarray] = []
    for c in rng.permutation(len(chunks)):
        tokens = chunks[c]
        ends = np.flatnonzero(tokens == eos_id)
        # the first piece may be the tail of a document begun in the previous chunk: skip it
        docs.extend(np.array(tokens[s + 1:e]) for s, e in zip(ends[:-1], ends[1:]) if e > s + 1)
        if len(docs) >= 4 * num_docs:  # enough to sample from without reading every chunk
            break
    if len(docs) > num_docs:
        keep = rng.choice(len(docs), size=num_docs, replace=False)
        docs = [docs[i] for i in sorted(keep)]
    return docs


def read_sft_texts(path: Path) -> list[str]:
    """The text the model is fine-tuned on, per record of a litgpt JSON/JSONL instruction file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SFT set {str(path)!r} does not exist (a litgpt .json or .jsonl file)")
    raw = path.read_text(encoding="utf-8")
    try:
        records = json.loads(raw) if path.suffix == ".json" else [json.loads(l) for l in raw.splitlines() if l.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"SFT set {str(path)!r} is not valid {'JSON' if path.suffix == '.json' else 'JSONL'}: {e}") from e
    texts = []
    for i, r in enumerate(records):
        if "text" in r:
            texts.append(str(r["text"]))
        elif "output" in r:
            texts.append("\n".join(str(r[k]) for k in ("instruction", "input", "output") if r.get(k)))
        else:
            raise ValueError(f"SFT set {str(path)!r} record {i} has neither 'text' nor 'instruction'/'output' keys: {sorted(r)}")
    return texts


def read_improvements(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"improvements file {str(path)!r} does not exist (CSV: set,sft,rel_improvement)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"set", "sft", "rel_improvement"}
    if not rows or not need <= set(rows[0]):
        raise ValueError(f"improvements file {str(path)!r} needs the columns {sorted(need)}; has {sorted(rows[0]) if rows else 'no rows'}")
    return [{"set": r["set"], "sft": r["sft"], "rel_improvement": float(r["rel_improvement"])} for r in rows]


def plot_heatmap(sim, sets, sft, path: Path, measures: Sequence[str] = MEASURES) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(measures), figsize=(3.2 * len(measures) + 1, 0.5 * len(sets) + 2), squeeze=False)
    for ax, m in zip(axes[0], measures):
        mat = np.array([[sim[m][s][t] for t in sft] for s in sets])
        im = ax.imshow(mat, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(sft)), sft, rotation=30, ha="right")
        ax.set_yticks(range(len(sets)), sets)
        ax.set_title(m, fontsize=9)
        for i in range(len(sets)):
            for j in range(len(sft)):
                ax.text(j, i, f"{mat[i, j]:.3f}", ha="center", va="center", fontsize=7,
                        color="white" if mat[i, j] < mat.mean() else "black")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("similarity of training sets (rows) to SFT sets (columns)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_similarity_csv(path: Path, sim: dict, pa: dict, sets: Sequence[str], sft: Sequence[str], general: str,
                         measures: Sequence[str] = MEASURES) -> None:
    """One row per (set, SFT set): each measure's similarity and its PA (empty for the general set)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["set", "sft", *measures, *(f"pa_{m}" for m in measures)])
        for s in sets:
            for t in sft:
                w.writerow([s, t, *(f"{sim[m][s][t]:.6f}" for m in measures),
                            *(f"{pa[m][s][t]:.6f}" if s != general else "" for m in measures)])
