"""`litgpt-ext mixfit`: a surrogate over (start, weight, domain) fit to a study's results.json.

Per arm and pretraining seed (SFT seeds averaged first) the gain (relative SFT-loss improvement over base
on the arm's domain's task) and the forgetting (relative change of the general loss after SFT vs base)
are fit as functions of (start, weight), with the domain as a categorical input, by a Gaussian process
(`litgpt_ext.study.mixfit_model`, which says why a GP). Written to `--out_dir`: `mixfit.json`,
`mixfit.md`, a heat map per domain (`mixfit_<domain>.png`: mean and std, measured arms marked), and
with `--propose N` the next N arms as a sweep-spec fragment (`mixfit_arms.yaml`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal, Optional

import numpy as np

from litgpt_ext.study.mixfit_model import (
    TARGETS,
    Z95,
    Objective,
    Surface,
    arm_groups,
    arm_label,
    design,
    loao,
    n_params,
    points_of,
    propose,
)


def _total_steps(path: Path, arms: list[dict]) -> Optional[int]:
    """The study's total steps from its arms' run configs (`train.max_iters`): reproduce writes them to
    <out>/configs/pretrain/<run>.yaml, a sweep to <out_root>/configs/<run>.yaml (its report is <out_root>/report)."""
    import yaml

    here = path.resolve().parent
    for a in arms:
        for s in a["pseeds"]:
            run = f"{a['name']}_seed{s}"
            for cfg in (here / "configs" / "pretrain" / f"{run}.yaml", here.parent / "configs" / f"{run}.yaml"):
                if cfg.is_file():
                    steps = ((yaml.safe_load(cfg.read_text()) or {}).get("train") or {}).get("max_iters")
                    if steps:
                        return int(steps)
    return None


def _candidates(domains: list[str], total: int, starts: Optional[list[int]], weights: Optional[list[float]],
                grid: int, budget: Optional[float]) -> tuple[list[int], list[float], list[tuple[str, int, float]]]:
    st = sorted(set(starts)) if starts else sorted({int(round(x)) for x in np.linspace(1, total - 1, grid)})
    ws = sorted(set(weights)) if weights else [round(float(x), 2) for x in np.linspace(0.05, 1.0, 20)]
    cands = [(d, s, w) for d in domains for s in st for w in ws if budget is None or w * (total - s) <= budget]
    return st, ws, cands


def _check(starts, weights, total, budget, propose_n, forget_weight, grid) -> None:
    bad_w = [w for w in weights or [] if not 0 < w <= 1]
    if bad_w:
        raise ValueError(f"--weights: {bad_w} outside (0, 1] (a weight is the domain's share of the blend)")
    bad_s = [s for s in starts or [] if not 0 < s < total]
    if bad_s:
        raise ValueError(f"--starts: {bad_s} outside (0, total_steps={total})")
    if budget is not None and budget <= 0:
        raise ValueError(f"--budget_steps must be > 0 (domain steps: weight x (total - start)), got {budget}")
    if propose_n < 0 or grid < 2 or forget_weight < 0:
        raise ValueError(f"--propose must be >= 0, --grid >= 2 and --forget_weight >= 0; got {propose_n}, {grid}, "
                         f"{forget_weight}")


def fit_results(results: Path, domains: Optional[list[str]] = None, task_of: Optional[dict[str, str]] = None,
                total_steps: Optional[int] = None, budget_steps: Optional[float] = None, propose_n: int = 0,
                acquisition: str = "ei", xi: float = 0.001, kappa: float = 2.0, forget_weight: float = 0.0,
                starts: Optional[list[int]] = None, weights: Optional[list[float]] = None, grid: int = 41,
                seed: int = 0) -> dict:
    """The whole fit as a dict (what mixfit.json holds), plus the surfaces under "_surfaces" for the figures."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # the GP's matrices are tiny: BLAS threads only contend (~25x slower on 2 busy cores)
        return _fit(Path(results), domains, task_of, total_steps, budget_steps, propose_n, acquisition, xi, kappa,
                    forget_weight, starts, weights, grid, seed)


