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

The spec's keys: `litgpt_ext.study.spec`; the `sweep` command: `litgpt_ext.study.execute`.
"""

from __future__ import annotations

import copy
import itertools
import math
import shlex
from pathlib import Path
from typing import Optional

import yaml

from litgpt_ext.study.executor import Job
from litgpt_ext.study.spec import (
    STAGES,
    Arm,
    SweepSpec,
    _get,
    _set,
    arm_family,
    arm_name,
    domain_steps,
    mix_string,
    plan_arms,
    split_run_name,
)
from litgpt_ext.study.stages import merge_job, prep_jobs, synth_data, synth_job, synth_name, synth_start, uses_synth

__all__ = ["Job", "plan_sweep", "plan_table", "job_groups", "write_plan"]


def plan_sweep(spec: SweepSpec) -> list[Job]:
    """Every run of the sweep with its config and dependencies, in an order that respects them."""
    if not spec.base_config.is_file():
        raise FileNotFoundError(f"base_config {str(spec.base_config)!r} does not exist")
    if spec.total_steps < 2:
        raise ValueError(f"total_steps must be >= 2, got {spec.total_steps}")
    base_cfg = yaml.safe_load(spec.base_config.read_text()) or {}
    root = Path(spec.out_root or Path("runs/sweeps") / spec.name)
    arms = plan_arms(spec)
    jobs: list[Job] = []
    # (run name, checkpoint SFT starts from, pretraining seed, the job that writes it: the run, or its merge-lora)
    finals: list[tuple[str, Path, Optional[int], str]] = []
    families: dict[str, list[tuple[str, Path]]] = {}  # arm name without the seed -> its runs (for soups)

    def under(a: Arm, seed: int) -> bool:
        return a.seeds is None or seed in a.seeds

    prep = prep_jobs(spec, root)
    jobs += prep
    synth_step = synth_start(spec, arms)
    for seed in spec.seeds:
        starts = sorted({int(a.start) for a in arms if under(a, seed)}
                        | ({synth_step} if synth_step is not None and any(uses_synth(a) for a in arms if under(a, seed))
                           else set()))
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
        prev: list[str] = [j.name for j in prep]
        for stop in starts if spec.split_base else []:  # one job per fork step, then the rest of the run
            seg = copy.deepcopy(cfg)
            _set(seg, "train.pause_at_step", stop)
            jobs.append(Job(f"{name}_to{stop}", "base", "pretrain", seg, out, depends=prev,
                            info={**info, "pause": stop}))
            prev = [f"{name}_to{stop}"]
        jobs.append(Job(name, "base", "pretrain", cfg, out, depends=prev, info=info))
        finals.append((name, out / "final", seed, name))
        if synth_step is not None and any(uses_synth(a) for a in arms if under(a, seed)):
            base_job = f"{name}_to{synth_step}" if spec.split_base else name
            jobs.append(synth_job(spec, root, seed, synth_step, base_job, _get(cfg, "data.init_args.data_path")))

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
        mix = a.mix or mix_string(spec.replay, a.domain, float(a.weight))
        _set(cfg, "out_dir", str(out))
        _set(cfg, "fork_from", str(root / f"base_seed{seed}" / f"step-{int(a.start):08d}"))
        _set(cfg, "resume", "auto")
        _set(cfg, "seed", seed)
        _set(cfg, "data.init_args.seed", seed if dseed is None else dseed)
        _set(cfg, "data.init_args.mix_weights_str", mix)
        for k in ("data.init_args.literal_weights_str", "data.init_args.mix_config_path",
                  "train.max_additional_steps", "train.max_tokens", "train.pause_at_step"):
            _set(cfg, k, None)
        _set(cfg, "train.max_iters", spec.total_steps)
        fork = str(root / f"base_seed{seed}" / f"step-{int(a.start):08d}")
        for k, v in {**spec.arm_overrides, **a.overrides}.items():  # "${fork_from}": this run's fork checkpoint
            _set(cfg, k, _substitute(v, "${fork_from}", fork))
        base_job = f"base_seed{seed}_to{int(a.start)}" if spec.split_base else f"base_seed{seed}"
        depends = [base_job]
        if spec.synth_replay is not None and uses_synth(a):  # its own seed's synth shard, beside the base shards
            _set(cfg, "data.init_args.data_path", str(synth_data(root, seed)))
            depends.append(synth_name(seed))
        jobs.append(Job(name, "midtrain", "pretrain", cfg, out, depends=depends,
                        info={"seed": seed, "mix": mix, "start": int(a.start), "domain": a.domain,
                              "weight": float(a.weight), "arm": arm_family(a),
                              "domain_steps": domain_steps(a, spec.total_steps), "data_seed": dseed}))
        if _get(cfg, "lora") is not None and spec.sft is not None:  # an adapter: SFT reads its merge (merge-lora)
            jobs.append(merge_job(name, out, seed))
            finals.append((name, Path(jobs[-1].config["out_dir"]), seed, jobs[-1].name))
        else:
            finals.append((name, out / "final", seed, name))
        families.setdefault(f"{arm_family(a)}_seed{seed}", []).append((name, out / "final"))

    if spec.soup_data_seeds:
        for family, runs in families.items():  # one arm, one pretraining seed: its data seeds' runs
            name, out = f"soup_{family}", root / f"soup_{family}"
            cfg = {"checkpoints": [str(c) for _, c in runs], "out": str(out), "overwrite": True}
            jobs.append(Job(name, "soup", "soup", cfg, out, depends=[n for n, _ in runs],
                            info={"family": family, "seeds": len(runs), "seed": split_run_name(family)[1]}))
            finals.append((name, out, jobs[-1].info["seed"], name))

    if spec.sft is not None:
        g = spec.sft
        if g.config is None or not Path(g.config).is_file():
            raise FileNotFoundError(f"sft.config {str(g.config)!r} does not exist")
        if not g.tasks or not g.lr:
            raise ValueError("sft needs tasks (name -> config overrides) and at least one lr")
        sft_cfg = yaml.safe_load(Path(g.config).read_text()) or {}
        for src, src_ckpt, pseed, writer in finals:
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
                    jobs.append(Job(name, "sft", "sft", cfg, out, depends=[writer],
                                    info={"task": task, "source": src, "lr": float(lr), "seed": sseed,
                                          "pretrain_seed": pseed}))
    names = [j.name for j in jobs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"sweep: jobs {dup} are planned twice (an arm's run and a stage's job with one name and one"
                         f" folder: prep_<step>, {synth_name(0).replace('0', '<S>')}); rename the arm or the prep step")
    return jobs


def _substitute(value, token: str, by: str):
    """`value` with `token` replaced by `by` in every string inside it (mappings and lists too)."""
    if isinstance(value, str):
        return value.replace(token, by)
    if isinstance(value, dict):
        return {k: _substitute(v, token, by) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, token, by) for v in value]
    return value


def plan_table(jobs: list[Job]) -> str:
    rows = [("#", "stage", "run", "depends on", "details", "done")]
    for i, j in enumerate(jobs, 1):
        if j.stage == "midtrain":
            d = f"fork @{j.info['start']}, {j.info['mix']}, {j.info['domain']} ~{j.info['domain_steps']:.0f} steps"
            d += f", data seed {j.info['data_seed']}" if j.info.get("data_seed") is not None else ""
        elif j.stage == "sft":
            lr = j.info.get("lr")
            d = f"{j.info['task']}, lr {'(config)' if lr is None else format(lr, 'g')}, seed {j.info['seed']}"
        elif j.stage == "soup":
            d = f"average of {j.info['seeds']} data seeds"
        elif j.stage in ("prep", "synth", "merge"):
            d = f"litgpt-ext {j.command}, done when {j.info['creates']} exists"
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


