"""The paper's representation checks: linear CKA per layer and weight distance per block.

`litgpt-ext cka --checkpoints '[base, arm, base_sft, arm_sft]' --pairs base:base_sft,arm:arm_sft
--data data/demo/val --num_docs 200 --out_dir runs/cka` runs every checkpoint on the same documents
and compares each pair:

- Linear CKA (Kornblith et al. 2019) between the hidden states of every layer of one checkpoint and
  every layer of the other (`embed` = the input of block 0, `block i` = the output of block i; hooks
  on `model.transformer.h[i]`): a layer x layer matrix per pair, whose diagonal is the per-layer
  similarity. Features are per token by default (`features: token`): every token position of the
  sampled documents is one sample (at most `max_tokens` positions drawn uniformly, the same for every
  checkpoint), as is usual for language models: mean-pooling over a document (`features: mean`) leaves
  only `num_docs` samples, and linear CKA with fewer samples than dimensions is biased upwards.
- Weight distance per group of parameters: relative L2 distance ||θ_a − θ_b|| / ||θ_a|| for the
  token embeddings, each transformer block, the final norm, the LM head and all weights together
  (`last_block` repeats the last block's: the paper's "last block before/after SFT"). Pairs put the
  reference (the checkpoint before SFT) first.

`--pairs a:b,c:d` names pairs by label or by 0-based index into `--checkpoints` (default: every pair
in order). Labels are `--labels` or the checkpoint folder names. Both checkpoints of a pair must have
the same architecture. Writes `cka.json`, `cka_heatmap.png` (per-layer CKA, layers x pairs, then a
layer x layer matrix per pair) and `weight_distance.png` (relative distance per block, one line per
pair).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np
import torch

from litgpt_ext.study import representations as rep


def _centered(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x).double()
    return x - x.mean(0, keepdim=True)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two feature matrices with the same samples (rows): ||Yᵀ X||²_F / (||Xᵀ X||_F ||Yᵀ Y||_F)
    on column-centered features (Kornblith et al. 2019, eq. 5). Written out here because none of our
    dependencies (numpy, torch, scipy, scikit-learn, torchmetrics) has it; it is these few lines.
    NaN when a side has no variance."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same samples on both sides, got {x.shape[0]} and {y.shape[0]} rows")
    x, y = _centered(x), _centered(y)
    if x.shape[0] < x.shape[1] + y.shape[1]:  # the n x n Gram form is cheaper; tr(Kx Ky) = ||Yᵀ X||²_F
        kx, ky = x @ x.T, y @ y.T
        hsic, nx, ny = (kx * ky).sum(), kx.norm(), ky.norm()
    else:
        hsic, nx, ny = (y.T @ x).norm() ** 2, (x.T @ x).norm(), (y.T @ y).norm()
    return float(hsic / (nx * ny)) if nx * ny > 0 else float("nan")


def cka_matrix(fa: Sequence[torch.Tensor], fb: Sequence[torch.Tensor]) -> np.ndarray:
    """Linear CKA between every layer of `fa` (rows) and every layer of `fb` (columns)."""
    return np.array([[linear_cka(a, b) for b in fb] for a in fa])


# --------------------------------------------------------------------------------------------- weights


def parameter_group(key: str) -> str:
    """`embeddings`, `block i`, `final_norm`, `head` or `other` for a litgpt state-dict key."""
    if key.startswith("transformer.wte."):
        return "embeddings"
    if key.startswith("transformer.h."):
        return f"block {key.split('.')[2]}"
    if key.startswith("transformer.ln_f."):
        return "final_norm"
    if key.startswith("lm_head."):
        return "head"
    return "other"


def weight_distance(sd_a: dict, sd_b: dict, name_a: str = "a", name_b: str = "b") -> dict[str, dict[str, float]]:
    """Per parameter group (and `total`): l2 = ||θ_a − θ_b||, norm = ||θ_a||, relative = l2 / norm, over
    the floating tensors (in float64). Key sets and shapes must match."""
    missing, extra = sorted(set(sd_a) - set(sd_b)), sorted(set(sd_b) - set(sd_a))
    if missing or extra:
        raise ValueError(f"{name_b} holds other weights than {name_a}: missing {missing[:3]}, extra {extra[:3]}")
    sq: dict[str, list[float]] = {}
    for k, a in sd_a.items():
        b = sd_b[k]
        if tuple(a.shape) != tuple(b.shape):
            raise ValueError(f"shape of {k!r}: {tuple(a.shape)} in {name_a} vs {tuple(b.shape)} in {name_b}")
        if not a.is_floating_point():
            continue
        a, b = a.double(), b.double()
        for g in (parameter_group(k), "total"):
            acc = sq.setdefault(g, [0.0, 0.0])
            acc[0] += float(((a - b) ** 2).sum())
            acc[1] += float((a ** 2).sum())
    out = {}
    for g, (d2, n2) in sq.items():
        l2, norm = math.sqrt(d2), math.sqrt(n2)
        out[g] = {"l2": l2, "norm": norm, "relative": l2 / norm if norm > 0 else float("nan")}
    return out


def group_order(groups: Sequence[str]) -> list[str]:
    blocks = sorted((g for g in groups if g.startswith("block ")), key=lambda g: int(g.split()[1]))
    return [g for g in ("embeddings", *blocks, "final_norm", "head", "other") if g in groups]


# --------------------------------------------------------------------------------------------- command


def default_labels(paths: Sequence[Path]) -> list[str]:
    labels = [p.name for p in paths]
    if len(set(labels)) < len(labels):
        labels = [f"{p.parent.name}/{p.name}" for p in paths]
    if len(set(labels)) < len(labels):
        labels = [f"{i}:{lab}" for i, lab in enumerate(labels)]
    return labels


def parse_pairs(pairs: Optional[str], labels: Sequence[str]) -> list[tuple[int, int]]:
    """`a:b,c:d` (labels or 0-based indices) -> index pairs; None -> every pair (i < j)."""
    if pairs is None:
        return [(i, j) for i in range(len(labels)) for j in range(i + 1, len(labels))]

    def index(tok: str) -> int:
        tok = tok.strip()
        if tok in labels:
            return list(labels).index(tok)
        if tok.isdigit() and int(tok) < len(labels):
            return int(tok)
        raise ValueError(f"--pairs names {tok!r}, which is neither a label {list(labels)} nor an index 0..{len(labels) - 1}")

    out = []
    for part in (p for p in pairs.split(",") if p.strip()):
        if part.count(":") != 1:
            raise ValueError(f"--pairs entry {part!r} is not `a:b` (labels or indices, e.g. base:base_sft)")
        a, b = part.split(":")
        out.append((index(a), index(b)))
    if not out:
        raise ValueError(f"--pairs {pairs!r} names no pair; write e.g. `0:1,2:3` or `base:base_sft`")
    return out


def cka(
    checkpoints: list[Path],
    data: Path,
    tokenizer_dir: Optional[Path] = None,
    num_docs: int = 200,
    pairs: Optional[str] = None,
    labels: Optional[list[str]] = None,
    features: Literal["token", "mean"] = "token",
    max_tokens: int = 4096,
    max_seq_length: int = 256,
    batch_size: int = 8,
    seed: int = 0,
    device: str = "auto",
    out_dir: Path = Path("runs/cka"),
) -> dict:
    """Linear CKA per layer and relative weight distance per block between pairs of checkpoints.

    Args:
        checkpoints: Two or more checkpoint folders (or run folders: their latest checkpoint), e.g.
            `'[runs/base/final, runs/sft_base/final]'` (or `--checkpoints+ A --checkpoints+ B`).
        data: Documents every checkpoint reads: a token shard folder (or a folder of shards, e.g.
            `data/demo/val`) or a JSON/JSONL file of texts (`text` or SFT records).
        tokenizer_dir: Tokenizer for JSON/JSONL texts and for splitting shards at EOS (default: the
            first checkpoint's folder).
        num_docs: Documents sampled (>= 1).
        pairs: `a:b,c:d`: pairs by label or 0-based index, reference (before SFT) first. Default:
            every pair in order.
        labels: One name per checkpoint (default: the folder names).
        features: `token`: every token position is a CKA sample (the default); `mean`: one sample
            per document, its hidden states averaged over tokens.
        max_tokens: At most this many token positions (seeded, the same for every checkpoint).
        max_seq_length: Documents are truncated to this many tokens (and to the model's block size).
        batch_size: Documents per forward pass.
        seed: Sampling seed (documents and positions).
        device: `auto`, `cpu`, `cuda`, ... (the models run in float32).
        out_dir: Where cka.json, cka_heatmap.png and weight_distance.png are written.
    """
    from litgpt_ext.checkpoint import load_model_state
    from litgpt_ext.checkpoint.loading import load_tokenizer, resolve_checkpoints

    if num_docs < 1:
        raise ValueError(f"num_docs must be >= 1, got {num_docs}")
    if max_tokens < 2 or max_seq_length < 1 or batch_size < 1:
        raise ValueError(f"max_tokens must be >= 2, max_seq_length and batch_size >= 1; got {max_tokens}, "
                         f"{max_seq_length}, {batch_size}")
    if features not in ("token", "mean"):
        raise ValueError(f"features must be 'token' or 'mean', got {features!r}")
    if len(checkpoints) < 2:
        raise ValueError(f"CKA compares checkpoints: give two or more, got {len(checkpoints)}")
    ckpts = [resolve_checkpoints(Path(p))[0] for p in checkpoints]
    labels = list(labels) if labels else default_labels([Path(p) for p in checkpoints])
    if len(labels) != len(ckpts) or len(set(labels)) < len(labels):
        raise ValueError(f"--labels needs one distinct name per checkpoint: {len(ckpts)} checkpoints, labels {labels}")
    index_pairs = parse_pairs(pairs, labels)
    for i, j in index_pairs:
        diff = rep.architecture_diff(ckpts[i], ckpts[j])
        if diff:
            raise ValueError(f"checkpoints {labels[i]} ({ckpts[i]}) and {labels[j]} ({ckpts[j]}) have different "
                             f"architectures (model_config.yaml): {'; '.join(diff[:4])}; CKA and weight distance "
                             "compare models of one architecture")
    used = sorted({k for p in index_pairs for k in p})
    tokenizer = load_tokenizer(ckpts[0], tokenizer_dir)
    docs = rep.read_texts_or_docs(Path(data), tokenizer, num_docs, seed)
    block = int(rep.model_config(ckpts[used[0]]).get("block_size", max_seq_length))
    max_len = min(max_seq_length, block)
    vocab = int(rep.model_config(ckpts[used[0]]).get("padded_vocab_size") or 0)
    if vocab and max(max(d) for d in docs) >= vocab:
        raise ValueError(f"data {str(data)!r} holds token ids >= the model's vocabulary ({vocab}): another tokenizer?")
    positions = rep.sample_positions([min(len(d), max_len) for d in docs], max_tokens, seed) if features == "token" else None
    n_samples = len(docs) if positions is None else int(sum(len(p) for p in positions))
    if n_samples < 2:
        raise ValueError(f"{n_samples} sample(s) from {str(data)!r}: CKA needs at least 2 (more documents or features=token)")

    feats: dict[int, list[torch.Tensor]] = {}
    layers: list[str] = []
    for k in used:
        model, config, _ = rep.load_checkpoint(ckpts[k], device, "float32")
        layers = rep.layer_names(config.n_layer)
        feats[k] = rep.block_features(model, docs, positions, max_len, batch_size)
        del model
        print(f"cka: {labels[k]}: {len(layers)} layers x {n_samples} samples of {feats[k][0].shape[1]} features")

    result = {"checkpoints": {labels[k]: str(ckpts[k]) for k in range(len(ckpts))},
              "pairs": [[labels[i], labels[j]] for i, j in index_pairs], "layers": layers, "features": features,
              "data": str(data), "num_docs": len(docs), "samples": n_samples, "max_seq_length": max_len,
              "seed": seed, "cka": {}, "weight_distance": {}}
    for i, j in index_pairs:
        name = f"{labels[i]} vs {labels[j]}"
        mat = cka_matrix(feats[i], feats[j])
        result["cka"][name] = {"per_layer": {lay: float(mat[n, n]) for n, lay in enumerate(layers)},
                               "matrix": mat.tolist()}
        wd = weight_distance(load_model_state(ckpts[i]), load_model_state(ckpts[j]), labels[i], labels[j])
        groups = group_order([g for g in wd if g != "total"])
        blocks = [g for g in groups if g.startswith("block ")]
        result["weight_distance"][name] = {**{g: wd[g] for g in groups}, "total": wd["total"],
                                           **({"last_block": {"group": blocks[-1], **wd[blocks[-1]]}} if blocks else {})}

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cka.json").write_text(json.dumps(result, indent=1))
    plot_cka(result, out_dir / "cka_heatmap.png")
    plot_weight_distance(result, out_dir / "weight_distance.png")
    print(format_summary(result))
    print(f"cka: wrote {out_dir}/cka.json, cka_heatmap.png, weight_distance.png")
    return result


def format_summary(result: dict) -> str:
    lines = [f"linear CKA per layer ({result['features']} features, {result['samples']} samples)",
             "pair".ljust(30) + "".join(lay.rjust(10) for lay in result["layers"])]
    for name, c in result["cka"].items():
        lines.append(name[:30].ljust(30) + "".join(f"{v:10.4f}" for v in c["per_layer"].values()))
    lines.append("relative weight distance ||a - b|| / ||a||")
    for name, wd in result["weight_distance"].items():
        cells = ", ".join(f"{g} {v['relative']:.4f}" for g, v in wd.items() if g != "last_block")
        lines.append(f"{name}: {cells}")
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cka(result: dict, path: Path) -> None:
    plt = _plt()
    names, layers = list(result["cka"]), result["layers"]
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(3.6 * (len(names) + 1) + 1, 0.35 * len(layers) + 3),
                             squeeze=False)
    diag = np.array([[result["cka"][n]["per_layer"][lay] for n in names] for lay in layers])
    panels = [(diag, "per-layer CKA", names, layers)] + \
        [(np.array(result["cka"][n]["matrix"]), n, layers, layers) for n in names]
    for ax, (mat, title, xt, yt) in zip(axes[0], panels):
        im = ax.imshow(mat, cmap="viridis", vmin=0, vmax=1, aspect="auto", origin="lower")
        ax.set_xticks(range(len(xt)), xt, rotation=40, ha="right", fontsize=7)
        ax.set_yticks(range(len(yt)), yt, fontsize=7)
        ax.set_title(title, fontsize=9)
        if mat.size <= 200:
            for (r, c), v in np.ndenumerate(mat):
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v < 0.5 else "black")
        fig.colorbar(im, ax=ax, fraction=0.046)
    for ax, n in zip(axes[0][1:], names):
        a, b = n.split(" vs ", 1)
        ax.set_ylabel(a, fontsize=8)
        ax.set_xlabel(b, fontsize=8)
    fig.suptitle(f"linear CKA ({result['features']} features, {result['samples']} samples)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_weight_distance(result: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(result["layers"]) + 3), 3.6))
    for name, wd in result["weight_distance"].items():
        groups = [g for g in wd if g not in ("total", "last_block")]
        ax.plot(range(len(groups)), [wd[g]["relative"] for g in groups], marker="o", label=name)
        ax.set_xticks(range(len(groups)), groups, rotation=40, ha="right", fontsize=7)
    ax.set_ylabel("||θ_a − θ_b|| / ||θ_a||")
    ax.set_title("relative weight distance per block", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
