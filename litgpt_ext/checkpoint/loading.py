"""Load our checkpoints natively (dense and MoE) and find them inside run folders.

Checkpoint names, completeness and the weight loader come from litgpt_ext.checkpoint (one
vocabulary for training and evaluation); this module builds models and tokenizers from them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from litgpt import Config, Tokenizer

# One checkpoint vocabulary for training and evaluation (names, completeness, weight loading).
from litgpt_ext.checkpoint import MODEL_FILE, is_complete, resolve_checkpoints  # noqa: F401
from litgpt_ext.checkpoint import load_model_state as load_state_dict  # noqa: F401
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
        raise FileNotFoundError(f"{str(checkpoint_dir)!r} has no lit_model.pth + model_config.yaml")
    device = resolve_device(device) if isinstance(device, str) else device
    dtype = resolve_dtype(dtype, device)
    config = Config.from_file(checkpoint_dir / "model_config.yaml")
    model = build_model(config, load_moe_args(checkpoint_dir))  # MoE options live in hyperparameters.yaml
    missing, unexpected = model.load_state_dict(load_state_dict(checkpoint_dir), strict=False)
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
