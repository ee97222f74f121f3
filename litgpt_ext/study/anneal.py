"""`litgpt-ext anneal`: microanneals and branch-and-anneal (OLMo's protocol), run by the study executor.

    litgpt-ext anneal --source runs/base/step-00000120 --mix main:0.7,math:0.3 --steps 40 --action local
    litgpt-ext anneal --source runs/wsd --at '[200, 400, 600]' --mix main:0.8,code:0.2 --steps 100   # WSD-S

From each branch point (a checkpoint, or with `at` the run's checkpoints at those steps: WSD-S, decay
branches off a continuing stable run, re-using its stable checkpoints) two runs branch off with the
same budget and a linear decay of the LR from where the parent left it to `min_lr` (0 by default):
the candidate mix, and the control (`--control`, general data only). Each branch is a fork (hard
links: it starts from the parent's weights bit for bit) and runs the source run's own resolved config
(`hyperparameters.yaml`) with only the mix, the budget and the schedule changed. With `sft_config`,
each branch's final checkpoint is fine-tuned (the post-anneal SFT probe). `anneal.md`/`anneal.json`
give, per branch point, every validation set's loss after the candidate and after the control and
their difference (negative: the candidate mix helped that set), and the probe's SFT loss.
`--action plan | write | local` as for `sweep`: the plan table, SLURM arrays with dependencies
(`write_plan`), or the runs here (subprocesses) by the one study executor.
"""

from __future__ import annotations

import copy
import csv
import json
import re
import shlex
from pathlib import Path
from typing import Literal, Optional

import yaml

from litgpt_ext.study.executor import Job
from litgpt_ext.study.spec import _set

_SAFE = re.compile(r"[^A-Za-z0-9.]+")


def _name(mix: str) -> str:
    return _SAFE.sub("_", mix).strip("_")


def branch_points(source: Path, at: Optional[list[int]]) -> list[tuple[int, Path]]:
    """(step, checkpoint) of each branch point: `source` itself, or the run's checkpoints at `at`."""
    from litgpt_ext import checkpoint as ckpt

    source = Path(source)
    if at is None:
        if not ckpt.is_complete(source):
            raise FileNotFoundError(f"anneal: {str(source)!r} is not a complete checkpoint (a step-* folder); give a"
                                    " checkpoint, or a run folder with --at [steps]")
        state = ckpt.load_training_state(source)
        return [(int(state["step"]), source)]
    found = dict(ckpt.list_checkpoints(source))
    if not found:
        raise FileNotFoundError(f"anneal: run {str(source)!r} holds no complete step-* checkpoint")
    missing = [s for s in at if s not in found]
    if missing:
        raise FileNotFoundError(f"anneal: run {str(source)!r} has no checkpoint at step(s) {missing}; it has "
                                f"{sorted(found)}")
    return [(s, found[s]) for s in at]


