"""Sweeps as grids, not copies: one base config + a grid → run configs, a SLURM plan and a local runner.

`litgpt-ext sweep --spec sweep.yaml` prints the plan as a table (a dry run); `--action write` writes
every run's YAML, one `CONFIG_LIST` per stage and `submit.sh` (SLURM arrays chained with
`--dependency=afterok`); `--action local` runs the same plan on this machine, in dependency order,
skipping runs whose output exists; `--action report` writes REPORT.md from the SFT runs that finished
(`litgpt_ext.study.report`, the analysis `reproduce` uses).

The paper's design, as generated here: one general-only base run per pretraining seed trains to the
shared total (`total_steps`); each midtraining arm forks the base run of its seed at `start`,
switches the blend to `replay:(1-w),domain:w` (or `domain:1.0` for a continued-pretraining control,
`weight: 1.0`), and trains to the same total with the base run's schedule (no re-warmup: the fork
continues the schedule of the phase it came from). SFT runs (a grid of tasks x LRs x seeds) start
from each arm's final checkpoint, and from the base run's when `sft.include_base` is true.

Spec (YAML; every key is listed in `SweepSpec`):

    name: demo_study
    base_config: midtrain_configs/demo/pretrain.yaml
    total_steps: 240
    seeds: [42]
    grid: {domain: [math, code], start: [80, 160], weight: [0.2]}
    arms: [{name: cpt_math, domain: math, start: 200, weight: 1.0}]
    sft: {config: midtrain_configs/sft/demo_math.yaml, tasks: {math: {...}}, lr: [1e-3, 3e-3], seeds: [0, 1, 2]}
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

STAGES = ("base", "midtrain", "soup", "sft")
ROLES = ("mid", "cpt", "cross", "ablation")  # what an arm feeds in the report: litgpt_ext.study.report


@dataclass
class SFTGrid:
    config: Optional[Path] = None
    """Base SFT config (for `litgpt-ext sft`); every SFT run is a copy with the overrides below"""
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Task name -> dotted-key overrides of the SFT config (e.g. its data paths)"""
    lr: list[float] = field(default_factory=list)
    """Learning rates to sweep (the best by SFT validation loss is kept per checkpoint and task)"""
    seeds: list[int] = field(default_factory=lambda: [0])
    """SFT seeds (mean and std are reported over them)"""
    include_base: bool = True
    """Also fine-tune the base run's final checkpoint: the general-only baseline"""
    lr_key: str = "optimizer.init_args.lr"
    """Where the LR goes in the SFT config"""
    checkpoint_key: str = "checkpoint_dir"
    """Where the source checkpoint goes in the SFT config"""


@dataclass
class ReportSpec:
    """`--action report`: how the sweep's arms and SFT tasks map onto the paper's findings F1-F4."""

    task_domains: dict[str, str] = field(default_factory=dict)
    """SFT task -> the midtraining domain it measures (the paper: pycode: code, gsm8k: math, lima: instruct,
    sciq: qa); a task without a domain is reported, not used by F1/F2/F4"""
    far_domains: list[str] = field(default_factory=lambda: ["code", "math"])
    """Domains far from general text (F1's far points); mid arms of other domains give its near points"""
    near_task: Optional[str] = None
    """A near-domain task the far arms are also fine-tuned on (an F1 near point per far arm)"""
    similarity_docs: int = 1000
    """Documents per shard and SFT set for the bridge (F3); 0 skips it"""
    data_path: Optional[Path] = None
    """Token shards for the bridge (default: the base config's data.init_args.data_path)"""
    tokenizer_dir: Optional[Path] = None
    """Tokenizer for the bridge (default: the base config's tokenizer_dir)"""


