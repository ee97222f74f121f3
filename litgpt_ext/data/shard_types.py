"""Shard types and shard discovery.

A data folder holds one litdata token shard per sub-folder: main shards are numbered (`1`, `2`, …)
and typed shards are a type prefix plus a number (`c1` code, `m2` math, …). The registry maps type
names (used in `mix_weights_str`) to prefixes (used in folder names) and can be extended from a
config (`extra_shard_types: {legal: l}`) without editing code.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from litgpt_ext.data.shard_io import ShardIndex, is_shard_dir, read_shard_index

log = logging.getLogger(__name__)

MAIN = "main"
DEFAULT_SHARD_TYPES: dict[str, str] = {
    MAIN: "",
    "code": "c",
    "math": "m",
    "web": "w",
    "instruct": "i",
    "qa": "q",
    "books": "b",
    "news": "n",
    "papers": "p",
    "synth": "s",  # documents sampled from a frozen checkpoint (`litgpt-ext synth-replay`)
}
_TYPE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_PREFIX = re.compile(r"^[a-z]+$")
_SHARD_NAME = re.compile(r"^([a-z]*)(\d+)$")


class MixError(ValueError):
    """A mix or data configuration that cannot be honoured; the message names the culprit."""


def build_registry(extra_shard_types: Mapping[str, str] | None = None) -> dict[str, str]:
    """The default type registry plus `extra_shard_types` ({type name: folder prefix})."""
    registry = dict(DEFAULT_SHARD_TYPES)
    for name, prefix in (extra_shard_types or {}).items():
        if not isinstance(name, str) or not _TYPE_NAME.match(name):
            raise MixError(f"extra_shard_types: bad type name {name!r}; use lowercase letters, digits and '_'")
        if not isinstance(prefix, str) or not _PREFIX.match(prefix):
            raise MixError(
                f"extra_shard_types: bad prefix {prefix!r} for type {name!r}; use lowercase letters only (e.g. 'l' for 'l1', 'l2')"
            )
        owner = next((n for n, p in registry.items() if p == prefix and n != name), None)
        if owner is not None:
            raise MixError(f"extra_shard_types: prefix {prefix!r} for {name!r} is already used by type {owner!r}")
        if name in registry and registry[name] != prefix:
            raise MixError(f"extra_shard_types: type {name!r} already exists with prefix {registry[name]!r}")
        registry[name] = prefix
    return registry


@dataclass(frozen=True)
class Shard:
    """One discovered shard. `id` is what literal mixes name: `main/N` or the folder name."""

    id: str
    type: str
    number: int
    path: Path
    index: ShardIndex

    @property
    def num_tokens(self) -> int:
        return self.index.num_tokens


def shard_id(type_name: str, folder: str) -> str:
    return f"{MAIN}/{folder}" if type_name == MAIN else folder


def discover_shards(data_path: str | Path, registry: Mapping[str, str]) -> list[Shard]:
    """All shards under `data_path`, ordered main first (by number), then by registry order.

    Folders that look like shards but carry an unknown prefix are reported, never silently used
    or dropped; folders without an index.json that are named like shards are an error.
    """
    if data_path is None or str(data_path) == "":
        raise MixError("data_path is not set; point it at a folder of shard folders (1, 2, c1, m1, …)")
    root = Path(data_path)
    if not root.is_dir():
        raise MixError(f"data_path {str(root)!r} does not exist or is not a folder")
    by_prefix = {p: n for n, p in registry.items()}
    order = {n: i for i, n in enumerate(registry)}
    shards: list[Shard] = []
    unknown: list[str] = []
    for child in sorted(root.iterdir()):
        m = _SHARD_NAME.match(child.name)
        if not child.is_dir() or m is None:
            continue
        prefix, number = m.group(1), int(m.group(2))
        if prefix not in by_prefix:
            if is_shard_dir(child):
                unknown.append(child.name)
            continue
        type_name = by_prefix[prefix]
        shards.append(Shard(shard_id(type_name, child.name), type_name, number, child, read_shard_index(child)))
    if unknown:
        known = ", ".join(f"{n}={p or 'N'}" for n, p in registry.items())
        log.warning(
            "ignoring shard folders with unknown type prefixes under %s: %s (known: %s; add them with "
            "extra_shard_types: {name: prefix})",
            root,
            ", ".join(unknown),
            known,
        )
    if not shards:
        raise MixError(
            f"no shards found under data_path {str(root)!r}: expected folders named 1, 2, … or "
            f"<prefix><n> ({', '.join(p + '1' for p in registry.values() if p)}) each holding an index.json"
        )
    shards.sort(key=lambda s: (order[s.type], s.number))
    return shards
