"""`litgpt-ext reproduce` (== `make reproduce`): the paper's study at CPU scale, end to end.

Stages (each skipped when its output exists, so an interrupted run continues where it stopped):

1. the offline demo corpus (`build-demo`) and its SFT tasks (`build-sft-tasks`: code, math, prose);
2. pretraining: one general-only base run per pretraining seed to the shared total, and every arm
   forked from its seed's base run at its start step with its new blend (`litgpt_ext.study.sweep`);
3. SFT of every arm's final checkpoint on its tasks: an LR sweep with the first SFT seed picks the
   LR with the lowest SFT validation loss (per checkpoint and task, as the paper), then the other
   seeds run at that LR;
4. the bridge: dataset similarity of each arm's mix to each SFT set (`litgpt_ext.study.similarity`);
5. `REPORT.md` with tables, PNG figures, the four findings as measured, seeds, sizes and versions.

Everything runs in this process (no interpreter start-up per run). The same grid at Pythia scale is
`midtrain_configs/sweeps/paper_pythia160m.yaml` for `litgpt-ext sweep` (a SLURM plan).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from litgpt_ext.study.sweep import Job, SweepSpec, mix_string, plan_sweep, read_yaml_for

DOMAIN_TASK = {"code": "code", "math": "math"}  # the SFT task of each midtraining domain


@dataclass
class Arm:
    name: str
    domain: str
    start: int
    weight: float
    seeds: Optional[list[int]] = None  # pretraining seeds this arm runs under (default: the first)
    tasks: Optional[list[str]] = None  # SFT tasks (default: its domain's task and prose)
    role: str = "mid"  # mid | cpt | cross (for the findings)


@dataclass
class ReproduceConfig:
    out_dir: Path = Path("runs/reproduce")
    demo_dir: Path = Path("data/demo")
    pretrain_config: Path = Path("midtrain_configs/reproduce/pretrain_cpu.yaml")
    sft_config: Path = Path("midtrain_configs/reproduce/sft_cpu.yaml")
    total_steps: int = 300
    pretrain_seeds: list[int] = field(default_factory=lambda: [42, 43])
    arms: list[dict] = field(default_factory=list)
    base_tasks: list[str] = field(default_factory=lambda: ["code", "math", "prose"])
    sft_lrs: list[float] = field(default_factory=lambda: [1e-3, 3e-3])
    sft_seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    similarity_docs: int = 300
    sft_task_args: dict[str, Any] = field(default_factory=dict)
    """Flags of `build-sft-tasks` (e.g. math_examples: fewer problems for a faster study)"""
    threads: Optional[int] = None


def load_config(path: Path) -> ReproduceConfig:
    cfg = ReproduceConfig(**read_yaml_for(path, "reproduce config", ReproduceConfig))
    for k in ("out_dir", "demo_dir", "pretrain_config", "sft_config"):
        setattr(cfg, k, Path(getattr(cfg, k)))
    validate_config(cfg)
    return cfg


def validate_config(cfg: ReproduceConfig) -> None:
    if len(cfg.sft_seeds) < 2:
        raise ValueError(f"sft_seeds needs >= 2 seeds for std and t-tests, got {cfg.sft_seeds}")
    if not cfg.sft_lrs or any(lr <= 0 for lr in cfg.sft_lrs):
        raise ValueError(f"sft_lrs must be positive learning rates, got {cfg.sft_lrs}")
    for p in (cfg.pretrain_config, cfg.sft_config):
        if not Path(p).is_file():
            raise FileNotFoundError(f"reproduce: config {str(p)!r} does not exist")
    bad = sorted(set(cfg.base_tasks) - {"code", "math", "prose"})
    if bad:
        raise ValueError(f"base_tasks {bad} are not SFT tasks; known: code, math, prose")


def arms_of(cfg: ReproduceConfig) -> list[Arm]:
    arms = []
    for a in cfg.arms:
        bad = sorted(set(a) - set(Arm.__dataclass_fields__))
        if bad:
            raise ValueError(f"reproduce arm {a}: unknown keys {bad}; known: {sorted(Arm.__dataclass_fields__)}")
        arm = Arm(**a)
        if arm.domain not in DOMAIN_TASK:
            raise ValueError(f"reproduce arm {arm.name}: domain {arm.domain!r} has no SFT task; known: {sorted(DOMAIN_TASK)}")
        if arm.role not in ("mid", "cpt", "cross"):
            raise ValueError(f"reproduce arm {arm.name}: role must be mid, cpt or cross, got {arm.role!r}")
        arm.seeds = arm.seeds or cfg.pretrain_seeds[:1]
        unknown = sorted(set(arm.seeds) - set(cfg.pretrain_seeds))
        if unknown:
            raise ValueError(f"reproduce arm {arm.name}: seeds {unknown} are not pretraining seeds {cfg.pretrain_seeds}")
        arm.tasks = arm.tasks or [DOMAIN_TASK[arm.domain], "prose"]
        arms.append(arm)
    return arms


# --------------------------------------------------------------------------------------------- stages


class _Progress:
    """Periodic lines with rate and ETA (the study runs for many minutes, usually piped to a log)."""

    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()

    def step(self, what: str) -> None:
        el = time.perf_counter() - self.t0
        eta = el / self.done * (self.total - self.done) if self.done else float("nan")
        print(f"[reproduce {self.done + 1}/{self.total}] {what} | elapsed {el / 60:.1f} min"
              + (f" | ETA {eta / 60:.1f} min" if self.done else ""), flush=True)
        self.done += 1


TIMINGS = "timings.jsonl"
"""<out_dir>/timings.jsonl: the wall time of every stage as it ran, over all invocations (a resumed
study's report still gives the whole study's cost)."""


@contextlib.contextmanager
def _timed(out_dir: Path, stage: str, what: str):
    t = time.perf_counter()
    yield
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / TIMINGS, "a") as f:
        f.write(json.dumps({"stage": stage, "what": what, "seconds": round(time.perf_counter() - t, 2)}) + "\n")


def stage_minutes(out_dir: Path) -> dict[str, float]:
    """Minutes per stage summed over timings.jsonl (stages that ran; skipped ones cost nothing)."""
    out: dict[str, float] = {}
    path = out_dir / TIMINGS
    for line in path.read_text().splitlines() if path.is_file() else []:
        d = json.loads(line)
        out[d["stage"]] = out.get(d["stage"], 0.0) + d["seconds"] / 60
    return out


def _cli(args: list[str], log: Path, out_dir: Optional[Path] = None) -> None:
    """One litgpt-ext command in this process, its output to a log file (the console gets progress);
    its wall time goes to <out_dir>/timings.jsonl."""
    from litgpt_ext.cli import main as cli_main

    log.parent.mkdir(parents=True, exist_ok=True)
    timed = _timed(out_dir, args[0], " ".join(args[1:])) if out_dir is not None else contextlib.nullcontext()
    with timed, open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            cli_main(args)
        except SystemExit as e:
            if e.code not in (0, None):
                raise RuntimeError(f"`litgpt-ext {' '.join(args)}` failed ({e.code}); log: {log}") from None


def _demo_paths(demo: Path) -> dict[str, Any]:
    """The demo corpus's shards, validation sets and tokenizer (the study's data lives in `demo_dir`)."""
    return {"data.init_args.data_path": str(demo), "tokenizer_dir": str(demo / "tokenizer"),
            "data.init_args.val_data_path": {"general": [str(demo / "val" / "1"), str(demo / "val" / "2")],
                                             "math": str(demo / "val" / "m1"), "code": str(demo / "val" / "c1")}}


def pretrain_jobs(cfg: ReproduceConfig, arms: list[Arm]) -> list[Job]:
    spec = SweepSpec(name="reproduce", base_config=cfg.pretrain_config, total_steps=cfg.total_steps,
                     out_root=cfg.out_dir / "runs", seeds=cfg.pretrain_seeds,
                     arms=[{"name": a.name, "domain": a.domain, "start": a.start, "weight": a.weight,
                            "seeds": a.seeds} for a in arms],
                     base_overrides=_demo_paths(cfg.demo_dir), arm_overrides=_demo_paths(cfg.demo_dir))
    return plan_sweep(spec)


@dataclass
class SFTRun:
    source: str  # pretraining job name
    family: str  # arm name without the seed (base, math_mid, ...)
    pretrain_seed: int
    task: str
    lr: float
    seed: int
    out_dir: Path

    def metrics(self) -> Optional[dict]:
        p = self.out_dir / "sft_metrics.json"
        return json.loads(p.read_text()) if p.is_file() else None


def sft_config(cfg: ReproduceConfig, base: dict, run: SFTRun, ckpt_dir: Path) -> dict:
    c = copy.deepcopy(base)
    c["checkpoint_dir"] = str(ckpt_dir)
    c["out_dir"] = str(run.out_dir)
    c["seed"] = run.seed
    c.setdefault("optimizer", {}).setdefault("init_args", {})["lr"] = run.lr
    init = c.setdefault("data", {}).setdefault("init_args", {})
    init["train_path"] = str(cfg.demo_dir / "sft_tasks" / run.task)
    init["name"] = f"demo_{run.task}"
    init["mask_prompt"] = run.task != "code"  # code: the whole function is learned (the paper's PyCode)
    val = c.setdefault("eval", {}).setdefault("val_data_path", {})
    val["general"] = [str(cfg.demo_dir / "val" / "1"), str(cfg.demo_dir / "val" / "2")]
    return c


def run_sft_grid(cfg: ReproduceConfig, sources: list[tuple[str, str, int, Path, list[str]]], progress: _Progress) -> list[SFTRun]:
    """LR sweep with the first seed, then the other seeds at the best LR, per (source, task)."""
    base = yaml.safe_load(cfg.sft_config.read_text()) or {}
    done: list[SFTRun] = []
    cfg_dir = cfg.out_dir / "configs" / "sft"
    cfg_dir.mkdir(parents=True, exist_ok=True)

    def run(r: SFTRun, ckpt_dir: Path) -> None:
        if r.metrics() is None:
            progress.step(f"sft {r.task} from {r.source} lr {r.lr:g} seed {r.seed}")
            path = cfg_dir / f"{r.source}_{r.task}_lr{r.lr:g}_s{r.seed}.yaml"
            path.write_text(yaml.safe_dump(sft_config(cfg, base, r, ckpt_dir), sort_keys=False))
            _cli(["sft", "--config", str(path)], r.out_dir / "sft.log", cfg.out_dir)
        else:
            progress.done += 1
        done.append(r)

    for source, family, pseed, ckpt_dir, tasks in sources:
        for task in tasks:
            first = [SFTRun(source, family, pseed, task, lr, cfg.sft_seeds[0],
                            cfg.out_dir / "sft" / task / source / f"lr{lr:g}_seed{cfg.sft_seeds[0]}") for lr in cfg.sft_lrs]
            for r in first:
                run(r, ckpt_dir)
            best = min(first, key=lambda r: r.metrics()["sft_val_loss"]).lr
            for s in cfg.sft_seeds[1:]:
                run(SFTRun(source, family, pseed, task, best, s, cfg.out_dir / "sft" / task / source / f"lr{best:g}_seed{s}"),
                    ckpt_dir)
    return done


# --------------------------------------------------------------------------------------------- analysis


def best_lr_runs(runs: list[SFTRun]) -> dict[tuple[str, str], list[dict]]:
    """{(family, task): metrics of the runs at each source's chosen LR, all seeds, all pretraining seeds}."""
    by_src: dict[tuple[str, str], list[SFTRun]] = {}
    for r in runs:
        by_src.setdefault((r.source, r.task), []).append(r)
    out: dict[tuple[str, str], list[dict]] = {}
    for (_source, task), rs in by_src.items():
        first_seed = min(r.seed for r in rs)
        best = min((r for r in rs if r.seed == first_seed), key=lambda r: r.metrics()["sft_val_loss"]).lr
        for r in rs:
            if r.lr == best:
                out.setdefault((r.family, task), []).append({**r.metrics(), "pretrain_seed": r.pretrain_seed})
    return out


@dataclass
class Cell:
    family: str
    task: str
    n: int
    sft: list[float]
    general: list[float]
    lrs: list[float]

    @property
    def sft_mean(self) -> float:
        return sum(self.sft) / len(self.sft)

    @property
    def general_mean(self) -> float:
        return sum(self.general) / len(self.general)


def cells_of(best: dict[tuple[str, str], list[dict]]) -> dict[tuple[str, str], Cell]:
    return {k: Cell(k[0], k[1], len(v), [m["sft_val_loss"] for m in v], [m["val_losses"]["general"] for m in v],
                    sorted({m["lr"] for m in v})) for k, v in best.items()}


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


def findings(cells: dict, arms: list[Arm]) -> list[dict]:
    """F1-F4 as measured: each with the numbers and holds / does not hold at this scale."""
    fam = {a.name: a for a in arms}
    out = []

    # F1: gains are larger for far domains (the midtraining domain's own task) than on near (prose) text
    far, near = [], []
    for a in arms:
        if a.role != "mid":
            continue
        c = compare(cells, a.name, DOMAIN_TASK[a.domain])
        n = compare(cells, a.name, "prose")
        if c:
            far.append((a.name, DOMAIN_TASK[a.domain], c["sft"]["rel_improvement"], c["sft"]["p"]))
        if n:
            near.append((a.name, "prose", n["sft"]["rel_improvement"], n["sft"]["p"]))
    if far and near:
        mf, mn = sum(x[2] for x in far) / len(far), sum(x[2] for x in near) / len(near)
        each = lambda xs: ", ".join(f"{a}/{t} {_pct(v)} ({_p(p)})" for a, t, v, p in xs)  # noqa: E731
        out.append({"id": "F1", "claim": "midtraining helps most for domains far from general pretraining data",
                    "measure": "mean relative SFT-loss improvement over base: on the arm's own (far) domain task vs on prose (near)",
                    "summary": f"Relative SFT-loss improvement over base on the arms' own domains: mean {_pct(mf)} "
                               f"({each(far)}); on prose: mean {_pct(mn)} ({each(near)}); "
                               f"{_sig([x[3] for x in far + near])}.",
                    "numbers": {"far": far, "near": near, "far_mean": mf, "near_mean": mn}, "holds": mf > mn and mf > 0})

    # F2: midtraining (mix) beats continued pretraining on the domain alone, in-domain and in forgetting
    rows = []
    for a in arms:
        if a.role != "cpt":
            continue
        mid = next((m for m in arms if m.role == "mid" and m.domain == a.domain), None)
        task = DOMAIN_TASK[a.domain]
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

    # F3 is computed with the similarity stage (PA vs improvement); F4: timing x weight
    cross = [a for a in arms if a.role == "cross"]
    if cross:
        table = {}
        starts = sorted({a.start for a in cross})
        weights = sorted({a.weight for a in cross})
        for a in cross:
            c = compare(cells, a.name, DOMAIN_TASK[a.domain])
            if c:
                table[(a.start, a.weight)] = c["sft"]["rel_improvement"]
        if len(starts) >= 2 and len(weights) >= 2 and all((s, w) in table for s in starts for w in weights):
            early, late, lo, hi = starts[0], starts[-1], weights[0], weights[-1]
            d_early = table[(early, hi)] - table[(early, lo)]  # what a high weight buys (or costs) early
            d_late = table[(late, hi)] - table[(late, lo)]
            cell = lambda st, w: f"{_pct(table[(st, w)])}"  # noqa: E731
            out.append({"id": "F4", "claim": "an early start tolerates a high specialized weight; a late start needs a low one",
                        "measure": "relative SFT-loss improvement over base at (start, weight); "
                                   "high-minus-low weight difference early vs late (holds if it is larger early and "
                                   "negative late)",
                        "summary": f"Start {early}: weight {lo:g} {cell(early, lo)}, weight {hi:g} {cell(early, hi)} "
                                   f"(high − low {_pct(d_early)}); start {late}: weight {lo:g} {cell(late, lo)}, "
                                   f"weight {hi:g} {cell(late, hi)} (high − low {_pct(d_late)}). One pretraining seed per "
                                   "cell: no test of the interaction.",
                        "numbers": {"table": {f"start {s} / weight {w:g}": v for (s, w), v in sorted(table.items())},
                                    "high_minus_low_early": d_early, "high_minus_low_late": d_late},
                        "holds": d_early > d_late and d_late < 0})
    del fam
    return out


# --------------------------------------------------------------------------------------------- report


def _plots(cells: dict, arms: list[Arm], out: Path, cross_table: Optional[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    files = []
    tasks = sorted({t for _, t in cells})
    fams = ["base"] + [a.name for a in arms]
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.2 * len(tasks), 7), squeeze=False)
    for j, task in enumerate(tasks):
        for i, (what, label) in enumerate((("sft", "SFT val loss"), ("general", "general loss after SFT"))):
            ax = axes[i][j]
            names = [f for f in fams if (f, task) in cells]
            vals = [getattr(cells[(f, task)], what) for f in names]
            ax.bar(range(len(names)), [np.mean(v) for v in vals], yerr=[np.std(v, ddof=1) if len(v) > 1 else 0 for v in vals],
                   color=["#777" if n == "base" else "#1f77b4" for n in names], capsize=3)
            ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
            lo = min(min(v) for v in vals)
            hi = max(max(v) for v in vals)
            ax.set_ylim(lo - 0.1 * (hi - lo + 1e-6), hi + 0.1 * (hi - lo + 1e-6))
            ax.set_title(f"{task}: {label}", fontsize=9)
    fig.suptitle("after SFT (mean ± std over seeds; lower is better)")
    fig.tight_layout()
    fig.savefig(out / "sft_losses.png", dpi=110)
    plt.close(fig)
    files.append("sft_losses.png")
    if cross_table:
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
        starts = sorted({s for s, _ in cross_table})
        for w in sorted({w for _, w in cross_table}):
            ax.plot(starts, [cross_table.get((s, w), np.nan) for s in starts], "o-", label=f"weight {w:g}")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel("midtraining start step")
        ax.set_ylabel("relative SFT-loss improvement")
        ax.legend()
        ax.set_title("F4: timing x weight")
        fig.tight_layout()
        fig.savefig(out / "timing_weight.png", dpi=110)
        plt.close(fig)
        files.append("timing_weight.png")
    return files


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


def write_report(cfg: ReproduceConfig, arms: list[Arm], runs: list[SFTRun], sim: Optional[dict], seconds: float) -> Path:
    cells = cells_of(best_lr_runs(runs))
    out = cfg.out_dir
    f = findings(cells, arms)
    cross = next((x["numbers"]["table"] for x in f if x["id"] == "F4"), None)
    cross_table = None
    if cross:
        cross_table = {}
        for k, v in cross.items():
            s, w = k.replace("start ", "").split(" / weight ")
            cross_table[(int(s), float(w))] = v
    figs = _plots(cells, arms, out, cross_table)

    # F3: PA vs relative improvement (every arm x task with a comparison)
    f3_missing = "Not measured: the similarity stage did not run."
    if sim is not None and "error" in sim:
        f3_missing = f"Not measured: the similarity stage failed ({sim['error']})."
    elif sim is not None:
        f3_missing = "Not measured: fewer than 3 (arm, task) points to correlate."
        points = []
        for fam, task in sorted(cells):
            if fam == "base":
                continue
            cmp = compare(cells, fam, task)
            if cmp:
                points.append({"set": fam, "sft": task, "rel_improvement": cmp["sft"]["rel_improvement"]})
        from litgpt_ext.study.similarity import correlate, plot_pa_scatter

        pts, corr = correlate(sim["pa"], points)
        if len(pts) >= 3:
            plot_pa_scatter(pts, corr, out / "pa_vs_improvement.png")
            figs.append("pa_vs_improvement.png")
            m = "unigram_js"
            r = corr[m]["r"]
            others = ", ".join(f"{m2} r = {c['r']:.2f} ({_p(c.get('p'))})" for m2, c in corr.items() if m2 != m)
            f.insert(2, {"id": "F3", "claim": "the gain grows with the proximity advantage (PA) of the mix to the SFT data",
                         "measure": f"Pearson r between PA ({m}) and relative SFT-loss improvement over {len(pts)} (arm, task) points",
                         "summary": f"Pearson r = {r:.2f} ({_p(corr[m].get('p'))}, n = {len(pts)}) between PA ({m}) and the "
                                    f"relative SFT-loss improvement; the other measures: {others}; "
                                    f"{_sig([corr[m].get('p')])}.",
                         "numbers": {m2: {"r": c["r"], "p": c.get("p"), "slope": c["slope"]} for m2, c in corr.items()},
                         "holds": (not math.isnan(r)) and r > 0})
            figs.append("similarity/similarity_heatmap.png")

    L = ["# Reproduction at CPU scale: Midtraining Bridges Pretraining and Posttraining Distributions", ""]
    cost = stage_minutes(out)
    spent = (f"The study's stages took {sum(cost.values()):.1f} min of wall time as they ran ("
             + ", ".join(f"{k} {v:.1f}" for k, v in cost.items()) + "; summed over every invocation, from "
             f"`{TIMINGS}`); this invocation took {seconds / 60:.1f} min." if cost else
             f"This invocation took {seconds / 60:.1f} min.")
    L += [f"Generated by `litgpt-ext reproduce`. {spent} Everything below is measured; "
          "nothing was tuned until a finding held.", ""]
    L += ["## Setup", "", f"- pretraining: `{cfg.pretrain_config}`, {cfg.total_steps} steps total, seeds {cfg.pretrain_seeds}; "
          f"arms fork the base run of their seed and train to the same total with the base run's schedule (no re-warmup)",
          f"- SFT: `{cfg.sft_config}`; LR sweep {cfg.sft_lrs} with seed {cfg.sft_seeds[0]}, the best LR per (checkpoint, task) "
          f"by SFT validation loss, then seeds {cfg.sft_seeds[1:]} at that LR", "", "| arm | role | domain | start | weight | mix | pretraining seeds | SFT tasks |",
          "|---|---|---|---|---|---|---|---|", f"| base | base | - | - | - | main:1.0 | {cfg.pretrain_seeds} | {cfg.base_tasks} |"]
    for a in arms:
        L.append(f"| {a.name} | {a.role} | {a.domain} | {a.start} | {a.weight:g} | {mix_string('main', a.domain, a.weight)} | {a.seeds} | {a.tasks} |")
    L += ["", "## Results after SFT", "", "Mean ± std over all SFT runs at the chosen LR (SFT seeds x pretraining seeds). "
          "Relative improvement = (L_base − L_arm) / L_base; p from Welch's t-test against base.", "",
          "| arm | task | n | chosen LR(s) | SFT val loss | rel. impr. | p | general loss after SFT | rel. impr. | p |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for (fam, task), c in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0] != "base", kv[0][0])):
        cmp = compare(cells, fam, task) if fam != "base" else None
        L.append(f"| {fam} | {task} | {c.n} | {', '.join(f'{x:g}' for x in c.lrs)} | {_ms(c.sft)} | {_cell(cmp, 'sft', 'rel_improvement')} | "
                 f"{_cell(cmp, 'sft', 'p')} | {_ms(c.general)} | {_cell(cmp, 'general', 'rel_improvement')} | {_cell(cmp, 'general', 'p')} |")
    L += ["", "## Findings, as measured", ""]
    L += [f"Each verdict follows the direction of the means as the claim states it; the sentence under it says how "
          f"many of the tests behind it are significant at p < {ALPHA}. The numbers are in `results.json`.", "",
          "| finding | at this scale |", "|---|---|"]
    L += [f"| {x['id']}: {x['claim']} | {'holds' if x['holds'] else 'does not hold'} |" for x in sorted(f, key=lambda x: x["id"])]
    L.append("")
    for x in sorted(f, key=lambda x: x["id"]):
        L += [f"### {x['id']}: {x['claim']}", "", f"**{'Holds' if x['holds'] else 'Does not hold'} at this scale.** "
              + x.get("summary", ""), "", f"Measure: {x.get('measure', 'see numbers')}.", "",
              "<details><summary>numbers</summary>", "", "```", json.dumps(x["numbers"], indent=1, default=str), "```",
              "", "</details>", ""]
    missing = {"F1", "F2", "F3", "F4"} - {x["id"] for x in f}
    for m in sorted(missing):
        why = f3_missing if m == "F3" else "Not measured: the config lacks the arms it needs (F1: mid arms; F2: a cpt arm per mid domain; F4: a 2x2 cross)."
        L += [f"### {m}", "", why, ""]
    L += ["## Figures", ""] + [f"![{p}]({p})" for p in figs]
    L += ["", "## Versions", "", "```", json.dumps(_versions(), indent=1), "```", "",
          "Scale caveat: a ~2M-parameter model on ~4M tokens; the paper's Pythia runs are 10^4-10^5 times larger. "
          "The same grid at Pythia scale: `litgpt-ext sweep --spec midtrain_configs/sweeps/paper_pythia160m.yaml`.", ""]
    path = out / "REPORT.md"
    path.write_text("\n".join(L))
    (out / "results.json").write_text(json.dumps({"cells": {f"{k[0]}|{k[1]}": vars(v) for k, v in cells.items()},
                                                    "findings": f}, indent=1, default=str))
    return path


# --------------------------------------------------------------------------------------------- command


def reproduce(
    out_dir: Path = Path("runs/reproduce"),
    demo_dir: Path = Path("data/demo"),
    pretrain_config: Path = Path("midtrain_configs/reproduce/pretrain_cpu.yaml"),
    sft_config: Path = Path("midtrain_configs/reproduce/sft_cpu.yaml"),
    total_steps: int = 200,
    pretrain_seeds: tuple[int, ...] = (42, 43),
    arms: Optional[list[dict[str, Any]]] = None,
    base_tasks: tuple[str, ...] = ("code", "math", "prose"),
    sft_lrs: tuple[float, ...] = (1e-3, 3e-3),
    sft_seeds: tuple[int, ...] = (1, 2, 3),
    similarity_docs: int = 300,
    sft_task_args: Optional[dict[str, Any]] = None,
    threads: Optional[int] = None,
) -> dict:
    """Run the paper's study at CPU scale and write <out_dir>/REPORT.md (stages with outputs are skipped).

    `litgpt-ext reproduce --config midtrain_configs/reproduce/cpu.yaml` (`make reproduce`).

    Args:
        out_dir: Where runs, SFT runs, similarity, figures and REPORT.md go.
        demo_dir: The offline demo corpus (built with `build-demo` when missing; its SFT tasks too).
        pretrain_config: The general-only base run's config (model, data, optimizer, schedule).
        sft_config: The SFT config every SFT run copies (epochs, batch, warmup, eval sets).
        total_steps: The shared total every run ends at.
        pretrain_seeds: One base run per seed; arms run under the seeds they name (default: the first).
        arms: Midtraining arms: {name, domain (math|code), start, weight, role (mid|cpt|cross), seeds, tasks}.
        base_tasks: SFT tasks of the base runs (the reference of every comparison).
        sft_lrs: LRs swept with the first SFT seed; the best (lowest SFT val loss) is kept per checkpoint and task.
        sft_seeds: SFT seeds (>= 2): the first sweeps the LR, the others run at the chosen LR.
        similarity_docs: Documents per shard and SFT set for the similarity measures.
        sft_task_args: Flags of `build-sft-tasks` (e.g. {math_examples: 500}).
        threads: torch threads (default: torch's).
    """
    import torch

    cfg = ReproduceConfig(out_dir=Path(out_dir), demo_dir=Path(demo_dir), pretrain_config=Path(pretrain_config),
                          sft_config=Path(sft_config), total_steps=total_steps, pretrain_seeds=list(pretrain_seeds),
                          arms=list(arms or []), base_tasks=list(base_tasks), sft_lrs=list(sft_lrs),
                          sft_seeds=list(sft_seeds), similarity_docs=similarity_docs,
                          sft_task_args=dict(sft_task_args or {}), threads=threads)
    validate_config(cfg)
    arms = arms_of(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    logs = cfg.out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    if not (cfg.demo_dir / "DONE.json").is_file():
        print(f"[reproduce] building the demo corpus in {cfg.demo_dir}", flush=True)
        _cli(["build-demo", "--out_dir", str(cfg.demo_dir)], logs / "build-demo.log", cfg.out_dir)
    if not (cfg.demo_dir / "sft_tasks" / "manifest.json").is_file():
        print("[reproduce] building the SFT tasks", flush=True)
        extra = [x for k, v in cfg.sft_task_args.items() for x in (f"--{k}", str(v))]
        _cli(["build-sft-tasks", "--demo_dir", str(cfg.demo_dir), *extra], logs / "build-sft-tasks.log", cfg.out_dir)

    jobs = pretrain_jobs(cfg, arms)
    n_sft = sum(len(cfg.base_tasks) for _ in cfg.pretrain_seeds) + sum(len(a.tasks) * len(a.seeds) for a in arms)
    progress = _Progress(len(jobs) + n_sft * (len(cfg.sft_lrs) + len(cfg.sft_seeds) - 1))
    cfg_dir = cfg.out_dir / "configs" / "pretrain"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    for j in jobs:
        if j.done():
            progress.done += 1
            continue
        what = (f" (fork @{j.info['start']}, {j.info['mix']})" if j.stage == "midtrain"
                else f" (until step {j.info['pause']})" if j.info.get("pause") is not None else "")
        progress.step(f"{j.stage} {j.name}{what}")
        path = cfg_dir / f"{j.name}.yaml"
        path.write_text(yaml.safe_dump(j.config, sort_keys=False))
        _cli(["pretrain", "--config", str(path)], j.out_dir / "reproduce.log", cfg.out_dir)

    fam = {a.name: a for a in arms}
    sources = []
    for j in jobs:
        if j.info.get("pause") is not None:
            continue  # a base run's segment up to a fork step: its run's last job is the SFT source
        family = "base" if j.stage == "base" else j.name.rsplit("_seed", 1)[0]
        tasks = cfg.base_tasks if family == "base" else fam[family].tasks
        sources.append((j.name, family, j.info["seed"], j.out_dir / "final", tasks))
    runs = run_sft_grid(cfg, sources, progress)

    sim = None
    try:
        print("[reproduce] similarity of the mixes to the SFT sets", flush=True)
        sets = {"base": "main:1.0", **{a.name: mix_string("main", a.domain, a.weight) for a in arms}}
        sft_sets = {t: cfg.demo_dir / "sft_tasks" / t / "train.json" for t in sorted({t for a in arms for t in a.tasks} | set(cfg.base_tasks))}
        from litgpt_ext.study.similarity import similarity

        saved = cfg.out_dir / "similarity" / "similarity.json"
        old = json.loads(saved.read_text()) if saved.is_file() else {}
        if (old.get("mixes"), old.get("sft_paths"), old.get("num_docs")) == (
                sets, {k: str(v) for k, v in sft_sets.items()}, cfg.similarity_docs):
            sim = old  # same sets, SFT sets and sample size: the stage's output exists
        else:
            with _timed(cfg.out_dir, "similarity", ""), open(logs / "similarity.log", "w") as fh, \
                    contextlib.redirect_stdout(fh):
                sim = similarity(cfg.demo_dir, cfg.demo_dir / "tokenizer", sets, sft_sets, general="base",
                                 num_docs=cfg.similarity_docs, out_dir=cfg.out_dir / "similarity")
    except (ValueError, FileNotFoundError) as e:
        print(f"[reproduce] similarity failed, F3 not measured: {e}")
        sim = {"error": str(e)}
    report = write_report(cfg, arms, runs, sim, time.perf_counter() - t0)
    print(f"[reproduce] done in {(time.perf_counter() - t0) / 60:.1f} min: {report}")
    print(report.read_text().split("## Findings, as measured")[1].split("## Figures")[0])
    return {"report": str(report), "minutes": (time.perf_counter() - t0) / 60}
