"""Seconds from start to the error for a bad `--config`: early check (validate_first) vs the late path.

Each case runs `python -m litgpt_ext <command> --config <bad.yaml>` as a fresh process and times it
to exit; the same command with LITGPT_EXT_SKIP_EARLY_CHECK=1 is the late path (what the CLI did
before: jsonargparse after importing torch/lightning, or the command after building the model);
`litgpt-ext --help` is the baseline (interpreter start + our CLI module). Cases and contenders are
interleaved; the median of `--repeats` is kept. Every case must fail (exit 1 or 2) with one line
that names the culprit, in both paths.

    PYTHONPATH=. python benchmarks/bad_config_latency.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (argv, a substring the error must contain)."""
    base = yaml.safe_load((ROOT / "midtrain_configs/pretrain/tiny_cpu.yaml").read_text())
    tok = tmp / "tok"  # a real folder for the cases that fail on another key
    tok.mkdir()
    unknown = dict(base, tokenizer_dir=str(tok), mix_weights_str="main:1.0")
    precision = dict(base, precision="bf16")
    out = {}
    for name, cfg in (("pretrain-unknown-key", unknown), ("pretrain-bad-precision", precision)):
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        out[name] = (["pretrain", "--config", str(path), "--out_dir", str(tmp / "out")],
                     "mix_weights_str" if "unknown" in name else "bf16")
    out["pretrain-missing-data (tiny_cpu.yaml)"] = (
        ["pretrain", "--config", "midtrain_configs/pretrain/tiny_cpu.yaml", "--out_dir", str(tmp / "out")], "data/demo")
    out["sft-missing-checkpoint (demo_math.yaml)"] = (
        ["sft", "--config", "midtrain_configs/sft/demo_math.yaml", "--out_dir", str(tmp / "out")], "runs/demo")
    return out


def timed(argv: list[str], early: bool, cwd: Path) -> tuple[float, int, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("LITGPT_EXT_TRACEBACK", None)
    if not early:
        env["LITGPT_EXT_SKIP_EARLY_CHECK"] = "1"
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "litgpt_ext", *argv], cwd=cwd, env=env, capture_output=True, text=True)
    return time.perf_counter() - t0, p.returncode, p.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        table = cases(tmp)
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.repeats):
            times.setdefault(("--help", "baseline"), []).append(timed(["--help"], True, ROOT)[0])
            for name, (argv, needle) in table.items():
                for early in (True, False):
                    dt, rc, err = timed(argv, early, ROOT)
                    label = "early" if early else "late"
                    if rc not in (1, 2) or needle not in err or "Traceback" in err:
                        raise SystemExit(f"{name} ({label}): rc={rc}, expected one line naming {needle!r}:\n{err[-2000:]}")
                    times.setdefault((name, label), []).append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med[("--help", "baseline")]
    print(f"litgpt-ext --help (baseline): {base:.2f} s  (median of {args.repeats}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f})")
    print(f"{'bad config':<42} {'early s':>8} {'late s':>8} {'early/--help':>13} {'late/early':>11}")
    for name in table:
        e, late = med[(name, "early")], med[(name, "late")]
        print(f"{name:<42} {e:>8.2f} {late:>8.2f} {e / base:>12.2f}x {late / e:>10.1f}x")


if __name__ == "__main__":
    main()
