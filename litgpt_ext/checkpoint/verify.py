"""Is a checkpoint complete, and do its files match its manifest."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from litgpt_ext.checkpoint.layout import CONFIG_FILE, MANIFEST_FILE, MODEL_FILE, _sha256, read_manifest, required_files


def is_complete(path: Path, need: str = "resume") -> bool:
    """Cheap completeness check (file presence and sizes; `verify_checkpoint` checks contents).

    need="weights": lit_model.pth + model_config.yaml (what evaluation and litgpt need).
    need="resume": every file a resume reads; with a manifest, every file it lists at its size.
    """
    path = Path(path)
    if need == "weights":
        return (path / MODEL_FILE).is_file() and (path / CONFIG_FILE).is_file()
    if need != "resume":
        raise ValueError(f"need={need!r}; valid: 'resume', 'weights'")
    if not all((path / f).is_file() for f in required_files(path)):
        return False
    man = read_manifest(path)
    if man is None:  # written before manifests existed: the required files are all we can check
        return not (path / MANIFEST_FILE).exists()
    try:
        return all((path / f).stat().st_size == meta["size"] for f, meta in man["files"].items())
    except (OSError, KeyError, TypeError):
        return False


def verify_checkpoint(path: Path) -> Optional[str]:
    """None if `path` is a complete checkpoint whose files match its manifest, else why not."""
    path = Path(path)
    missing = [f for f in required_files(path) if not (path / f).is_file()]
    if missing:
        broken = [f for f in missing if (path / f).is_symlink()]
        if broken:
            return f"{', '.join(broken)} point(s) to files that no longer exist ({os.readlink(path / broken[0])})"
        return f"missing {', '.join(missing)}"
    if not (path / MANIFEST_FILE).exists():
        return None  # a checkpoint from before manifests: presence is all we can check
    man = read_manifest(path)
    if man is None or not isinstance(man.get("files"), dict):
        return f"{MANIFEST_FILE} is unreadable"
    for f, meta in man["files"].items():
        p = path / f
        if not p.is_file():
            return f"{f} is missing"
        if p.stat().st_size != meta.get("size"):
            return f"{f} has {p.stat().st_size} bytes, the manifest says {meta.get('size')}"
        if meta.get("sha256") and _sha256(p) != meta["sha256"]:
            return f"{f} does not match its sha256 checksum (corrupt)"
    return None
