"""`sweep --action report` with `report: {kind: methods}`: the arms ranked as ways to gain a domain
without losing general ability (the forgetting toolkit's study, `midtrain_configs/studies/`).

Per arm, over its runs (pretraining seeds x data seeds), from each run's `val_metrics.csv`:

- **domain gain** = the domain's validation loss at the fork step minus at the end (higher is better);
- **forgetting** = the general set's loss at the end minus at the fork step (lower is better);
- **post-SFT loss**: the SFT validation loss at the chosen LR (the one best-LR rule), when the spec has
  an `sft:` section;

each as mean with a 95% interval from the hierarchical bootstrap of `litgpt_ext.study.evidence`
(pretraining seeds, then the runs within them). Arms share their fork checkpoints and data orders, so
two arms are compared on **paired differences**: arm minus other arm on the runs with the same
(pretraining seed, data seed), with the same bootstrap over those differences. A difference is told
apart when its interval excludes zero (by more than 1e-4 nats, the printed precision). REPORT.md gives each arm's differences from `report.reference`
(e.g. no_replay: what the method changes), the **Pareto front** (the arms no other arm beats on both
gain and forgetting, by their means), and, as measured, which front arms are told apart from each
other and whether each arm off the front is beaten by a significant margin or by its means only.
`pareto.png` plots gain vs forgetting with the intervals.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional

from litgpt_ext.study.evidence import Cell, bootstrap, fmt_interval

NA = "n/a"
MIN_EFFECT = 1e-4  # nats: a smaller difference prints as ±0.0000 and is not called told apart (float noise)
AXES = ("gain", "forgetting", "sft")
BETTER = {"gain": 1, "forgetting": -1, "sft": -1}  # the sign of a better value
WORDS = {"gain": ("more gain", "less gain"), "forgetting": ("forgets less", "forgets more"),
         "sft": ("lower post-SFT loss", "higher post-SFT loss")}


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


def arm_runs(spec, jobs: list) -> dict[str, dict]:
    """{arm: {domain, mix, missing: [runs], runs: {(pretraining seed, data seed): {gain, forgetting[, sft]}}}}
    from the finished runs (an SFT value at the arm run's best LR)."""
    from litgpt_ext.sft.grid import best_lr
    from litgpt_ext.sft.metrics import FILE_NAME, read_sft_metrics

    general = (spec.report.general_set if spec.report else "general")
    out: dict[str, dict] = {}
    key_of: dict[str, tuple] = {}  # midtrain job name -> (arm, run key)
    for j in jobs:
        if j.stage != "midtrain":
            continue
        m = out.setdefault(j.info["arm"], {"domain": j.info["domain"], "mix": j.info["mix"], "missing": [], "runs": {}})
        vals = _fork_and_final(j.out_dir) if j.done() else None
        if vals is None or j.info["domain"] not in vals[0] or general not in vals[0]:
            m["missing"].append(j.name)
            continue
        fork, final = vals
        key = (j.info["seed"], j.info.get("data_seed"))
        key_of[j.name] = (j.info["arm"], key)
        m["runs"][key] = {"gain": fork[j.info["domain"]] - final[j.info["domain"]],
                          "forgetting": final[general] - fork[general]}
    by_src: dict[str, dict[float, list]] = {}
    for j in jobs:
        if j.stage == "sft" and j.done():
            by_src.setdefault(j.info["source"], {}).setdefault(j.info["lr"], []).append(
                read_sft_metrics(j.out_dir / FILE_NAME).sft_val_loss)
    for src, lrs in by_src.items():
        if src in key_of:
            arm, key = key_of[src]
            vals = lrs[best_lr(lrs)]
            out[arm]["runs"][key]["sft"] = sum(vals) / len(vals)  # SFT seeds of one run: its value
    return out


def _cell(name: str, runs: dict[tuple, dict], axis: str) -> Optional[Cell]:
    keys = [k for k in sorted(runs, key=str) if axis in runs[k]]
    if not keys:
        return None
    xs = [runs[k][axis] for k in keys]
    return Cell(name, axis, len(keys), xs, xs, [], [k[0] for k in keys])


def summarize(runs: dict[tuple, dict], n_boot: int) -> dict[str, dict]:
    """{axis: {point, lo, hi, n}} over the runs (hierarchical bootstrap; no interval without replicates)."""
    out = {}
    for axis in AXES:
        c = _cell("x", runs, axis)
        if c is None:
            continue
        b = bootstrap({"x": c}, lambda x: {"v": x["x"].sft_mean}, n=n_boot)["v"] if n_boot else {}
        out[axis] = {"point": c.sft_mean if not b else b["point"], "lo": b.get("lo"), "hi": b.get("hi"), "n": c.n}
    return out


def paired(a: dict[tuple, dict], b: dict[tuple, dict], n_boot: int) -> dict[str, dict]:
    """a minus b on the runs both have (same pretraining and data seed), per axis, with intervals."""
    both = {k: {ax: a[k][ax] - b[k][ax] for ax in AXES if ax in a[k] and ax in b[k]} for k in a if k in b}
    return summarize(both, n_boot)


def told(d: dict, axis: str) -> Optional[str]:
    """The word for a paired difference on `axis` whose interval excludes zero (by more than
    `MIN_EFFECT`), else None."""
    if d.get("lo") is None:
        return None
    better, worse = WORDS[axis]
    if d["lo"] > MIN_EFFECT:
        return better if BETTER[axis] > 0 else worse
    if d["hi"] < -MIN_EFFECT:
        return worse if BETTER[axis] > 0 else better
    return None


def pareto(points: dict[str, tuple[float, float]]) -> set[str]:
    """Arms not dominated: no other arm has gain >= and forgetting <= with one strictly better."""
    front = set()
    for a, (g, f) in points.items():
        if not any((g2 >= g and f2 <= f) and (g2 > g or f2 < f) for b, (g2, f2) in points.items() if b != a):
            front.add(a)
    return front


def methods_report(spec, jobs: list, out: Path) -> Path:
    arms = arm_runs(spec, jobs)
    n_boot = spec.report.bootstrap if spec.report else 1000
    ref = spec.report.reference if spec.report else None
    if ref is not None and ref not in arms:
        raise ValueError(f"sweep spec report.reference={ref!r} is not an arm of the sweep; arms: {sorted(arms)}")
    rows = {arm: {"domain": m["domain"], "mix": m["mix"], "missing": m["missing"], "n": len(m["runs"]),
                  **summarize(m["runs"], n_boot)} for arm, m in arms.items()}
    points = {a: (r["gain"]["point"], r["forgetting"]["point"]) for a, r in rows.items() if "gain" in r}
    front = pareto(points)
    vs_ref = {a: paired(arms[a]["runs"], arms[ref]["runs"], n_boot) for a in points if ref and a != ref}
    apart = {(a, b): paired(arms[a]["runs"], arms[b]["runs"], n_boot)
             for a in points for b in points if a != b and (b in front)}
    out.mkdir(parents=True, exist_ok=True)
    figs = ([_plot(rows, front, out)] if points else []) + ([_plot_paired(vs_ref, ref, out)] if vs_ref else [])
    L = [f"# Sweep {spec.name}: methods to gain a domain without forgetting", "",
         "Generated by `litgpt-ext sweep` (`report: {kind: methods}`). Per arm over its runs (pretraining seeds x data "
         "seeds): domain gain = the domain's val loss at the fork minus at the end (higher is better); forgetting = the "
         "general set's val loss at the end minus at the fork (lower is better); post-SFT loss on the SFT task at the "
         "chosen LR (lower is better). Mean with a 95% interval (hierarchical bootstrap: pretraining seeds, then runs; "
         "widened for few pretraining seeds, docs/studies.md). Arms are compared on paired differences (the runs with "
         "the same pretraining and data seed); a difference is told apart when its interval excludes zero (by more than "
         f"{MIN_EFFECT:g} nats, the printed precision).", "",
         "| arm | mix | runs | domain gain [95%] | forgetting [95%] | post-SFT loss [95%] | Pareto front |",
         "|---|---|---|---|---|---|---|"]
    for arm, r in sorted(rows.items(), key=lambda kv: -(kv[1]["gain"]["point"] if "gain" in kv[1] else -1e9)):
        if "gain" not in r:
            L.append(f"| {arm} | {r['mix']} | 0 | {NA} | {NA} | {NA} | not measured ({len(r['missing'])} run(s) missing) |")
            continue
        L.append(f"| {arm} | {r['mix']} | {r['n']} | {fmt_interval(r['gain'])} | {fmt_interval(r['forgetting'])} | "
                 f"{fmt_interval(r['sft']) if 'sft' in r else NA} | {'yes' if arm in front else 'no'} |")
    if vs_ref:
        L += ["", f"## Each method minus {ref} (paired)", "",
              "| arm | Δ domain gain [95%] | Δ forgetting [95%] | Δ post-SFT loss [95%] | as measured |",
              "|---|---|---|---|---|"]
        for arm, d in sorted(vs_ref.items()):
            words = [w for ax in AXES if ax in d for w in [told(d[ax], ax)] if w]
            L.append(f"| {arm} | " + " | ".join(fmt_interval(d[ax]) if ax in d else NA for ax in AXES)
                     + f" | {', '.join(words) if words else f'not told apart from {ref}'} |")
    L += ["", "## The Pareto front, as measured", "", f"On the front (by means): {', '.join(sorted(front)) or 'none'}."]
    pairs = sorted((a, b) for a in front for b in front if a < b)
    same = [f"{a} vs {b}" for a, b in pairs if not any(told(apart[(a, b)].get(ax, {}), ax) for ax in ("gain", "forgetting"))]
    if pairs:
        L.append("Front arms not told apart on gain or forgetting (paired): " + ("; ".join(same) or "none") + ".")
    for arm in sorted(set(points) - front):
        beats = [b for b in sorted(front) if points[b][0] >= points[arm][0] and points[b][1] <= points[arm][1]]
        sig = [b for b in beats if _significantly_beats(apart[(arm, b)])]
        L.append(f"- {arm}: off the front, beaten by {', '.join(beats) or 'a front arm'} by means; "
                 + (f"significantly by {', '.join(sig)}." if sig else "not significantly by any (not told apart)."))
    missing = sorted(n for r in rows.values() for n in r["missing"])
    if missing:
        L += ["", f"Runs not finished, left out: {', '.join(missing)}."]
    L += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figs]
    (out / "REPORT.md").write_text("\n".join(L) + "\n")
    (out / "results.json").write_text(json.dumps(
        {"kind": "methods", "arms": rows, "front": sorted(front), "reference": ref, "vs_reference": vs_ref,
         "front_not_told_apart": same}, indent=1))
    return out / "REPORT.md"