def _fit(path: Path, domains, task_of, total_steps, budget_steps, propose_n, acquisition, xi, kappa, forget_weight,
         starts, weights, grid, seed) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"--results {str(path)!r} does not exist (a study's results.json)")
    if acquisition not in ("ei", "ucb"):
        raise ValueError(f"--acquisition must be ei or ucb, got {acquisition!r}")
    points, arms, skipped = points_of(json.loads(path.read_text()), path, domains, task_of)
    doms = sorted({p.domain for p in points}) if not domains else [d for d in domains if any(p.domain == d for p in points)]
    groups = arm_groups(points)
    need = n_params(len(doms))
    if len(groups) < need:
        raise ValueError(f"{path}: {len(groups)} arm(s) with results ({', '.join(doms) or 'no domain'}), fewer than the "
                         f"{need} parameters of the fit (amplitude, a length scale per input: start, weight"
                         f"{' and ' + str(len(doms) - 1) + ' domain indicator(s)' if len(doms) > 1 else ''}, noise); "
                         f"run at least {need} arms at distinct (start, weight)" + (f" (skipped: {skipped})" if skipped else ""))
    total = total_steps or _total_steps(path, arms)
    if total is None:
        raise ValueError(f"{path}: the study's total steps are unknown (no arm run config under {path.parent}/configs); "
                         "pass --total_steps")
    late = [a["name"] for a in arms if not 0 < int(a["start"]) < total]
    if late:
        raise ValueError(f"--total_steps {total}: arms {late} start at or after it")
    _check(starts, weights, total, budget_steps, propose_n, forget_weight, grid)

    X = design([(p.domain, p.start, p.weight) for p in points], doms)
    surf = {t: Surface(X, np.array([getattr(p, t) for p in points]), seed=seed) for t in TARGETS}
    obj = Objective(surf["gain"], surf["forget"], forget_weight)
    # each held-out fit re-optimizes the hyperparameters on the other arms, starting from the full fit's
    # (no random restarts: n fits of a few seconds each on 2 cores otherwise)
    loaos = {t: loao(points, t, doms, lambda X, y, t=t: Surface(X, y, seed=seed, kernel=surf[t].gp.kernel_))
             for t in TARGETS}

    def pred(d: str, s: int, w: float) -> dict:
        x = design([(d, s, w)], doms)
        out = {"domain": d, "start": int(s), "weight": float(w), "domain_steps": float(w) * (total - int(s))}
        for name, model in (*surf.items(), ("objective", obj)):
            mu, sd = model.predict(x)
            out[name] = {"mean": float(mu[0]), "std": float(sd[0]), "lo": float(mu[0] - Z95 * sd[0]),
                         "hi": float(mu[0] + Z95 * sd[0])}
        return out

    measured = []
    for (d, s, w), held in groups.items():
        m = pred(d, s, w)
        m.update(arms=sorted({p.arm for p in held}), n_pseeds=len(held),
                 measured={t: float(np.mean([getattr(p, t) for p in held])) for t in TARGETS})
        measured.append(m)
    st, ws, cands = _candidates(doms, total, starts, weights, grid, budget_steps)
    best = {}
    for d in doms:
        mine = [c for c in cands if c[0] == d]
        if not mine:
            best[d] = None
            continue
        mu, _ = obj.predict(design(mine, doms))
        b = pred(*mine[int(np.argmax(mu))])
        box = [(p.start, p.weight) for p in points if p.domain == d]
        b["inside_measured_range"] = bool(box) and (min(x for x, _ in box) <= b["start"] <= max(x for x, _ in box)
                                                   and min(y for _, y in box) <= b["weight"] <= max(y for _, y in box))
        best[d] = b
    taken = {a["name"] for a in arms} | {arm_label(*k) for k in groups}
    props = propose(points, doms, cands, propose_n, acquisition, xi, kappa, forget_weight, surf["gain"], surf["forget"],
                    taken) if propose_n else []
    return {
        "results": str(path), "domains": doms, "task_of": {a["domain"]: a["task"] for a in arms},
        "total_steps": total, "budget_steps": budget_steps, "forget_weight": forget_weight,
        "targets": {"gain": "relative SFT-loss improvement over base on the domain's task, (L_base - L_arm) / L_base",
                    "forget": "relative change of the general loss after SFT vs base, (G_arm - G_base) / G_base",
                    "objective": f"gain - {forget_weight:g} x forget" if forget_weight else "gain"},
        "model": {"kind": "GaussianProcessRegressor(normalize_y) on standardized inputs", "inputs": ["start", "weight"]
                  + [f"domain={d}" for d in doms[1:]], "n_params": need, "n_arms": len(groups), "n_points": len(points),
                  "kernel": {t: str(s.gp.kernel_) for t, s in surf.items()},
                  "noise_std": {t: math.sqrt(s.noise) for t, s in surf.items()}},
        "loao": loaos, "measured": measured, "best": best, "skipped": skipped,
        "candidates": {"starts": st, "weights": ws, "n": len(cands)},
        "acquisition": {"kind": acquisition, "xi": xi, "kappa": kappa, "batch": "kriging believer (hyperparameters fixed)"},
        "proposals": props, "_surfaces": (surf, obj),
    }


