"""Load our checkpoints natively (dense and MoE) and find them inside run folders.

A checkpoint folder is litgpt-compatible: `lit_model.pth` (a plain GPT state dict, or a dict whose
"model" entry holds it, as Fabric saves it), `model_config.yaml` and tokenizer files. A run folder
holds `step-XXXXXXXX/` folders and `final/`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from litgpt import Config, Tokenizer

from litgpt_ext.eval.naming import STEP_RE, checkpoint_step

from litgpt_ext.model import build_model, load_moe_args

# Prefixes that wrappers leave on parameter names (torch.compile, Fabric, DDP/FSDP).
_WRAPPER_PREFIXES = ("_orig_mod.", "_forward_module.", "module.")


def is_checkpoint_dir(path: Path) -> bool:
    path = Path(path)
    return (path / "lit_model.pth").is_file() and (path / "model_config.yaml").is_file()


def list_checkpoints(run_dir: Path) -> list[Path]:
    """All `step-*` and `final` checkpoints of a run, in training order."""
    run_dir = Path(run_dir)
    found = [
        p for p in run_dir.iterdir()
        if p.is_dir() and (p.name == "final" or STEP_RE.match(p.name)) and is_checkpoint_dir(p)
    ]
    return sorted(found, key=checkpoint_step)


def resolve_checkpoints(path: Path, all_checkpoints: bool = False) -> list[Path]:
    """A checkpoint folder -> [it]; a run folder -> its latest checkpoint (or all of them)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint or run directory {str(path)!r} does not exist")
    if is_checkpoint_dir(path):
        return [path]
    ckpts = list_checkpoints(path)
    if not ckpts:
        raise FileNotFoundError(
            f"{str(path)!r} is neither a checkpoint (lit_model.pth + model_config.yaml) "
            "nor a run directory with step-*/ or final/ checkpoints"
        )
    return ckpts if all_checkpoints else ckpts[-1:]


def load_state_dict(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """The model weights of `lit_model.pth`, with wrapper prefixes stripped."""
    sd = torch.load(Path(checkpoint_dir) / "lit_model.pth", map_location="cpu", mmap=True, weights_only=False)
    sd = sd.get("model", sd)
    out = {}
    for k, v in sd.items():
        for prefix in _WRAPPER_PREFIXES:
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


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
