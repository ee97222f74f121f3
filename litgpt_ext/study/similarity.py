"""The paper's "bridge" analysis: how close each (mixed) training set is to each SFT set.

`litgpt-ext similarity --config sim.yaml` samples documents from token shards (as the training run
mixes them) and from SFT sets, and compares their distributions:

- token unigrams with the run's tokenizer: cosine, 1 - Jensen-Shannon divergence (base 2, so in
  [0, 1]) and vocabulary Jaccard;
- character n-grams, n = 1..`ngram_max`: the cosine of each n's distribution, averaged over n.

A set is a *mix string* over the shards of `data_path` (`main:1.0`, `main:0.8,math:0.2`, or a
literal `main/1:0.5,m1:0.5`), resolved by the same code as training. Its distribution is the
mixture of its shards' distributions at the mix weights, which is what the model sees in expectation:
the paper's "mixture-aware" variant. A pure domain set is just `math:1.0`.

Proximity advantage PA(set, sft) = sim(set, sft) - sim(general, sft). Given the measured relative
improvements after SFT (`improvements`: a CSV with `set,sft,rel_improvement`), PA is regressed
against them (Pearson r and a least-squares line per measure), as the paper's F3.

Embedding-based similarity (optional, new keys beside the above; `embedding_checkpoint` or
`sentence_model`): each document is embedded (a checkpoint of ours: its last-layer hidden states,
mean-pooled over tokens, the offline default; or a local sentence-transformers model when its folder
is given and the package is installed) and each set is its documents' mean embedding (a blend's: its
shards' means at the mix weights). `embedding_cosine` is the cosine of two sets' mean embeddings,
`embedding_mmd_linear` the linear-kernel MMD², ||μ_a − μ_b||² (a distance: its PA is
mmd(general, sft) − mmd(set, sft), so positive still means closer). Mean hidden states of a language
model tend to share a large common direction, so the cosine can sit near 1 for every pair; then its
differences (and the PA) carry the signal.

The mixed-effects regression of the gain on PA (random intercept per SFT set) is in the study report
(`litgpt_ext.study.evidence`). CKA and weight distances are model analyses, not dataset ones:
`litgpt-ext cka` (litgpt_ext/study/cka.py).

Sampling: each shard's chunks are visited in a seeded order and split at EOS; only documents that
lie wholly inside one chunk are kept (a document that spans a chunk boundary is skipped, which
slightly under-samples very long documents), then `num_docs` are drawn without replacement.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from litgpt_ext.study.bridge_io import (  # noqa: F401  (the bridge's readers, statistics and heat map; names kept here)
    MEASURES,
    pearson,
    pearson_p,
    plot_heatmap,
    read_improvements,
    read_sft_texts,
    sample_shard_docs,
    write_similarity_csv,
)

# --------------------------------------------------------------------------------------------- stats


@dataclass
class TextStats:
    """Normalised token-unigram and character n-gram distributions of a set of documents."""

    unigrams: dict[int, float]
    ngrams: list[dict[str, float]]  # index n-1
    docs: int = 0

    @staticmethod
    def of(texts: Sequence[str], token_ids: Sequence[Sequence[int]], ngram_max: int) -> "TextStats":
        uni = Counter()
        for ids in token_ids:
            uni.update(int(t) for t in ids)
        grams = [Counter() for _ in range(ngram_max)]
        for text in texts:
            for n in range(1, ngram_max + 1):
                grams[n - 1].update(text[i:i + n] for i in range(len(text) - n + 1))
        return TextStats(_normalise(uni), [_normalise(g) for g in grams], docs=len(texts))

    @staticmethod
    def mixture(parts: Sequence[tuple[float, "TextStats"]]) -> "TextStats":
        """The distribution of a blend that draws from each part with the given weight."""
        total = sum(w for w, _ in parts)
        if total <= 0:
            raise ValueError("a mixture needs a positive total weight")
        uni: dict[int, float] = {}
        grams: list[dict[str, float]] = [{} for _ in parts[0][1].ngrams]
        for w, s in parts:
            _add_scaled(uni, s.unigrams, w / total)
            for g, sg in zip(grams, s.ngrams):
                _add_scaled(g, sg, w / total)
        return TextStats(uni, grams, docs=sum(s.docs for _, s in parts))


def _normalise(c: Counter) -> dict:
    total = sum(c.values())
    return {k: v / total for k, v in c.items()} if total else {}


def _add_scaled(into: dict, d: Mapping, w: float) -> None:
    for k, v in d.items():
        into[k] = into.get(k, 0.0) + w * v


def cosine(p: Mapping, q: Mapping) -> float:
    if not p or not q:
        return 0.0
    dot = sum(v * q.get(k, 0.0) for k, v in p.items())
    return dot / (math.sqrt(sum(v * v for v in p.values())) * math.sqrt(sum(v * v for v in q.values())))


def js_similarity(p: Mapping, q: Mapping) -> float:
    """1 - Jensen-Shannon divergence in bits: 1 for identical, 0 for disjoint distributions."""
    jsd = 0.0
    for k in set(p) | set(q):
        a, b = p.get(k, 0.0), q.get(k, 0.0)
        m = (a + b) / 2
        if a > 0:
            jsd += 0.5 * a * math.log2(a / m)
        if b > 0:
            jsd += 0.5 * b * math.log2(b / m)
    return 1.0 - jsd


def jaccard(p: Mapping, q: Mapping) -> float:
    a, b = {k for k, v in p.items() if v > 0}, {k for k, v in q.items() if v > 0}
    return len(a & b) / len(a | b) if a | b else 0.0


def compare(a: TextStats, b: TextStats) -> dict[str, float]:
    return {
        "unigram_cosine": cosine(a.unigrams, b.unigrams),
        "unigram_js": js_similarity(a.unigrams, b.unigrams),
        "vocab_jaccard": jaccard(a.unigrams, b.unigrams),
        "char_ngram_cosine": float(np.mean([cosine(x, y) for x, y in zip(a.ngrams, b.ngrams)])),
    }


# --------------------------------------------------------------------------------------------- sampling


# --------------------------------------------------------------------------------------------- command


@dataclass
class SimilarityReport:
    sets: list[str]
    sft: list[str]
    general: str
    # sim[measure][set][sft]
    sim: dict[str, dict[str, dict[str, float]]]
    pa: dict[str, dict[str, dict[str, float]]]
    correlation: dict[str, dict] = field(default_factory=dict)
    points: list[dict] = field(default_factory=list)


def similarity(
    data_path: Path,
    tokenizer_dir: Path,
    sets: dict[str, str],
    sft: dict[str, Path],
    general: str = "general",
    num_docs: int = 1000,
    ngram_max: int = 5,
    seed: int = 0,
    improvements: Optional[Path] = None,
    out_dir: Path = Path("runs/similarity"),
    extra_shard_types: Optional[dict[str, str]] = None,
    embedding_checkpoint: Optional[Path] = None,
    sentence_model: Optional[Path] = None,
    embedding_max_tokens: int = 256,
) -> dict:
    """Dataset similarity between mixed token-shard sets and SFT sets, proximity advantage, and its
    correlation with the relative improvement after SFT.

    Args:
        data_path: Folder of token shards (1, 2, c1, m1, ...), as in the training config.
        tokenizer_dir: The run's tokenizer (token unigrams use it; shard documents are decoded with it).
        sets: Name -> mix string over the shards: type weights (`main:0.8,math:0.2`) or literal
            shard weights (`main/1:0.5,m1:0.5`). Must include `general`.
        sft: Name -> SFT set file (litgpt JSON/JSONL: instruction/input/output, or text).
        general: The set that PA is measured against (general pretraining text).
        num_docs: Documents sampled per shard and per SFT set (the paper: 1,000).
        ngram_max: Character n-grams from 1 to this n.
        seed: Sampling seed.
        improvements: Optional CSV with columns set, sft, rel_improvement (e.g. from the reproduction
            report): PA is correlated against it.
        out_dir: Where similarity.json, similarity.csv, similarity_heatmap.png (and
            pa_vs_improvement.png) are written.
        extra_shard_types: Extra shard types {name: prefix}, as in the data config.
        embedding_checkpoint: A checkpoint (or run folder) whose mean-pooled last-layer hidden states
            embed each document: adds the `embedding` key (cosine of mean embeddings, linear MMD²)
            to the outputs and `similarity_embedding.csv`; the other outputs stay as they are.
        sentence_model: A local sentence-transformers model folder instead (needs the
            sentence-transformers package).
        embedding_max_tokens: Tokens per document that the checkpoint embeds.
    """
    import torch
    from litgpt import Tokenizer

    from litgpt_ext.data.mix_spec import mix_spec, resolve_weights
    from litgpt_ext.data.shard_types import build_registry, discover_shards

    if general not in sets:
        raise ValueError(f"general={general!r} is not one of the sets: {sorted(sets)}; PA is measured against it")
    if not sft:
        raise ValueError("no SFT sets given: sft: {name: path/to/train.json}")
    if num_docs < 1 or ngram_max < 1:
        raise ValueError(f"num_docs and ngram_max must be >= 1, got num_docs={num_docs}, ngram_max={ngram_max}")
    tokenizer = Tokenizer(tokenizer_dir)
    if tokenizer.eos_id is None:
        raise ValueError(f"tokenizer in {str(tokenizer_dir)!r} has no EOS token; shard documents are split at EOS")
    embedder = None
    if embedding_checkpoint is not None or sentence_model is not None:  # before sampling: fail fast
        from litgpt_ext.study.representations import TextEmbedder, embedding_similarity, write_embedding_outputs

        embedder = TextEmbedder(embedding_checkpoint, sentence_model, tokenizer_dir, embedding_max_tokens)
    registry = build_registry(extra_shard_types)
    shards = {s.id: s for s in discover_shards(data_path, registry)}

    weights: dict[str, dict[str, float]] = {}
    for name, mix in sets.items():
        literal = any("/" in k or k in shards for k in (p.split(":")[0].strip() for p in mix.split(",")))
        spec = mix_spec(literal_weights_str=mix) if literal else mix_spec(mix_weights_str=mix)
        weights[name] = resolve_weights(spec, list(shards.values()), registry)

    shard_stats: dict[str, TextStats] = {}
    texts_of: dict[tuple[str, str], list[str]] = {}  # ("shard"|"sft", name) -> texts, for the embeddings
    for sid in sorted({sid for w in weights.values() for sid in w}):
        docs = sample_shard_docs(shards[sid].path, tokenizer.eos_id, num_docs, seed)
        if not docs:
            raise ValueError(f"shard {sid} ({shards[sid].path}) yielded no whole documents between EOS tokens")
        texts = [tokenizer.decode(torch.as_tensor(d)) for d in docs]
        shard_stats[sid] = TextStats.of(texts, docs, ngram_max)
        texts_of["shard", sid] = texts
        print(f"similarity: shard {sid}: {len(docs)} documents sampled")
    set_stats = {n: TextStats.mixture([(w, shard_stats[sid]) for sid, w in ws.items()]) for n, ws in weights.items()}

    sft_stats = {}
    rng = np.random.default_rng(seed)
    for name, path in sft.items():
        texts = read_sft_texts(Path(path))
        if len(texts) > num_docs:
            texts = [texts[i] for i in sorted(rng.choice(len(texts), size=num_docs, replace=False))]
        ids = [tokenizer.encode(t, bos=False, eos=False).tolist() for t in texts]
        sft_stats[name] = TextStats.of(texts, ids, ngram_max)
        texts_of["sft", name] = texts
        print(f"similarity: SFT set {name}: {len(texts)} records")

    sim = {m: {s: {} for s in sets} for m in MEASURES}
    for s, st in set_stats.items():
        for t, tt in sft_stats.items():
            for m, v in compare(st, tt).items():
                sim[m][s][t] = v
    pa = {m: {s: {t: sim[m][s][t] - sim[m][general][t] for t in sft} for s in sets if s != general} for m in MEASURES}
    report = SimilarityReport(sets=list(sets), sft=list(sft), general=general, sim=sim, pa=pa)
    if improvements is not None:
        report.points, report.correlation = correlate(pa, read_improvements(Path(improvements)))

    extra = {}
    if embedder is not None:
        extra["embedding"] = embedding_similarity(embedder, texts_of, weights, list(sft), general, improvements)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "similarity.json").write_text(json.dumps(
        {**asdict(report), **extra, "mixes": dict(sets), "sft_paths": {k: str(v) for k, v in sft.items()}, "weights": weights,
         "num_docs": num_docs, "ngram_max": ngram_max, "seed": seed}, indent=1))
    write_similarity_csv(out_dir / "similarity.csv", sim, pa, list(sets), list(sft), general)
    plot_heatmap(sim, list(sets), list(sft), out_dir / "similarity_heatmap.png")
    if extra:
        write_embedding_outputs(extra["embedding"], list(sets), list(sft), general, out_dir)
    if report.points:
        plot_pa_scatter(report.points, report.correlation, out_dir / "pa_vs_improvement.png")
    print(format_table(sim, pa, list(sets), list(sft), general))
    for m, c in report.correlation.items():
        print(f"PA ({m}) vs relative improvement: r = {c['r']:.3f}, slope = {c['slope']:.3f} over {c['n']} points")
    print(f"similarity: wrote {out_dir}/similarity.json, similarity.csv, similarity_heatmap.png"
          + (", similarity_embedding.csv, similarity_embedding_heatmap.png" if extra else ""))
    return {**asdict(report), **extra}


def saved_similarity(out_dir: Path, sets: dict[str, str], sft: Mapping[str, Path], num_docs: int) -> Optional[dict]:
    """`<out_dir>/similarity.json` when it was computed for these sets, SFT sets and sample size (a stage
    whose output exists is not redone), else None."""
    saved = Path(out_dir) / "similarity.json"
    old = json.loads(saved.read_text()) if saved.is_file() else {}
    same = (old.get("mixes"), old.get("sft_paths"), old.get("num_docs")) == (sets, {k: str(v) for k, v in sft.items()}, num_docs)
    return old if same else None


def correlate(pa: dict, rows: Iterable[dict]) -> tuple[list[dict], dict[str, dict]]:
    """(set, sft) points with PA per measure and the measured improvement; Pearson r per measure."""
    points = []
    for r in rows:
        s, t = r["set"], r["sft"]
        if s in pa[MEASURES[0]] and t in pa[MEASURES[0]][s]:
            points.append({"set": s, "sft": t, "rel_improvement": r["rel_improvement"],
                           **{f"pa_{m}": pa[m][s][t] for m in MEASURES}})
    corr = {m: pearson([p[f"pa_{m}"] for p in points], [p["rel_improvement"] for p in points]) for m in MEASURES}
    return points, corr


def format_table(sim, pa, sets, sft, general) -> str:
    lines = []
    for m in MEASURES:
        lines.append(f"\n{m} (PA vs {general} in brackets)")
        lines.append("set".ljust(16) + "".join(t[:14].rjust(22) for t in sft))
        for s in sets:
            cells = [f"{sim[m][s][t]:.4f}" + (f" [{pa[m][s][t]:+.4f}]" if s != general else "") for t in sft]
            lines.append(s[:16].ljust(16) + "".join(c.rjust(22) for c in cells))
    return "\n".join(lines)


def plot_pa_scatter(points, corr, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MEASURES), figsize=(3.6 * len(MEASURES), 3.4), squeeze=False)
    y = np.array([p["rel_improvement"] for p in points])
    for ax, m in zip(axes[0], MEASURES):
        x = np.array([p[f"pa_{m}"] for p in points])
        ax.scatter(x, y, s=18)
        for p, xi, yi in zip(points, x, y):
            ax.annotate(f"{p['set']}/{p['sft']}", (xi, yi), fontsize=6)
        c = corr[m]
        if not math.isnan(c["slope"]):
            xs = np.linspace(x.min(), x.max(), 2)
            ax.plot(xs, c["slope"] * xs + c["intercept"], "r-", lw=1)
        ax.set_title(f"{m}: r = {c['r']:.2f} (n={c['n']})", fontsize=9)
        ax.set_xlabel("proximity advantage")
        ax.set_ylabel("relative improvement")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
