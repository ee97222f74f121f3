"""The study's analysis, shared by `litgpt-ext reproduce` (CPU scale) and `litgpt-ext sweep --action report`
(a cluster sweep): per arm and SFT task the SFT validation loss and the general loss after SFT (mean ± std
over seeds at the chosen LR), relative improvement over the base run with Welch's t-test, the four
findings F1-F4 as measured (never asserted in advance), PNG figures, and REPORT.md.

A study maps onto the findings through `Analysis`: which SFT task measures each midtraining domain
(the CPU study: code -> code, math -> math; the paper: code -> pycode, math -> gsm8k, ...), which
domains count as far from general text, and optionally a near-domain task that the far arms are also
fine-tuned on (the CPU study's prose).
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from litgpt_ext.study import evidence
from litgpt_ext.study.evidence import Cell
from litgpt_ext.study.figures import study_figures
from litgpt_ext.study.spec import Arm, mix_string, split_run_name

if TYPE_CHECKING:
    from litgpt_ext.sft.metrics import SFTMetrics

__all__ = ["Arm", "Analysis", "Cell", "cells_of", "general_before_of", "compare", "findings", "cross_grid", "write_report"]


@dataclass
class Analysis:
    """How a study's arms and SFT tasks map onto the paper's findings."""

    task_of: dict[str, str]
    """Midtraining domain -> the SFT task that measures it (F1's and F2's in-domain task)"""
    near_task: Optional[str] = None
    """A near-domain task the far arms are also fine-tuned on (the CPU study: prose); F1's near points"""
    far_domains: Optional[list[str]] = None
    """Domains far from general text (F1); None: every mid arm's domain. Mid arms of other domains
    give F1 near points on their own task (the paper: FLAN, KnowledgeQA)"""


def cells_of(best: dict[tuple[str, str], list["SFTMetrics"]],
             before: Optional[dict[str, float]] = None) -> dict[tuple[str, str], Cell]:
    """{(arm family, task): the SFT runs at the chosen LR (`SFTMetrics`, all seeds)} -> their `Cell`s, each
    run's pretraining seed read from its source run's name (`<family>_seed<N>`). A run's general loss
    before SFT is its own initial validation's, else `before[its source checkpoint]` (`general_before_of`:
    one run per checkpoint validating before its first step is enough)."""
    def pseed(m) -> int:
        try:
            return split_run_name(m.source_run)[1]
        except ValueError:  # a source that is not a study run (a converted model): one seed
            return 0

    def general_before(v) -> Optional[list[float]]:
        xs = [((m.initial or {}).get("val_losses") or {}).get("general") for m in v]
        xs = [x if x is not None else (before or {}).get(m.source_checkpoint) for x, m in zip(xs, v)]
        return None if any(x is None for x in xs) else xs

    return {k: Cell(k[0], k[1], len(v), [m.sft_val_loss for m in v], [m.val_losses["general"] for m in v],
                    sorted({m.lr for m in v}), [pseed(m) for m in v], general_before(v)) for k, v in best.items()}


def general_before_of(metrics: list["SFTMetrics"]) -> dict[str, float]:
    """{source checkpoint: its general val loss before SFT}, from the runs that validated before training."""
    out: dict[str, float] = {}
    for m in metrics:
        g = ((m.initial or {}).get("val_losses") or {}).get("general") if m is not None else None
        if g is not None:
            out.setdefault(m.source_checkpoint, g)
    return out


def _ms(xs: list[float]) -> str:
    from litgpt_ext.sft.grid import mean_std

    m, s = mean_std(xs)
    return f"{m:.4f} ± {s:.4f}" if s is not None else f"{m:.4f}"


def compare(cells: dict, family: str, task: str, ref: str = "base") -> Optional[dict]:
    """Relative improvement (L_ref - L) / L_ref of SFT loss and of general loss after SFT, Welch t-tests."""
    from litgpt_ext.sft.grid import welch_t

    a, b = cells.get((ref, task)), cells.get((family, task))
    if a is None or b is None:
        return None
    out = {"family": family, "task": task, "ref": ref}
    for what, xa, xb in (("sft", a.sft, b.sft), ("general", a.general, b.general)):
        la, lb = sum(xa) / len(xa), sum(xb) / len(xb)
        t, _, p = welch_t(xa, xb) if len(xa) >= 2 and len(xb) >= 2 else (None, None, None)
        out[what] = {"ref": la, "arm": lb, "rel_improvement": (la - lb) / la, "t": t, "p": p}
    return out


