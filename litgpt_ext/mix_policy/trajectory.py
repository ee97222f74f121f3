"""`mix_trajectory.jsonl` (what an online mixing policy chose, when, and from which signals) and
`litgpt-ext mix-replay`, which turns it into a static `mix_schedule` that draws the same samples.

The file's first line is a header (`kind: header`): the policy, the phase, the arms and the data
the run drew from (data_path, seed, sample size, each shard's samples). Each further line is one
point of the blend's schedule: the step it holds from, the arm and shard weights, and the signals
(per-arm mean loss or excess loss, tokens) that chose it. The checkpoint holds the same history, so
a resumed run rewrites the file to its checkpoint's step: the file never keeps an abandoned future.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

TRAJECTORY = "mix_trajectory.jsonl"
VERSION = 1


def write_trajectory(path: Path, header: Mapping[str, Any], lines: list[Mapping[str, Any]]) -> None:
    """The whole file, atomically (tmp + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for rec in [header, *lines]:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
    os.replace(tmp, path)


def append_line(path: Path, line: Mapping[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(line, sort_keys=True) + "\n")


def read_trajectory(path: Path) -> tuple[dict, list[dict]]:
    """(header, points) of a trajectory file; a file that is not one is a ValueError naming it."""
    path = Path(path)
    if path.is_dir():
        path = path / TRAJECTORY
    if not path.is_file():
        raise FileNotFoundError(f"trajectory {str(path)!r} does not exist (an online mixing run writes"
                                f" <out_dir>/{TRAJECTORY})")
    rows = []
    for k, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{k}: not a JSON line ({e.msg})") from None
    if not rows or rows[0].get("kind") != "header":
        raise ValueError(f"{path} has no header line (kind: header): not a {TRAJECTORY} written by litgpt-ext")
    if rows[0].get("version") != VERSION:
        raise ValueError(f"{path}: trajectory version {rows[0].get('version')!r}; this litgpt-ext reads {VERSION}")
    points = rows[1:]
    if not points:
        raise ValueError(f"{path} holds a header but no point")
    return rows[0], points


def schedule_points(points: list[Mapping[str, Any]]) -> list[dict]:
    """The trajectory's points as `mix_schedule` entries (exact floats: YAML writes them with repr)."""
    return [{"at_step": int(p["step"]), "literal_weights": dict(p["weights"])} for p in points]


def origin_of(header: Mapping[str, Any], path: Optional[Path] = None) -> dict:
    """What a replay must match: the phase, data seed, sample size and shards of the recorded run."""
    d = header["data"]
    out = {"phase": dict(header["phase"]), "seed": d["seed"], "block_size": d["block_size"],
           "world_size": d["world_size"], "shards": dict(d["shards"])}
    if path is not None:
        out["trajectory"] = str(path)
    return out


def replay_config(header: Mapping[str, Any], points: list[Mapping[str, Any]], path: Path, out_dir: str) -> dict:
    """The recorded run's config with its policy replaced by the static schedule it chose."""
    cfg = copy.deepcopy(header.get("config") or {})
    if not cfg:
        raise ValueError(f"{path}: the header records no run config; give --online_config (the online run's YAML)")
    cfg.pop("mix_policy", None)
    init = cfg.setdefault("data", {}).setdefault("init_args", {})
    for key in ("mix_weights_str", "literal_weights_str", "mix_config_path"):
        init.pop(key, None)
    init["mix_schedule"] = schedule_points(points)
    init["mix_schedule_lookahead"] = False
    init["mix_schedule_origin"] = origin_of(header, path)
    cfg["out_dir"] = out_dir
    return cfg


def _config_diffs(header: Mapping[str, Any], cfg: Mapping[str, Any]) -> list[str]:
    rec = header.get("config") or {}
    out = []
    for dotted in ("train.global_batch_size", "train.max_seq_length", "data.init_args.data_path",
                   "data.init_args.seed", "fork_from", "initial_checkpoint_dir"):
        a, b = rec, cfg
        for k in dotted.split("."):
            a = a.get(k) if isinstance(a, Mapping) else None
            b = b.get(k) if isinstance(b, Mapping) else None
        if b is not None and a is not None and str(a) != str(b):
            out.append(f"{dotted}: trajectory {a!r}, config {b!r}")
    return out


def mix_replay(trajectory: Path, out: Path, out_dir: str, online_config: Optional[Path] = None) -> dict:
    """Turn an online mixing run's trajectory into a static run that draws the same samples in the same order.

    Args:
        trajectory: `<run>/mix_trajectory.jsonl` (or the run folder).
        out: the YAML to write: the recorded run's config with `mix_policy` removed and the chosen
            weights as `data.init_args.mix_schedule` (+ `mix_schedule_lookahead: false` and the
            recorded run's origin, checked when the replay starts).
        out_dir: the replay's out_dir (not the online run's: the replay would resume it).
        online_config: the online run's YAML to build on instead of the config the trajectory recorded;
            a config whose batch size, sequence length, data or start differ is refused.
    """
    header, points = read_trajectory(Path(trajectory))
    if online_config is not None:
        cfg = yaml.safe_load(Path(online_config).read_text()) or {}
        diffs = _config_diffs(header, cfg)
        if diffs:
            raise ValueError(f"{online_config} is not the config of the run that wrote {trajectory}: " + "; ".join(diffs))
        header = {**header, "config": cfg}
    recorded = (header.get("config") or {}).get("out_dir")
    if recorded is not None and Path(str(recorded)).resolve() == Path(out_dir).resolve():
        raise ValueError(f"--out_dir {out_dir} is the online run's own out_dir: the replay would resume it; give another")
    cfg = replay_config(header, points, Path(trajectory), out_dir)
    head = (f"# litgpt-ext mix-replay of {trajectory}: {header['policy']['type']} over {len(header['arms'])} arms,"
            f" {len(points)} points, phase steps {header['phase']['start_step']}->{header['phase']['stop_step']}\n"
            "# a static run of this config draws the online run's samples in the same order\n")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(head + yaml.safe_dump(cfg, sort_keys=False))
    print(f"Wrote {out}: {len(points)} schedule points from {trajectory}")
    return cfg