def plan_anneal(source: Path, mix: str, steps: int, control: str = "main:1.0", at: Optional[list[int]] = None,
                out_root: Optional[Path] = None, min_lr: float = 0.0, sft_config: Optional[Path] = None,
                sft_lr: Optional[float] = None, sft_seeds: Optional[list[int]] = None) -> list[Job]:
    """Every branch (candidate and control per branch point) and SFT probe, as executor jobs."""
    from litgpt_ext import checkpoint as ckpt

    if steps < 1:
        raise ValueError(f"anneal: steps must be >= 1 (the branch's budget in optimizer steps), got {steps}")
    if min_lr < 0:
        raise ValueError(f"anneal: min_lr must be >= 0, got {min_lr}")
    if mix == control:
        raise ValueError(f"anneal: the candidate mix and the control are both {mix!r}; the control is the general-only "
                         "mix the candidate is compared with")
    points = branch_points(source, at)
    run = Path(source) if at is not None else Path(source).parent
    root = Path(out_root or run.parent / f"{run.name}_anneal")
    jobs: list[Job] = []
    for step, ck in points:
        hp = ck / ckpt.HPARAMS_FILE
        if not hp.is_file():
            raise FileNotFoundError(f"anneal: {str(ck)!r} has no {ckpt.HPARAMS_FILE} (the run's resolved config)")
        base = yaml.safe_load(hp.read_text()) or {}
        for role, m in (("candidate", mix), ("control", control)):
            cfg = copy.deepcopy(base)
            name = f"anneal_at{step}_{role}_{_name(m)}"
            out = root / name
            for k, v in (("out_dir", str(out)), ("fork_from", str(ck)), ("resume", "auto"), ("initial_checkpoint_dir", None),
                         ("data.init_args.mix_weights_str", m), ("data.init_args.literal_weights_str", None),
                         ("data.init_args.mix_config_path", None), ("data.init_args.mix_schedule", None),
                         ("train.max_iters", None), ("train.max_tokens", None), ("train.max_additional_steps", steps),
                         ("train.pause_at_step", None), ("train.lr_scheduler", "decay"), ("train.min_lr", float(min_lr)),
                         ("train.lr_warmup_steps", None), ("train.lr_warmup_fraction", None), ("train.new_phase", False),
                         ("train.save_interval", steps), ("train.keep_last_k", None)):
                _set(cfg, k, v)
            jobs.append(Job(name, "midtrain", "pretrain", cfg, out,
                            info={"seed": cfg.get("seed"), "mix": m, "start": step, "domain": role, "weight": None,
                                  "domain_steps": float(steps), "role": role, "branch_step": step}))
    if sft_config is not None:
        if not Path(sft_config).is_file():
            raise FileNotFoundError(f"anneal: sft_config {str(sft_config)!r} does not exist")
        sft_base = yaml.safe_load(Path(sft_config).read_text()) or {}
        for j in [j for j in jobs if j.command == "pretrain"]:
            for seed in sft_seeds or [0]:
                cfg = copy.deepcopy(sft_base)
                out = j.out_dir / "sft" / f"seed{seed}"
                _set(cfg, "checkpoint_dir", str(j.out_dir / "final"))
                _set(cfg, "out_dir", str(out))
                _set(cfg, "seed", seed)
                if sft_lr is not None:
                    _set(cfg, "optimizer.init_args.lr", float(sft_lr))
                lr = ((cfg.get("optimizer") or {}).get("init_args") or {}).get("lr") if isinstance(
                    cfg.get("optimizer"), dict) else None  # the SFT config's own LR when --sft_lr is not given
                jobs.append(Job(f"sft_{j.name}_s{seed}", "sft", "sft", cfg, out, depends=[j.name],
                                info={"task": "probe", "source": j.name, "lr": lr, "seed": seed}))
    return jobs


def _last_val(run: Path) -> dict[str, float]:
    """Each validation set's loss at the run's last validated step (val_metrics.csv)."""
    path = run / "val_metrics.csv"
    if not path.is_file():
        return {}
    rows = list(csv.DictReader(open(path)))
    if not rows:
        return {}
    last = max(int(r["step"]) for r in rows)
    return {r["set"]: float(r["loss"]) for r in rows if int(r["step"]) == last}