F3_MEASURE = "unigram_js"
"""The PA measure F3 is stated in: its sentence, its bootstrap interval and verdict, its mixed model"""
F3_EFFECT = "F3: Pearson r, PA vs gain"

ALPHA = 0.05
"""Significance level the report's sentences use (the verdicts follow the direction of the means)."""


def _pct(x: float) -> str:
    return f"{100 * x:+.2f}%"


def _p(p: Optional[float]) -> str:
    return "p n/a" if p is None else f"p = {p:.3g}"


def _sig(ps: list[Optional[float]]) -> str:
    """How many of the tests behind a finding are significant at ALPHA."""
    known = [p for p in ps if p is not None]
    if not known:
        return "no test could be run (scipy missing or < 2 runs per cell)"
    k = sum(p < ALPHA for p in known)
    return f"{k} of {len(known)} test{'s' if len(known) > 1 else ''} behind it significant at p < {ALPHA}"


def cross_grid(cells: dict, arms: list[Arm], analysis: Analysis) -> Optional[tuple[str, list[Arm], dict[tuple[int, float], float]]]:
    """F4's grid: (domain, its cross arms, {(start, weight): relative SFT-loss improvement over base}) for
    the domain most cross arms train on; None without cross arms. A `mid` arm of that domain fills a
    missing cell of the cross arms' starts x weights when it lies on it (the CPU preset's math_mid is
    the early, low-weight cell). The figure and the finding share it."""
    cross = [a for a in arms if a.role == "cross" and a.domain in analysis.task_of]
    if not cross:
        return None
    domain = max(sorted({a.domain for a in cross}), key=lambda d: sum(a.domain == d for a in cross))
    cross = [a for a in cross if a.domain == domain]
    starts, weights, have = {a.start for a in cross}, {a.weight for a in cross}, {(a.start, a.weight) for a in cross}
    for a in arms:
        if a.role == "mid" and a.domain == domain and a.start in starts and a.weight in weights \
                and (a.start, a.weight) not in have:
            cross.append(a)
            have.add((a.start, a.weight))
    table = {}
    for a in cross:
        c = compare(cells, a.name, analysis.task_of[domain])
        if c:
            table[(a.start, a.weight)] = c["sft"]["rel_improvement"]
    return domain, cross, table


