"""`litgpt-ext reproduce`: config validation, the findings' logic on known numbers, the report."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from litgpt_ext.study.reproduce import (
    ANALYSIS,
    Arm,
    Cell,
    ReproduceConfig,
    arms_of,
    compare,
    findings,
    load_config,
    pretrain_jobs,
)

ROOT = Path(__file__).resolve().parents[1]


def _cells(values: dict) -> dict:
    """{(family, task): (sft losses, general losses)} -> cells."""
    return {k: Cell(k[0], k[1], len(v[0]), list(v[0]), list(v[1]), [1e-3]) for k, v in values.items()}


ARMS = [Arm("math_mid", "math", 66, 0.12, [42], ["math", "prose"], "mid"),
        Arm("math_cpt", "math", 184, 1.0, [42], ["math"], "cpt"),
        Arm("early_low", "math", 20, 0.1, [42], ["math"], "cross"), Arm("early_high", "math", 20, 0.5, [42], ["math"], "cross"),
        Arm("late_low", "math", 130, 0.1, [42], ["math"], "cross"), Arm("late_high", "math", 130, 0.5, [42], ["math"], "cross")]


def test_relative_improvement_and_t_test():
    cells = _cells({("base", "math"): ([2.0, 2.1, 1.9], [4.0, 4.0, 4.0]), ("math_mid", "math"): ([1.0, 1.1, 0.9], [4.1, 4.2, 4.0])})
    c = compare(cells, "math_mid", "math")
    assert c["sft"]["rel_improvement"] == pytest.approx(0.5)
    assert c["general"]["rel_improvement"] == pytest.approx(-0.025)
    assert c["sft"]["p"] < 0.01  # well separated, 3 vs 3
    assert compare(cells, "math_mid", "code") is None


def test_findings_follow_the_numbers_both_ways():
    good = _cells({
        ("base", "math"): ([2.0, 2.0], [4.0, 4.0]), ("base", "prose"): ([3.0, 3.0], [4.0, 4.0]),
        ("math_mid", "math"): ([1.5, 1.5], [4.05, 4.05]), ("math_mid", "prose"): ([2.99, 2.99], [4.05, 4.05]),
        ("math_cpt", "math"): ([1.6, 1.6], [4.3, 4.3]),
        ("early_low", "math"): ([1.8, 1.8], [4.0, 4.0]), ("early_high", "math"): ([1.6, 1.6], [4.1, 4.1]),
        ("late_low", "math"): ([1.8, 1.8], [4.0, 4.0]), ("late_high", "math"): ([1.9, 1.9], [4.2, 4.2]),
    })
    f = {x["id"]: x for x in findings(good, ARMS, ANALYSIS)}
    assert f["F1"]["holds"] and f["F1"]["numbers"]["far_mean"] == pytest.approx(0.25)
    assert f["F2"]["holds"]
    assert f["F4"]["holds"] and f["F4"]["numbers"]["high_minus_low_late"] == pytest.approx(-0.05)
    # the report's sentences carry the numbers (and say what was not significant)
    assert "mean +25.00%" in f["F1"]["summary"] and "math_mid/prose +0.33%" in f["F1"]["summary"]
    assert "SFT loss math_mid 1.5000 vs math_cpt 1.6000" in f["F2"]["summary"]
    assert "(high − low -5.00%)" in f["F4"]["summary"]
    bad = dict(good)
    bad[("math_cpt", "math")] = Cell("math_cpt", "math", 2, [1.4, 1.4], [4.3, 4.3], [1e-3])  # CPT better in-domain
    bad[("late_high", "math")] = Cell("late_high", "math", 2, [1.7, 1.7], [4.2, 4.2], [1e-3])  # high weight fine late
    f = {x["id"]: x for x in findings(bad, ARMS, ANALYSIS)}
    assert not f["F2"]["holds"] and not f["F4"]["holds"]


def test_f4_takes_a_mid_arm_as_the_missing_cell_it_lies_on():
    """The CPU preset's F4 grid: cross arms at (66, high), (130, low), (130, high); math_mid at (66, low) is the
    fourth cell. A mid arm off the cross arms' starts x weights is not taken."""
    arms = [Arm("math_mid", "math", 66, 0.1, [42], ["math"], "mid"), Arm("early_high", "math", 66, 0.5, [42], ["math"], "cross"),
            Arm("late_low", "math", 130, 0.1, [42], ["math"], "cross"), Arm("late_high", "math", 130, 0.5, [42], ["math"], "cross"),
            Arm("other_mid", "math", 20, 0.1, [42], ["math"], "mid")]
    cells = _cells({("base", "math"): ([2.0, 2.0], [4.0, 4.0]), ("math_mid", "math"): ([1.8, 1.8], [4.0, 4.0]),
                    ("early_high", "math"): ([1.6, 1.6], [4.1, 4.1]), ("late_low", "math"): ([1.8, 1.8], [4.0, 4.0]),
                    ("late_high", "math"): ([1.9, 1.9], [4.2, 4.2]), ("other_mid", "math"): ([1.0, 1.0], [4.0, 4.0])})
    f4 = next(x for x in findings(cells, arms, ANALYSIS) if x["id"] == "F4")
    assert f4["numbers"]["table"] == {"start 66 / weight 0.1": pytest.approx(0.1), "start 66 / weight 0.5": pytest.approx(0.2),
                                      "start 130 / weight 0.1": pytest.approx(0.1), "start 130 / weight 0.5": pytest.approx(0.05)}
    assert f4["numbers"]["high_minus_low_early"] == pytest.approx(0.1) and f4["holds"]


