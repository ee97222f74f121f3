"""`litgpt-ext inspect-mix`: what a mix means before you spend GPU hours on it."""

from __future__ import annotations

import json as _json
from pathlib import Path

from litgpt_ext.data.mix_spec import MIX_SOURCES, check_mix_sources, mix_spec, resolve_weights
from litgpt_ext.data.schedule import (
    Phase,
    apply_repetition_caps,
    check_max_epochs,
    constant_record,
    describe_schedule,
    drawn_samples,
    parse_mix_schedule,
    resolve_schedule,
    schedule_weights_at,
)
from litgpt_ext.data.shard_types import MixError, build_registry, discover_shards


def mix_report(
    data_path: Path,
    mix_weights_str: str | None = None,
    literal_weights_str: str | None = None,
    mix_config_path: Path | None = None,
    proportional_sampling: bool = False,
    extra_shard_types: dict[str, str] | None = None,
    tokens: int | None = None,
    max_seq_length: int = 2048,
    mix_schedule: list[dict] | None = None,
    max_epochs: float | dict[str, float] | None = None,
    cap_repetition: bool = False,
    global_batch_size: int = 1,
    start_step: int = 0,
) -> dict:
    """Resolved weights, sizes and epochs-per-budget for every discovered shard (pure data).

    With a schedule or `max_epochs`, the phase is `tokens` worth of optimizer steps of
    `global_batch_size` samples from `start_step` (as the training loop counts them: a step is
    global_batch_size x max_seq_length tokens), and the report adds one row per schedule segment.
    """
    registry = build_registry(extra_shard_types)
    points = parse_mix_schedule(mix_schedule, proportional_sampling)
    if points:
        check_mix_sources(dict(zip(MIX_SOURCES, (mix_weights_str, literal_weights_str, mix_config_path))),
                          scheduled=True, scheduled_names="/".join(MIX_SOURCES))
    spec = points[0].spec if points else mix_spec(mix_weights_str, literal_weights_str, mix_config_path, proportional_sampling)
    shards = discover_shards(data_path, registry)
    check_max_epochs(max_epochs, shards, registry)
    block = max_seq_length + 1
    by_id = {s.id: s for s in shards}
    record, cap_log, phase = None, [], None
    if points or max_epochs is not None:
        if tokens is None:
            raise MixError("a mix_schedule or max_epochs needs the phase's budget: pass --tokens (and --global_batch_size)")
        steps = tokens // (global_batch_size * max_seq_length)
        if steps < 1:
            raise MixError(f"--tokens {tokens} is less than one optimizer step of {global_batch_size} x {max_seq_length} tokens")
        phase = Phase(start_step, start_step + steps, global_batch_size)
        record = (resolve_schedule(points, shards, registry, phase) if points
                  else constant_record(resolve_weights(spec, shards, registry), phase))
        nums = {sid: by_id[sid].index.num_samples(block) for sid in record["weights"][0]}
        for sid, n in nums.items():
            if n == 0:
                raise MixError(f"shard {sid!r} holds fewer tokens than one sample of {block}")
        record, cap_log = apply_repetition_caps(record, by_id, nums, phase.total_samples, max_epochs, cap_repetition,
                                                block, global_batch_size)
    if record is not None:
        total = phase.total_samples
        drawn = drawn_samples(record, 0.0, float(total))
        weights = {sid: d / total for sid, d in drawn.items() if d > 0}  # the phase's average share
    else:
        weights = resolve_weights(spec, shards, registry)
    rows = []
    for s in shards:
        w = weights.get(s.id, 0.0)
        served = s.index.num_samples(block) * block
        row = {
            "shard": s.id, "type": s.type, "weight": w, "tokens": s.num_tokens,
            "samples": s.index.num_samples(block), "unserved_tokens": s.num_tokens - served,
        }
        if record is not None:  # what the phase draws, in samples of `block` tokens, as the loader counts
            d = drawn.get(s.id, 0.0)
            row["budget_tokens"] = d * (block - 1)  # trained on, as the loader's `tokens` counts them
            row["budget_tokens_read"] = d * block  # + 1 per sample for the input/target shift
            row["epochs"] = d / row["samples"] if d > 0 else 0.0
        elif tokens is not None:
            row["budget_tokens"] = w * tokens
            row["epochs"] = (w * tokens / served) if served else float("inf") if w > 0 else 0.0
        rows.append(row)
    types: dict[str, float] = {}
    for r in rows:
        types[r["type"]] = types.get(r["type"], 0.0) + r["weight"]
    rep = {"data_path": str(data_path), "mix": describe_schedule(points) or spec.describe(), "block_size": block,
           "budget_tokens": tokens, "shards": rows, "types": types, "repetition_cap": cap_log}
    if points:
        rep["phase"] = phase.as_dict()
        rep["segments"] = schedule_segments(record, phase, {sid: by_id[sid].index.num_samples(block) for sid in record["weights"][0]}, block)
    return rep


