"""`sweep --action report` with `report: {kind: methods}`: the arms ranked as ways to gain a domain
without losing general ability (the forgetting toolkit's study, `midtrain_configs/studies/`).

Per arm, over its runs (pretraining seeds x data seeds), from each run's `val_metrics.csv`:

- **domain gain** = the domain's validation loss at the fork step minus at the end (higher is better);
- **forgetting** = the general set's loss at the end minus at the fork step (lower is better);
- **post-SFT loss**: the SFT validation loss at the chosen LR (the one best-LR rule), when the spec has
  an `sft:` section;

each as mean ± std with a 95% interval from the hierarchical bootstrap of `litgpt_ext.study.evidence`
(pretraining seeds, then the runs within them). The **Pareto front** holds the arms no other arm beats
on both gain and forgetting (means); REPORT.md says which are on it, and `pareto.png` plots gain vs
forgetting with the intervals. Arms whose intervals overlap on both axes are not told apart: the table
says so rather than ranking noise.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional

from litgpt_ext.study.evidence import Cell, bootstrap, fmt_interval

NA = "n/a"


def _fork_and_final(run: Path) -> Optional[tuple[dict[str, float], dict[str, float]]]:
    path = run / "val_metrics.csv"
    if not path.is_file():
        return None
    rows = list(csv.DictReader(open(path)))
    if not rows:
        return None
    steps = sorted({int(r["step"]) for r in rows})
    at = lambda s: {r["set"]: float(r["loss"]) for r in rows if int(r["step"]) == s}  # noqa: E731
    return at(steps[0]), at(steps[-1])


def arm_measures(spec, jobs: list) -> dict[str, dict]:
    """{arm: {gain: Cell, forgetting: Cell, sft: Cell | None, domain, missing: [runs]}} from finished runs."""
    from litgpt_ext.sft.grid import best_lr
    from litgpt_ext.sft.metrics import FILE_NAME, read_sft_metrics

    general = (spec.report.general_set if spec.report else "general")
    out: dict[str, dict] = {}
    for j in jobs:
        if j.stage != "midtrain":
            continue
        m = out.setdefault(j.info["arm"], {"domain": j.info["domain"], "gain": [], "forgetting": [], "pseeds": [],
                                           "missing": [], "sft": {}, "mix": j.info["mix"]})
        vals = _fork_and_final(j.out_dir) if j.done() else None
        if vals is None or j.info["domain"] not in vals[0] or general not in vals[0]:
            m["missing"].append(j.name)
            continue
        fork, final = vals
        m["gain"].append(fork[j.info["domain"]] - final[j.info["domain"]])
        m["forgetting"].append(final[general] - fork[general])
        m["pseeds"].append(j.info["seed"])
    by_src: dict[str, dict[float, list]] = {}
    for j in jobs:
        if j.stage == "sft" and j.done():
            by_src.setdefault(j.info["source"], {}).setdefault(j.info["lr"], []).append(
                (read_sft_metrics(j.out_dir / FILE_NAME).sft_val_loss, j.info["pretrain_seed"]))
    src_arm = {j.name: j.info["arm"] for j in jobs if j.stage == "midtrain"}
    for src, lrs in by_src.items():
        if src in src_arm:
            lr = best_lr({k: [v for v, _ in xs] for k, xs in lrs.items()})
            out[src_arm[src]]["sft"].setdefault("runs", []).extend(lrs[lr])
    cells = {}
    for arm, m in out.items():
        n = len(m["gain"])
        cells[arm] = {"domain": m["domain"], "mix": m["mix"], "missing": m["missing"],
                      "gain": Cell(arm, "gain", n, m["gain"], m["forgetting"], [], m["pseeds"]) if n else None,
                      "sft": None}
        runs = m["sft"].get("runs")
        if runs:
            cells[arm]["sft"] = Cell(arm, "sft", len(runs), [v for v, _ in runs], [v for v, _ in runs], [],
                                     [s for _, s in runs])
    return cells


def pareto(points: dict[str, tuple[float, float]]) -> set[str]:
    """Arms not dominated: no other arm has gain >= and forgetting <= with one strictly better."""
    front = set()
    for a, (g, f) in points.items():
        if not any((g2 >= g and f2 <= f) and (g2 > g or f2 < f) for b, (g2, f2) in points.items() if b != a):
            front.add(a)
    return front


def methods_report(spec, jobs: list, out: Path) -> Path:
    cells = arm_measures(spec, jobs)
    n_boot = spec.report.bootstrap if spec.report else 1000
    rows, points = {}, {}
    for arm, c in cells.items():
        if c["gain"] is None:
            rows[arm] = {"domain": c["domain"], "mix": c["mix"], "missing": c["missing"]}
            continue
        cl = {("gain", "t"): c["gain"]}
        b = bootstrap(cl, lambda x: {"gain": x[("gain", "t")].sft_mean, "forgetting": x[("gain", "t")].general_mean},
                      n=n_boot) if n_boot else {}
        r = {"domain": c["domain"], "mix": c["mix"], "n": c["gain"].n, "missing": c["missing"],
             "gain": b.get("gain") or {"point": c["gain"].sft_mean, "lo": None, "hi": None},
             "forgetting": b.get("forgetting") or {"point": c["gain"].general_mean, "lo": None, "hi": None}}
        if c["sft"] is not None:
            bs = bootstrap({("s", "t"): c["sft"]}, lambda x: {"sft": x[("s", "t")].sft_mean}, n=n_boot) if n_boot else {}
            r["sft"] = bs.get("sft") or {"point": c["sft"].sft_mean, "lo": None, "hi": None}
        rows[arm] = r
        points[arm] = (r["gain"]["point"], r["forgetting"]["point"])
    front = pareto(points)
    out.mkdir(parents=True, exist_ok=True)
    figs = [_plot(rows, front, out)] if points else []
    L = [f"# Sweep {spec.name}: methods to gain a domain without forgetting", "",
         "Generated by `litgpt-ext sweep --action report` (`report: {kind: methods}`). Per arm over its runs: domain gain "
         "= the domain's val loss at the fork minus at the end (higher is better); forgetting = the general set's val "
         "loss at the end minus at the fork (lower is better); post-SFT loss at the chosen LR. Mean with a 95% interval "
         "(hierarchical bootstrap: pretraining seeds, then runs). An arm is on the Pareto front when no other arm has "
         "both more gain and less forgetting.", "",
         "| arm | mix | runs | domain gain [95%] | forgetting [95%] | post-SFT loss [95%] | Pareto front |",
         "|---|---|---|---|---|---|---|"]
    for arm, r in sorted(rows.items(), key=lambda kv: -(kv[1]["gain"]["point"] if "gain" in kv[1] else -1e9)):
        if "gain" not in r:
            L.append(f"| {arm} | {r['mix']} | 0 | {NA} | {NA} | {NA} | not measured ({len(r['missing'])} run(s) missing) |")
            continue
        L.append(f"| {arm} | {r['mix']} | {r['n']} | {fmt_interval(r['gain'])} | {fmt_interval(r['forgetting'])} | "
                 f"{fmt_interval(r['sft']) if 'sft' in r else NA} | {'yes' if arm in front else 'no'} |")
    L += ["", f"On the front: {', '.join(sorted(front)) or 'none'}."]
    tied = [(a, b) for a in front for b in front if a < b and _overlap(rows[a], rows[b])]
    if tied:
        L += ["", "Not told apart (their intervals overlap on both gain and forgetting): "
              + "; ".join(f"{a} vs {b}" for a, b in tied) + "."]
    missing = sorted(n for r in rows.values() for n in r["missing"])
    if missing:
        L += ["", f"Runs not finished, left out: {', '.join(missing)}."]
    L += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figs]
    (out / "REPORT.md").write_text("\n".join(L) + "\n")
    (out / "results.json").write_text(json.dumps({"kind": "methods", "arms": rows, "front": sorted(front)}, indent=1))
    return out / "REPORT.md"


def _overlap(a: dict, b: dict) -> bool:
    def ov(x: dict, y: dict) -> bool:
        if x.get("lo") is None or y.get("lo") is None:
            return False
        return x["lo"] <= y["hi"] and y["lo"] <= x["hi"]
    return ov(a["gain"], b["gain"]) and ov(a["forgetting"], b["forgetting"])


def _plot(rows: dict, front: set, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for arm, r in rows.items():
        if "gain" not in r:
            continue
        g, f = r["gain"], r["forgetting"]
        xerr = [[g["point"] - g["lo"]], [g["hi"] - g["point"]]] if g.get("lo") is not None else None
        yerr = [[f["point"] - f["lo"]], [f["hi"] - f["point"]]] if f.get("lo") is not None else None
        ax.errorbar(g["point"], f["point"], xerr=xerr, yerr=yerr, fmt="o", capsize=3,
                    color="#d62728" if arm in front else "#1f77b4")
        ax.annotate(arm, (g["point"], f["point"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    pts = sorted((rows[a]["gain"]["point"], rows[a]["forgetting"]["point"]) for a in front)
    if len(pts) > 1:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "--", color="#d62728", lw=1, label="Pareto front")
        ax.legend(fontsize=8)
    ax.set_xlabel("domain gain (val loss drop; higher is better)")
    ax.set_ylabel("forgetting (general val loss rise; lower is better)")
    ax.set_title("gain vs forgetting (95% intervals)")
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=110)
    plt.close(fig)
    return "pareto.png"
