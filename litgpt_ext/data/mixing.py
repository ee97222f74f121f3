"""Mix specifications -> per-shard weights, and the exact deterministic blend order.

Both are pure functions of their inputs so that a mix can be printed (`litgpt-ext inspect-mix`),
tested exhaustively and reproduced from a checkpoint.
"""

from __future__ import annotations

import bisect
import copy
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

    def target(self, i: int, x: float) -> float:
        """The ideal count of shard i after x samples."""
        return self.weights[i] * x


# ----------------------------------------------------------------------------------------- schedules

RAMPS = ("constant", "linear")


@dataclass(frozen=True)
class SchedulePoint:
    """One point of a mixture schedule: the mix that holds from `at` (or is reached at `at`, ramped)."""

    kind: str  # "step" | "fraction"
    at: float
    spec: MixSpec
    ramp: str = "constant"  # how the mix gets here from the previous point

    def describe(self) -> str:
        at = f"step {int(self.at)}" if self.kind == "step" else f"fraction {self.at:g}"
        return f"{at} {self.ramp} -> {self.spec.describe()}"


def parse_mix_schedule(points: Sequence[Mapping] | None, proportional_sampling: bool = False) -> list[SchedulePoint] | None:
    """`mix_schedule` from the data config -> points; every bad entry is named.

    A point is `{at_step: N | at_fraction: F, <mix>, ramp: constant | linear}` where <mix> is one of
    `mix_weights_str`, `literal_weights_str`, `weights` (type -> weight) or `literal_weights`
    (shard id -> weight). `ramp: linear` ramps from the previous point's mix to this one; `constant`
    (default) switches at this point. Before the first point the first point's mix holds.
    """
    if points in (None, []):
        return None
    if isinstance(points, Mapping) or not isinstance(points, Sequence) or isinstance(points, str):
        raise MixError(f"mix_schedule must be a list of points, e.g. [{{at_fraction: 0.1, mix_weights_str: 'main:0.5,math:0.5'}}], got {points!r}")
    out = []
    valid = {"at_step", "at_fraction", "mix_weights_str", "literal_weights_str", "weights", "literal_weights", "ramp"}
    for k, p in enumerate(points):
        what = f"mix_schedule point {k}"
        if not isinstance(p, Mapping):
            raise MixError(f"{what} is {p!r}; expected a mapping like {{at_step: 500, mix_weights_str: 'main:0.8,math:0.2'}}")
        unknown = set(p) - valid
        if unknown:
            raise MixError(f"{what}: unknown keys {sorted(unknown)}; valid: {', '.join(sorted(valid))}")
        has_step, has_frac = p.get("at_step") is not None, p.get("at_fraction") is not None
        if has_step == has_frac:
            raise MixError(f"{what}: set exactly one of at_step (an optimizer step) or at_fraction (0..1 of the phase), got {dict(p)}")
        if has_step:
            at = p["at_step"]
            if isinstance(at, bool) or not isinstance(at, int) or at < 0:
                raise MixError(f"{what}: at_step={at!r} must be an integer >= 0")
            kind = "step"
        else:
            at = p["at_fraction"]
            if isinstance(at, bool) or not isinstance(at, (int, float)) or not 0 <= at <= 1:
                raise MixError(f"{what}: at_fraction={at!r} must be a number in [0, 1]")
            kind = "fraction"
        ramp = p.get("ramp", "constant")
        if ramp not in RAMPS:
            raise MixError(f"{what}: ramp={ramp!r}; valid: {', '.join(RAMPS)}")
        if ramp == "linear" and k == 0:
            raise MixError(f"{what}: the first point cannot ramp (there is no earlier mix to ramp from); use ramp: constant")
        given = [key for key in ("mix_weights_str", "literal_weights_str", "weights", "literal_weights") if p.get(key) not in (None, "", {})]
        if len(given) != 1:
            raise MixError(f"{what}: set exactly one of mix_weights_str, literal_weights_str, weights, literal_weights; got {given or 'none'}")
        key = given[0]
        try:
            if key == "mix_weights_str":
                spec = mix_spec(mix_weights_str=p[key], proportional_sampling=proportional_sampling)
            elif key == "literal_weights_str":
                spec = mix_spec(literal_weights_str=p[key])
            else:
                w = p[key]
                if not isinstance(w, Mapping):
                    raise MixError(f"{key} must be a mapping name -> weight, got {w!r}")
                _check_weights(w, key)
                w = {str(a): float(b) for a, b in w.items()}
                spec = (MixSpec("weighted", type_weights=w, proportional=proportional_sampling, source="mix_schedule")
                        if key == "weights" else MixSpec("literal", literal_weights=w, source="mix_schedule"))
        except MixError as e:
            raise MixError(f"{what}: {e}") from None
        out.append(SchedulePoint(kind, float(at), spec, ramp))
    return out