def validate(earlier: Path, fit: dict) -> dict:
    """An earlier fit's proposals (`--propose`) vs this fit's measured arms, matched by position (domain, start,
    weight): error, and whether the earlier 95% interval for a measurement covered the measured mean."""
    if not earlier.is_file():
        raise FileNotFoundError(f"--compare {str(earlier)!r} does not exist (an earlier mixfit.json)")
    old = json.loads(earlier.read_text())
    if not old.get("proposals"):
        raise ValueError(f"--compare {str(earlier)!r}: no proposals (run that fit with --propose N)")
    now = {(m["domain"], m["start"], m["weight"]): m for m in fit["measured"]}
    rows, missing = [], []
    for p in old["proposals"]:
        m = now.get((p["domain"], p["start"], p["weight"]))
        if m is None:
            missing.append(p["name"])
            continue
        for t in TARGETS:
            half = Z95 * math.sqrt(p[f"{t}_std"] ** 2 + old["model"]["noise_std"][t] ** 2 / m["n_pseeds"])
            rows.append({"arm": p["name"], "target": t, "predicted": p[t], "lo": p[t] - half, "hi": p[t] + half,
                         "measured": m["measured"][t], "error": p[t] - m["measured"][t],
                         "covered": p[t] - half <= m["measured"][t] <= p[t] + half})
    summary = {t: {"n": len(rs), "mae": float(np.mean([abs(r["error"]) for r in rs])),
                   "coverage": float(np.mean([r["covered"] for r in rs]))}
               for t in TARGETS if (rs := [r for r in rows if r["target"] == t])}
    return {"predicted_by": str(earlier), "rows": rows, "summary": summary, "not_measured": missing}


def arms_fragment(props: list[dict]) -> str:
    """The proposals as a sweep spec's `arms:` list (names as the sweep would give them)."""
    import yaml

    return yaml.safe_dump({"arms": [{"name": p["name"], "domain": p["domain"], "start": int(p["start"]),
                                     "weight": float(p["weight"])} for p in props]}, sort_keys=False,
                          default_flow_style=None)


