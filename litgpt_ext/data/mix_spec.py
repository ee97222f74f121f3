"""Mix specifications: the mix a data config names (strings, a JSON file) -> per-shard weights.

`mix_spec` reads the one mix source that is set (`check_mix_sources` is the one rule for that,
shared by the data module, its schedule points and `inspect-mix`); `resolve_weights` turns the
spec into normalised per-shard weights. Pure functions of their inputs, so a mix can be printed
(`litgpt-ext inspect-mix`), tested exhaustively and reproduced from a checkpoint.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from litgpt_ext.data.shard_types import MAIN, MixError, Shard

MIX_SOURCES = ("mix_weights_str", "literal_weights_str", "mix_config_path")
"""The data config's keys that each set one whole mix; at most one may be set."""

POINT_SOURCES = ("mix_weights_str", "literal_weights_str", "weights", "literal_weights")
"""The keys that set a mix_schedule point's mix; exactly one must be set."""


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


def check_weights(weights: Mapping[str, float], what: str) -> None:
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


def check_mix_sources(sources: Mapping[str, Any], *, point: str | None = None, scheduled: bool = False,
                      scheduled_names: str | None = None) -> str | None:
    """The one mix source set in `sources` ({config key: value}, in the order errors name them), or None.

    One rule, three settings, each with its own message:
    - the flat keys (`MIX_SOURCES`, read by `mix_spec`): at most one may be set;
    - a mix_schedule point (`point` names it in the error): exactly one of `POINT_SOURCES` must be
      set, and an empty mapping counts as unset;
    - `scheduled`: a mix_schedule holds the mix, so no flat key may be set; the error names the first
      one set, or `scheduled_names` when given.
    """
    unset = (None, "", {}) if point is not None else (None, "")
    given = [name for name, value in sources.items() if value not in unset]
    if scheduled:
        if given:
            raise MixError(f"set the mix either in mix_schedule's points or in {scheduled_names or given[0]}, not both")
        return None
    if point is not None:
        if len(given) != 1:
            raise MixError(f"{point}: set exactly one of {', '.join(sources)}; got {given or 'none'}")
        return given[0]
    if len(given) > 1:
        raise MixError(f"set only one mix source, got {' and '.join(given)}")
    return given[0] if given else None


def mix_spec(
    mix_weights_str: str | None = None,
    literal_weights_str: str | None = None,
    mix_config_path: str | Path | None = None,
    proportional_sampling: bool = False,
) -> MixSpec:
    """Read the one mix source that is set (two at once is an error)."""
    check_mix_sources({"mix_weights_str": mix_weights_str, "literal_weights_str": literal_weights_str,
                       "mix_config_path": mix_config_path})
    if mix_config_path not in (None, ""):
        return _spec_from_file(Path(mix_config_path), proportional_sampling)
    if literal_weights_str not in (None, ""):
        if proportional_sampling:
            raise MixError("proportional_sampling cannot be combined with literal_weights_str (literal weights are exact)")
        lw = parse_weights_str(literal_weights_str, "literal_weights_str")
        check_weights(lw, "literal_weights_str")
        return MixSpec("literal", literal_weights=lw, source="literal_weights_str")
    if mix_weights_str not in (None, ""):
        tw = parse_weights_str(mix_weights_str, "mix_weights_str")
        check_weights(tw, "mix_weights_str")
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
        check_weights(literal, f"{what} literal_weights")
        return MixSpec("literal", literal_weights={str(k): float(v) for k, v in literal.items()}, source=str(path))
    if weights:
        check_weights(weights, f"{what} weights")
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
        for sid in spec.literal_weights:
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
