"""Mix specifications -> per-shard weights, and the exact deterministic blend order.

Both are pure functions of their inputs so that a mix can be printed (`litgpt-ext inspect-mix`),
tested exhaustively and reproduced from a checkpoint.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from litgpt_ext.data.shard_types import MAIN, MixError, Shard


def parse_weights_str(text: str, what: str) -> dict[str, float]:
    """Parse `"a:0.8,b:0.2"` strictly; `what` names the config key in errors."""
    if not isinstance(text, str) or not text.strip():
        raise MixError(f"{what} is empty; expected 'name:weight,name:weight', e.g. 'main:0.8,code:0.2'")
    out: dict[str, float] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise MixError(f"{what}={text!r} has an empty entry (stray comma?)")
        if ":" not in item:
            raise MixError(f"{what}: entry {item!r} is not 'name:weight' (in {text!r}); e.g. 'main:0.8'")
        name, _, value = item.rpartition(":")
        name = name.strip()
        if not name:
            raise MixError(f"{what}: entry {item!r} has no name (in {text!r})")
        try:
            weight = float(value)
        except ValueError:
            raise MixError(f"{what}: weight {value.strip()!r} of {name!r} is not a number (in {text!r})") from None
        if name in out:
            raise MixError(f"{what}: {name!r} appears twice (in {text!r})")
        out[name] = weight
    return out


def _check_weights(weights: Mapping[str, float], what: str) -> None:
    for name, w in weights.items():
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w):
            raise MixError(f"{what}: weight of {name!r} is {w!r}; weights must be finite numbers >= 0")
        if w < 0:
            raise MixError(f"{what}: weight of {name!r} is negative ({w}); weights must be >= 0")
    if not weights or sum(weights.values()) <= 0:
        raise MixError(f"{what}: all weights are zero ({dict(weights)}); give at least one positive weight")


@dataclass(frozen=True)
class MixSpec:
    """Which mix the user asked for, after reading strings/files; `describe()` for logs."""

    mode: str  # "weighted" | "literal"
    type_weights: dict[str, float] = field(default_factory=dict)
    literal_weights: dict[str, float] = field(default_factory=dict)
    proportional: bool = False
    source: str = "default"

    def describe(self) -> str:
        if self.mode == "literal":
            body = ",".join(f"{k}:{v:g}" for k, v in self.literal_weights.items())
        else:
            body = ",".join(f"{k}:{v:g}" for k, v in self.type_weights.items())
        return f"{self.mode}{'+proportional' if self.proportional else ''} [{body}] from {self.source}"


def mix_spec(
    mix_weights_str: str | None = None,
    literal_weights_str: str | None = None,
    mix_config_path: str | Path | None = None,
    proportional_sampling: bool = False,
) -> MixSpec:
    """Read the one mix source that is set (two at once is an error)."""
    given = [
        n
        for n, v in (
            ("mix_weights_str", mix_weights_str),
            ("literal_weights_str", literal_weights_str),
            ("mix_config_path", mix_config_path),
        )
        if v not in (None, "")
    ]
    if len(given) > 1:
        raise MixError(f"set only one mix source, got {' and '.join(given)}")
    if mix_config_path not in (None, ""):
        return _spec_from_file(Path(mix_config_path), proportional_sampling)
    if literal_weights_str not in (None, ""):
        if proportional_sampling:
            raise MixError("proportional_sampling cannot be combined with literal_weights_str (literal weights are exact)")
        lw = parse_weights_str(literal_weights_str, "literal_weights_str")
        _check_weights(lw, "literal_weights_str")
        return MixSpec("literal", literal_weights=lw, source="literal_weights_str")
    if mix_weights_str not in (None, ""):
        tw = parse_weights_str(mix_weights_str, "mix_weights_str")
        _check_weights(tw, "mix_weights_str")
        return MixSpec("weighted", type_weights=tw, proportional=proportional_sampling, source="mix_weights_str")
    if proportional_sampling:
        return MixSpec("weighted", proportional=True, source="proportional_sampling over all shards")
    return MixSpec("weighted", type_weights={MAIN: 1.0}, source="default (main only)")


def _spec_from_file(path: Path, proportional_sampling: bool) -> MixSpec:
    """The paper's JSON format: {"weights": {...}, "proportional_sampling": bool, "literal_weights": {...}}."""
    if not path.is_file():
        raise MixError(f"mix_config_path {str(path)!r} does not exist")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MixError(f"mix_config_path {str(path)!r} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise MixError(f"mix_config_path {str(path)!r} must hold a JSON object with 'weights' or 'literal_weights'")
    unknown = set(cfg) - {"weights", "proportional_sampling", "literal_weights"}
    if unknown:
        raise MixError(
            f"mix_config_path {str(path)!r}: unknown keys {sorted(unknown)}; valid: weights, literal_weights, proportional_sampling"
        )
    weights = cfg.get("weights") or {}
    literal = cfg.get("literal_weights") or {}
    proportional = bool(cfg.get("proportional_sampling", False)) or proportional_sampling
    what = f"mix_config_path {path.name}"
    if weights and literal:
        raise MixError(f"{what}: set either 'weights' or 'literal_weights', not both")
    if literal:
        if proportional:
            raise MixError(f"{what}: proportional_sampling cannot be combined with literal_weights")
        _check_weights(literal, f"{what} literal_weights")
        return MixSpec("literal", literal_weights={str(k): float(v) for k, v in literal.items()}, source=str(path))
    if weights:
        _check_weights(weights, f"{what} weights")
        return MixSpec("weighted", type_weights={str(k): float(v) for k, v in weights.items()}, proportional=proportional, source=str(path))
    if proportional:
        return MixSpec("weighted", proportional=True, source=str(path))
    raise MixError(f"{what}: neither 'weights' nor 'literal_weights' is set")


def resolve_weights(spec: MixSpec, shards: Sequence[Shard], registry: Mapping[str, str]) -> dict[str, float]:
    """Per-shard weights (normalised, zero-weight shards omitted), in discovery order.

    weighted: a type's weight is split equally over its shards. proportional: each shard's weight
    is its token count, times its type's weight when type weights are given. literal: exact ids.
    """
    by_type: dict[str, list[Shard]] = {}
    for s in shards:
        by_type.setdefault(s.type, []).append(s)
    raw: dict[str, float] = {}
    if spec.mode == "literal":
        ids = {s.id for s in shards}
        for sid, w in spec.literal_weights.items():
            if sid not in ids:
                hint = f" (numbered shards are named 'main/{sid}')" if sid.isdigit() else ""
                raise MixError(
                    f"literal_weights: shard id {sid!r} matches no shard{hint}; available: {', '.join(s.id for s in shards)}"
                )
        raw = {s.id: float(spec.literal_weights[s.id]) for s in shards if spec.literal_weights.get(s.id, 0) > 0}
    else:
        if spec.type_weights:
            for t, w in spec.type_weights.items():
                if t not in registry:
                    alias = next((n for n, p in registry.items() if p and p == t), None)
                    hint = f" (did you mean {alias!r}?)" if alias else ""
                    raise MixError(f"unknown shard type {t!r} in mix{hint}; known: {', '.join(registry)}")
                if w > 0 and t not in by_type:
                    present = ", ".join(f"{k} ({len(v)})" for k, v in by_type.items())
                    prefix = registry[t]
                    raise MixError(
                        f"type {t!r} has weight {w:g} but no shards on disk (folders {prefix or ''}1, {prefix or ''}2, …); "
                        f"types present: {present}"
                    )
            type_w = {t: w for t, w in spec.type_weights.items() if w > 0}
        else:
            type_w = {t: 1.0 for t in by_type}
        for t, w in type_w.items():
            members = by_type[t]
            for s in members:
                raw[s.id] = w * s.num_tokens if spec.proportional else w / len(members)
    total = sum(raw.values())
    if total <= 0:
        raise MixError(f"the mix {spec.describe()} gives every shard zero weight")
    order = [s.id for s in shards]
    return {sid: raw[sid] / total for sid in order if sid in raw and raw[sid] > 0}


class Blend:
    """The exact blend: which shard serves the next sample, deterministic and memoryless.

    Tijdeman's solution of the chairman assignment problem: after every prefix of n samples each
    shard's count c_i satisfies |c_i - w_i n| <= 1 - 1/(2(S-1)) < 1. The next pick depends only on
    the counts so far, so a resumed run continues exactly from saved counts.
    """

    def __init__(self, weights: Sequence[float], counts: Sequence[int] | None = None):
        if not weights or any(w <= 0 for w in weights):
            raise ValueError(f"blend weights must be positive, got {list(weights)}")
        total = float(sum(weights))
        self.weights = [w / total for w in weights]
        self.counts = list(counts) if counts is not None else [0] * len(weights)
        if len(self.counts) != len(self.weights):
            raise ValueError("counts and weights differ in length")
        self._inv = [1.0 / w for w in self.weights]
        self._delta = 1.0 / (2 * (len(weights) - 1)) if len(weights) > 1 else 0.0
        self._limit = 1.0 - self._delta + 1e-9

    @property
    def position(self) -> int:
        return sum(self.counts)

    def next(self) -> int:
        n1 = self.position + 1
        best, best_deadline = -1, math.inf
        counts, weights, inv, delta, limit = self.counts, self.weights, self._inv, self._delta, self._limit
        for i in range(len(weights)):
            c1 = counts[i] + 1
            if c1 - weights[i] * n1 <= limit:
                deadline = (c1 - delta) * inv[i]
                if deadline < best_deadline:
                    best, best_deadline = i, deadline
        counts[best] += 1
        return best

    def take(self, n: int) -> list[int]:
        return [self.next() for _ in range(n)]