def plot_surface(fit: dict, domain: str, out: Path) -> None:
    """Mean and std of the objective over (start, weight) for one domain, measured arms marked, the best (star)
    and the budget line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, obj = fit["_surfaces"]
    total, doms = fit["total_steps"], fit["domains"]
    ss = np.linspace(1, total - 1, 60)
    ws = np.linspace(0.02, 1.0, 50)
    S, W = np.meshgrid(ss, ws)
    mu, sd = obj.predict(design([(domain, s, w) for s, w in zip(S.ravel(), W.ravel())], doms))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, Z, title, cmap in ((axes[0], mu, "mean", "viridis"), (axes[1], sd, "std", "magma")):
        im = ax.pcolormesh(S, W, 100 * Z.reshape(S.shape), shading="auto", cmap=cmap)
        fig.colorbar(im, ax=ax, label=f"{title} of objective (%)")
        for m in fit["measured"]:
            if m["domain"] == domain:
                ax.scatter(m["start"], m["weight"], c="white", edgecolors="black", s=40, zorder=3)
                ax.annotate(f"{100 * m['measured']['gain']:+.1f}", (m["start"], m["weight"]), fontsize=7, color="white",
                            xytext=(4, 4), textcoords="offset points")
        b = fit["best"].get(domain)
        if b:
            ax.scatter(b["start"], b["weight"], marker="*", c="red", s=160, zorder=4, label="predicted best")
        for p in fit["proposals"]:
            if p["domain"] == domain:
                ax.scatter(p["start"], p["weight"], marker="x", c="cyan", s=50, zorder=4)
        if fit["budget_steps"]:
            bw = fit["budget_steps"] / (total - ss)
            ax.plot(ss[bw <= 1], bw[bw <= 1], "w--", lw=1, label="budget")
        ax.set(xlabel="start (step)", ylabel="weight", title=f"{domain}: {title} of {fit['targets']['objective']} (o: arms, measured gain %; *: best; x: proposed)",
               ylim=(0, 1.02), xlim=(0, total))
        ax.title.set_fontsize(8)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _f(x: Optional[float], pct: bool = True) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:+.2f}%" if pct else f"{x:.2f}"


def _iv(p: dict) -> str:
    return f"{_f(p['mean'])} [{_f(p['lo'])}, {_f(p['hi'])}]"


def write_md(fit: dict, out: Path, figs: list[str], fragment: str) -> None:
    L = [f"# mixfit: a surrogate over (start, weight, domain) from `{fit['results']}`", "",
         f"Gaussian process ({fit['model']['kind']}; kernel on the gain: `{fit['model']['kernel']['gain']}`) over "
         f"{fit['model']['n_arms']} arms ({fit['model']['n_points']} points: one per arm and pretraining seed), inputs "
         f"{fit['model']['inputs']}; total steps {fit['total_steps']}; tasks {fit['task_of']}. Gain = "
         f"{fit['targets']['gain']}; forgetting = {fit['targets']['forget']}. Intervals are 95%.", "",
         "## Leave one arm out", "",
         "| target | MAE | Spearman (predicted vs measured) | interval coverage |", "|---|---|---|---|"]
    for t, r in fit["loao"].items():
        sp = "n/a" if r["spearman"] is None else f"{r['spearman']:.2f}"
        L.append(f"| {t} | {_f(r['mae']).lstrip('+')} | {sp} | {_f(r['coverage'], False)} |")
    L += ["", "| arms | domain | start | weight | pseeds | gain measured | gain LOAO [95%] | forget measured "
          "| forget LOAO [95%] |", "|---|---|---|---|---|---|---|---|---|"]
    for g, f in zip(fit["loao"]["gain"]["rows"], fit["loao"]["forget"]["rows"]):
        L.append(f"| {', '.join(g['arms'])} | {g['domain']} | {g['start']} | {g['weight']:g} | {g['n_pseeds']} | "
                 f"{_f(g['measured'])} | {_f(g['predicted'])} [{_f(g['lo'])}, {_f(g['hi'])}] | {_f(f['measured'])} | "
                 f"{_f(f['predicted'])} [{_f(f['lo'])}, {_f(f['hi'])}] |")
    budget = f" within {fit['budget_steps']:g} domain steps" if fit["budget_steps"] else ""
    L += ["", f"## Predicted best (start, weight){budget}", "", f"Objective (maximized): {fit['targets']['objective']}.", "",
          "| domain | start | weight | domain steps | objective | gain | forget | inside the measured range |",
          "|---|---|---|---|---|---|---|---|"]
    for d, b in fit["best"].items():
        if b is None:
            L.append(f"| {d} | - | - | - | no candidate within the budget | | | |")
        else:
            L.append(f"| {d} | {b['start']} | {b['weight']:g} | {b['domain_steps']:.0f} | {_iv(b['objective'])} | "
                     f"{_iv(b['gain'])} | {_iv(b['forget'])} | {'yes' if b['inside_measured_range'] else 'no: extrapolated'} |")
    if fit["proposals"]:
        a = fit["acquisition"]
        knob = f"xi = {a['xi']:g}" if a["kind"] == "ei" else f"kappa = {a['kappa']:g}"
        L += ["", "## Next arms", "", f"Acquisition: {'expected improvement' if a['kind'] == 'ei' else 'upper confidence bound'}"
              f" ({knob}), batch by {a['batch']}. Paste into a sweep spec (`mixfit_arms.yaml`):", "", "```yaml",
              fragment.rstrip(), "```", ""]
    if fit["skipped"]:
        L += ["", "Skipped: " + "; ".join(fit["skipped"]) + "."]
    if fit.get("validation"):
        v = fit["validation"]
        L += ["", f"## Predicted before (`{v['predicted_by']}`), measured now", "",
              "Interval: the earlier fit's 95% interval for a measurement (surface variance + noise / pretraining seeds).", "",
              "| arm | target | predicted [95%] | measured | error | covered |", "|---|---|---|---|---|---|"]
        L += [f"| {r['arm']} | {r['target']} | {_f(r['predicted'])} [{_f(r['lo'])}, {_f(r['hi'])}] | {_f(r['measured'])} "
              f"| {_f(r['error'])} | {'yes' if r['covered'] else 'no'} |" for r in v["rows"]]
        L += [""] + [f"- {t}: MAE {_f(e['mae']).lstrip('+')}, coverage {_f(e['coverage'], False)} over {e['n']} arm(s)"
                     for t, e in v["summary"].items()]
        if v["not_measured"]:
            L.append(f"- proposed but not in these results: {v['not_measured']}")
    L += ["", "## Surfaces", ""] + [f"![{p}]({p})" for p in figs] + [""]
    (out / "mixfit.md").write_text("\n".join(L))


def mixfit(results: Path, out_dir: Path = Path("runs/mixfit"), domains: Optional[list[str]] = None,
           task_of: Optional[dict[str, str]] = None, total_steps: Optional[int] = None,
           budget_steps: Optional[float] = None, propose: int = 0, acquisition: Literal["ei", "ucb"] = "ei",
           xi: float = 0.001, kappa: float = 2.0, forget_weight: float = 0.0, starts: Optional[list[int]] = None,
           weights: Optional[list[float]] = None, grid: int = 41, seed: int = 0,
           compare: Optional[Path] = None) -> dict:
    """Fit a surrogate of the post-SFT gain and forgetting over (start, weight, domain) to a study's results.

    Args:
        results: A study's results.json (`reproduce` or `sweep --action report`).
        out_dir: Where mixfit.json, mixfit.md, mixfit_<domain>.png and mixfit_arms.yaml go.
        domains: Fit only these domains (default: every arm's).
        task_of: Domain -> the SFT task that measures it (default: the task named as the domain).
        total_steps: The study's total steps (default: from the arms' run configs beside results.json).
        budget_steps: Keep the domain steps, weight x (total - start), within this for the best and the proposals.
        propose: Propose this many next arms (a sweep spec `arms:` fragment).
        acquisition: ei (expected improvement over the best measured arm's predicted objective) or ucb (mean + kappa std).
        xi: EI's knob: the improvement (in objective units, 0.001 = 0.1 percentage points) that counts.
        kappa: UCB's knob: how many stds of optimism.
        forget_weight: Objective = gain - forget_weight x forgetting (0: the gain alone).
        starts: Candidate starts (default: `grid` steps over (0, total)).
        weights: Candidate weights, each in (0, 1] (default: 0.05 to 1.0 by 0.05).
        grid: Number of candidate starts when `starts` is not given.
        seed: Random state of the GP's optimizer restarts.
        compare: An earlier mixfit.json whose proposals have since been run: their predicted gain and forgetting
            vs what this results.json measured (the validation of the surrogate).
    """
    fit = fit_results(results, domains, task_of, total_steps, budget_steps, propose, acquisition, xi, kappa,
                      forget_weight, starts, weights, grid, seed)
    if compare is not None:
        fit["validation"] = validate(Path(compare), fit)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figs = []
    for d in fit["domains"]:
        plot_surface(fit, d, out / f"mixfit_{d}.png")
        figs.append(f"mixfit_{d}.png")
    fragment = arms_fragment(fit["proposals"]) if fit["proposals"] else ""
    if fragment:
        (out / "mixfit_arms.yaml").write_text(fragment)
    write_md(fit, out, figs, fragment)
    saved = {k: v for k, v in fit.items() if not k.startswith("_")}
    (out / "mixfit.json").write_text(json.dumps(saved, indent=1))
    for t, r in fit["loao"].items():
        sp = "n/a" if r["spearman"] is None else f"{r['spearman']:.2f}"
        print(f"mixfit: {t}: leave-one-arm-out MAE {_f(r['mae']).lstrip('+')}, Spearman {sp}, "
              f"coverage {_f(r['coverage'], False)}")
    for d, b in fit["best"].items():
        if b:
            print(f"mixfit: best {d}: start {b['start']}, weight {b['weight']:g}: objective {_iv(b['objective'])}")
    print(f"mixfit: wrote {out / 'mixfit.md'}, mixfit.json, {', '.join(figs)}" + (", mixfit_arms.yaml" if fragment else ""))
    return saved