def anneal_table(jobs: list[Job], out: Path) -> Path:
    """anneal.md / anneal.json: per branch point and val set, candidate vs control after the anneal."""
    rows = []
    for step in sorted({j.info["branch_step"] for j in jobs if j.command == "pretrain"}):
        cand = next(j for j in jobs if j.info.get("branch_step") == step and j.info["role"] == "candidate")
        ctrl = next(j for j in jobs if j.info.get("branch_step") == step and j.info["role"] == "control")
        vc, vk = _last_val(cand.out_dir), _last_val(ctrl.out_dir)
        probe = {}
        for j, key in ((cand, "candidate"), (ctrl, "control")):
            ms = [json.loads(p.read_text())["sft_val_loss"] for p in sorted((j.out_dir / "sft").glob("seed*/sft_metrics.json"))]
            probe[key] = sum(ms) / len(ms) if ms else None
        for s in sorted(set(vc) | set(vk)):
            a, b = vc.get(s), vk.get(s)
            rows.append({"branch_step": step, "set": s, "candidate": a, "control": b,
                         "delta": None if a is None or b is None else a - b})
        rows.append({"branch_step": step, "set": "SFT probe (sft_val_loss)", "candidate": probe["candidate"],
                     "control": probe["control"], "delta": None if None in probe.values() else
                     probe["candidate"] - probe["control"]})
    fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
    mix = next(j.info["mix"] for j in jobs if j.info.get("role") == "candidate")
    ctrl_mix = next(j.info["mix"] for j in jobs if j.info.get("role") == "control")
    L = [f"# Microanneal: {mix} vs the control {ctrl_mix}", "",
         "Loss after the anneal (lower is better); delta = candidate − control (negative: the candidate mix helped).", "",
         "| branch step | set | candidate | control | delta |", "|---|---|---|---|---|"]
    sign = lambda x: "n/a" if x is None else f"{x:+.4f}"  # noqa: E731
    L += [f"| {r['branch_step']} | {r['set']} | {fmt(r['candidate'])} | {fmt(r['control'])} | {sign(r['delta'])} |"
          for r in rows]
    out.mkdir(parents=True, exist_ok=True)
    (out / "anneal.md").write_text("\n".join(L) + "\n")
    (out / "anneal.json").write_text(json.dumps({"mix": mix, "control": ctrl_mix, "rows": rows}, indent=1))
    return out / "anneal.md"


def anneal(source: Path, mix: str, steps: int, control: str = "main:1.0", at: Optional[list[int]] = None,
           out_root: Optional[Path] = None, min_lr: float = 0.0, sft_config: Optional[Path] = None,
           sft_lr: Optional[float] = None, sft_seeds: Optional[list[int]] = None,
           action: Literal["plan", "write", "local"] = "plan") -> list[dict]:
    """Branch a checkpoint into a short linear LR decay on a candidate mix and on the general-only control.

    Args:
        source: The branch point: a checkpoint folder (step-*), or a run folder with `at`.
        mix: The candidate mix (e.g. main:0.7,math:0.3).
        steps: Each branch's budget in optimizer steps (the decay's length).
        control: The control mix, same budget (OLMo: general data only).
        at: WSD-S: branch at each of these checkpoint steps of the run `source` (its stable phase).
        out_root: Where the branches go (default: <the source run>_anneal beside it).
        min_lr: Where the linear decay ends (0: OLMo's microanneal).
        sft_config: An SFT config for the post-anneal probe of every branch's final checkpoint.
        sft_lr: The probe's LR (default: the SFT config's).
        sft_seeds: The probe's SFT seeds (default: [0]).
        action: plan (print the table), write (configs and SLURM arrays), local (run here).
    """
    from litgpt_ext.study.plan_checks import check_plan
    from litgpt_ext.study.sweep import plan_table, write_plan

    if action not in ("plan", "write", "local"):
        raise ValueError(f"action must be plan, write or local, got {action!r}")
    jobs = plan_anneal(source, mix, steps, control, at, out_root, min_lr, sft_config, sft_lr, sft_seeds)
    check_plan(jobs, here=action == "local")
    root = jobs[0].out_dir.parent
    cdir = root / "configs"
    print(plan_table(jobs))
    if action == "write":
        submit = write_plan(jobs, cdir)
        print(f"\nwrote {len(jobs)} configs and {submit}; submit with: bash {submit}")
    elif action == "local":
        from litgpt_ext.study.execute import run_local

        again = ("litgpt-ext anneal --source " + shlex.quote(str(source)) + f" --mix {shlex.quote(mix)} --steps {steps}"
                 + f" --control {shlex.quote(control)}" + (f" --at '{at}'" if at else "") + " --action local")
        run_local(jobs, cdir, resume_command=again)
        print(f"\nwrote {anneal_table(jobs, root)}")
    return [{"name": j.name, "out_dir": str(j.out_dir), **j.info} for j in jobs]
