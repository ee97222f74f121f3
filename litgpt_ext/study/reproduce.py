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

Everything runs in this process (no interpreter start-up per run), through the one study executor
(`litgpt_ext.study.executor`: its "finished" rule, its interrupt handling: a preempted job exits 99
with the command to continue). The same grid at Pythia scale is
`midtrain_configs/sweeps/paper_pythia160m.yaml` for `litgpt-ext sweep` (a SLURM plan).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from litgpt_ext.study import report
from litgpt_ext.study.executor import Executor, Job
from litgpt_ext.study.report import Analysis, Arm, Cell, cells_of, compare, findings  # noqa: F401  (the API)
from litgpt_ext.study.representation_stage import representation_lines
from litgpt_ext.study.reproduce_sft import SFTGrid, SFTRun, best_lr_runs, lr_edges, lrs_for  # noqa: F401  (the API)
from litgpt_ext.study.spec import SweepSpec, arm_of, mix_string, read_yaml_for, split_run_name
from litgpt_ext.study.sweep import plan_sweep

DOMAIN_TASK = {"code": "code", "math": "math"}  # the SFT task of each midtraining domain
ANALYSIS = Analysis(task_of=DOMAIN_TASK, near_task="prose")
"""The CPU study's findings: each far arm on its own domain's task and on prose (the near domain)."""


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
    sft_lrs: Union[list[float], dict[str, list[float]]] = field(default_factory=lambda: [1e-3, 3e-3])
    """The SFT LR grid: one list for every task, or a list per task ({code: [...], math: [...], prose: [...]})"""
    sft_seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    similarity_docs: int = 300
    sft_task_args: dict[str, Any] = field(default_factory=dict)
    """Flags of `build-sft-tasks` (e.g. math_examples: fewer problems for a faster study)"""
    threads: Optional[int] = None
    """torch threads of each worker (and of this process; default: the cores divided among the workers)"""
    workers: int = 1
    """Jobs run at a time, each in a worker process (`litgpt_ext.study.pool`); 1: one after another here"""
    bootstrap: int = 1000
    """Hierarchical-bootstrap replicates behind every finding's 95% interval (0: no intervals)"""
    sft_lr_sweep: str = "per_checkpoint"
    """per_checkpoint (the paper): the LR sweep runs on every source checkpoint; per_arm: on each arm's
    first pretraining seed, whose chosen LR the arm's other pretraining seeds then use"""
    general_before: bool = False
    """The first SFT cell of each (checkpoint, task) also validates before its first step: the table's
    general loss before SFT (forgetting from midtraining alone)"""
    sft_lr_extend: int = 0
    """When the chosen SFT LR is at an edge of sft_lrs, try up to this many more LRs beyond that edge
    (one grid step each: the ratio of the two nearest grid LRs) until the optimum is interior"""
    cka_docs: int = 50
    """Held-out documents for the representation stage (CKA, weight distance; 0: skipped)"""
    replicates: Union[int, list[list[int]]] = 1
    """Disjoint pretraining-seed sets, each a whole study (`litgpt_ext.study.replicates`): a count N, or
    the sets themselves; > 1 set writes STABILITY.md (each finding's verdict per set, holds in k of N)"""


def load_config(path: Path) -> ReproduceConfig:
    cfg = ReproduceConfig(**read_yaml_for(path, "reproduce config", ReproduceConfig))
    for k in ("out_dir", "demo_dir", "pretrain_config", "sft_config"):
        setattr(cfg, k, Path(getattr(cfg, k)))
    validate_config(cfg)
    return cfg


