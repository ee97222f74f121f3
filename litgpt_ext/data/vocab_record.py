"""Which tokenizer made a run's shards: refuse a mix of vocabularies before the first step.

`prepare` records the digest of the tokenizer that tokenized a shard (`prepare_meta.json`,
`settings.tokenizer`). `extend-vocab` writes, into the new tokenizer's `tokenizer_config.json`, the
digests of the tokenizers it extends (`EXTENDED_FROM_KEY`), which travel with the tokenizer into
every checkpoint. `check_shard_tokenizers` (called by training setup, `train.validate`) refuses:

- a shard tokenized by a tokenizer that the run's tokenizer extends (its ids are valid, so nothing
  else would notice: the text of every new token is still split into the old sub-pieces);
- shards of one run tokenized by different tokenizers (even without a tokenizer_dir to compare to).

Shards without `prepare_meta.json` (written by other tools) are not judged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional

EXTENDED_FROM_KEY = "litgpt_ext_extended_from"


def extended_from(tokenizer_dir: Optional[Path]) -> list[str]:
    """Digests of the tokenizers `tokenizer_dir`'s tokenizer extends (newest first); [] if none."""
    if tokenizer_dir is None:
        return []
    try:
        cfg = json.loads((Path(tokenizer_dir) / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    value = cfg.get(EXTENDED_FROM_KEY) if isinstance(cfg, dict) else None
    return [d for d in value if isinstance(d, str)] if isinstance(value, list) else []


def shard_tokenizer(path: Path) -> tuple[Optional[str], Optional[str]]:
    """(digest, tokenizer_dir) that `prepare` recorded for a shard, or (None, None)."""
    try:
        meta = json.loads((Path(path) / "prepare_meta.json").read_text())
    except (OSError, ValueError):
        return None, None
    if not isinstance(meta, dict):
        return None, None
    digest = (meta.get("settings") or {}).get("tokenizer")
    return (digest if isinstance(digest, str) else None), meta.get("tokenizer_dir")


def check_shard_tokenizers(paths: Mapping[str, Path], tokenizer_dir: Optional[Path] = None) -> None:
    """Refuse (ValueError, one line naming the shards) old-vocabulary shards and mixed tokenizers."""
    found = {sid: shard_tokenizer(p) for sid, p in paths.items()}
    found = {sid: v for sid, v in found.items() if v[0] is not None}
    if not found:
        return
    ancestors = extended_from(tokenizer_dir)
    old = sorted(sid for sid, (d, _) in found.items() if d in ancestors)
    if old:
        raise ValueError(
            f"shard(s) {', '.join(old)} ({paths[old[0]]}) were tokenized with the vocabulary that "
            f"`litgpt-ext extend-vocab` extended into this run's tokenizer_dir {str(tokenizer_dir)!r}: their text "
            f"holds the new tokens as old sub-pieces; re-prepare them with `litgpt-ext prepare --tokenizer_dir "
            f"{tokenizer_dir}`")
    groups: dict[str, list[str]] = {}
    for sid, (d, _) in found.items():
        groups.setdefault(d, []).append(sid)
    if len(groups) > 1:
        parts = []
        for d, sids in groups.items():
            where = found[sids[0]][1]
            extends = sorted(o for o in groups if o != d and o in extended_from(Path(where) if where else None))
            note = f" (extend-vocab of {', '.join(extends)})" if extends else ""
            parts.append(f"tokenizer {d}{note} from {where!r}: {', '.join(sorted(sids))}")
        raise ValueError("the run's shards were tokenized by different tokenizers (their ids mean different "
                         "things): " + "; ".join(parts) + "; re-prepare them with one tokenizer")
