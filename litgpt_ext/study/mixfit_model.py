"""The surrogate behind `litgpt-ext mixfit`: measured points from a study's results.json, a Gaussian
process over (start, weight[, domain]), leave-one-arm-out errors and the acquisition for new arms.

Why a Gaussian process and not gradient boosting (OLMix's LightGBM, RegMix's regressors): a study
has a handful to a few dozen arms, each measured with seed noise. A GP with an RBF kernel interpolates
smoothly between so few points, its WhiteKernel estimates the seed noise from the replicates
(pretraining seeds of one arm), and it gives a predictive std, which the 95% intervals and the
acquisition (expected improvement, upper confidence bound) need. Boosted trees are piecewise constant,
extrapolate flat, need hundreds of proxy runs (OLMix's swarms) and have no native uncertainty.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

Z95 = 1.959963984540054
TARGETS = ("gain", "forget")
"""gain: relative SFT-loss improvement over base on the arm's domain's task, (L_base - L_arm) / L_base
(higher is better); forget: relative change of the general loss after SFT vs base, (G_arm - G_base) / G_base
(higher is more forgetting)."""


@dataclass
class Point:
    """One arm under one pretraining seed (its SFT seeds averaged first)."""

    arm: str
    domain: str
    start: int
    weight: float
    pseed: int
    gain: float
    forget: float


def _by_seed(values: list[float], pseeds: Optional[list[int]]) -> dict[int, float]:
    """Mean of a cell's runs per pretraining seed (None: all runs from one seed, 0)."""
    seeds = pseeds or [0] * len(values)
    out: dict[int, list[float]] = {}
    for s, v in zip(seeds, values):
        out.setdefault(int(s), []).append(float(v))
    return {s: sum(v) / len(v) for s, v in out.items()}


def points_of(results: dict, path: Path, domains: Optional[list[str]] = None,
              task_of: Optional[dict[str, str]] = None) -> tuple[list[Point], list[dict], list[str]]:
    """The measured points of a results.json: per arm (of `domains`) and pretraining seed, the gain and the
    forgetting on its domain's task (`task_of`, else the task named as the domain). Returns (points, the
    arms used, why others were skipped)."""
    if "arms" not in results:
        raise ValueError(f"{path}: no 'arms' list (a results.json written before the report recorded its arms; it has "
                         f"{sorted(results)}); mixfit needs each arm's domain, start and weight: rewrite it with the "
                         "study's `sweep --action report` or `reproduce` (finished runs are read, not rerun)")
    if "cells" not in results:
        raise ValueError(f"{path}: no 'cells' (the per-arm SFT results); it has {sorted(results)}")
    arms = results["arms"]
    for a in arms:
        missing = [k for k in ("name", "domain", "start", "weight") if a.get(k) is None]
        if missing:
            raise ValueError(f"{path}: arm {a.get('name', a)!r} lacks {missing}")
        if not 0 < float(a["weight"]) <= 1:
            raise ValueError(f"{path}: arm {a['name']!r} has weight {a['weight']}, outside (0, 1]")
    known = sorted({a["domain"] for a in arms})
    bad = sorted(set(domains or []) - set(known))
    if bad:
        raise ValueError(f"--domains: unknown domain(s) {bad}; the arms of {path} train on {known}")
    cells = {tuple(k.split("|", 1)): v for k, v in results["cells"].items()}
    tasks = {t for _, t in cells}
    task_of = dict(task_of or {})
    wrong = {d: t for d, t in task_of.items() if t not in tasks}
    if wrong:
        raise ValueError(f"--task_of {wrong}: no such SFT task in {path}; its tasks: {sorted(tasks)}")
    points, used, skipped = [], [], []
    for a in arms:
        if domains and a["domain"] not in domains:
            continue
        task = task_of.get(a["domain"]) or (a["domain"] if a["domain"] in tasks else None)
        if task is None:
            raise ValueError(f"{path}: no SFT task measures domain {a['domain']!r} (no task of that name; tasks: "
                             f"{sorted(tasks)}); name it with --task_of '{{{a['domain']}: <task>}}'")
        arm_c, base_c = cells.get((a["name"], task)), cells.get(("base", task))
        if arm_c is None or base_c is None:
            skipped.append(f"{a['name']}: no {'SFT result on ' + task if arm_c is None else 'base result on ' + task}")
            continue
        b_sft, b_gen = _by_seed(base_c["sft"], base_c.get("pseeds")), _by_seed(base_c["general"], base_c.get("pseeds"))
        m_sft, m_gen = _by_seed(arm_c["sft"], arm_c.get("pseeds")), _by_seed(arm_c["general"], arm_c.get("pseeds"))
        all_b_sft, all_b_gen = sum(b_sft.values()) / len(b_sft), sum(b_gen.values()) / len(b_gen)
        for s in sorted(m_sft):
            # paired with the base run of the same pretraining seed (the arm forks it); else the base's mean
            bs, bg = b_sft.get(s, all_b_sft), b_gen.get(s, all_b_gen)
            points.append(Point(a["name"], a["domain"], int(a["start"]), float(a["weight"]), s,
                                (bs - m_sft[s]) / bs, (m_gen[s] - bg) / bg))
        used.append({**a, "task": task, "pseeds": sorted(m_sft)})
    return points, used, skipped