@dataclass
class SweepSpec:
    name: str
    """Sweep name; runs go to out_root/<run>, configs to out_root/configs"""
    base_config: Path
    """The general-only pretraining config every run is derived from"""
    total_steps: int
    """The shared total: every run ends at this optimizer step (the paper: 61,035)"""
    out_root: Optional[Path] = None
    """Default runs/sweeps/<name>"""
    seeds: list[int] = field(default_factory=lambda: [42])
    """Pretraining seeds: one base run each (sets `seed` and `data.init_args.seed`)"""
    replay: str = "main"
    """The general (replay) shard type mixed with the domain"""
    grid: dict[str, list] = field(default_factory=dict)
    """Cartesian product over domain, start, weight (each a list)"""
    arms: list[dict[str, Any]] = field(default_factory=list)
    """Explicit extra arms: {domain, start, weight[, name][, seeds]} (e.g. continued-pretraining controls;
    `seeds` limits an arm to some of the pretraining seeds). `match_tokens_of: <arm>` instead of `start`
    starts the arm where it sees as many domain tokens as that arm: a token-matched CPT control.
    `role` (mid | cpt | cross | ablation; default cpt at weight 1.0, else mid) says which finding of
    `--action report` the arm feeds (ablation: the results table only)"""
    base_overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted-key overrides of the base runs (e.g. train.log_interval)"""
    arm_overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted-key overrides of every midtraining arm"""
    split_base: bool = True
    """Run each base run as one job per fork step (`train.pause_at_step`): an arm forking at 6k starts
    once step 6k is saved, not after the whole base run. The plan, LR and data order are those of one
    uninterrupted run; false: one job per base run"""
    arm_data_seeds: list[int] = field(default_factory=list)
    """Run every arm once per data seed (`data.init_args.seed`), all forked from the same base checkpoint
    (empty: one run per pretraining seed, with the data seed = the pretraining seed)"""
    soup_data_seeds: bool = False
    """Average each arm's `arm_data_seeds` runs (same fork point, different data order) into
    `soup_<arm>_seed<s>` (`litgpt-ext soup`, as OLMo soups its anneal runs); SFT then also starts from
    each soup. Runs of different pretraining seeds are never souped: they start from different random
    initializations and their average is not a working model"""
    sft: Optional[SFTGrid] = None
    report: Optional[ReportSpec] = None
    """`--action report`: the findings' mapping (`ReportSpec`)"""


@dataclass
class Job:
    name: str
    stage: str
    command: str  # litgpt-ext command
    config: dict
    out_dir: Path
    depends: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def done(self) -> bool:
        if self.command == "sft":
            return (self.out_dir / "sft_metrics.json").is_file()
        if self.command == "soup":
            return (self.out_dir / "soup.json").is_file()
        from litgpt_ext.train.checkpoint import is_complete, list_checkpoints

        pause = self.info.get("pause")
        if pause is not None:  # a base segment: done once a checkpoint at or past its pause step exists
            return any(step >= pause for step, _ in list_checkpoints(self.out_dir, final=True))
        return is_complete(self.out_dir / "final")


# ------------------------------------------------------------------------------------------- spec


def read_yaml_for(path: Path, what: str, cls: type) -> dict:
    """A YAML file's mapping, refusing keys that are not fields of the dataclass `cls` (named)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{what} {str(path)!r}: unknown keys {unknown}; known: {sorted(known)}")
    return raw


def _section(raw: dict, key: str, cls: type) -> Any:
    """The spec's `key:` mapping as a `cls`, refusing keys that are not its fields (named)."""
    sec = raw.pop(key, None)
    if sec is None:
        return None
    bad = sorted(set(sec) - set(cls.__dataclass_fields__))
    if bad:
        raise ValueError(f"sweep spec {key}: unknown keys {bad}; known: {sorted(cls.__dataclass_fields__)}")
    return cls(**sec)


def load_spec(path: Path) -> SweepSpec:
    raw = read_yaml_for(path, "sweep spec", SweepSpec)
    missing = [k for k in ("name", "base_config", "total_steps") if k not in raw]
    if missing:
        raise ValueError(f"sweep spec {str(path)!r} lacks {missing}")
    sft, rep = _section(raw, "sft", SFTGrid), _section(raw, "report", ReportSpec)
    spec = SweepSpec(**raw, sft=sft, report=rep)
    spec.base_config = Path(spec.base_config)
    return spec


