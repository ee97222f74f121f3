"""LoRA adapter checkpoints: the `lora:` settings, the adapter's record, and the base it applies to.

A LoRA run (`lora:` in a pretrain/midtrain config; the model is litgpt's `litgpt.lora.GPT`) trains
only the adapter, so its checkpoints hold only the adapter (`lit_model.pth.lora`, litgpt
finetune_lora's name) and `lora.json`:

    {"format": 1, "lora": {"r": 8, "alpha": 16.0, "dropout": 0.05, "targets": ["query", "value"]},
     "base": {"path": "<out_dir>/lora_base", "sha256": "...", "size": 1234, "source": "<the start checkpoint>"},
     "trainable_parameters": 6144}

The base is the full checkpoint the LoRA phase started from. Its weights (lit_model.pth,
model_config.yaml) are hard-linked once into `<out_dir>/lora_base/` (a copy across file systems):
pruning old `step-*` folders (`keep_last_k`) or deleting the source run cannot take the base away.
Whatever reads an adapter (resume, `merge-lora`, a fork) finds its base at the recorded path (or at
`lora_base/` beside the checkpoint, for a run folder that moved, or at a path given explicitly) and
refuses it unless its lit_model.pth has the recorded sha256: a moved, changed or other base is one
line naming the path and the hashes, never an adapter applied to other weights.

No torch at import: `litgpt_ext.validate_first` checks a config's `lora:` section with `LoRAArgs`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from litgpt_ext.checkpoint.layout import CONFIG_FILE, LORA_FILE, LORA_RECORD, MODEL_FILE, SHARDED_DIR, _sha256

# litgpt.lora.Config's `lora_<target>` switches (tests/test_lora.py keeps this equal to litgpt's fields)
LORA_TARGETS = ("query", "key", "value", "projection", "mlp", "head")
LORA_KEYS = ("r", "alpha", "dropout", "targets", "base")
BASE_DIR = "lora_base"  # <out_dir>/lora_base/: the run's hard-linked copy of its base weights


@dataclass
class LoRAArgs:
    """LoRA continued pretraining (`lora:` section): litgpt's LoRA on a frozen base; only the adapter
    trains and is checkpointed (see `litgpt_ext.checkpoint.lora`)."""

    r: int = 8
    """Rank of the update B·A (> 0)"""
    alpha: float = 16.0
    """The update is (alpha / r)·B·A (> 0)"""
    dropout: float = 0.05
    """Dropout on the LoRA branch's input, in [0, 1)"""
    targets: list[str] = field(default_factory=lambda: ["query", "value"])
    """Weights that get an adapter: query, key, value (parts of the fused qkv), projection (attention
    output), mlp (every MLP linear), head (lm_head); litgpt finetune_lora's default is query, value"""
    base: Optional[Path] = None
    """Resuming only: where the adapter's base checkpoint is now, when it moved (its lit_model.pth must
    have the sha256 recorded in the adapter's lora.json); default: the recorded path"""

    def __post_init__(self) -> None:
        r, a, d, t = self.r, self.alpha, self.dropout, self.targets
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"lora.r={r!r} is not valid: the rank must be an integer > 0 (e.g. 8)")
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not a > 0 or math.isinf(a):
            raise ValueError(f"lora.alpha={a!r} is not valid: give a number > 0 (the update is scaled by alpha / r)")
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d < 1:
            raise ValueError(f"lora.dropout={d!r} is not valid: give a number in [0, 1)")
        if isinstance(t, str) or not isinstance(t, (list, tuple)) or not t or not all(isinstance(x, str) for x in t):
            raise ValueError(f"lora.targets={t!r} is not valid: give a non-empty list of targets from "
                             f"{', '.join(LORA_TARGETS)}")
        unknown = [x for x in t if x not in LORA_TARGETS]
        if unknown:
            raise ValueError(f"lora.targets: {unknown[0]!r} is not a LoRA target; valid targets: {', '.join(LORA_TARGETS)}")
        if len(set(t)) < len(t):
            raise ValueError(f"lora.targets={list(t)!r} names a target twice")
        self.alpha, self.dropout, self.targets = float(a), float(d), list(t)
        if self.base is not None:
            self.base = Path(self.base)

    @classmethod
    def parse(cls, cfg: Any) -> Optional["LoRAArgs"]:
        """The checked settings of a `lora:` mapping (None: no LoRA); a bad value is one ValueError."""
        if cfg is None or isinstance(cfg, cls):
            return cfg
        if not isinstance(cfg, dict):
            raise ValueError(f"lora must be a mapping such as {{r: 8, alpha: 16, dropout: 0.05, targets: [query, value]}},"
                             f" got {cfg!r}")
        unknown = sorted(set(map(str, cfg)) - set(LORA_KEYS))
        if unknown:
            raise ValueError(f"lora: unknown key(s) {unknown}; valid: {', '.join(LORA_KEYS)}")
        return cls(**cfg)

    def shape(self) -> dict:
        """What the adapter's tensors and function depend on (a resume must keep it): r, alpha, targets."""
        return {"r": self.r, "alpha": self.alpha, "targets": sorted(self.targets)}

    def litgpt_fields(self) -> dict:
        """`litgpt.lora.Config`'s fields for these settings."""
        return {"lora_r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
                **{f"lora_{t}": t in self.targets for t in LORA_TARGETS}}

    def describe(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, dropout={self.dropout:g}, targets {', '.join(self.targets)}"


# ------------------------------------------------------------------------------------------ the record


def is_adapter(path: Path) -> bool:
    return (Path(path) / LORA_FILE).is_file()


def read_record(ckpt_dir: Path) -> dict:
    path = Path(ckpt_dir) / LORA_RECORD
    if not path.is_file():
        raise FileNotFoundError(f"{str(ckpt_dir)!r} holds no LoRA adapter ({LORA_RECORD} missing)")
    rec = json.loads(path.read_text())
    if not isinstance(rec, dict) or not isinstance(rec.get("lora"), dict) or not isinstance(rec.get("base"), dict):
        raise ValueError(f"{path}: not a LoRA adapter record (expected the keys lora and base)")
    return rec


def record_args(rec: dict) -> LoRAArgs:
    return LoRAArgs.parse({k: v for k, v in rec["lora"].items() if k != "base"})


def make_record(args: LoRAArgs, base: "BaseRef", trainable: int) -> str:
    lora = {k: v for k, v in asdict(args).items() if k != "base"}
    return json.dumps({"format": 1, "lora": lora, "base": asdict(base), "trainable_parameters": trainable},
                      indent=1) + "\n"


# ------------------------------------------------------------------------------------------ the base


@dataclass(frozen=True)
class BaseRef:
    """Where an adapter's base weights are and what they hash to."""

    path: str  # a folder with lit_model.pth + model_config.yaml
    sha256: str  # of its lit_model.pth
    size: int
    source: str  # the checkpoint the LoRA phase started from (for the record)


def weights_digest(ckpt_dir: Path) -> tuple[str, int]:
    f = Path(ckpt_dir) / MODEL_FILE
    return _sha256(f), f.stat().st_size


def base_of_start(start: Path) -> Path:
    """The base of a LoRA phase that starts from the full checkpoint `start` (its weights, checked)."""
    start = Path(start)
    if (start / SHARDED_DIR).is_dir() and not (start / MODEL_FILE).is_file():
        raise ValueError(f"lora: the base {str(start)!r} is a sharded checkpoint; run `litgpt-ext consolidate {start}`"
                         f" first (LoRA reads the base's {MODEL_FILE})")
    if not (start / MODEL_FILE).is_file() or not (start / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"lora: the base {str(start)!r} has no {MODEL_FILE} + {CONFIG_FILE}")
    return start


def find_base(adapter_dir: Path, rec: dict, override: Optional[Path] = None, what: str = "lora.base") -> Path:
    """The folder holding the base weights recorded in `rec` (an adapter's lora.json): `override` if
    given, else the recorded path, else `lora_base/` beside the adapter's run folder; the first that
    exists must have the recorded sha256. Anything else is one error naming the paths and hashes."""
    base = rec["base"]
    want, size = str(base.get("sha256")), base.get("size")
    fix = (f"give its new location with {what} (a folder with {MODEL_FILE} of sha256 {want[:16]}…)")
    candidates = [Path(override)] if override is not None else [Path(base["path"]), Path(adapter_dir).parent / BASE_DIR]
    tried = []
    for c in dict.fromkeys(candidates):
        f = c / MODEL_FILE
        if not f.is_file():
            tried.append(f"{c} ({'no ' + MODEL_FILE if c.is_dir() else 'does not exist'})")
            continue
        if size is not None and f.stat().st_size != size:
            raise ValueError(f"the base of LoRA adapter {adapter_dir} changed: {f} has {f.stat().st_size} bytes, the"
                             f" adapter was trained on {size} bytes (sha256 {want[:16]}…); refusing to apply it to"
                             f" other weights; {fix}")
        got = _sha256(f)
        if got != want:
            raise ValueError(f"the base of LoRA adapter {adapter_dir} changed: {f} has sha256 {got[:16]}…, the adapter"
                             f" was trained on {want[:16]}… (from {base.get('source')}); refusing to apply it to other"
                             f" weights; {fix}")
        return c
    raise FileNotFoundError(f"the base of LoRA adapter {adapter_dir} is missing (moved or deleted?): tried "
                            + "; ".join(tried) + f"; {fix}")


def link_base(src: Path, out_dir: Path, sha256: str, size: int, source: str,
              log: Callable[[str], Any] = print) -> BaseRef:
    """`<out_dir>/lora_base/` = hard links to `src`'s lit_model.pth + model_config.yaml (a copy across
    file systems); an existing one must hold the same weights (a run folder has one base)."""
    dst = Path(out_dir) / BASE_DIR
    ref = BaseRef(str(dst.resolve()), sha256, size, source)
    if dst.exists():
        if Path(src).resolve() == dst.resolve():
            return ref
        if (dst / MODEL_FILE).is_file() and (dst / MODEL_FILE).stat().st_size == size and _sha256(dst / MODEL_FILE) == sha256:
            return ref
        raise ValueError(f"lora: {dst} holds the base of another LoRA phase (not the weights of {src}); a run folder"
                         " has one LoRA base: use a new out_dir (or merge-lora and continue from the merged checkpoint)")
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    how = set()
    for name in (MODEL_FILE, CONFIG_FILE):
        try:
            os.link(Path(src) / name, tmp / name)
            how.add("hard link")
        except OSError:
            shutil.copy2(Path(src) / name, tmp / name)
            how.add("copy")
    os.replace(tmp, dst)
    log(f"LoRA base: {src} -> {dst} ({', '.join(sorted(how))}; sha256 {sha256[:16]}…)")
    return ref
