"""Mixture schedules: the mix as a function of the phase position, and the repetition caps on it.

`parse_mix_schedule` reads `mix_schedule`'s points; `resolve_schedule` places them in a `Phase` as a
plain record (knots in global samples, per-shard weights, ramps) that the loader state stores;
`curve_pieces` gives a blend the record in its own coordinates; `apply_repetition_caps` refuses (or
caps) a record that would draw a shard more than its `max_epochs`. A constant mix is a one-point
record (`constant_record`), so caps and reports treat both alike.
"""

from __future__ import annotations

import bisect
import copy
from dataclasses import dataclass
from typing import Mapping, Sequence

from litgpt_ext.data.blend import ScheduledBlend
from litgpt_ext.data.mix_spec import POINT_SOURCES, MixSpec, check_mix_sources, check_weights, mix_spec, resolve_weights
from litgpt_ext.data.shard_types import MixError, Shard

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
    if points is None:
        return None
    if isinstance(points, Mapping) or not isinstance(points, Sequence) or isinstance(points, str):
        raise MixError(f"mix_schedule must be a list of points, e.g. [{{at_fraction: 0.1, mix_weights_str: 'main:0.5,math:0.5'}}], got {points!r}")
    if not points:
        raise MixError("mix_schedule is an empty list; give at least one point, e.g. [{at_step: 0, mix_weights_str: "
                       "'main:0.8,math:0.2'}], or drop mix_schedule and set the mix with mix_weights_str")
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
        key = check_mix_sources({k: p.get(k) for k in POINT_SOURCES}, point=what)
        try:
            if key == "mix_weights_str":
                spec = mix_spec(mix_weights_str=p[key], proportional_sampling=proportional_sampling)
            elif key == "literal_weights_str":
                spec = mix_spec(literal_weights_str=p[key])
            else:
                w = p[key]
                if not isinstance(w, Mapping):
                    raise MixError(f"{key} must be a mapping name -> weight, got {w!r}")
                check_weights(w, key)
                w = {str(a): float(b) for a, b in w.items()}
                spec = (MixSpec("weighted", type_weights=w, proportional=proportional_sampling, source="mix_schedule")
                        if key == "weights" else MixSpec("literal", literal_weights=w, source="mix_schedule"))
        except MixError as e:
            raise MixError(f"{what}: {e}") from None
        twin = next((j for j, q in enumerate(out) if q.kind == kind and q.at == float(at)), None)
        if twin is not None:
            raise MixError(f"{what}: at_{kind}={at!r} is also point {twin}'s; each point needs its own "
                           f"at_{kind} (a mix switches once per position: drop or move one of them)")
        out.append(SchedulePoint(kind, float(at), spec, ramp))
    return out


def check_schedule_budget(points: Sequence[SchedulePoint], phase: Phase) -> None:
    """Refuse an `at_step` point after the phase's last step (its mix would never be drawn).

    `at_step` is absolute; the phase ends at `stop_step`, which the run's budget (train.max_tokens,
    max_steps, max_additional_steps) sets. A point at `stop_step` itself is allowed: a linear ramp
    that ends there is as meaningful as `at_fraction: 1`.
    """
    for k, p in enumerate(points):
        if p.kind == "step" and p.at > phase.stop_step:
            raise MixError(
                f"mix_schedule point {k}: at_step={int(p.at)} is beyond this run's budget (the phase is steps "
                f"{phase.start_step}->{phase.stop_step}); use an at_step <= {phase.stop_step}, an at_fraction, "
                f"or a longer run (train.max_tokens / max_steps)")


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


# the phase in which `ShardedMixedDataset.resolve()` places the points only to learn which shards
# they use (before the run's budget is known): no budget check there
UNPLACED = Phase(0, 1, 1)


def resolve_schedule(points: Sequence[SchedulePoint], shards: Sequence[Shard], registry: Mapping[str, str],
                     phase: Phase) -> dict:
    """Points -> a plain record: knots in global samples since the phase start, per-shard weights, ramps.

    The record is what the loader state stores, so a resume follows it exactly (a requeue never
    moves it even if the phase it would compute now differs).
    """
    if phase != UNPLACED:
        check_schedule_budget(points, phase)
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