def _set(cfg: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = cfg
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


def _get(cfg: dict, dotted: str, default: Any = None) -> Any:
    node = cfg
    for k in dotted.split("."):
        if not isinstance(node, dict) or k not in node:
            return default
        node = node[k]
    return node


def mix_string(replay: str, domain: str, weight: float) -> str:
    if weight == 1.0:
        return f"{domain}:1.0"
    return f"{replay}:{1 - weight:g},{domain}:{weight:g}"


def arm_family(a: dict) -> str:
    """An arm's name without the pretraining seed (its seeds' runs are one family: a soup's ingredients)."""
    return a.get("name") or f"{a['domain']}_w{a['weight']:g}_at{a['start']}"


def arm_name(a: dict, seed: int) -> str:
    return f"{arm_family(a)}_seed{seed}"


def domain_steps(a: dict, total_steps: int) -> float:
    """Optimizer steps' worth of the arm's domain data: weight x (total - start)."""
    return float(a["weight"]) * (total_steps - int(a["start"]))


def matched_start(a: dict, arms: dict[str, dict], total_steps: int) -> int:
    """The start at which `a` sees as much of its domain as the arm it names in `match_tokens_of`
    (a token-matched continued-pretraining control: weight 1.0 from total - w_ref x (total - start_ref))."""
    ref = arms.get(str(a["match_tokens_of"]))
    if ref is None:
        raise ValueError(f"sweep arm {a}: match_tokens_of={a['match_tokens_of']!r} names no arm with a start;"
                         f" arms: {sorted(arms)}")
    if ref["domain"] != a["domain"]:
        raise ValueError(f"sweep arm {a}: match_tokens_of={a['match_tokens_of']!r} trains on {ref['domain']!r},"
                         f" not {a['domain']!r}; token matching compares one domain's tokens")
    start = total_steps - round(domain_steps(ref, total_steps) / float(a["weight"]))
    if not 0 < start < total_steps:
        raise ValueError(f"sweep arm {a}: matching {domain_steps(ref, total_steps):.0f} steps of {a['domain']} at"
                         f" weight {a['weight']} needs a start of {start}, outside (0, total_steps={total_steps})")
    return start


def _arms(spec: SweepSpec) -> list[dict]:
    arms = []
    if spec.grid:
        bad = sorted(set(spec.grid) - {"domain", "start", "weight"})
        if bad:
            raise ValueError(f"sweep grid: unknown dimensions {bad}; the grid spans domain, start, weight")
        missing = [k for k in ("domain", "start", "weight") if not spec.grid.get(k)]
        if missing:
            raise ValueError(f"sweep grid lacks values for {missing}")
        for d, s, w in itertools.product(spec.grid["domain"], spec.grid["start"], spec.grid["weight"]):
            arms.append({"domain": d, "start": s, "weight": w})
    known = {"name", "domain", "start", "weight", "seeds", "match_tokens_of", "role"}
    for a in spec.arms:
        bad = sorted(set(a) - known)
        if bad:
            raise ValueError(f"sweep arm {a}: unknown keys {bad}; known: {sorted(known)}")
        need = ("domain", "weight") + (() if "match_tokens_of" in a else ("start",))
        missing = [k for k in need if k not in a]
        if missing:
            raise ValueError(f"sweep arm {a} lacks {missing}")
        arms.append(dict(a))
    by_name = {arm_family(a): a for a in arms if "match_tokens_of" not in a}
    for a in arms:
        if "match_tokens_of" in a:
            a["start"] = matched_start(a, by_name, spec.total_steps)
    for a in arms:
        if not (0 < float(a["weight"]) <= 1):
            raise ValueError(f"sweep arm {a}: weight must be in (0, 1], got {a['weight']}")
        if a.get("role", "mid") not in ROLES:
            raise ValueError(f"sweep arm {a}: role must be one of {', '.join(ROLES)} (what the report's findings use it"
                             f" for), got {a['role']!r}")
        if not (0 < int(a["start"]) < spec.total_steps):
            raise ValueError(f"sweep arm {a}: start must be in (0, total_steps={spec.total_steps}), got {a['start']}")
    names = [arm_name(a, 0) for a in arms]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"sweep: duplicate arms {dup}")
    return arms