def n_params(n_domains: int) -> int:
    """The GP's hyperparameters: an amplitude, a length scale per input (start, weight and one indicator per
    domain after the first), a noise level. A fit with fewer arms than these is refused."""
    return 1 + 2 + max(n_domains - 1, 0) + 1


def design(rows: list[tuple[str, int, float]], domains: list[str]) -> np.ndarray:
    """Inputs (start, weight, indicator of each domain after the first) of (domain, start, weight) rows."""
    return np.array([[float(s), float(w)] + [1.0 if d == o else 0.0 for o in domains[1:]] for d, s, w in rows])


class Surface:
    """A GP fit on standardized inputs (and targets); predictions in the target's units."""

    def __init__(self, X: np.ndarray, y: np.ndarray, seed: int = 0, kernel=None, optimize: bool = True,
                 restarts: int = 2):
        """`kernel`: start from these hyperparameters (a fit's `gp.kernel_`), re-optimized unless not `optimize`;
        `restarts`: random restarts of the optimizer when starting from the default kernel."""
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.gaussian_process import GaussianProcessRegressor
        from sklearn.gaussian_process.kernels import RBF, WhiteKernel
        from sklearn.gaussian_process.kernels import ConstantKernel as C
        from sklearn.preprocessing import StandardScaler

        self.scaler = StandardScaler().fit(X)
        given = kernel is not None
        if kernel is None:
            kernel = (C(1.0, (1e-3, 1e3)) * RBF(np.ones(X.shape[1]), (1e-2, 1e2))
                      + WhiteKernel(0.1, (1e-6, 1e1)))
        self.gp = GaussianProcessRegressor(kernel, normalize_y=True, n_restarts_optimizer=0 if given else restarts,
                                           optimizer="fmin_l_bfgs_b" if optimize else None, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.gp.fit(self.scaler.transform(X), y)

    @property
    def noise(self) -> float:
        """The fitted noise variance of one measurement (one pretraining seed), in the target's units."""
        return float(self.gp.kernel_.k2.noise_level) * float(np.atleast_1d(self.gp._y_train_std)[0]) ** 2

    def predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std of the surface itself (the WhiteKernel's measurement noise taken out)."""
        mu, sd = self.gp.predict(self.scaler.transform(X), return_std=True)
        return mu, np.sqrt(np.clip(sd ** 2 - self.noise, 0.0, None))


Fit = Callable[[np.ndarray, np.ndarray], Surface]


def spearman(a: list[float], b: list[float]) -> Optional[float]:
    from scipy.stats import spearmanr

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b).statistic)


def arm_groups(points: list[Point]) -> dict[tuple[str, int, float], list[Point]]:
    """Points grouped by arm position (domain, start, weight): two arms at one position are one arm here."""
    out: dict[tuple[str, int, float], list[Point]] = {}
    for p in points:
        out.setdefault((p.domain, p.start, p.weight), []).append(p)
    return out