def _significantly_beats(d: dict) -> bool:
    """`d` = arm minus a front arm: the front arm is better on one axis with an interval that excludes
    zero, and not significantly worse on the other."""
    g, f = told(d.get("gain", {}), "gain"), told(d.get("forgetting", {}), "forgetting")
    return (g == "less gain" or f == "forgets more") and g != "more gain" and f != "forgets less"


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


def _plot_paired(vs_ref: dict, ref: str, out: Path) -> str:
    """Each arm minus the reference, paired: Δ gain and Δ forgetting with their intervals (zero: the reference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = sorted(vs_ref)
    fig, axes = plt.subplots(1, 2, figsize=(9, 0.45 * len(arms) + 1.6), sharey=True)
    for ax, axis, label in zip(axes, ("gain", "forgetting"), ("Δ domain gain (higher is better)",
                                                              "Δ forgetting (lower is better)")):
        for y, arm in enumerate(arms):
            d = vs_ref[arm].get(axis)
            if d is None:
                continue
            err = [[d["point"] - d["lo"]], [d["hi"] - d["point"]]] if d.get("lo") is not None else None
            ax.errorbar(d["point"], y, xerr=err, fmt="o", capsize=3, color="#d62728" if told(d, axis) else "#7f7f7f")
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlabel(label)
    axes[0].set_yticks(range(len(arms)), arms)
    fig.suptitle(f"each method minus {ref}, paired (95% intervals; red: told apart)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "paired.png", dpi=110)
    plt.close(fig)
    return "paired.png"