def validate_config(cfg: ReproduceConfig) -> None:
    from litgpt_ext.study.replicates import seed_sets

    seed_sets(cfg.pretrain_seeds, cfg.replicates)  # checked before anything runs
    if min(cfg.bootstrap, cfg.sft_lr_extend, cfg.cka_docs) < 0:
        raise ValueError(f"bootstrap, sft_lr_extend and cka_docs must be >= 0, got {cfg.bootstrap}, {cfg.sft_lr_extend}"
                         f" and {cfg.cka_docs}")
    if cfg.sft_lr_sweep not in ("per_checkpoint", "per_arm"):
        raise ValueError(f"sft_lr_sweep must be per_checkpoint or per_arm, got {cfg.sft_lr_sweep!r}")
    if cfg.workers < 1 or (cfg.threads is not None and cfg.threads < 1):
        raise ValueError(f"workers and threads must be >= 1, got workers={cfg.workers} threads={cfg.threads}")
    if len(cfg.sft_seeds) < 2:
        raise ValueError(f"sft_seeds needs >= 2 seeds for std and t-tests, got {cfg.sft_seeds}")
    grids = cfg.sft_lrs.values() if isinstance(cfg.sft_lrs, dict) else [cfg.sft_lrs]
    if not cfg.sft_lrs or any(not g or any(not isinstance(lr, (int, float)) or lr <= 0 for lr in g) for g in grids):
        raise ValueError(f"sft_lrs must be positive learning rates (a list, or a list per task), got {cfg.sft_lrs}")
    if isinstance(cfg.sft_lrs, dict) and set(cfg.sft_lrs) - {"code", "math", "prose"}:
        raise ValueError(f"sft_lrs names tasks {sorted(set(cfg.sft_lrs) - {'code', 'math', 'prose'})} that are not SFT "
                         "tasks; known: code, math, prose")
    for p in (cfg.pretrain_config, cfg.sft_config):
        if not Path(p).is_file():
            raise FileNotFoundError(f"reproduce: config {str(p)!r} does not exist")
    bad = sorted(set(cfg.base_tasks) - {"code", "math", "prose"})
    if bad:
        raise ValueError(f"base_tasks {bad} are not SFT tasks; known: code, math, prose")
    for t in cfg.base_tasks:
        lrs_for(cfg, t)


def arms_of(cfg: ReproduceConfig) -> list[Arm]:
    arms = []
    for raw in cfg.arms:
        arm = arm_of(raw, "reproduce arm")
        if arm.match_tokens_of is not None:
            raise ValueError(f"reproduce arm {arm.name}: match_tokens_of is a sweep feature; give its start")
        if arm.domain not in DOMAIN_TASK:
            raise ValueError(f"reproduce arm {arm.name}: domain {arm.domain!r} has no SFT task; known: {sorted(DOMAIN_TASK)}")
        arm.seeds = arm.seeds or cfg.pretrain_seeds[:1]
        unknown = sorted(set(arm.seeds) - set(cfg.pretrain_seeds))
        if unknown:
            raise ValueError(f"reproduce arm {arm.name}: seeds {unknown} are not pretraining seeds {cfg.pretrain_seeds}")
        arm.tasks = arm.tasks or [DOMAIN_TASK[arm.domain], "prose"]
        for t in arm.tasks:
            lrs_for(cfg, t)
        arms.append(arm)
    return arms


# --------------------------------------------------------------------------------------------- stages


TIMINGS = "timings.jsonl"
"""<out_dir>/timings.jsonl: the wall and CPU time of every stage as it ran, over all invocations (a
resumed study's report still gives the whole study's cost)."""


@contextlib.contextmanager
def _timed(out_dir: Path, stage: str, what: str):
    t, cpu = time.perf_counter(), time.process_time()
    yield
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / TIMINGS, "a") as f:
        f.write(json.dumps({"stage": stage, "what": what, "seconds": round(time.perf_counter() - t, 2),
                            "cpu_seconds": round(time.process_time() - cpu, 2)}) + "\n")


def stage_minutes(out_dir: Path, key: str = "seconds") -> dict[str, float]:
    """Minutes per stage summed over timings.jsonl (stages that ran; skipped ones cost nothing): wall
    time, or with key="cpu_seconds" the CPU time (user + system) of the process that ran each stage."""
    out: dict[str, float] = {}
    path = out_dir / TIMINGS
    for line in path.read_text().splitlines() if path.is_file() else []:
        d = json.loads(line)
        out[d["stage"]] = out.get(d["stage"], 0.0) + d.get(key, 0.0) / 60
    return out


