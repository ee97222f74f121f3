"""Hidden states of our checkpoints for the representation analyses (CKA, embedding similarity).

Shared by `litgpt_ext.study.cka` (linear CKA per layer between checkpoints) and the embedding-based
dataset similarity of `litgpt_ext.study.similarity`. Models are built with the evaluation loader
(`litgpt_ext.checkpoint.loading.load_model`, dense and MoE), run without gradients on right-padded
batches (a causal model never looks at the padding to its right, so no mask is needed), and read
with forward hooks on litgpt's blocks (`model.transformer.h[i]`):

- layer `embed` is the input of block 0 (token embeddings, after any embedding scaling);
- layer `block i` is the output of block i (the residual stream after it);
- `mean_pooled` reads the output of the final norm (`transformer.ln_f`), the last-layer hidden states
  the LM head sees (Hugging Face's `last_hidden_state`), averaged over each document's tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch


def read_texts_or_docs(data: Path, tokenizer, num_docs: int, seed: int = 0) -> list[list[int]]:
    """Up to `num_docs` documents as token ids, seeded: from a token shard folder (one shard with an
    index.json, or a folder of shards such as `data/demo/val`: documents pooled over its shards), or
    from a JSON/JSONL file of texts (`text`, or litgpt SFT records `instruction`/`input`/`output`)."""
    from litgpt_ext.study.bridge_io import read_sft_texts, sample_shard_docs

    data = Path(data)
    if num_docs < 1:
        raise ValueError(f"num_docs must be >= 1, got {num_docs}")
    rng = np.random.default_rng(seed)
    if data.is_file():
        texts = read_sft_texts(data)
        if len(texts) > num_docs:
            texts = [texts[i] for i in sorted(rng.choice(len(texts), size=num_docs, replace=False))]
        docs = [tokenizer.encode(t, bos=False, eos=False).tolist() for t in texts]
    elif data.is_dir():
        shards = [data] if (data / "index.json").is_file() else \
            sorted(p for p in data.iterdir() if (p / "index.json").is_file())
        if not shards:
            raise FileNotFoundError(f"data {str(data)!r} is neither a token shard (index.json) nor a folder of shards")
        if tokenizer.eos_id is None:
            raise ValueError("the tokenizer has no EOS token; shard documents are split at EOS")
        docs = []
        for shard in shards:
            docs.extend(d.tolist() for d in sample_shard_docs(shard, tokenizer.eos_id, num_docs, seed))
        if len(docs) > num_docs:
            docs = [docs[i] for i in sorted(rng.choice(len(docs), size=num_docs, replace=False))]
    else:
        raise FileNotFoundError(f"data {str(data)!r} does not exist (a token shard folder or a JSON/JSONL file of texts)")
    docs = [d for d in docs if d]
    if not docs:
        raise ValueError(f"data {str(data)!r} gave no non-empty documents")
    return docs


def load_checkpoint(path: Path, device: str = "auto", dtype: str = "float32"):
    """(model, config, checkpoint folder) for a checkpoint folder or a run folder (its latest)."""
    from litgpt_ext.checkpoint.loading import load_model, resolve_checkpoints

    ckpt = resolve_checkpoints(Path(path))[0]
    model, config = load_model(ckpt, device, dtype)
    return model, config, ckpt


def model_config(ckpt: Path) -> dict:
    import yaml

    return yaml.safe_load((Path(ckpt) / "model_config.yaml").read_text()) or {}


def architecture_diff(a: Path, b: Path) -> list[str]:
    """The model_config.yaml fields (other than `name`) that differ between two checkpoints, and the
    MoE options (hyperparameters.yaml `moe:`)."""
    from litgpt_ext.model import load_moe_args

    ca, cb = model_config(a), model_config(b)
    diff = [f"{k}: {ca.get(k, '<missing>')!r} vs {cb.get(k, '<missing>')!r}"
            for k in sorted(set(ca) | set(cb), key=str) if k != "name" and ca.get(k) != cb.get(k)]
    ma, mb = load_moe_args(a), load_moe_args(b)
    if ma != mb:
        diff.append(f"moe: {ma!r} vs {mb!r}")
    return diff


def _batches(docs: Sequence[Sequence[int]], max_len: int, batch_size: int):
    for start in range(0, len(docs), batch_size):
        rows = [list(d[:max_len]) for d in docs[start:start + batch_size]]
        width = max(len(r) for r in rows)
        batch = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            batch[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        yield start, batch, [len(r) for r in rows]


def layer_names(n_layer: int) -> list[str]:
    return ["embed", *(f"block {i}" for i in range(n_layer))]


@torch.inference_mode()
def block_features(model, docs: Sequence[Sequence[int]], positions: Optional[Sequence[np.ndarray]] = None,
                   max_len: int = 256, batch_size: int = 8) -> list[torch.Tensor]:
    """Per layer (`layer_names`), a float32 CPU matrix of features (samples x n_embd).

    `positions` None: one sample per document, its hidden state averaged over the document's tokens.
    Otherwise `positions[i]` are the token positions of document i that are samples (per-token
    features), in order: the same positions for every model, so samples correspond across models.
    """
    blocks = model.transformer.h
    outs: dict[int, torch.Tensor] = {}
    hooks = [blocks[0].register_forward_pre_hook(lambda m, args: outs.__setitem__(0, args[0]))]
    hooks += [blk.register_forward_hook(lambda m, i, o, k=k: outs.__setitem__(k + 1, o))
              for k, blk in enumerate(blocks)]
    device = next(model.parameters()).device
    feats: list[list[torch.Tensor]] = [[] for _ in range(len(blocks) + 1)]
    try:
        for start, batch, lens in _batches(docs, max_len, batch_size):
            outs.clear()
            model(batch.to(device))
            for k in range(len(blocks) + 1):
                h = outs[k].float()
                for i, n in enumerate(lens):
                    if positions is None:
                        feats[k].append(h[i, :n].mean(0, keepdim=True).cpu())
                    elif len(positions[start + i]):
                        feats[k].append(h[i, torch.as_tensor(positions[start + i], device=h.device)].cpu())
    finally:
        for hk in hooks:
            hk.remove()
    return [torch.cat(f) for f in feats]


@torch.inference_mode()
def mean_pooled(model, docs: Sequence[Sequence[int]], max_len: int = 256, batch_size: int = 8) -> torch.Tensor:
    """(documents x n_embd) float64: the final norm's output (last-layer hidden states), mean over tokens."""
    out: list[torch.Tensor] = []
    hook = model.transformer.ln_f.register_forward_hook(lambda m, i, o: out.append(o))
    device = next(model.parameters()).device
    rows: list[torch.Tensor] = []
    try:
        for _, batch, lens in _batches(docs, max_len, batch_size):
            out.clear()
            model(batch.to(device))
            h = out[0].double()
            rows.extend(h[i, :n].mean(0).cpu() for i, n in enumerate(lens))
    finally:
        hook.remove()
    return torch.stack(rows)


