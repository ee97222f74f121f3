"""`reproduce --replicates`: disjoint seed sets, arms remapped by position, the stability table."""

from __future__ import annotations

import json

import pytest

from litgpt_ext.study.replicates import remap_arms, seed_sets, write_stability
from litgpt_ext.study.reproduce import Arm, ReproduceConfig, validate_config


def test_seed_sets_are_disjoint_and_shaped_like_pretrain_seeds():
    assert seed_sets([42, 43], 1) == [[42, 43]]
    assert seed_sets([42, 43], 3) == [[42, 43], [1042, 1043], [2042, 2043]]
    assert seed_sets([42, 43], [[1, 2], [3, 4]]) == [[1, 2], [3, 4]]
    for bad, match in ((0, "must be >= 1"), ([[1, 2], [2, 3]], "seed 2 is in set 0 and set 1"),
                       ([[1, 2, 3]], r"each seed set is 2 integer seeds"), ("two", "a count")):
        with pytest.raises(ValueError, match=match):
            seed_sets([42, 43], bad)


def test_arms_keep_their_seed_positions_and_config_is_checked(tmp_path):
    arms = [Arm("mid", "math", 66, 0.12, [42, 43], ["math"], "mid"), Arm("cpt", "math", 184, 1.0, [42], ["math"], "cpt")]
    out = remap_arms(arms, [42, 43], [1042, 1043])
    assert [a.seeds for a in out] == [[1042, 1043], [1042]] and [a.seeds for a in arms] == [[42, 43], [42]]
    with pytest.raises(ValueError, match="seed 5 is in set 0 and set 1"):
        validate_config(ReproduceConfig(replicates=[[5, 6], [5, 7]]))


def test_stability_table_counts_the_sets_where_a_finding_holds(tmp_path):
    def result(verdict: str, point: float) -> dict:
        eff = {"F2: math SFT loss, cpt − mid": {"point": point, "lo": point - 0.05, "hi": point + 0.05, "verdict": verdict}}
        return {"findings": [{"id": "F2", "verdict": verdict, "effects": eff}]}

    paths = []
    for k, (v, p) in enumerate((("holds", 0.1), ("direction only", 0.03), ("holds", 0.2))):
        paths.append(tmp_path / f"r{k}.json")
        paths[-1].write_text(json.dumps(result(v, p)))
    md = write_stability(tmp_path, [[1], [2], [3]], paths).read_text()
    assert "| F2 | holds | direction only | holds | 2 of 3 |" in md
    assert "| F1 | not measured | not measured | not measured | 0 of 3 |" in md
    assert "| 1 [2] | direction only | math SFT loss, cpt − mid +0.0300 [-0.0200, +0.0800] |" in md
    assert json.loads((tmp_path / "stability.json").read_text())["sets"] == [[1], [2], [3]]