def _cli(args: list[str], log: Path, out_dir: Optional[Path] = None) -> None:
    """A data-building litgpt-ext command (no config, no checkpoints) in this process, its output to a
    log file; its wall time goes to <out_dir>/timings.jsonl. A failure is one line naming the log."""
    from litgpt_ext.cli import main as cli_main

    log.parent.mkdir(parents=True, exist_ok=True)
    timed = _timed(out_dir, args[0], " ".join(args[1:])) if out_dir is not None else contextlib.nullcontext()
    code = None
    with timed, open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            cli_main(args)
        except SystemExit as e:
            code = e.code
            if isinstance(code, str):
                print(code)
    if code not in (0, None):
        raise SystemExit(f"litgpt-ext reproduce: `litgpt-ext {' '.join(args)}` failed ({code if isinstance(code, int) else 1});"
                         f" its log: {log}; fix it, then run the same reproduce command again")


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


# --------------------------------------------------------------------------------------------- analysis


def write_report(cfg: ReproduceConfig, arms: list[Arm], runs: list[SFTRun], sim: Optional[dict], seconds: float,
                 out: Optional[Path] = None) -> Path:
    rep = representation_lines(cfg, arms, runs, cfg.out_dir / "logs")
    cost, cpu = stage_minutes(cfg.out_dir), stage_minutes(cfg.out_dir, "cpu_seconds")
    par = f", {cfg.workers} at a time, so their sum exceeds the elapsed time" if cfg.workers > 1 else ""
    spent = (f"The study's stages used {sum(cpu.values()):.1f} CPU-min ("
             + ", ".join(f"{k} {cpu.get(k, 0.0):.1f}" for k in cost) + f") and {sum(cost.values()):.1f} min of job wall time ("
             + ", ".join(f"{k} {v:.1f}" for k, v in cost.items()) + f"{par}), summed over every invocation from "
             f"`{TIMINGS}`; this invocation took {seconds / 60:.1f} min." if cost else
             f"This invocation took {seconds / 60:.1f} min.")
    setup = [f"- pretraining: `{cfg.pretrain_config}`, {cfg.total_steps} steps total, seeds {cfg.pretrain_seeds}; "
             "arms fork the base run of their seed and train to the same total with the base run's schedule (no re-warmup)",
             (f"- SFT: `{cfg.sft_config}`; LR sweep {cfg.sft_lrs} with seed {cfg.sft_seeds[0]}, the best LR per (checkpoint, task) "
              f"by SFT validation loss, then seeds {cfg.sft_seeds[1:]} at that LR" if cfg.sft_lr_sweep == "per_checkpoint" else
              f"- SFT: `{cfg.sft_config}`; LR sweep {cfg.sft_lrs} with seed {cfg.sft_seeds[0]} on each arm's first pretraining "
              f"seed, the best LR per (arm, task) by SFT validation loss (`sft_lr_sweep: per_arm`), then seeds "
              f"{cfg.sft_seeds[1:]} at that LR, and every SFT seed at that LR on the arm's other pretraining seeds")
             + (f"; up to {cfg.sft_lr_extend} more LR(s) beyond an edge of the grid (`sft_lr_extend`)" if cfg.sft_lr_extend else "")]
    edges = lr_edges(runs)
    setup.append(f"- **warning:** the chosen LR is at an edge of the LR grid for {len(edges)} (checkpoint, task) cell(s) "
                 f"({'; '.join(edges[:6])}{' …' if len(edges) > 6 else ''}): the best LR may lie outside it "
                 "(`sft_lr_extend: N` tries N more LRs beyond the edge)" if edges else
                 "- the chosen LR is inside the LR grid for every (checkpoint, task) cell")
    return report.write_report(
        out or cfg.out_dir, title="Reproduction at CPU scale: Midtraining Bridges Pretraining and Posttraining Distributions",
        intro=f"Generated by `litgpt-ext reproduce`. {spent} Everything below is measured; nothing was tuned until a finding held.",
        setup=setup, arms=arms, base_seeds=cfg.pretrain_seeds, base_tasks=cfg.base_tasks, replay="main",
        cells=cells_of(best_lr_runs(runs), report.general_before_of([r.metrics() for r in runs])), sim=sim, analysis=ANALYSIS, n_boot=cfg.bootstrap,
        footer=rep + ["Scale caveat: a ~2M-parameter model on ~4M tokens; the paper's Pythia runs are 10^4-10^5 times larger. "
                "The same grid at Pythia scale: `litgpt-ext sweep --spec midtrain_configs/sweeps/paper_pythia160m.yaml` "
                "(and `--action report` once its runs are done).", ""])


