"""Coverage of the study report's 95% intervals (litgpt_ext/study/evidence.py) on synthetic studies.

Each synthetic study has a base and an arm on one task: k pretraining seeds x 3 SFT seeds, a seed
offset (sd 0.1) shared by a seed's SFT runs, SFT noise (sd 0.03), and a known true gain (0 or 0.3).
For each k, the fraction of studies whose interval covers the true gain, with and without the
small-sample widening (`evidence.small_sample_factor`), and how often the verdict is `holds`.

    python benchmarks/bootstrap_coverage.py [--studies 200] [--boot 300]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from litgpt_ext.study import evidence  # noqa: E402
from litgpt_ext.study.evidence import Cell, bootstrap, verdict  # noqa: E402


def study(rng: random.Random, effect: float, k: int) -> dict:
    out = {}
    for fam, shift in (("base", 0.0), ("arm", -effect)):
        sft, ps = [], []
        for s in range(k):
            off = rng.gauss(0, 0.1)
            for _ in range(3):
                sft.append(2.0 + shift + off + rng.gauss(0, 0.03))
                ps.append(s)
        out[(fam, "t")] = Cell(fam, "t", len(sft), sft, list(sft), [1e-3], ps)
    return out


def gain(c: dict) -> dict:
    return {"gain": c[("base", "t")].sft_mean - c[("arm", "t")].sft_mean}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--studies", type=int, default=200)
    ap.add_argument("--boot", type=int, default=300)
    a = ap.parse_args()
    print("| pretraining seeds | true gain | coverage, percentile | coverage, widened | holds (widened) |")
    print("|---:|---:|---:|---:|---:|")
    for k in (3, 6):
        for effect in (0.0, 0.3):
            row = []
            for widen in (False, True):
                rng = random.Random(5)
                cov = holds = 0
                patch = mock.patch.object(evidence, "small_sample_factor", lambda _k: 1.0) if not widen else mock.MagicMock()
                with patch:
                    for _ in range(a.studies):
                        b = bootstrap(study(rng, effect, k), gain, n=a.boot, seed=rng.randrange(10**6))["gain"]
                        cov += b["lo"] <= effect <= b["hi"]
                        holds += verdict(b["point"], b["lo"], b["hi"]) == "holds"
                row.append((cov / a.studies, holds / a.studies))
            print(f"| {k} | {effect} | {row[0][0]:.1%} | {row[1][0]:.1%} | {row[1][1]:.1%} |")


if __name__ == "__main__":
    main()
