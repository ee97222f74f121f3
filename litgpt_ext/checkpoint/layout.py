"""Checkpoint layout and naming: the file names, the step folder names, the manifest, the training state."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Optional, Union

MODEL_FILE = "lit_model.pth"


STATE_FILE = "training_state.pth"


HPARAMS_FILE = "hyperparameters.yaml"


CONFIG_FILE = "model_config.yaml"


HF_CONFIG_FILE = "config.json"


MANIFEST_FILE = "manifest.json"


FORK_RECORD = "forked_from.json"


LOCK_FILE = ".run.lock"


FINAL = "final"


SHARDED_DIR = "sharded"


LORA_FILE = "lit_model.pth.lora"  # litgpt finetune_lora's name for a checkpoint's adapter weights


LORA_RECORD = "lora.json"  # the adapter's LoRA settings and the base it applies to (litgpt_ext.checkpoint.lora)


# Files a resumable checkpoint must hold (the manifest lists them all, plus tokenizer files).
REQUIRED_FILES = (MODEL_FILE, STATE_FILE, HPARAMS_FILE, CONFIG_FILE)


SHARDED_REQUIRED_FILES = (f"{SHARDED_DIR}/.metadata", STATE_FILE, HPARAMS_FILE, CONFIG_FILE)


LORA_REQUIRED_FILES = (LORA_FILE, LORA_RECORD, STATE_FILE, HPARAMS_FILE, CONFIG_FILE)  # an adapter-only checkpoint


STEP_RE = re.compile(r"^step-(\d+)$")  # we write 8 digits; any width is read


_WRAPPER_PREFIXES = ("_orig_mod.", "_forward_module.", "module.")  # torch.compile, Fabric, DDP/FSDP


class CheckpointError(OSError):
    """A checkpoint could not be written or read back (names the file and the cause)."""


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoint_step(path: Union[Path, str]) -> float:
    """Sort key from the folder name: `step-N` -> N, `final` -> +inf (written last), else NaN."""
    name = Path(path).name
    if name == FINAL:
        return float("inf")
    m = STEP_RE.match(name)
    return float(m.group(1)) if m else float("nan")


def read_manifest(path: Path) -> Optional[dict]:
    try:
        return json.loads((Path(path) / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None


def required_files(path: Path) -> tuple[str, ...]:
    """What a resume reads: lit_model.pth, or for a sharded checkpoint its sharded/ folder, or for a
    LoRA checkpoint its adapter (lit_model.pth.lora + lora.json; the base is elsewhere)."""
    if (Path(path) / SHARDED_DIR).is_dir():
        return SHARDED_REQUIRED_FILES
    return LORA_REQUIRED_FILES if (Path(path) / LORA_FILE).is_file() else REQUIRED_FILES


def adapter_hint(path: Path) -> str:
    """'' or, for a LoRA adapter checkpoint, why it has no full weights and how to get them."""
    if not (Path(path) / LORA_FILE).is_file():
        return ""
    return (f"; {str(path)!r} is a LoRA adapter checkpoint ({LORA_FILE}: the adapter only, on a frozen base):"
            f" merge it into full weights first: `litgpt-ext merge-lora {path} <out_dir>`")


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def load_training_state(ckpt_dir: Path) -> dict:
    import torch

    return torch.load(Path(ckpt_dir) / STATE_FILE, map_location="cpu", weights_only=False)


def config_diff(a: dict, b: dict) -> list[str]:
    """`key: a vs b` for every key whose value differs (two model configs; soups, weight loading)."""
    keys = sorted(set(a) | set(b), key=str)
    return [f"{k}: {a.get(k, '<missing>')!r} vs {b.get(k, '<missing>')!r}" for k in keys if a.get(k) != b.get(k)]