def sample_positions(lengths: Sequence[int], max_tokens: int, seed: int = 0) -> list[np.ndarray]:
    """Token positions per document: all of them, or `max_tokens` drawn uniformly without replacement
    over all (document, position) pairs, seeded and sorted."""
    lengths = [int(n) for n in lengths]
    total = sum(lengths)
    if total <= max_tokens:
        return [np.arange(n) for n in lengths]
    keep = np.sort(np.random.default_rng(seed).choice(total, size=max_tokens, replace=False))
    bounds = np.cumsum([0, *lengths])
    return [keep[(keep >= lo) & (keep < hi)] - lo for lo, hi in zip(bounds[:-1], bounds[1:])]


# --------------------------------------------------------------------------------------------- embeddings


class TextEmbedder:
    """Texts -> one vector each, for the embedding-based dataset similarity.

    The offline default is a checkpoint of ours (`checkpoint`): the final norm's output (last-layer
    hidden states) mean-pooled over each text's tokens (at most `max_tokens`). `sentence_model` is a
    local sentence-transformers model folder instead (the paper's sentence-embedding cosine); it needs
    the optional `sentence-transformers` package and is refused with that reason when it is missing.
    """

    def __init__(self, checkpoint: Optional[Path] = None, sentence_model: Optional[Path] = None,
                 tokenizer_dir: Optional[Path] = None, max_tokens: int = 256, batch_size: int = 8,
                 device: str = "auto"):
        if (checkpoint is None) == (sentence_model is None):
            raise ValueError("embedding similarity needs exactly one of embedding_checkpoint (a checkpoint of ours) "
                             "and sentence_model (a local sentence-transformers folder)")
        if max_tokens < 1 or batch_size < 1:
            raise ValueError(f"embedding max_tokens and batch_size must be >= 1, got {max_tokens}, {batch_size}")
        self.batch_size, self.st, self.model = batch_size, None, None
        if sentence_model is not None:
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError:
                raise ValueError(f"sentence_model={str(sentence_model)!r} needs the sentence-transformers package, "
                                 "which is not installed (pip install sentence-transformers); or use "
                                 "embedding_checkpoint=<a checkpoint> for mean-pooled hidden states") from None
            if not Path(sentence_model).is_dir():
                raise FileNotFoundError(f"sentence_model {str(sentence_model)!r} is not a local model folder")
            from litgpt_ext.checkpoint.loading import resolve_device

            self.st = SentenceTransformer(str(sentence_model), device=str(resolve_device(device)))
            self.source = f"sentence-transformers:{sentence_model}"
            self.pooling = "the sentence-transformers model's own pooling"
        else:
            from litgpt import Tokenizer

            self.model, config, ckpt = load_checkpoint(Path(checkpoint), device, "float32")
            has_own = any((ckpt / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
            if not has_own and tokenizer_dir is None:
                raise FileNotFoundError(f"embedding checkpoint {str(ckpt)!r} has no tokenizer files; give tokenizer_dir")
            self.tokenizer = Tokenizer(ckpt if has_own else Path(tokenizer_dir))
            self.max_len = min(max_tokens, config.block_size)
            self.source = f"checkpoint:{ckpt}"
            self.pooling = f"mean over tokens (at most {self.max_len}) of the final norm's output"

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """(texts x dim) float64; a text that tokenizes to nothing is left out."""
        if self.st is not None:
            return np.asarray(self.st.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True),
                              dtype=np.float64)
        docs = [ids for ids in (self.tokenizer.encode(t, bos=False, eos=False).tolist() for t in texts) if ids]
        if not docs:
            raise ValueError("no text to embed: every text tokenized to nothing")
        return mean_pooled(self.model, docs, self.max_len, self.batch_size).numpy()


EMBEDDING_MEASURES = ("embedding_cosine", "embedding_mmd_linear")


def embedding_measures(mu_a: np.ndarray, mu_b: np.ndarray) -> dict[str, float]:
    """Between two sets' mean embeddings: cosine (1 = same direction) and the linear-kernel MMD²,
    ||μ_a − μ_b||² (0 = same mean; a distance, not a similarity). Both depend on the sets only through
    their means, so a blend's is exact from its parts' means at the mix weights."""
    na, nb = float(np.linalg.norm(mu_a)), float(np.linalg.norm(mu_b))
    return {"embedding_cosine": float(mu_a @ mu_b) / (na * nb) if na * nb > 0 else 0.0,
            "embedding_mmd_linear": float(((mu_a - mu_b) ** 2).sum())}


def embedding_similarity(embedder, texts_of: dict, weights: dict, sft: list[str], general: str,
                         improvements: Optional[Path]) -> dict:
    """The `embedding` key: each shard's and SFT set's mean embedding, each set's as its shards' at the
    mix weights; cosine and linear MMD² per (set, SFT set); PA (MMD's sign flipped: positive = closer)."""
    from litgpt_ext.study.bridge_io import pearson, read_improvements

    means = {key: embedder(texts).mean(0) for key, texts in texts_of.items()}
    set_mean = {n: sum(w / sum(ws.values()) * means["shard", sid] for sid, w in ws.items()) for n, ws in weights.items()}
    sim = {m: {s: {} for s in weights} for m in EMBEDDING_MEASURES}
    for s, mu in set_mean.items():
        for t in sft:
            for m, v in embedding_measures(mu, means["sft", t]).items():
                sim[m][s][t] = v
    sign = {"embedding_cosine": 1.0, "embedding_mmd_linear": -1.0}
    pa = {m: {s: {t: sign[m] * (sim[m][s][t] - sim[m][general][t]) for t in sft} for s in weights if s != general}
          for m in EMBEDDING_MEASURES}
    out = {"source": embedder.source, "pooling": embedder.pooling, "measures": list(EMBEDDING_MEASURES),
           "sim": sim, "pa": pa, "dim": int(next(iter(means.values())).shape[0])}
    if improvements is not None:
        rows = read_improvements(Path(improvements))
        points = [r for r in rows if r["set"] in pa[EMBEDDING_MEASURES[0]] and r["sft"] in sft]
        out["correlation"] = {m: pearson([pa[m][r["set"]][r["sft"]] for r in points],
                                         [r["rel_improvement"] for r in points]) for m in EMBEDDING_MEASURES}
    return out


def write_embedding_outputs(emb: dict, sets: list[str], sft: list[str], general: str, out_dir: Path) -> None:

    from litgpt_ext.study.bridge_io import plot_heatmap, write_similarity_csv

    measures = emb["measures"]
    write_similarity_csv(out_dir / "similarity_embedding.csv", emb["sim"], emb["pa"], sets, sft, general, measures)
    plot_heatmap(emb["sim"], sets, sft, out_dir / "similarity_embedding_heatmap.png", measures=measures)
    for m in measures:
        print(f"{m} ({emb['source']}): " + "; ".join(
            f"{s}/{t} {emb['sim'][m][s][t]:.4f}" for s in sets for t in sft))
