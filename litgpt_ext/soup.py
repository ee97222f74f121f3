"""`litgpt-ext soup`: average the weights of several checkpoints ("model soups", as OLMo 2/3 do for
the final checkpoints of anneal/midtraining runs that differ in data order or mix ingredients).

The soup is a litgpt-compatible checkpoint folder (`lit_model.pth` as a bare litgpt state dict,
`model_config.yaml`, tokenizer files, `hyperparameters.yaml` with a `soup:` record) that
`evaluate`, `convert-to-hf` and `pretrain --initial_checkpoint_dir` accept. It has no
`training_state.pth`: a soup starts new training runs (weights only), it does not resume one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import torch
import yaml

from litgpt_ext import checkpoint as ckpt


def _ingredient(path: Path) -> Path:
    """A checkpoint folder as is; a run folder -> its latest checkpoint (`final/` or the last step)."""
    from litgpt_ext.checkpoint.loading import resolve_checkpoints

    return resolve_checkpoints(Path(path))[0]


def _yaml(path: Path) -> dict:
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def start_of(ckpt_dir: Path) -> str:
    """Where a checkpoint's run started, from its hyperparameters.yaml: the checkpoint it forked or was
    fine-tuned from, or its random initialization (seed). Soups only work between runs with one start."""
    h = _yaml(Path(ckpt_dir) / ckpt.HPARAMS_FILE)
    for key in ("fork_from", "initial_checkpoint_dir", "checkpoint_dir"):
        if h.get(key):
            return f"{key}={os.path.normpath(str(h[key]))}"
    if "soup" in h:
        return "a soup"
    return f"random init (seed={h.get('seed')})"


def soup_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Per-ingredient weights: uniform by default; given weights are normalised to sum to 1."""
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"--weights has {len(weights)} values for {n} checkpoints; give one weight per checkpoint")
    if any(not w >= 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--weights {weights} must be >= 0 with a positive sum")
    total = sum(weights)
    return [w / total for w in weights]


def average_state_dicts(paths: Sequence[Path], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """The weighted mean of the checkpoints' model weights, read one checkpoint at a time.

    Floating tensors are averaged in float32 and cast back to the first checkpoint's dtype; other
    tensors (integer buffers) must be equal. Key sets and shapes must match (the mismatch is named).
    """
    acc: dict[str, torch.Tensor] = {}
    ref: dict[str, tuple[tuple, torch.dtype]] = {}
    first = paths[0]
    for idx, (path, w) in enumerate(zip(paths, weights)):
        sd = ckpt.load_model_state(path)
        if idx == 0:
            ref = {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}
        else:
            missing, extra = sorted(set(ref) - set(sd)), sorted(set(sd) - set(ref))
            if missing or extra:
                raise ValueError(
                    f"{path} holds other weights than {first}: missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
                    f"extra {extra[:5]}{'…' if len(extra) > 5 else ''}"
                )
        for k, v in sd.items():
            if tuple(v.shape) != ref[k][0]:
                raise ValueError(f"shape mismatch for {k!r}: {tuple(v.shape)} in {path} vs {ref[k][0]} in {first}")
            if v.is_floating_point():
                t = v.to(torch.float32) * w
                acc[k] = t if idx == 0 else acc[k].add_(t)
            elif idx == 0:
                acc[k] = v.clone()
            elif not torch.equal(acc[k], v):
                raise ValueError(f"non-float tensor {k!r} differs between {first} and {path}; cannot average it")
        del sd
    return {k: (v.to(ref[k][1]) if ref[k][1].is_floating_point else v) for k, v in acc.items()}


def soup(checkpoints: list[Path], out: Path, weights: list[float] | None = None, overwrite: bool = False) -> Path:
    """Average the model weights of checkpoints into a new litgpt-compatible checkpoint.

    Args:
        checkpoints: two or more checkpoint folders (or run folders: their latest checkpoint), with the
            same model_config.yaml, MoE options (hyperparameters.yaml `moe:`) and tokenizer.
        out: the folder to write (lit_model.pth, model_config.yaml, tokenizer files, hyperparameters.yaml,
            soup.json).
        weights: one weight per checkpoint (default: uniform); normalised to sum to 1 (printed when they did not).
        overwrite: replace an existing `out`.
    """
    paths = [_ingredient(Path(p)) for p in checkpoints]
    if len(paths) < 2:
        raise ValueError(f"a soup needs at least two checkpoints, got {len(paths)}")
    if len({p.resolve() for p in paths}) < len(paths):
        raise ValueError(f"a checkpoint appears twice in {[str(p) for p in paths]}; use --weights to weight one more")
    given = None if weights is None else [float(w) for w in weights]
    w = soup_weights(given, len(paths))
    if given is not None and abs(sum(given) - 1) > 1e-6:
        print(f"soup: weights {given} sum to {sum(given):g}; normalised to {[round(x, 6) for x in w]}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite true to replace it")
    if out.resolve() in {p.resolve() for p in paths}:
        raise ValueError(f"--out {out} is one of the ingredients")

    first = paths[0]
    cfg0, moe0 = _yaml(first / "model_config.yaml"), _yaml(first / ckpt.HPARAMS_FILE).get("moe")
    tok0 = (first / "tokenizer.json").read_bytes() if (first / "tokenizer.json").is_file() else None
    for p in paths[1:]:
        d = ckpt.config_diff(cfg0, _yaml(p / "model_config.yaml"))
        if d:
            raise ValueError(f"model_config.yaml of {p} differs from {first}: " + "; ".join(d))
        moe = _yaml(p / ckpt.HPARAMS_FILE).get("moe")
        if moe != moe0:
            d = ckpt.config_diff(moe0 or {}, moe or {})
            raise ValueError(f"MoE options (hyperparameters.yaml moe:) of {p} differ from {first}: " + "; ".join(d))
        tok = (p / "tokenizer.json").read_bytes() if (p / "tokenizer.json").is_file() else None
        if tok != tok0:
            raise ValueError(f"tokenizer.json of {p} differs from {first}; a soup needs one tokenizer")

    starts = {p: start_of(p) for p in paths}
    if len(set(starts.values())) > 1:  # warn, not refuse: lineage can be lost (copied folders, converted models)
        print("soup: WARNING: the ingredients did not start from one checkpoint; averaging independently initialized"
              " models does not give a working model (soup runs that differ in data order from one fork):\n"
              + "\n".join(f"  {p}: {st}" for p, st in starts.items()))
    sd = average_state_dicts(paths, w)
    record = {"ingredients": [str(p.resolve()) for p in paths], "weights": w}
    hparams = _yaml(first / ckpt.HPARAMS_FILE)
    hparams = {**{k: v for k, v in hparams.items() if k not in ("resume", "fork_from")}, "soup": record}

    from litgpt.utils import copy_config_files

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    torch.save(sd, tmp / ckpt.MODEL_FILE)  # a bare litgpt state dict (litgpt's own lit_model.pth format)
    copy_config_files(first, tmp)  # model_config.yaml, tokenizer and generation files
    with open(tmp / ckpt.HPARAMS_FILE, "w", encoding="utf-8") as f:
        yaml.safe_dump(hparams, f, sort_keys=False)
    (tmp / "soup.json").write_text(json.dumps(record, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    n = sum(v.numel() for v in sd.values())
    print(f"soup: {len(paths)} checkpoints, {n:,} weights, weights {[round(x, 4) for x in w]} -> {out}")
    for p, x in zip(paths, w):
        print(f"  {x:.4f}  {p}")
    return out