def test_config_and_arms_are_validated(tmp_path):
    cfg = load_config(ROOT / "midtrain_configs" / "reproduce" / "cpu.yaml")
    arms = arms_of(cfg)
    assert {a.role for a in arms} == {"mid", "cpt", "cross"} and all(a.seeds for a in arms)
    jobs = pretrain_jobs(cfg, arms)
    names = [j.name for j in jobs]
    assert names[:5] == ["base_seed42_to20", "base_seed42_to66", "base_seed42_to132", "base_seed42_to184", "base_seed42"]
    # every arm under every pretraining seed: 3 base runs split at the 4 fork steps, 7 arms x 3 seeds
    assert len(names) == 3 * 5 + 7 * 3 and all(f"{a.name}_seed44" in names for a in arms)
    assert cfg.workers == 2 and cfg.sft_lr_sweep == "per_arm" and all(len(v) == 3 for v in cfg.sft_lrs.values())
    mid = next(j for j in jobs if j.name == "math_mid_seed42")
    assert mid.config["fork_from"].endswith("base_seed42/step-00000066")
    assert mid.config["data"]["init_args"]["mix_weights_str"] == "main:0.88,math:0.12"
    assert mid.depends == ["base_seed42_to66"]
    base = jobs[4].config
    assert base["train"]["max_iters"] == 200 and base["train"]["save_interval"] == 80  # no extra checkpoints
    with pytest.raises(ValueError, match="unknown keys"):
        arms_of(ReproduceConfig(arms=[{"name": "x", "domain": "math", "start": 1, "weight": 0.1, "colour": 1}]))
    with pytest.raises(ValueError, match="domain 'prose' has no SFT task"):
        arms_of(ReproduceConfig(arms=[{"name": "x", "domain": "prose", "start": 1, "weight": 0.1}]))
    with pytest.raises(ValueError, match=r"seeds \[7\] are not pretraining seeds"):
        arms_of(ReproduceConfig(arms=[{"name": "x", "domain": "math", "start": 1, "weight": 0.1, "seeds": [7]}]))
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"sft_seeds": [1]}))
    with pytest.raises(ValueError, match="sft_seeds needs >= 2"):
        load_config(p)


def test_pearson_p_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    from litgpt_ext.study.similarity import pearson

    x, y = [0.1, 0.3, 0.2, 0.5, 0.4, 0.9], [1.0, 0.8, 1.5, 2.0, 1.1, 2.2]
    got, ref = pearson(x, y), scipy_stats.pearsonr(x, y)
    assert got["r"] == pytest.approx(ref[0]) and got["p"] == pytest.approx(ref[1], rel=1e-6)
    assert pearson([1, 2], [1, 2])["p"] is None  # 2 points: no test


def test_stage_times_add_up_over_invocations(tmp_path):
    from litgpt_ext.study.reproduce import _timed, stage_minutes

    for stage in ("pretrain", "sft", "pretrain"):  # e.g. a study resumed after its first invocation died
        with _timed(tmp_path, stage, "x"):
            pass
    (tmp_path / "timings.jsonl").write_text((tmp_path / "timings.jsonl").read_text()
                                           + '{"stage": "sft", "what": "y", "seconds": 90}\n')
    got = stage_minutes(tmp_path)
    assert list(got) == ["pretrain", "sft"] and got["sft"] == pytest.approx(1.5, abs=0.01)
    assert stage_minutes(tmp_path / "none") == {}