def schedule_segments(record: dict, phase: Phase, num_samples: dict[str, int], block: int) -> list[dict]:
    """Per segment between schedule points (within the phase): each shard's weight at both ends,
    samples, tokens and epochs drawn in the segment, and epochs drawn by its end."""
    total, gbs = phase.total_samples, phase.global_batch_size
    cuts = sorted({0.0, float(total), *(min(max(x, 0.0), float(total)) for x in record["knots"])})
    out, done = [], {sid: 0.0 for sid in record["weights"][0]}
    for a, b in zip(cuts, cuts[1:]):
        if b <= a:
            continue
        drawn = drawn_samples(record, a, b)
        w0, w1 = schedule_weights_at(record, a), schedule_weights_at(record, b - 1e-9 * max(1.0, b))
        shards = {}
        for sid, d in drawn.items():
            done[sid] += d
            shards[sid] = {"weight_start": w0[sid], "weight_end": w1[sid], "samples": d, "tokens": d * (block - 1), "tokens_read": d * block,
                           "epochs": d / num_samples[sid], "epochs_total": done[sid] / num_samples[sid]}
        out.append({"start_step": phase.start_step + a / gbs, "end_step": phase.start_step + b / gbs,
                    "start_fraction": a / total, "end_fraction": b / total, "shards": shards})
    return out


def _fmt_tokens(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def inspect_mix(
    data_path: Path,
    mix_weights_str: str | None = None,
    literal_weights_str: str | None = None,
    mix_config_path: Path | None = None,
    proportional_sampling: bool = False,
    extra_shard_types: dict[str, str] | None = None,
    tokens: int | None = None,
    max_seq_length: int = 2048,
    mix_schedule: list[dict] | None = None,
    max_epochs: float | dict[str, float] | None = None,
    cap_repetition: bool = False,
    global_batch_size: int = 1,
    start_step: int = 0,
    json: bool = False,
) -> None:
    """Print each shard's resolved weight, token count and the epochs a token budget would take.

    Args:
        data_path: folder of shard folders.
        mix_weights_str: per-type weights, e.g. "main:0.8,math:0.2".
        literal_weights_str: exact shard weights, e.g. "main/1:0.8,m1:0.2".
        mix_config_path: the paper's JSON mix file.
        proportional_sampling: weight shards by token count (type weights multiply).
        extra_shard_types: more types {name: prefix}.
        tokens: a training budget in tokens; adds budget tokens and epochs per shard.
        max_seq_length: sequence length of training (samples are max_seq_length + 1 tokens).
        mix_schedule: schedule points (as in the data config), e.g.
            '[{"at_fraction": 0.1, "mix_weights_str": "main:0.5,math:0.5"}, {"at_fraction": 0.5, "mix_weights_str": "main:0.2,math:0.8", "ramp": "linear"}]'.
        max_epochs: the most epochs the phase may draw per shard: a number, or {shard or type: epochs}.
        cap_repetition: cap shards over max_epochs and renormalise instead of refusing.
        global_batch_size: samples per optimizer step (places at_step points; a step is
            global_batch_size x max_seq_length tokens of the budget).
        start_step: the optimizer step the phase starts at.
        json: print JSON instead of a table.
    """
    if max_seq_length < 1 or (tokens is not None and tokens < 1):
        raise ValueError(f"max_seq_length={max_seq_length} and tokens={tokens} must be >= 1 (tokens: or null)")
    rep = mix_report(data_path, mix_weights_str, literal_weights_str, mix_config_path, proportional_sampling,
                     extra_shard_types, tokens, max_seq_length, mix_schedule, max_epochs, cap_repetition,
                     global_batch_size, start_step)
    if json:
        print(_json.dumps(rep, indent=2))
        return
    print(f"data_path: {rep['data_path']}\nmix: {rep['mix']}\nsample: {rep['block_size']} tokens")
    head = f"{'shard':<10} {'type':<9} {'weight':>8} {'tokens':>9} {'samples':>9} {'unserved':>9}"
    if tokens is not None:
        head += f" {'budget':>9} {'epochs':>7}"
    print(head)
    print("-" * len(head))
    for r in rep["shards"]:
        line = (f"{r['shard']:<10} {r['type']:<9} {r['weight']:>8.4f} {_fmt_tokens(r['tokens']):>9} "
                f"{r['samples']:>9} {_fmt_tokens(r['unserved_tokens']):>9}")
        if tokens is not None:
            line += f" {_fmt_tokens(r['budget_tokens']):>9} {r['epochs']:>7.2f}"
        print(line)
    print("types: " + ", ".join(f"{t}={w:.4f}" for t, w in rep["types"].items() if w > 0))
    for line in rep["repetition_cap"]:
        print(line)
    if rep.get("segments"):
        ph = rep["phase"]
        print(f"schedule over steps {ph['start_step']} -> {ph['stop_step']} ({ph['global_batch_size']} samples/step); "
              "weight at segment start -> end, drawn in the segment, epochs by its end:")
        for seg in rep["segments"]:
            print(f"  steps {seg['start_step']:.0f}-{seg['end_step']:.0f} "
                  f"({seg['start_fraction']:.0%}-{seg['end_fraction']:.0%} of the phase)")
            for sid, r in seg["shards"].items():
                w = (f"{r['weight_start']:.4f}" if abs(r["weight_end"] - r["weight_start"]) < 5e-5
                     else f"{r['weight_start']:.4f}->{r['weight_end']:.4f}")
                print(f"    {sid:<10} weight {w:<15} tokens {_fmt_tokens(r['tokens']):>9} "
                      f"epochs {r['epochs']:>7.3f} (total {r['epochs_total']:.3f})")
    if tokens is not None:
        over = [r["shard"] for r in rep["shards"] if r["weight"] > 0 and r["epochs"] > 1]
        if over:
            print(f"note: the budget repeats {', '.join(over)} (more than one epoch)")