# ------------------------------------------------------------------------------------------- plan


def plan_sweep(spec: SweepSpec) -> list[Job]:
    """Every run of the sweep with its config and dependencies, in an order that respects them."""
    if not spec.base_config.is_file():
        raise FileNotFoundError(f"base_config {str(spec.base_config)!r} does not exist")
    if spec.total_steps < 2:
        raise ValueError(f"total_steps must be >= 2, got {spec.total_steps}")
    base_cfg = yaml.safe_load(spec.base_config.read_text()) or {}
    root = Path(spec.out_root or Path("runs/sweeps") / spec.name)
    arms = _arms(spec)
    jobs: list[Job] = []
    finals: list[tuple[str, Path, Optional[int]]] = []  # (job name, checkpoint SFT starts from, pretraining seed)
    families: dict[str, list[tuple[str, Path]]] = {}  # arm name without the seed -> its runs (for soups)

    def under(a: dict, seed: int) -> bool:
        return a.get("seeds") is None or seed in a["seeds"]

    for seed in spec.seeds:
        starts = sorted({int(a["start"]) for a in arms if under(a, seed)})
        cfg = copy.deepcopy(base_cfg)
        name = f"base_seed{seed}"
        out = root / name
        _set(cfg, "out_dir", str(out))
        _set(cfg, "resume", "auto")  # every job of the run (segments, requeues) continues its checkpoints
        _set(cfg, "seed", seed)
        _set(cfg, "data.init_args.seed", seed)
        _set(cfg, "train.max_iters", spec.total_steps)
        for k in ("train.max_additional_steps", "train.max_tokens", "train.pause_at_step"):
            _set(cfg, k, None)
        for k, v in spec.base_overrides.items():
            _set(cfg, k, v)
        save = _get(cfg, "train.save_interval")
        if starts and not spec.split_base:  # (split: each segment's pause saves its fork step)
            need = math.gcd(*starts)
            if not save or need % save:
                new = math.gcd(need, save) if save else need
                print(f"sweep: base save_interval {save} does not hit every fork step {starts}; using {new}")
                _set(cfg, "train.save_interval", new)
        if starts and _get(cfg, "train.keep_last_k") is not None:
            print("sweep: base keep_last_k would delete fork points; keeping every checkpoint")
            _set(cfg, "train.keep_last_k", None)
        info = {"seed": seed, "mix": _get(cfg, "data.init_args.mix_weights_str")}
        prev: list[str] = []
        for stop in starts if spec.split_base else []:  # one job per fork step, then the rest of the run
            seg = copy.deepcopy(cfg)
            _set(seg, "train.pause_at_step", stop)
            jobs.append(Job(f"{name}_to{stop}", "base", "pretrain", seg, out, depends=prev,
                            info={**info, "pause": stop}))
            prev = [f"{name}_to{stop}"]
        jobs.append(Job(name, "base", "pretrain", cfg, out, depends=prev, info=info))
        finals.append((name, out / "final", seed))

    if spec.soup_data_seeds and len(spec.arm_data_seeds) < 2:
        raise ValueError(
            f"soup_data_seeds needs >= 2 arm_data_seeds, got {spec.arm_data_seeds}: a soup averages runs that start"
            " from one checkpoint and differ in data order. Runs of different pretraining seeds start from different"
            " random initializations; their average is not a working model (the CPU study's two math_mid seeds,"
            " souped and fine-tuned: general loss 8.38 vs 7.10 for either)")
    if len(set(spec.arm_data_seeds)) < len(spec.arm_data_seeds):
        raise ValueError(f"arm_data_seeds has repeats: {spec.arm_data_seeds}")
    for seed, a, dseed in itertools.product(spec.seeds, arms, spec.arm_data_seeds or [None]):
        if not under(a, seed):
            continue  # this arm runs under some pretraining seeds only
        cfg = copy.deepcopy(base_cfg)
        name = arm_name(a, seed) + (f"_data{dseed}" if dseed is not None else "")
        out = root / name
        mix = mix_string(spec.replay, a["domain"], float(a["weight"]))
        _set(cfg, "out_dir", str(out))
        _set(cfg, "fork_from", str(root / f"base_seed{seed}" / f"step-{int(a['start']):08d}"))
        _set(cfg, "resume", "auto")
        _set(cfg, "seed", seed)
        _set(cfg, "data.init_args.seed", seed if dseed is None else dseed)
        _set(cfg, "data.init_args.mix_weights_str", mix)
        for k in ("data.init_args.literal_weights_str", "data.init_args.mix_config_path",
                  "train.max_additional_steps", "train.max_tokens", "train.pause_at_step"):
            _set(cfg, k, None)
        _set(cfg, "train.max_iters", spec.total_steps)
        for k, v in spec.arm_overrides.items():
            _set(cfg, k, v)
        base_job = f"base_seed{seed}_to{int(a['start'])}" if spec.split_base else f"base_seed{seed}"
        jobs.append(Job(name, "midtrain", "pretrain", cfg, out, depends=[base_job],
                        info={"seed": seed, "mix": mix, "start": int(a["start"]), "domain": a["domain"],
                              "weight": float(a["weight"]),
                              "domain_steps": domain_steps(a, spec.total_steps), "data_seed": dseed}))
        finals.append((name, out / "final", seed))
        families.setdefault(f"{arm_family(a)}_seed{seed}", []).append((name, out / "final"))

    if spec.soup_data_seeds:
        for family, runs in families.items():  # one arm, one pretraining seed: its data seeds' runs
            name, out = f"soup_{family}", root / f"soup_{family}"
            cfg = {"checkpoints": [str(c) for _, c in runs], "out": str(out), "overwrite": True}
            jobs.append(Job(name, "soup", "soup", cfg, out, depends=[n for n, _ in runs],
                            info={"family": family, "seeds": len(runs), "seed": int(family.rsplit("_seed", 1)[1])}))
            finals.append((name, out, jobs[-1].info["seed"]))

    if spec.sft is not None:
        g = spec.sft
        if g.config is None or not Path(g.config).is_file():
            raise FileNotFoundError(f"sft.config {str(g.config)!r} does not exist")
        if not g.tasks or not g.lr:
            raise ValueError("sft needs tasks (name -> config overrides) and at least one lr")
        sft_cfg = yaml.safe_load(Path(g.config).read_text()) or {}
        for src, src_ckpt, pseed in finals:
            if src in (f"base_seed{s}" for s in spec.seeds) and not g.include_base:
                continue
            for task, overrides in g.tasks.items():
                for lr, sseed in itertools.product(g.lr, g.seeds):
                    cfg = copy.deepcopy(sft_cfg)
                    for k, v in (overrides or {}).items():
                        _set(cfg, k, v)
                    name = f"sft_{task}_{src}_lr{lr:g}_s{sseed}"
                    out = root / "sft" / task / src / f"lr{lr:g}_seed{sseed}"
                    _set(cfg, g.checkpoint_key, str(src_ckpt))
                    _set(cfg, g.lr_key, float(lr))
                    _set(cfg, "seed", sseed)
                    _set(cfg, "out_dir", str(out))
                    jobs.append(Job(name, "sft", "sft", cfg, out, depends=[src],
                                    info={"task": task, "source": src, "lr": float(lr), "seed": sseed,
                                          "pretrain_seed": pseed}))
    return jobs


