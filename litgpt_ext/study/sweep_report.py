"""`litgpt-ext sweep --action report`: REPORT.md of a sweep from the SFT runs that finished, with the
analysis `reproduce` uses (`litgpt_ext.study.report`)."""

from __future__ import annotations

from pathlib import Path

from litgpt_ext.sft.grid import best_lr, lr_edge_step
from litgpt_ext.study.report import Analysis, cells_of, write_report
from litgpt_ext.study.spec import mix_string, plan_arms, split_run_name


def _sft_train_file(path: Path) -> Path:
    """An SFT data path as `SFTData` takes it (a file, or a folder with train.json(l)) -> its train file."""
    path = Path(path)
    if path.is_dir():
        for name in ("train.json", "train.jsonl"):
            if (path / name).is_file():
                return path / name
    return path


def sweep_report(spec, jobs: list, out: Path) -> Path:
    """REPORT.md of a sweep (`litgpt-ext sweep --action report`) from the SFT runs that finished.

    Per (source checkpoint, task) the LR with the lowest mean SFT validation loss over the seeds that
    finished is kept (the sweep runs the whole LR x seed grid), and its seeds are the cell; an arm's
    pretraining seeds pool into one cell, as in `reproduce`. Runs without `sft_metrics.json` are
    counted and named in the report, never silently left out.
    """
    import yaml

    from litgpt_ext.sft.metrics import FILE_NAME, SFTMetrics, read_sft_metrics
    from litgpt_ext.study.spec import ReportSpec, _get

    if spec.sft is None:
        raise ValueError("sweep report: the spec has no sft section; the report compares the arms after SFT")
    rs = spec.report or ReportSpec()
    if rs.similarity_docs < 0:
        raise ValueError(f"sweep report: similarity_docs must be >= 0 (0 skips the bridge), got {rs.similarity_docs}")
    unknown = sorted(set(rs.task_domains) - set(spec.sft.tasks))
    if unknown:
        raise ValueError(f"sweep report: task_domains names {unknown}, which are not SFT tasks; tasks: {sorted(spec.sft.tasks)}")
    task_of: dict[str, str] = {}
    for task, domain in rs.task_domains.items():
        if domain in task_of:
            raise ValueError(f"sweep report: tasks {task_of[domain]!r} and {task!r} both measure domain {domain!r}; "
                             "give each domain one task")
        task_of[domain] = task
    family_of = {"base_seed%d" % s: "base" for s in spec.seeds}
    for j in jobs:
        if j.stage == "midtrain":
            family_of[j.name] = split_run_name(j.name)[0]
        elif j.stage == "soup":
            family_of[j.name] = "soup_" + split_run_name(j.info["family"])[0]
    sft_jobs = [j for j in jobs if j.stage == "sft"]
    missing = [j.name for j in sft_jobs if not j.done()]  # the executor's one "finished" rule
    by_src: dict[tuple[str, str], dict[float, list[SFTMetrics]]] = {}
    for j in sft_jobs:
        if j.name in missing:
            continue
        m = read_sft_metrics(j.out_dir / FILE_NAME)
        by_src.setdefault((j.info["source"], j.info["task"]), {}).setdefault(j.info["lr"], []).append(m)
    best: dict[tuple[str, str], list[SFTMetrics]] = {}
    edges: list[str] = []  # (checkpoint, task)s whose chosen LR is the grid's smallest or largest
    for (src, task), lrs in sorted(by_src.items()):
        lr = best_lr({k: [m.sft_val_loss for m in ms] for k, ms in lrs.items()})
        best.setdefault((family_of[src], task), []).extend(lrs[lr])
        if lr_edge_step(sorted(lrs), lr) is not None:
            edges.append(f"{src}/{task}: {lr:g} of {sorted(lrs)}")
    cells = cells_of(best)
    tasks = list(spec.sft.tasks)
    arms = plan_arms(spec)
    for a in arms:  # a sweep runs every arm under every seed it names and fine-tunes it on every task
        a.seeds, a.tasks = a.seeds or list(spec.seeds), tasks

    sim = None
    if rs.similarity_docs > 0 and cells:
        base_cfg = yaml.safe_load(Path(spec.base_config).read_text()) or {}
        data_path = Path(rs.data_path or _get(base_cfg, "data.init_args.data_path", "") or "")
        tok = Path(rs.tokenizer_dir or base_cfg.get("tokenizer_dir") or "")
        sft_cfg = yaml.safe_load(Path(spec.sft.config).read_text()) or {}
        sft_sets = {t: _sft_train_file(Path((o or {}).get("data.init_args.train_path") or _get(sft_cfg, "data.init_args.train_path", "")))
                    for t, o in spec.sft.tasks.items()}
        sets = {"base": f"{spec.replay}:1.0", **{a.name: a.mix or mix_string(spec.replay, a.domain, a.weight) for a in arms}}
        absent = [str(p) for p in (data_path, tok, *sft_sets.values()) if not str(p) or not p.exists()]
        if absent:
            sim = {"error": f"missing {absent}; set report.data_path / report.tokenizer_dir or prepare the SFT sets"}
        else:
            from litgpt_ext.study.similarity import saved_similarity, similarity

            sim = saved_similarity(out / "similarity", sets, sft_sets, rs.similarity_docs)
            if sim is None:
                try:
                    sim = similarity(data_path, tok, sets, sft_sets, general="base", num_docs=rs.similarity_docs,
                                     out_dir=out / "similarity")
                except (ValueError, FileNotFoundError) as e:
                    sim = {"error": str(e)}
    done = len(sft_jobs) - len(missing)
    status = (f"all {done} SFT runs of the plan have finished" if not missing else
              f"{done} of {len(sft_jobs)} SFT runs have finished; the {len(missing)} not finished (no `sft_metrics.json` and complete `final/`) are left "
              f"out (first: {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''})")
    g = spec.sft
    setup = [f"- pretraining: `{spec.base_config}`, {spec.total_steps} steps total, seeds {list(spec.seeds)}; arms fork the "
             "base run of their seed and train to the same total with the base run's schedule (no re-warmup)",
             f"- SFT: `{g.config}`; tasks {tasks}, LRs {list(g.lr)} x seeds {list(g.seeds)}; per (checkpoint, task) the LR "
             "with the lowest mean SFT validation loss over seeds",
             (f"- **warning:** the chosen LR is at an edge of the grid for {len(edges)} (checkpoint, task) cell(s) "
              f"({'; '.join(edges[:6])}{' …' if len(edges) > 6 else ''}): the best LR may lie outside the grid; "
              "extend `sft.lr` beyond that edge" if edges else "- the chosen LR is inside the grid for every cell"),
             f"- findings: task of each domain {task_of or '(none: report.task_domains)'}, far domains {rs.far_domains}"
             + (f", near task {rs.near_task}" if rs.near_task else "")]
    return write_report(
        out, title=f"Sweep {spec.name}: results after SFT and the paper's findings",
        intro=f"Generated by `litgpt-ext sweep --action report`: {status}. Everything below is measured.",
        setup=setup, arms=arms, base_seeds=list(spec.seeds), base_tasks=tasks if g.include_base else [],
        replay=spec.replay, cells=cells, sim=sim,
        analysis=Analysis(task_of=task_of, near_task=rs.near_task, far_domains=list(rs.far_domains)), footer=[],
        n_boot=rs.bootstrap)