def describe_schedule(points: Sequence[SchedulePoint] | None) -> str | None:
    """A canonical text of the schedule (what a resume compares)."""
    if not points:
        return None
    return "; ".join(p.describe().replace(" from mix_weights_str", "").replace(" from literal_weights_str", "")
                     .replace(" from mix_schedule", "") for p in points)


@dataclass
class Phase:
    """The training phase a schedule lives in: optimizer steps [start_step, stop_step), global samples per step."""

    start_step: int
    stop_step: int
    global_batch_size: int

    def __post_init__(self) -> None:
        for name in ("start_step", "stop_step", "global_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise MixError(f"phase {name}={v!r} must be an integer >= 0")
        if self.stop_step <= self.start_step:
            raise MixError(f"phase stop_step={self.stop_step} must be after start_step={self.start_step}")
        if self.global_batch_size < 1:
            raise MixError(f"phase global_batch_size={self.global_batch_size} must be >= 1")

    @property
    def total_samples(self) -> int:
        return (self.stop_step - self.start_step) * self.global_batch_size

    def as_dict(self) -> dict:
        return {"start_step": self.start_step, "stop_step": self.stop_step, "global_batch_size": self.global_batch_size}


def resolve_schedule(points: Sequence[SchedulePoint], shards: Sequence[Shard], registry: Mapping[str, str],
                     phase: Phase) -> dict:
    """Points -> a plain record: knots in global samples since the phase start, per-shard weights, ramps.

    The record is what the loader state stores, so a resume follows it exactly (a requeue never
    moves it even if the phase it would compute now differs).
    """
    knots, mixes = [], []
    for k, p in enumerate(points):
        x = (p.at - phase.start_step) * phase.global_batch_size if p.kind == "step" else p.at * phase.total_samples
        if knots and x < knots[-1]:
            raise MixError(
                f"mix_schedule point {k} ({p.describe()}) is at phase sample {x:g}, before point {k - 1} "
                f"(at {knots[-1]:g}); points must be in order (phase: steps {phase.start_step}->{phase.stop_step})"
            )
        try:
            mixes.append(resolve_weights(p.spec, shards, registry))
        except MixError as e:
            raise MixError(f"mix_schedule point {k}: {e}") from None
        knots.append(float(x))
    order = [s.id for s in shards if any(s.id in m for m in mixes)]
    return {
        "spec": describe_schedule(points),
        "phase": phase.as_dict(),
        "knots": knots,
        "weights": [{sid: m.get(sid, 0.0) for sid in order} for m in mixes],
        "ramps": [p.ramp for p in points],
    }


def schedule_weights_at(record: Mapping, x: float) -> dict[str, float]:
    """The scheduled per-shard weights at phase sample x."""
    knots, W, ramps = record["knots"], record["weights"], record["ramps"]
    if x < knots[0]:
        return dict(W[0])
    k = bisect.bisect_right(knots, x) - 1
    if k + 1 < len(knots) and ramps[k + 1] == "linear" and knots[k + 1] > knots[k]:
        f = (x - knots[k]) / (knots[k + 1] - knots[k])
        return {sid: W[k][sid] + f * (W[k + 1][sid] - W[k][sid]) for sid in W[k]}
    return dict(W[k])


def curve_pieces(record: Mapping, ids: Sequence[str], offset: float, scale: float) -> list[tuple[float, list[float], list[float]]]:
    """The schedule in a blend's own coordinate n (x = offset + n * scale), from n = 0 on.

    Returns pieces (start n, weights at start, slope per sample); the last piece holds forever.
    """
    knots, W, ramps = record["knots"], record["weights"], record["ramps"]
    ns = [(x - offset) / scale for x in knots]
    vec = lambda w: [float(w.get(s, 0.0)) for s in ids]  # noqa: E731

    def slope(k: int) -> list[float]:  # of the span from knot k to knot k+1 (0 if it holds)
        if k + 1 < len(ns) and ramps[k + 1] == "linear" and ns[k + 1] > ns[k]:
            return [(b - a) / (ns[k + 1] - ns[k]) for a, b in zip(vec(W[k]), vec(W[k + 1]))]
        return [0.0] * len(ids)

    before = [k for k, n in enumerate(ns) if n <= 0]
    if before:  # n = 0 lies in the span after knot k0: interpolate there
        k0 = before[-1]
        sl = slope(k0)
        pieces = [(0.0, [a - s * ns[k0] for a, s in zip(vec(W[k0]), sl)], sl)]
    else:  # before the first point its mix holds
        pieces = [(0.0, vec(W[0]), [0.0] * len(ids))]
    for k, n in enumerate(ns):
        if n > 0:
            if n == pieces[-1][0]:
                pieces.pop()
            pieces.append((n, vec(W[k]), slope(k)))
    return pieces


class ScheduledBlend:
    """The exact blend for weights that change with the sample position (a mixture schedule).

    Tijdeman's theorem covers weights that vary per sample (lambda_{i,k} >= 0 with sum_i = 1 for each
    k): choosing, among shards i with c_i + 1 - T_i(n+1) <= 1 - delta, the one whose cumulative
    target T_i first reaches c_i + 1 - delta keeps |c_i(n) - T_i(n)| <= 1 - delta for every n,
    with delta = 1/(2(S-1)). Here sample k's demand is the integral of the piecewise-linear scheduled
    weight over [k, k+1), so T_i(n) is that integral over the first n samples: every prefix holds
    each shard within 1 - 1/(2(S-1)) < 1 of the integral of its scheduled weight. Deterministic in
    the counts, so a resume continues exactly.
    """

    def __init__(self, pieces: Sequence[tuple[float, Sequence[float], Sequence[float]]], counts: Sequence[int] | None = None):
        if not pieces or pieces[0][0] != 0:
            raise ValueError("a schedule's pieces must start at 0")
        S = len(pieces[0][1])
        self.starts = [float(p[0]) for p in pieces]
        self.a = [list(map(float, p[1])) for p in pieces]
        self.b = [list(map(float, p[2])) for p in pieces]
        self.b[-1] = [0.0] * S  # the last piece holds
        for j, (a, b) in enumerate(zip(self.a, self.b)):
            if any(w < -1e-12 for w in a) or abs(sum(a) - 1) > 1e-6:
                raise ValueError(f"piece {j}: weights {a} must be >= 0 and sum to 1")
        self.counts = list(counts) if counts is not None else [0] * S
        if len(self.counts) != S:
            raise ValueError("counts and weights differ in length")
        # cumulative target of every shard at every piece start: cum[i][j]
        self.cum = [[0.0] * len(pieces) for _ in range(S)]
        for j in range(1, len(pieces)):
            u = self.starts[j] - self.starts[j - 1]
            for i in range(S):
                self.cum[i][j] = self.cum[i][j - 1] + self.a[j - 1][i] * u + 0.5 * self.b[j - 1][i] * u * u
        self._delta = 1.0 / (2 * (S - 1)) if S > 1 else 0.0
        self._limit = 1.0 - self._delta + 1e-9
        self._piece = 0
        self._n = sum(self.counts)

    @property
    def position(self) -> int:
        return sum(self.counts)

    def target(self, i: int, x: float) -> float:
        """T_i(x): the integral of shard i's scheduled weight over the first x samples."""
        j = bisect.bisect_right(self.starts, x) - 1
        u = x - self.starts[j]
        return self.cum[i][j] + self.a[j][i] * u + 0.5 * self.b[j][i] * u * u

    def weights_at(self, x: float) -> list[float]:
        j = bisect.bisect_right(self.starts, x) - 1
        u = x - self.starts[j]
        return [a + b * u for a, b in zip(self.a[j], self.b[j])]

    def _deadline(self, i: int, goal: float) -> float:
        """The first x with T_i(x) >= goal (inf if never)."""
        cum = self.cum[i]
        j = bisect.bisect_right(cum, goal) - 1
        if j < 0:
            return 0.0
        # the first piece whose end reaches the goal (pieces of zero weight keep cum flat)
        r = goal - cum[j]
        a, b = self.a[j][i], self.b[j][i]
        if b == 0.0:
            return self.starts[j] + r / a if a > 0 else math.inf
        disc = a * a + 2.0 * b * r
        if disc < 0:  # the weight falls to zero in this piece before the goal: the next piece reaches it
            return self.starts[j + 1] if j + 1 < len(self.starts) else math.inf
        denom = a + math.sqrt(disc)
        return self.starts[j] + (2.0 * r / denom if denom > 0 else 0.0)

    def next(self) -> int:
        counts, limit, delta, starts = self.counts, self._limit, self._delta, self.starts
        n1 = float(self._n + 1)
        j = self._piece
        while j + 1 < len(starts) and starts[j + 1] <= n1:
            j += 1
        self._piece = j
        u = n1 - starts[j]
        aj, bj, cum = self.a[j], self.b[j], self.cum
        last = j + 1 == len(starts)
        s0 = starts[j]
        best, best_deadline, worst, worst_gap = -1, math.inf, 0, -math.inf
        for i in range(len(counts)):
            ci, a, b = cum[i], aj[i], bj[i]
            t = ci[j] + u * (a + 0.5 * b * u)
            c = counts[i]
            if c + 1 - t <= limit:
                goal = c + 1 - delta
                r = goal - ci[j]
                if r >= 0 and (last or goal <= ci[j + 1]):  # reached within this piece (the usual case)
                    if b == 0.0:
                        deadline = s0 + r / a if a > 0 else math.inf
                    else:
                        disc = a * a + 2.0 * b * r
                        denom = a + math.sqrt(disc) if disc > 0 else 0.0
                        deadline = s0 + 2.0 * r / denom if denom > 0 else self._deadline(i, goal)
                else:
                    deadline = self._deadline(i, goal)
                if deadline < best_deadline:
                    best, best_deadline = i, deadline
            if t - c > worst_gap:
                worst, worst_gap = i, t - c
        if best < 0:  # float round-off only: serve the largest deficit
            best = worst
        counts[best] += 1
        self._n += 1
        return best

    def take(self, n: int) -> list[int]:
        return [self.next() for _ in range(n)]


def constant_record(weights: Mapping[str, float], phase: Phase | None = None, spec: str | None = None) -> dict:
    """A constant mix as a one-point schedule record (so caps and reports treat both alike)."""
    return {"spec": spec, "phase": phase.as_dict() if phase else None, "knots": [0.0], "weights": [dict(weights)],
            "ramps": ["constant"]}


def drawn_samples(record: Mapping, start: float, end: float) -> dict[str, float]:
    """The scheduled samples of each shard between phase samples `start` and `end` (all ranks together)."""
    ids = list(record["weights"][0])
    blend = ScheduledBlend(curve_pieces(record, ids, 0.0, 1.0))
    return {sid: blend.target(i, end) - blend.target(i, start) for i, sid in enumerate(ids)}


def epoch_limit(max_epochs: float | Mapping[str, float] | None, shard: Shard) -> float | None:
    """A shard's `max_epochs`: its own id, else its type, else a single number for all."""
    if max_epochs is None:
        return None
    if isinstance(max_epochs, Mapping):
        v = max_epochs.get(shard.id, max_epochs.get(shard.type))
        return None if v is None else float(v)
    return float(max_epochs)


def check_max_epochs(max_epochs, shards: Sequence[Shard], registry: Mapping[str, str]) -> None:
    if max_epochs is None:
        return
    items = max_epochs.items() if isinstance(max_epochs, Mapping) else [("all shards", max_epochs)]
    ids = {s.id for s in shards}
    for key, v in items:
        if isinstance(max_epochs, Mapping) and key not in ids and key not in registry:
            raise MixError(f"max_epochs names {key!r}, which is neither a shard ({', '.join(sorted(ids))}) nor a type ({', '.join(registry)})")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise MixError(f"max_epochs for {key}={v!r} must be a number > 0")


def apply_repetition_caps(record: dict, shards: Mapping[str, Shard], num_samples: Mapping[str, int],
                          total_samples: int, max_epochs, cap: bool, block_size: int,
                          samples_per_step: int | None = None) -> tuple[dict, list[str]]:
    """Refuse (or, with `cap`, cap and renormalise) a plan that draws a shard more than its max_epochs.

    Epochs count what this phase draws (`total_samples` global samples). Capping scales a shard's
    weight at every point by max_epochs / epochs it would need and spreads the freed share over the
    uncapped shards in proportion to their weights, repeating until no shard is over its cap.
    Returns the (possibly new) record and log lines describing any change.
    """
    if max_epochs is None:
        return record, []
    ids = list(record["weights"][0])
    limits = {sid: epoch_limit(max_epochs, shards[sid]) for sid in ids}
    drawn = drawn_samples(record, 0.0, float(total_samples))
    over = {sid: drawn[sid] / num_samples[sid] for sid in ids
            if limits[sid] is not None and drawn[sid] / num_samples[sid] > limits[sid] + 1e-9}
    if not over:
        return record, []
    if not cap:
        lines = []
        for sid, ep in over.items():
            s, lim = shards[sid], limits[sid]
            fit = total_samples * lim / ep
            steps = f" = {int(fit // samples_per_step):,} optimizer steps of {samples_per_step}" if samples_per_step else ""
            lines.append(
                f"shard {sid!r} ({s.num_tokens:,} tokens = {num_samples[sid]:,} samples of {block_size}) would be drawn "
                f"{ep:.2f} epochs in this phase ({drawn[sid]:,.0f} of {total_samples:,} samples) but max_epochs={lim:g}; "
                f"the budget that fits at this mix is {fit:,.0f} samples ({fit * block_size:,.0f} tokens{steps})"
            )
        raise MixError("repetition cap exceeded:\n  " + "\n  ".join(lines)
                       + "\nshorten the phase, lower the shard's weight, raise max_epochs, or set cap_repetition: true "
                         "to cap these shards and renormalise the others")
    factor: dict[str, float] = {}
    new = copy.deepcopy(record)
    for _ in range(len(ids) + 1):
        for sid, ep in over.items():
            factor[sid] = factor.get(sid, 1.0) * limits[sid] / ep
        free = [s for s in ids if s not in factor]
        Wn = []
        for w in record["weights"]:
            capped = {s: w[s] * factor[s] for s in factor}
            rest = sum(w[s] for s in free)
            room = 1.0 - sum(capped.values())
            if free and rest > 0:
                Wn.append({s: capped[s] if s in capped else w[s] * room / rest for s in ids})
            elif room > 1e-12:
                raise MixError(
                    f"repetition caps leave no shard to take the freed share at some point of the mix (capped: "
                    f"{', '.join(sorted(factor))}); add data, raise max_epochs or shorten the phase"
                )
            else:
                Wn.append(capped)
        new["weights"] = Wn
        drawn_new = drawn_samples(new, 0.0, float(total_samples))
        over = {sid: drawn_new[sid] / num_samples[sid] for sid in ids
                if limits[sid] is not None and drawn_new[sid] / num_samples[sid] > limits[sid] * (1 + 1e-9) + 1e-9}
        if not over:
            break
    else:
        raise MixError("repetition caps did not converge; lower the weights of the small shards by hand")
    lines = [f"repetition cap: capped {', '.join(sorted(factor))} and renormalised the others "
             f"(phase of {total_samples:,} samples)",
             f"{'shard':<10} {'max_ep':>7} {'epochs before':>13} {'epochs after':>12} {'weight before -> after (per point)'}"]
    for sid in ids:
        before, after = drawn[sid] / num_samples[sid], drawn_new[sid] / num_samples[sid]
        ws = ", ".join(f"{a[sid]:.4f}->{b[sid]:.4f}" for a, b in zip(record["weights"], new["weights"]))
        lim = limits[sid]
        lines.append(f"{sid:<10} {('-' if lim is None else f'{lim:g}'):>7} {before:>13.3f} {after:>12.3f} {ws}")
    return new, lines
