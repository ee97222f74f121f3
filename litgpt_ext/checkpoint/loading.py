"""Load our checkpoints natively (dense and MoE) and find them inside run folders.

Checkpoint names, completeness and the weight loader come from litgpt_ext.checkpoint (one
vocabulary for training and evaluation); this module builds models and tokenizers from them.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from litgpt import Config, Tokenizer

# One checkpoint vocabulary for training and evaluation (names, completeness, weight loading).
from litgpt_ext.checkpoint import MODEL_FILE, is_complete, resolve_checkpoints  # noqa: F401
from litgpt_ext.checkpoint import load_model_state as load_state_dict  # noqa: F401
from litgpt_ext.checkpoint.layout import adapter_hint
from litgpt_ext.model import build_model, load_moe_args


def is_checkpoint_dir(path: Path) -> bool:
    """Weights a model can be built from: lit_model.pth + model_config.yaml (no training state needed)."""
    return is_complete(path, need="weights")


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on a GPU that supports it, fp32 otherwise (CPU bf16 matmuls are slow)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load_model(
    checkpoint_dir: Path, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto"
) -> tuple[torch.nn.Module, Config]:
    """Build the model for `model_config.yaml` (MoE blocks included) and load its weights."""
    checkpoint_dir = Path(checkpoint_dir)
    if not is_checkpoint_dir(checkpoint_dir):
        raise FileNotFoundError(f"{str(checkpoint_dir)!r} has no lit_model.pth + model_config.yaml"
                                f"{adapter_hint(checkpoint_dir)}")
    device = resolve_device(device) if isinstance(device, str) else device
    dtype = resolve_dtype(dtype, device)
    config = Config.from_file(checkpoint_dir / "model_config.yaml")
    model = build_model(config, load_moe_args(checkpoint_dir))  # MoE options live in hyperparameters.yaml
    try:
        missing, unexpected = model.load_state_dict(load_state_dict(checkpoint_dir), strict=False)
    except RuntimeError as e:  # other shapes: one line, not torch's line per tensor
        if "Error(s) in loading state_dict" not in str(e):
            raise
        raise WeightsMismatchError(weights_mismatch(checkpoint_dir, config, str(e))) from None
    if missing or unexpected:
        raise RuntimeError(
            f"weights in {checkpoint_dir / 'lit_model.pth'} do not match model_config.yaml: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return model, config


def load_tokenizer(checkpoint_dir: Path, tokenizer_dir: Path | None = None) -> Tokenizer:
    """The checkpoint's own tokenizer; `tokenizer_dir` overrides it (e.g. for bare checkpoints)."""
    return Tokenizer(Path(tokenizer_dir) if tokenizer_dir is not None else Path(checkpoint_dir))


class WeightsMismatchError(ValueError):
    """A checkpoint's weights do not fit the model being built (a configuration error: one line)."""


def load_weights(model: torch.nn.Module, checkpoint_dir: Path, config: Config) -> None:
    """`model.load_state_dict(strict=True)` of a checkpoint's weights. Weights that do not fit (other
    shapes or keys) are one error naming the checkpoint and the config fields that differ between its
    model_config.yaml and `config`, not torch's line per tensor."""
    checkpoint_dir = Path(checkpoint_dir)
    try:
        model.load_state_dict(load_state_dict(checkpoint_dir), strict=True)
    except RuntimeError as e:
        if "Error(s) in loading state_dict" not in str(e):
            raise
        raise WeightsMismatchError(weights_mismatch(checkpoint_dir, config, str(e))) from None


def weights_mismatch(checkpoint_dir: Path, config: Config, torch_message: str) -> str:
    """The one line for weights that do not fit `config`: the differing fields (soup's comparison)."""
    from dataclasses import asdict

    import yaml

    saved_file = Path(checkpoint_dir) / "model_config.yaml"
    saved = (yaml.safe_load(saved_file.read_text()) or {}) if saved_file.is_file() else {}
    ours = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
    from litgpt_ext.checkpoint.layout import config_diff

    diff = [d for d in config_diff({k: saved.get(k, ours[k]) for k in ours}, ours) if not d.startswith("name:")]
    sizes = re.findall(r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from "
                       r"checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)", torch_message)
    other = [line.strip() for line in torch_message.splitlines()[1:2]]
    first = f"{sizes[0][0]}: checkpoint {sizes[0][1]} vs model {sizes[0][2]}" if sizes else "".join(other)
    first = first if len(first) <= 160 else first[:157] + "..."
    what = f"{len(sizes)} tensor(s) of another shape, e.g. {first}" if sizes else f"other tensors ({first})"
    fields = ("; the config fields that differ (the checkpoint's model_config.yaml vs the model's config): "
              + "; ".join(diff)) if diff else (f"; the model's config is {saved_file}'s, so that checkpoint's "
                                               f"{MODEL_FILE} and model_config.yaml disagree")
    return f"weights in {checkpoint_dir / MODEL_FILE} do not fit the model: {what}{fields}"