def findings(cells: dict, arms: list[Arm], analysis: Analysis) -> list[dict]:
    """F1-F4 as measured: each with the numbers and holds / does not hold at this scale (F3 is added with
    the similarity stage, `f3_finding`)."""
    task_of = analysis.task_of
    far_domains = set(analysis.far_domains) if analysis.far_domains is not None else {a.domain for a in arms}
    out = []

    # F1: gains are larger for far domains (the midtraining domain's own task) than for near ones
    far, near = [], []
    for a in arms:
        task = task_of.get(a.domain)
        if a.role != "mid" or task is None:
            continue
        c = compare(cells, a.name, task)
        if a.domain not in far_domains:  # a near-domain arm on its own task (the paper's FLAN, KnowledgeQA)
            if c:
                near.append((a.name, task, c["sft"]["rel_improvement"], c["sft"]["p"]))
            continue
        if c:
            far.append((a.name, task, c["sft"]["rel_improvement"], c["sft"]["p"]))
        n = compare(cells, a.name, analysis.near_task) if analysis.near_task else None
        if n:
            near.append((a.name, analysis.near_task, n["sft"]["rel_improvement"], n["sft"]["p"]))
    if far and near:
        mf, mn = sum(x[2] for x in far) / len(far), sum(x[2] for x in near) / len(near)
        each = lambda xs: ", ".join(f"{a}/{t} {_pct(v)} ({_p(p)})" for a, t, v, p in xs)  # noqa: E731
        near_what = " and ".join(x for x in (
            f"on {analysis.near_task}" if analysis.near_task else "",
            "near-domain arms on their own tasks" if any(t != analysis.near_task for _, t, _, _ in near) else "") if x)
        out.append({"id": "F1", "claim": "midtraining helps most for domains far from general pretraining data",
                    "measure": f"mean relative SFT-loss improvement over base: far-domain arms ({', '.join(sorted(far_domains))}) "
                               f"on their own domain's task vs {near_what} (near)",
                    "summary": f"Relative SFT-loss improvement over base on the far domains' own tasks: mean {_pct(mf)} "
                               f"({each(far)}); near ({near_what}): mean {_pct(mn)} ({each(near)}); "
                               f"{_sig([x[3] for x in far + near])}.",
                    "numbers": {"far": far, "near": near, "far_mean": mf, "near_mean": mn}, "holds": mf > mn and mf > 0})

    # F2: midtraining (mix) beats continued pretraining on the domain alone, in-domain and in forgetting
    rows = []
    for a in arms:
        task = task_of.get(a.domain)
        if a.role != "cpt" or task is None:
            continue
        mid = next((m for m in arms if m.role == "mid" and m.domain == a.domain), None)
        if mid is None or (mid.name, task) not in cells or (a.name, task) not in cells:
            continue
        c = compare(cells, mid.name, task, ref=a.name)  # improvement of mid over cpt
        rows.append({"domain": a.domain, "mid": mid.name, "cpt": a.name, "task": task,
                     "sft_mid": c["sft"]["arm"], "sft_cpt": c["sft"]["ref"], "sft_p": c["sft"]["p"],
                     "general_mid": c["general"]["arm"], "general_cpt": c["general"]["ref"], "general_p": c["general"]["p"]})
    if rows:
        holds = all(r["sft_mid"] < r["sft_cpt"] and r["general_mid"] < r["general_cpt"] for r in rows)
        summary = "; ".join(
            f"{r['domain']}: SFT loss {r['mid']} {r['sft_mid']:.4f} vs {r['cpt']} {r['sft_cpt']:.4f} ({_p(r['sft_p'])}), "
            f"general loss after SFT {r['general_mid']:.4f} vs {r['general_cpt']:.4f} ({_p(r['general_p'])})" for r in rows)
        summary += f"; {_sig([p for r in rows for p in (r['sft_p'], r['general_p'])])}."
        out.append({"id": "F2", "claim": "midtraining beats continued pretraining on the specialized data alone, "
                    "in-domain (SFT loss) and in forgetting (general loss after SFT)",
                    "measure": "mean SFT validation loss and general loss after SFT, mid arm vs its domain's CPT arm "
                               "(lower is better; both must be lower for the finding to hold)",
                    "summary": summary[0].upper() + summary[1:], "numbers": rows, "holds": holds})

    # F4: timing x weight, on the cross arms of one domain (the one most of them train on)
    grid = cross_grid(cells, arms, analysis)
    if grid is not None:
        domain, cross, table = grid
        starts = sorted({a.start for a in cross})
        weights = sorted({a.weight for a in cross})
        if len(starts) >= 2 and len(weights) >= 2 and all((s, w) in table for s in starts for w in weights):
            early, late, lo, hi = starts[0], starts[-1], weights[0], weights[-1]
            d_early = table[(early, hi)] - table[(early, lo)]  # what a high weight buys (or costs) early
            d_late = table[(late, hi)] - table[(late, lo)]
            cell = lambda st, w: f"{_pct(table[(st, w)])}"  # noqa: E731
            seeds = sorted({len(a.seeds or [None]) for a in cross})
            out.append({"id": "F4", "claim": "an early start tolerates a high specialized weight; a late start needs a low one",
                        "measure": f"relative SFT-loss improvement over base on {task_of[domain]} at ({domain} start, weight); "
                                   "high-minus-low weight difference early vs late (holds if it is larger early and "
                                   "negative late)",
                        "summary": f"Start {early}: weight {lo:g} {cell(early, lo)}, weight {hi:g} {cell(early, hi)} "
                                   f"(high − low {_pct(d_early)}); start {late}: weight {lo:g} {cell(late, lo)}, "
                                   f"weight {hi:g} {cell(late, hi)} (high − low {_pct(d_late)}). "
                                   f"{'/'.join(map(str, seeds))} pretraining seed(s) per cell: the interaction itself is "
                                   "not tested.",
                        "numbers": {"table": {f"start {s} / weight {w:g}": v for (s, w), v in sorted(table.items())},
                                    "high_minus_low_early": d_early, "high_minus_low_late": d_late},
                        "holds": d_early > d_late and d_late < 0})
    return out