def plan_table(jobs: list[Job]) -> str:
    rows = [("#", "stage", "run", "depends on", "details", "done")]
    for i, j in enumerate(jobs, 1):
        if j.stage == "midtrain":
            d = f"fork @{j.info['start']}, {j.info['mix']}, {j.info['domain']} ~{j.info['domain_steps']:.0f} steps"
            d += f", data seed {j.info['data_seed']}" if j.info.get("data_seed") is not None else ""
        elif j.stage == "sft":
            d = f"{j.info['task']}, lr {j.info['lr']:g}, seed {j.info['seed']}"
        elif j.stage == "soup":
            d = f"average of {j.info['seeds']} data seeds"
        else:
            stop = f", until step {j.info['pause']}" if j.info.get("pause") is not None else ""
            d = f"{j.info.get('mix') or 'base mix'}, seed {j.info['seed']}{stop}"
        rows.append((str(i), j.stage, j.name, ",".join(j.depends) or "-", d, "yes" if j.done() else ""))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


# ------------------------------------------------------------------------------------------- outputs


def job_groups(jobs: list[Job]) -> list[list[Job]]:
    """Jobs that share a stage and the exact same dependencies form one SLURM array (in plan order):
    each SFT grid of one checkpoint, the arms forking one base segment, the first segments of all seeds."""
    groups: dict[tuple, list[Job]] = {}
    for j in jobs:
        groups.setdefault((j.stage, j.command, tuple(j.depends)), []).append(j)
    return list(groups.values())