@pytest.mark.slow
def test_reproduce_end_to_end_on_a_tiny_corpus(tmp_path, capsys):
    """The whole study as `make reproduce` runs it (demo corpus, SFT tasks, split base runs, forks, the SFT
    LR pick, similarity, REPORT.md; 2 worker processes), shrunk to seconds; a second invocation finds
    every output and redoes nothing."""
    import json

    from litgpt_ext.demo.corpus import build_demo
    from litgpt_ext.study.reproduce import reproduce

    demo = tmp_path / "demo"
    build_demo(demo, vocab_size=1000, main_tokens=30_000, code_tokens=12_000, math_tokens=12_000, heldout_docs=40,
               tokenizer_sample_chars=150_000, chunk_tokens=4096, val_fraction=0.1, seed=5)
    pre = yaml.safe_load((ROOT / "midtrain_configs" / "reproduce" / "pretrain_cpu.yaml").read_text())
    pre["model_config"].update(n_layer=1, n_head=2, n_embd=16, vocab_size=1000, padded_vocab_size=1000)
    pre["train"].update(global_batch_size=4, micro_batch_size=4, log_interval=4)
    pre["eval"].update(interval=100, max_iters=2)
    sft = yaml.safe_load((ROOT / "midtrain_configs" / "reproduce" / "sft_cpu.yaml").read_text())
    sft["train"].update(global_batch_size=8, micro_batch_size=8)
    sft["eval"]["max_iters"] = 2
    (tmp_path / "pre.yaml").write_text(yaml.safe_dump(pre))
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(sft))
    out = tmp_path / "study"
    kw = dict(out_dir=out, demo_dir=demo, pretrain_config=tmp_path / "pre.yaml", sft_config=tmp_path / "sft.yaml",
              total_steps=12, pretrain_seeds=(42,), base_tasks=("math", "prose"), sft_lrs=(1e-3, 3e-3), sft_seeds=(1, 2),
              arms=[{"name": "math_mid", "domain": "math", "start": 4, "weight": 0.25, "role": "mid"},
                    {"name": "math_cpt", "domain": "math", "start": 10, "weight": 1.0, "role": "cpt", "tasks": ["math"]}],
              similarity_docs=20, sft_task_args={"math_examples": 200}, workers=2, threads=1, general_before=True)
    res = reproduce(**kw)
    # every run ended at the shared total: the base run split at its fork steps, the arms forked from them
    runs = out / "runs"
    for name in ("base_seed42", "math_mid_seed42", "math_cpt_seed42"):
        state = json.loads((runs / name / "final" / "manifest.json").read_text())
        assert state["step"] == 12, name
    assert json.loads((runs / "math_mid_seed42" / "forked_from.json").read_text())["source"].endswith("step-00000004")
    # SFT: 2 LRs with seed 1, then seed 2 at the chosen LR, per (checkpoint, task): 5 pairs x 3 runs
    metrics = sorted(out.glob("sft/*/*/*/sft_metrics.json"))
    assert len(metrics) == 15
    for task, source in (("math", "base_seed42"), ("prose", "math_mid_seed42")):
        first = {lr: json.loads((out / "sft" / task / source / f"lr{lr}_seed1" / "sft_metrics.json").read_text())["sft_val_loss"]
                 for lr in ("0.001", "0.003")}
        assert first["0.001"] != first["0.003"]  # the runs trained (several steps, not one warmup step)
        best = min(first, key=first.get)
        assert (out / "sft" / task / source / f"lr{best}_seed2" / "sft_metrics.json").is_file()
    report = (out / "REPORT.md").read_text()
    results = json.loads((out / "results.json").read_text())
    assert set(results["cells"]) == {"base|math", "base|prose", "math_mid|math", "math_mid|prose", "math_cpt|math"}
    assert {f["id"] for f in results["findings"]} >= {"F1", "F2"}
    for line in ("### F1:", "### F2:", "### F4", "Not measured: the study lacks the arms", "## Versions"):
        assert line in report, line
    assert "**Verdict: " in report and "Mixed-effects models" in report and "The paper's test, for comparison" in report
    assert results["cells"]["math_mid|math"]["pseeds"] == [42, 42]  # the unit of replication, per run
    # the first cell of each (checkpoint, task) validated before SFT: the checkpoint's general loss before SFT
    before = results["cells"]["math_mid|math"]["general_before"]
    assert len(before) == 2 and before[0] == before[1] and before[0] != results["cells"]["base|math"]["general_before"][0]
    # the representation stage: base vs arm before and after SFT, and each vs its SFT'd self
    assert "## Representations" in report and "| base vs math_mid |" in report and "| math_mid vs math_mid_sft_math |" in report
    cka = json.loads((out / "representations" / "cka.json").read_text())
    assert all(0 <= v <= 1 + 1e-6 for c in cka["cka"].values() for v in c["per_layer"].values())
    for fig in ("sft_losses.png", "similarity/similarity_heatmap.png", "representations/cka_heatmap.png"):
        assert (out / fig).stat().st_size > 1000, fig
    assert res["minutes"] > 0 and (out / "timings.jsonl").is_file()
    # a second invocation: every stage's output exists, nothing runs again, the findings are the same
    capsys.readouterr()
    before = (out / "timings.jsonl").read_text()
    reproduce(**kw)
    printed = capsys.readouterr().out
    assert "[reproduce 1/" not in printed and (out / "timings.jsonl").read_text() == before
    assert json.loads((out / "results.json").read_text())["findings"] == results["findings"]