def _cell(cmp: Optional[dict], what: str, key: str) -> str:
    """A comparison's relative improvement (as %) or p-value for the results table ('' for the base)."""
    if cmp is None:
        return ""
    v = cmp[what][key]
    if key == "rel_improvement":
        return f"{v:+.2%}"
    return f"{v:.3g}" if v is not None else "n/a"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "machine": f"{platform.machine()} {platform.processor() or ''}".strip()}
    for pkg in ("torch", "lightning", "litgpt", "litdata", "lm-eval", "litgpt_ext"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def f3_finding(cells: dict, sim: Optional[dict], out: Path) -> tuple[Optional[dict], str, list[str]]:
    """F3 from the similarity stage: Pearson r between PA and the relative SFT-loss improvement over every
    (arm, task) point with a comparison. Returns (finding or None, why it is missing, figures written)."""
    if sim is None:
        return None, "Not measured: the similarity stage did not run.", []
    if "error" in sim:
        return None, f"Not measured: the similarity stage failed ({sim['error']}).", []
    points = []
    for fam, task in sorted(cells):
        cmp = compare(cells, fam, task) if fam != "base" else None
        if cmp:
            points.append({"set": fam, "sft": task, "rel_improvement": cmp["sft"]["rel_improvement"]})
    from litgpt_ext.study.similarity import correlate, plot_pa_scatter

    pts, corr = correlate(sim["pa"], points)
    if len(pts) < 3:
        return None, f"Not measured: {len(pts)} (arm, task) point(s) with a PA to correlate, fewer than 3.", []
    plot_pa_scatter(pts, corr, out / "pa_vs_improvement.png")
    m = F3_MEASURE
    r = corr[m]["r"]
    others = ", ".join(f"{m2} r = {c['r']:.2f} ({_p(c.get('p'))})" for m2, c in corr.items() if m2 != m)
    f3 = {"id": "F3", "claim": "the gain grows with the proximity advantage (PA) of the mix to the SFT data",
          "measure": f"Pearson r between PA ({m}) and relative SFT-loss improvement over {len(pts)} (arm, task) points",
          "summary": f"Pearson r = {r:.2f} ({_p(corr[m].get('p'))}, n = {len(pts)}) between PA ({m}) and the "
                     f"relative SFT-loss improvement; the other measures: {others}; {_sig([corr[m].get('p')])}.",
          "numbers": {m2: {"r": c["r"], "p": c.get("p"), "slope": c["slope"]} for m2, c in corr.items()},
          "holds": (not math.isnan(r)) and r > 0}
    return f3, "", ["pa_vs_improvement.png", "similarity/similarity_heatmap.png"]


EFFECT_SIGN = {"F4: late, high − low weight": -1}
"""The claimed sign of each effect (+1 unless listed): F4 claims a high weight hurts a late start."""


def finding_effects(cells: dict, arms: list[Arm], analysis: Analysis, pa: Optional[dict] = None) -> dict[str, Optional[float]]:
    """Each finding's effect(s), by the code that states the finding (`findings`), from these cells:
    F1 far − near relative gain; F2 cpt − mid loss per domain (SFT and general); F4 the early − late
    difference of (high − low weight) and the late one; F3 Pearson r of PA vs gain (with `pa`)."""
    f = {x["id"]: x for x in findings(cells, arms, analysis)}
    out: dict[str, Optional[float]] = {}
    if "F1" in f:
        out["F1: far − near relative gain"] = f["F1"]["numbers"]["far_mean"] - f["F1"]["numbers"]["near_mean"]
    for r in f["F2"]["numbers"] if "F2" in f else []:
        out[f"F2: {r['domain']} SFT loss, cpt − mid"] = r["sft_cpt"] - r["sft_mid"]
        out[f"F2: {r['domain']} general loss after SFT, cpt − mid"] = r["general_cpt"] - r["general_mid"]
    if "F4" in f:
        n = f["F4"]["numbers"]
        out["F4: (high − low weight), early − late"] = n["high_minus_low_early"] - n["high_minus_low_late"]
        out["F4: late, high − low weight"] = n["high_minus_low_late"]
    if pa is not None:
        from litgpt_ext.study.similarity import correlate

        _, corr = correlate(pa, _f3_points(cells))
        r = corr[F3_MEASURE]["r"]
        out[F3_EFFECT] = None if r is None or math.isnan(r) else r
    return out


def _f3_points(cells: dict) -> list[dict]:
    out = []
    for fam, task in sorted(cells):
        cmp = compare(cells, fam, task) if fam != "base" else None
        if cmp:
            out.append({"set": fam, "sft": task, "rel_improvement": cmp["sft"]["rel_improvement"]})
    return out


def attach_evidence(f: list[dict], cells: dict, arms: list[Arm], analysis: Analysis, sim: Optional[dict],
                    n_boot: int) -> None:
    """Give every finding its effects with hierarchical-bootstrap 95% intervals, the verdict word
    (`evidence.verdict`; `holds` is true only for "holds"), and its mixed-effects models."""
    pa = sim.get("pa") if sim and "error" not in sim else None
    boot = evidence.bootstrap(cells, lambda c: finding_effects(c, arms, analysis, pa), n=n_boot,
                              correlations=(F3_EFFECT,)) if n_boot > 0 else {}
    task_of = analysis.task_of
    for x in f:
        effects = {k: {**v, "sign": EFFECT_SIGN.get(k, 1),
                       "verdict": evidence.verdict(v["point"], v["lo"], v["hi"], EFFECT_SIGN.get(k, 1))}
                   for k, v in boot.items() if k.startswith(x["id"] + ":")}
        x["effects"] = effects
        x["verdict"] = evidence.combine([e["verdict"] for e in effects.values()])
        x["holds"] = x["verdict"] == "holds"
        mixed = {}
        if x["id"] == "F1":
            for name, task, *_ in x["numbers"]["far"] + x["numbers"]["near"]:
                mixed[f"{name} vs base on {task}, SFT loss"] = evidence.mixed_effect(cells, name, task)
        elif x["id"] == "F2":
            for r in x["numbers"]:
                for what in ("sft", "general"):
                    mixed[f"{r['mid']} vs {r['cpt']} on {r['task']}, {what} loss"] = evidence.mixed_effect(
                        cells, r["mid"], r["task"], ref=r["cpt"], what=what)
        elif x["id"] == "F4":
            for a in (cross_grid(cells, arms, analysis) or (None, []))[1]:  # its cells: cross arms (and a mid arm)
                if (a.name, task_of[a.domain]) in cells:
                    mixed[f"{a.name} vs base on {task_of[a.domain]}, SFT loss"] = evidence.mixed_effect(
                        cells, a.name, task_of[a.domain])
        elif x["id"] == "F3" and pa is not None:
            from litgpt_ext.study.similarity import correlate

            pts, _ = correlate(pa, _f3_points(cells))
            mixed[f"relative gain ~ PA ({F3_MEASURE}) + (1 | SFT set)"] = evidence.mixed_pa(pts, F3_MEASURE)
        x["mixed"] = mixed


def _evidence_lines(x: dict) -> list[str]:
    pct = x["id"] in ("F1",)
    L = [f"**Verdict: {x['verdict']}.** Effects with 95% intervals (hierarchical bootstrap: pretraining seeds, then "
         "SFT seeds within them): " + ("; ".join(f"{k.split(': ', 1)[1]} {evidence.fmt_interval(e, pct)} → {e['verdict']}"
                                                for k, e in x.get("effects", {}).items()) or "none (bootstrap off)") + "."]
    if x.get("mixed"):
        label = "random intercept per SFT set" if x["id"] == "F3" else "random intercept per pretraining seed"
        L += ["", f"Mixed-effects models ({label}; β is the arm's effect on the loss, lower is better"
              + ("" if x["id"] != "F3" else "; here β is the slope of the gain on PA") + "): "
              + "; ".join(f"{k}: {evidence.fmt_mixed(m)}" for k, m in x["mixed"].items()) + "."]
    L += ["", "The paper's test, for comparison: " + x.get("summary", "")
          + (" (Pearson's r over the (arm, task) points of the pooled SFT runs, with its t-test.)" if x["id"] == "F3" else
             " (Welch's t over the pooled SFT runs, which treats SFT seeds as independent evidence.)")]
    return L


def write_report(out: Path, *, title: str, intro: str, setup: list[str], arms: list[Arm], base_seeds: list[int],
                 base_tasks: list[str], replay: str, cells: dict, sim: Optional[dict], analysis: Analysis,
                 footer: list[str], n_boot: int = 1000) -> Path:
    """<out>/REPORT.md (setup, results table, findings, figures, versions) and <out>/results.json."""
    out.mkdir(parents=True, exist_ok=True)
    f = findings(cells, arms, analysis)
    grid = cross_grid(cells, arms, analysis) if any(x["id"] == "F4" for x in f) else None
    cross_table = grid[2] if grid else None
    figs = study_figures(cells, arms, out, cross_table) if cells else []
    f3, f3_missing, f3_figs = f3_finding(cells, sim, out)
    if f3 is not None:
        f.append(f3)
        figs += f3_figs
    f.sort(key=lambda x: x["id"])
    attach_evidence(f, cells, arms, analysis, sim, n_boot)

    L = [f"# {title}", "", intro, "", "## Setup", ""] + setup
    L += ["", "| arm | role | domain | start | weight | mix | pretraining seeds | SFT tasks |",
          "|---|---|---|---|---|---|---|---|", f"| base | base | - | - | - | {replay}:1.0 | {base_seeds} | {base_tasks} |"]
    for a in arms:
        L.append(f"| {a.name} | {a.role} | {a.domain} | {a.start} | {a.weight:g} | {a.mix or mix_string(replay, a.domain, a.weight)} "
                 f"| {a.seeds} | {a.tasks} |")
    L += ["", "## Results after SFT", "", "Mean ± std over all SFT runs at the chosen LR (SFT seeds x pretraining seeds). "
          "Relative improvement = (L_base − L_arm) / L_base; p from Welch's t-test against base (the paper's test). "
          "General loss before SFT is the source checkpoint's (forgetting from midtraining alone); after SFT it adds "
          "the forgetting from SFT.", "",
          "| arm | task | n (pretraining seeds) | chosen LR(s) | SFT val loss | rel. impr. | p | general loss before SFT "
          "| general loss after SFT | rel. impr. | p |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (fam, task), c in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0] != "base", kv[0][0])):
        cmp = compare(cells, fam, task) if fam != "base" else None
        L.append(f"| {fam} | {task} | {c.n} ({len(set(c.pseeds or [0]))}) | {', '.join(f'{x:g}' for x in c.lrs)} | "
                 f"{_ms(c.sft)} | {_cell(cmp, 'sft', 'rel_improvement')} | {_cell(cmp, 'sft', 'p')} | "
                 f"{_ms(c.general_before) if c.general_before else 'n/a'} | {_ms(c.general)} | "
                 f"{_cell(cmp, 'general', 'rel_improvement')} | {_cell(cmp, 'general', 'p')} |")
    L += ["", "## Findings, as measured", ""]
    L += ["Verdict words: **holds** (the 95% interval of the effect excludes zero in the claimed direction), "
          "**direction only** (right sign, the interval includes zero: not significant), **does not hold** (the "
          "estimate or the whole interval is on the wrong side), **not measured**. Intervals come from a hierarchical "
          "bootstrap with the pretraining seed as the unit of replication (`litgpt_ext/study/evidence.py`); a finding "
          "with one pretraining seed per arm has intervals that reflect SFT noise only. The numbers are in "
          "`results.json`.", "", "| finding | verdict | effects [95% interval] |", "|---|---|---|"]
    L += [f"| {x['id']}: {x['claim']} | {x['verdict']} | "
          + "; ".join(f"{k.split(': ', 1)[1]} {evidence.fmt_interval(e, x['id'] == 'F1')}" for k, e in x["effects"].items())
          + " |" for x in f]
    L.append("")
    for x in f:
        L += [f"### {x['id']}: {x['claim']}", ""] + _evidence_lines(x) + ["", f"Measure: {x.get('measure', 'see numbers')}.", "",
              "<details><summary>numbers</summary>", "", "```", json.dumps(x["numbers"], indent=1, default=str), "```",
              "", "</details>", ""]
    missing = {"F1", "F2", "F3", "F4"} - {x["id"] for x in f}
    for m in sorted(missing):
        why = f3_missing if m == "F3" else (
            "Not measured: the study lacks the arms or SFT results it needs (F1: far-domain mid arms and a near point; "
            "F2: a cpt arm and a mid arm of one domain, both fine-tuned on its task; F4: a complete 2x2 of cross arms).")
        L += [f"### {m}", "", why, ""]
    L += ["## Figures", ""] + [f"![{p}]({p})" for p in figs]
    L += ["", "## Versions", "", "```", json.dumps(_versions(), indent=1), "```", ""] + footer
    path = out / "REPORT.md"
    path.write_text("\n".join(L))
    (out / "results.json").write_text(json.dumps({"cells": {f"{k[0]}|{k[1]}": vars(v) for k, v in cells.items()},
                                                    "findings": f,
                                                    "arms": [{**vars(a), "mix": a.mix or mix_string(replay, a.domain, a.weight)}
                                                             for a in arms], "replay": replay,
                                                    "base_seeds": base_seeds}, indent=1, default=str))
    return path


# --------------------------------------------------------------------------------------------- sweeps