def sft_sources(cfg: ReproduceConfig, arms: list[Arm], jobs: list[Job]) -> list[tuple[str, str, int, Path, list[str]]]:
    """(job, family, pretraining seed, final checkpoint, SFT tasks) of every run SFT starts from."""
    fam = {a.name: a for a in arms}
    sources = []
    for j in jobs:
        if j.info.get("pause") is not None:
            continue  # a base run's segment up to a fork step: its run's last job is the SFT source
        family = "base" if j.stage == "base" else split_run_name(j.name)[0]
        tasks = cfg.base_tasks if family == "base" else fam[family].tasks
        sources.append((j.name, family, j.info["seed"], j.out_dir / "final", tasks))
    return sources


def similarity_stage(cfg: ReproduceConfig, arms: list[Arm], logs: Path) -> dict:
    """The bridge: similarity of every mix to every SFT set (saved; reused when its inputs match)."""
    try:
        print("[reproduce] similarity of the mixes to the SFT sets", flush=True)
        sets = {"base": "main:1.0", **{a.name: mix_string("main", a.domain, a.weight) for a in arms}}
        sft_sets = {t: cfg.demo_dir / "sft_tasks" / t / "train.json" for t in sorted({t for a in arms for t in a.tasks} | set(cfg.base_tasks))}
        from litgpt_ext.study.similarity import saved_similarity, similarity

        sim = saved_similarity(cfg.out_dir / "similarity", sets, sft_sets, cfg.similarity_docs)
        if sim is None:
            with _timed(cfg.out_dir, "similarity", ""), open(logs / "similarity.log", "w") as fh, \
                    contextlib.redirect_stdout(fh):
                sim = similarity(cfg.demo_dir, cfg.demo_dir / "tokenizer", sets, sft_sets, general="base",
                                 num_docs=cfg.similarity_docs, out_dir=cfg.out_dir / "similarity")
        return sim
    except (ValueError, FileNotFoundError) as e:
        print(f"[reproduce] similarity failed, F3 not measured: {e}")
        return {"error": str(e)}


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
    sft_lrs: Union[tuple[float, ...], dict[str, list[float]]] = (1e-3, 3e-3),
    sft_seeds: tuple[int, ...] = (1, 2, 3),
    similarity_docs: int = 300,
    sft_task_args: Optional[dict[str, Any]] = None,
    threads: Optional[int] = None,
    bootstrap: int = 1000,
    sft_lr_extend: int = 0,
    replicates: Union[int, list[list[int]]] = 1,
    cka_docs: int = 50,
    workers: int = 1,
    sft_lr_sweep: str = "per_checkpoint",
    general_before: bool = False,
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
        arms: Midtraining arms: {name, domain (math|code), start, weight, role (mid|cpt|cross|ablation), seeds, tasks}.
        base_tasks: SFT tasks of the base runs (the reference of every comparison).
        sft_lrs: LRs swept with the first SFT seed (one list, or a list per task: {math: [...], ...}); the best
            (lowest SFT val loss) is kept per checkpoint and task.
        sft_seeds: SFT seeds (>= 2): the first sweeps the LR, the others run at the chosen LR.
        similarity_docs: Documents per shard and SFT set for the similarity measures.
        sft_task_args: Flags of `build-sft-tasks` (e.g. {math_examples: 500}).
        threads: torch threads of each job (default: torch's; with workers, the cores divided among them).
        bootstrap: Hierarchical-bootstrap replicates behind each finding's 95% interval (0: none).
        sft_lr_extend: Up to this many more SFT LRs beyond the grid's edge when the chosen LR is at it.
        cka_docs: Held-out documents for the representation stage (CKA, weight distance; 0: skipped).
        replicates: Disjoint pretraining-seed sets (a count, or the sets), each a whole study; > 1 writes
            STABILITY.md (`litgpt_ext.study.replicates`).
        workers: Jobs run at a time, each in a worker process that imports torch once; a job starts when
            its dependencies have finished (SFT cells of a finished checkpoint while others still train).
            1: one after another in this process. Outputs do not depend on it.
        sft_lr_sweep: per_checkpoint (the paper: the LR sweep on every source checkpoint) or per_arm (on
            each arm's first pretraining seed; its other pretraining seeds use that LR).
        general_before: The first SFT cell of each (checkpoint, task) also validates before training
            (the general loss before SFT in the results table).
    """
    import torch

    cfg = ReproduceConfig(out_dir=Path(out_dir), demo_dir=Path(demo_dir), pretrain_config=Path(pretrain_config),
                          sft_config=Path(sft_config), total_steps=total_steps, pretrain_seeds=list(pretrain_seeds),
                          arms=list(arms or []), base_tasks=list(base_tasks), sft_lrs=dict(sft_lrs) if isinstance(sft_lrs, dict) else list(sft_lrs),
                          sft_seeds=list(sft_seeds), similarity_docs=similarity_docs,
                          sft_task_args=dict(sft_task_args or {}), threads=threads, bootstrap=bootstrap,
                          sft_lr_extend=sft_lr_extend, replicates=replicates, cka_docs=cka_docs, workers=workers,
                          sft_lr_sweep=sft_lr_sweep, general_before=general_before)
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

    from litgpt_ext.study.replicates import remap_arms, seed_sets, write_stability

    sets = seed_sets(cfg.pretrain_seeds, cfg.replicates)
    studies = [(dataclasses.replace(cfg, pretrain_seeds=seeds), remap_arms(arms, cfg.pretrain_seeds, seeds))
               for seeds in sets]
    plans = [pretrain_jobs(c, a) for c, a in studies]
    from litgpt_ext.study.plan_checks import check_forks

    for jobs in plans:  # an arm added after its base finished must fork a checkpoint that exists
        check_forks(jobs)
    n_sft = sum(n for (c, a), p in zip(studies, plans) for _, _, n in SFTGrid(c, sft_sources(c, a, p)).planned())
    ex = Executor(label="reproduce", resume_command=f"the same `litgpt-ext reproduce` (out_dir {cfg.out_dir})",
                  config_dir=cfg.out_dir / "configs" / "pretrain", mode="inprocess", log_name="reproduce.log",
                  timings=cfg.out_dir / TIMINGS, workers=cfg.workers, threads=cfg.threads,
                  total=sum(map(len, plans)) + n_sft)
    sim, reports = None, []
    try:
        for k, ((scfg, sarms), jobs) in enumerate(zip(studies, plans)):
            if len(sets) > 1:
                print(f"[reproduce] seed set {k + 1}/{len(sets)}: pretraining seeds {scfg.pretrain_seeds}", flush=True)
            grid = SFTGrid(scfg, sft_sources(scfg, sarms, jobs))
            ex.run(jobs + grid.first_jobs(), then=grid.then)  # each SFT cell once its checkpoint exists
            if sim is None:  # the mixes and SFT sets do not depend on the seeds: one similarity stage
                sim = similarity_stage(cfg, arms, logs)
            out = cfg.out_dir if len(sets) == 1 else cfg.out_dir / "replicates" / f"set{k}"
            reports.append(write_report(scfg, sarms, grid.runs(), sim, time.perf_counter() - t0, out=out))
    finally:
        ex.close()
    report = reports[0] if len(sets) == 1 else write_stability(cfg.out_dir, sets, [r.parent / "results.json" for r in reports])
    print(f"[reproduce] done in {(time.perf_counter() - t0) / 60:.1f} min: {report}")
    text = report.read_text()
    print(text.split("## Findings, as measured")[1].split("## Figures")[0] if "## Findings, as measured" in text else text)
    return {"report": str(report), "minutes": (time.perf_counter() - t0) / 60}