def loao(points: list[Point], target: str, domains: list[str], fit: Fit) -> dict:
    """Leave one arm out: for each arm position, fit on every other arm's points and predict its measured
    value (the mean over its pretraining seeds). MAE, Spearman of predicted vs measured, and how often the
    95% interval for that measurement (surface variance + noise / seeds) covered it."""
    groups = arm_groups(points)
    rows = []
    for key, held in groups.items():
        rest = [p for k, g in groups.items() if k != key for p in g]
        s = fit(design([(p.domain, p.start, p.weight) for p in rest], domains), np.array([getattr(p, target) for p in rest]))
        mu, sd = s.predict(design([key], domains))
        measured = float(np.mean([getattr(p, target) for p in held]))
        half = Z95 * math.sqrt(float(sd[0]) ** 2 + s.noise / len(held))
        rows.append({"arms": sorted({p.arm for p in held}), "domain": key[0], "start": key[1], "weight": key[2],
                     "n_pseeds": len(held), "measured": measured, "predicted": float(mu[0]),
                     "lo": float(mu[0]) - half, "hi": float(mu[0]) + half, "error": float(mu[0]) - measured})
    err = [abs(r["error"]) for r in rows]
    return {"rows": rows, "mae": float(np.mean(err)) if err else None,
            "spearman": spearman([r["predicted"] for r in rows], [r["measured"] for r in rows]),
            "coverage": float(np.mean([r["lo"] <= r["measured"] <= r["hi"] for r in rows])) if rows else None}


class Objective:
    """gain − forget_weight · forget from the two surfaces (independent: the variances add)."""

    def __init__(self, gain: Surface, forget: Surface, forget_weight: float):
        self.gain, self.forget, self.lam = gain, forget, float(forget_weight)

    def predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mg, sg = self.gain.predict(X)
        if self.lam == 0:
            return mg, sg
        mf, sf = self.forget.predict(X)
        return mg - self.lam * mf, np.sqrt(sg ** 2 + (self.lam * sf) ** 2)


def acquisition(mu: np.ndarray, sd: np.ndarray, best: float, kind: str, xi: float, kappa: float) -> np.ndarray:
    """Expected improvement over `best` by more than `xi` (objective units), or mu + kappa·sd (UCB)."""
    from scipy.stats import norm

    if kind == "ucb":
        return mu + kappa * sd
    imp = mu - best - xi
    z = np.divide(imp, sd, out=np.zeros_like(imp), where=sd > 0)
    return np.where(sd > 0, imp * norm.cdf(z) + sd * norm.pdf(z), np.maximum(imp, 0.0))


def propose(points: list[Point], domains: list[str], cands: list[tuple[str, int, float]], n: int, kind: str,
            xi: float, kappa: float, forget_weight: float, gain: Surface, forget: Surface,
            taken: set[str]) -> list[dict]:
    """The next `n` arms: the candidate with the highest acquisition, then (kriging believer) its predicted
    values are added as if measured and the GPs refit with their hyperparameters fixed, so the batch
    spreads instead of piling onto one point. `taken`: arm names (and positions) not to propose again."""
    X_all = design(cands, domains)
    obs = [(p.domain, p.start, p.weight) for p in points]
    yg, yf = [p.gain for p in points], [p.forget for p in points]
    g, f = gain, forget
    out = []
    for _ in range(n):
        obj = Objective(g, f, forget_weight)
        best = float(np.max(obj.predict(design(obs, domains))[0]))
        mu, sd = obj.predict(X_all)
        score = acquisition(mu, sd, best, kind, xi, kappa)
        for i, c in enumerate(cands):
            if arm_label(*c) in taken:
                score[i] = -np.inf
        i = int(np.argmax(score))
        if not np.isfinite(score[i]):
            break
        c = cands[i]
        mg, sg = g.predict(X_all[i:i + 1])
        mf, sf = f.predict(X_all[i:i + 1])
        out.append({"name": arm_label(*c), "domain": c[0], "start": c[1], "weight": c[2], "acquisition": float(score[i]),
                    "objective": float(mu[i]), "objective_std": float(sd[i]),
                    "gain": float(mg[0]), "gain_std": float(sg[0]), "forget": float(mf[0]), "forget_std": float(sf[0])})
        taken.add(arm_label(*c))
        obs.append(c)
        yg.append(float(mg[0]))
        yf.append(float(mf[0]))
        X = design(obs, domains)
        g = Surface(X, np.array(yg), kernel=gain.gp.kernel_, optimize=False)
        f = Surface(X, np.array(yf), kernel=forget.gp.kernel_, optimize=False)
    return out


def arm_label(domain: str, start: int, weight: float) -> str:
    """The sweep's default arm name (`litgpt_ext.study.spec.arm_of`): <domain>_w<weight>_at<start>."""
    return f"{domain}_w{float(weight):g}_at{int(start)}"