def write_plan(jobs: list[Job], config_dir: Path, script: str = "training_scripts/small_model_pretrain.sh") -> Path:
    """Each run's YAML, a CONFIG_LIST per stage, and submit.sh: one SLURM array per group of jobs
    with the same dependencies, each after exactly the jobs it needs (`afterok:<array>_<task>`)."""
    config_dir.mkdir(parents=True, exist_ok=True)
    lists: dict[str, list[str]] = {s: [] for s in STAGES}
    for j in jobs:
        path = config_dir / f"{j.name}.yaml"
        path.write_text(f"# generated by litgpt-ext sweep ({j.stage}); depends on: {', '.join(j.depends) or 'nothing'}\n"
                        + yaml.safe_dump(j.config, sort_keys=False))
        lists[j.stage].append(str(path))
    for stage, paths in lists.items():  # every run of a stage, for reference and hand submission
        if paths:
            (config_dir / f"{stage}.txt").write_text("\n".join(paths) + "\n")
    groups = job_groups(jobs)
    arrays = config_dir / "arrays"
    arrays.mkdir(exist_ok=True)
    where: dict[str, str] = {}  # job name -> "${gK}_<task>"
    lines = ["#!/usr/bin/env bash",
             f"# Submit the sweep ({len(jobs)} runs) as {len(groups)} SLURM arrays; each array waits for exactly the",
             "# runs it needs (afterok), so an arm starts once its fork step is saved and an SFT grid once its",
             "# checkpoint exists. Run from the repository root; a run already finished is skipped by the trainer.",
             "# Extra sbatch options: SBATCH_OPTS='--partition=… --time=…' (SOUP_SBATCH_OPTS for the soups).",
             "set -euo pipefail", f"SCRIPT=${{SCRIPT:-{script}}}"]
    for k, group in enumerate(groups, 1):
        lst = arrays / f"{k:03d}_{group[0].stage}.txt"
        lst.write_text("\n".join(str(config_dir / f"{j.name}.yaml") for j in group) + "\n")
        deps = ":".join(where[d] for d in group[0].depends)
        dep = f" --dependency=afterok:{deps} --kill-on-invalid-dep=yes" if deps else ""
        opts = "${SOUP_SBATCH_OPTS:-${SBATCH_OPTS:-}}" if group[0].command == "soup" else "${SBATCH_OPTS:-}"
        lines += [
            f"g{k}=$(LITGPT_EXT_COMMAND={group[0].command} CONFIG_LIST={shlex.quote(str(lst))} sbatch --parsable"
            f" --job-name={shlex.quote(group[0].stage + '-' + group[0].name)} --array=1-{len(group)}{dep} {opts} \"$SCRIPT\")",
            f"g{k}=${{g{k}%%;*}}",
            f"echo \"{group[0].stage}: job $g{k} ({len(group)} run{'s' if len(group) > 1 else ''}:"
            f" {group[0].name}{' ...' if len(group) > 1 else ''})\"",
        ]
        for i, j in enumerate(group, 1):
            where[j.name] = f"${{g{k}}}_{i}"
    submit = config_dir / "submit.sh"
    submit.write_text("\n".join(lines) + "\n")
    submit.chmod(0o755)
    return submit


