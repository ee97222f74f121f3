"""`litgpt-ext inspect-mix`: what a mix means before you spend GPU hours on it."""

from __future__ import annotations

import json as _json
from pathlib import Path

from litgpt_ext.data.mixing import mix_spec, resolve_weights
from litgpt_ext.data.shard_types import build_registry, discover_shards


def mix_report(
    data_path: Path,
    mix_weights_str: str | None = None,
    literal_weights_str: str | None = None,
    mix_config_path: Path | None = None,
    proportional_sampling: bool = False,
    extra_shard_types: dict[str, str] | None = None,
    tokens: int | None = None,
    max_seq_length: int = 2048,
) -> dict:
    """Resolved weights, sizes and epochs-per-budget for every discovered shard (pure data)."""
    registry = build_registry(extra_shard_types)
    spec = mix_spec(mix_weights_str, literal_weights_str, mix_config_path, proportional_sampling)
    shards = discover_shards(data_path, registry)
    weights = resolve_weights(spec, shards, registry)
    block = max_seq_length + 1
    rows = []
    for s in shards:
        w = weights.get(s.id, 0.0)
        served = s.index.num_samples(block) * block
        row = {
            "shard": s.id, "type": s.type, "weight": w, "tokens": s.num_tokens,
            "samples": s.index.num_samples(block), "unserved_tokens": s.num_tokens - served,
        }
        if tokens is not None:
            row["budget_tokens"] = w * tokens
            row["epochs"] = (w * tokens / served) if served else float("inf") if w > 0 else 0.0
        rows.append(row)
    types: dict[str, float] = {}
    for r in rows:
        types[r["type"]] = types.get(r["type"], 0.0) + r["weight"]
    return {"data_path": str(data_path), "mix": spec.describe(), "block_size": block, "budget_tokens": tokens,
            "shards": rows, "types": types}


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
        json: print JSON instead of a table.
    """
    if max_seq_length < 1 or (tokens is not None and tokens < 1):
        raise ValueError(f"max_seq_length={max_seq_length} and tokens={tokens} must be >= 1 (tokens: or null)")
    rep = mix_report(data_path, mix_weights_str, literal_weights_str, mix_config_path, proportional_sampling,
                     extra_shard_types, tokens, max_seq_length)
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
    if tokens is not None:
        over = [r["shard"] for r in rep["shards"] if r["weight"] > 0 and r["epochs"] > 1]
        if over:
            print(f"note: the budget repeats {', '.join(over)} (more than one epoch)")