def run_local(jobs: list[Job], config_dir: Path, python: str = sys.executable) -> list[str]:
    """Run the plan here, one job at a time in dependency order; finished runs are skipped."""
    write_plan(jobs, config_dir)
    done_names, ran = set(), []
    todo = [j for j in jobs if not j.done()]
    done_names |= {j.name for j in jobs if j.done()}
    t0 = time.perf_counter()
    for k, j in enumerate(todo, 1):
        missing = [d for d in j.depends if d not in done_names]
        if missing:
            raise RuntimeError(f"sweep: {j.name} depends on {missing}, which did not finish")
        elapsed = time.perf_counter() - t0
        eta = elapsed / (k - 1) * (len(todo) - k + 1) if k > 1 else float("nan")
        print(f"[sweep {k}/{len(todo)}] {j.stage} {j.name} (elapsed {elapsed / 60:.1f} min"
              + (f", ETA {eta / 60:.1f} min)" if k > 1 else ")"), flush=True)
        j.out_dir.mkdir(parents=True, exist_ok=True)
        cmd = [python, "-m", "litgpt_ext", j.command, "--config", str(config_dir / f"{j.name}.yaml")]
        with open(j.out_dir / "sweep.log", "a") as log:
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if rc != 0:
            raise RuntimeError(f"sweep: {j.name} failed (exit {rc}); log: {j.out_dir / 'sweep.log'}")
        done_names.add(j.name)
        ran.append(j.name)
    return ran


def sweep(spec: Path, action: Literal["plan", "write", "local", "report"] = "plan",
          config_dir: Optional[Path] = None) -> list[dict]:
    """Expand a sweep spec into runs: print the plan, write configs + SLURM submit script, run locally,
    or report the finished runs (REPORT.md: results after SFT and the findings, as `reproduce` writes it).

    Args:
        spec: The sweep YAML (see `litgpt_ext.study.sweep`).
        action: plan (print the table; a dry run), write (configs, CONFIG_LISTs, submit.sh), local (run here),
            report (<out_root>/report/REPORT.md from the SFT runs that finished).
        config_dir: Where generated configs go (default: <out_root>/configs).
    """
    if action not in ("plan", "write", "local", "report"):
        raise ValueError(f"action must be plan, write, local or report, got {action!r}")
    s = load_spec(spec)
    jobs = plan_sweep(s)
    root = Path(s.out_root or Path("runs/sweeps") / s.name)
    cdir = Path(config_dir or root / "configs")
    print(plan_table(jobs))
    if action == "write":
        submit = write_plan(jobs, cdir)
        print(f"\nwrote {len(jobs)} configs, CONFIG_LISTs and {submit}; submit with: bash {submit}")
    elif action == "local":
        run_local(jobs, cdir)
    elif action == "report":
        from litgpt_ext.study.report import sweep_report

        print(f"\nwrote {sweep_report(s, jobs, root / 'report')}")
    return [{"name": j.name, "stage": j.stage, "out_dir": str(j.out_dir), "depends": j.depends, **j.info} for j in jobs]
