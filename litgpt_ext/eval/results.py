"""Read evaluation results and validation losses across runs into flat records.

One record per (run, checkpoint, task, metric): lm-eval scores from `<ckpt>/eval/*.json` (written by
`litgpt-ext evaluate`) and validation losses from `<run>/val_metrics.csv` (columns
`step,tokens,set,loss,ppl`, written by the trainer), the latter as task `val:<set>`, metric `loss`.
`util_scripts/{collect_results,plot_results,pick_best}.py` are thin CLIs over this module.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from litgpt_ext.checkpoint import STEP_RE

LOWER_IS_BETTER = {"loss", "ppl", "perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"}
VAL_PREFIX = "val:"


@dataclass
class Record:
    run: str
    checkpoint: str
    step: int | None
    task: str
    metric: str
    value: float
    stderr: float | None = None
    num_fewshot: int | None = None
    source: str = ""


def lower_is_better(metric: str) -> bool:
    return metric.split(",")[0] in LOWER_IS_BETTER


def _num(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def read_val_metrics(run_dir: Path) -> list[dict]:
    """Rows of `<run>/val_metrics.csv` as dicts with int step and float loss; [] if absent."""
    path = Path(run_dir) / "val_metrics.csv"
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step, loss = _num(row.get("step")), _num(row.get("loss"))
            if step is None or loss is None:
                continue
            rows.append({"step": int(step), "set": row.get("set") or "val", "loss": loss,
                         "tokens": _num(row.get("tokens")), "ppl": _num(row.get("ppl"))})
    return rows


def _ckpt_step(name: str) -> int | None:
    m = STEP_RE.match(name)
    return int(m.group(1)) if m else None


def _final_step(run_dir: Path, val_rows: list[dict]) -> int | None:
    """`final` has no step in its name: the run's last validation step, else its last step-* + 1."""
    if val_rows:
        return max(r["step"] for r in val_rows)
    steps = [s for p in Path(run_dir).glob("step-*") if (s := _ckpt_step(p.name)) is not None]
    return max(steps) + 1 if steps else None


def read_run(run_dir: Path, with_val: bool = True) -> list[Record]:
    """All eval scores of a run's checkpoints, plus its validation losses."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {str(run_dir)!r} does not exist")
    run = run_dir.resolve().name
    val_rows = read_val_metrics(run_dir)
    records: list[Record] = []
    for path in sorted(run_dir.glob("*/eval/*.json")):
        ckpt = path.parent.parent.name
        try:
            res = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"results file {str(path)!r} is not valid JSON: {e}") from e
        step = _ckpt_step(ckpt)
        if step is None and ckpt == "final":
            step = _final_step(run_dir, val_rows)
        meta = res.get("litgpt_ext", {})
        for task, metrics in res.get("results", {}).items():
            for key, value in metrics.items():
                if "," not in key or "_stderr" in key or _num(value) is None:
                    continue
                metric, _, filt = key.partition(",")
                name = metric if filt in ("", "none") else f"{metric},{filt}"
                records.append(Record(
                    run=run, checkpoint=ckpt, step=step, task=task, metric=name, value=float(value),
                    stderr=_num(metrics.get(f"{metric}_stderr,{filt}")),
                    num_fewshot=meta.get("num_fewshot"), source=str(path),
                ))
    if with_val:
        ckpts = {p.name: (_ckpt_step(p.name) if p.name != "final" else _final_step(run_dir, val_rows))
                 for p in run_dir.iterdir() if p.is_dir() and (p.name == "final" or STEP_RE.match(p.name))}
        for r in val_rows:
            names = [n for n, s in ckpts.items() if s == r["step"]] or [""]
            for name in names:
                records.append(Record(run=run, checkpoint=name, step=r["step"], task=VAL_PREFIX + r["set"],
                                      metric="loss", value=r["loss"], source=str(run_dir / "val_metrics.csv")))
    return records


def read_runs(run_dirs: list[Path], with_val: bool = True) -> list[Record]:
    out: list[Record] = []
    for run_dir in run_dirs:
        out += read_run(run_dir, with_val=with_val)
    if len({Path(r).resolve().name for r in run_dirs}) != len(run_dirs):
        raise ValueError(f"run directories must have distinct names, got {[str(r) for r in run_dirs]}")
    return out


def write_csv(records: list[Record], path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(Record)])
        writer.writeheader()
        for r in records:
            writer.writerow({k: ("" if v is None else v) for k, v in asdict(r).items()})


def pivot(records: list[Record], metrics: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """Rows: (run, checkpoint, step), sorted by run then step; columns: `task metric`."""
    keep = [r for r in records if r.checkpoint and (metrics is None or r.metric.split(",")[0] in metrics)]
    cols = sorted({(r.task, r.metric) for r in keep}, key=lambda c: (c[0].startswith(VAL_PREFIX), c))
    table: dict[tuple, dict] = {}
    for r in keep:
        table.setdefault((r.run, r.checkpoint, r.step), {})[(r.task, r.metric)] = r
    header = ["run", "checkpoint", "step"] + [f"{t} {m}" for t, m in cols]
    rows = []
    for (run, ckpt, step), vals in sorted(table.items(), key=lambda kv: (kv[0][0], kv[0][2] if kv[0][2] is not None else math.inf)):
        row = [run, ckpt, "" if step is None else str(step)]
        for c in cols:
            r = vals.get(c)
            row.append("" if r is None else f"{r.value:.4f}" + (f" ± {r.stderr:.4f}" if r.stderr else ""))
        rows.append(row)
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


@dataclass
class Candidate:
    run: str
    checkpoint: str
    step: int | None
    domain_score: float
    general_loss: float | None
    baseline_loss: float | None
    eligible: bool


def pick_best(
    records: list[Record], domain_task: str, domain_metric: str = "acc", general_set: str = "general",
    general_task: str | None = None, general_metric: str = "loss", budget: float = 0.05,
    baseline_loss: float | None = None,
) -> tuple[Candidate | None, list[Candidate]]:
    """Best domain score among checkpoints whose general loss is within `(1 + budget) x` baseline.

    The general loss is the run's validation loss on `general_set` at the checkpoint's step (from
    val_metrics.csv), or the `general_metric` of lm-eval task `general_task` when that is given.
    Without `baseline_loss`, each run's baseline is its earliest general loss (the checkpoint it
    started from, for a midtraining run that evaluates at step 0 or its first interval).
    """
    gen_task = general_task or VAL_PREFIX + general_set
    gen = [r for r in records if r.task == gen_task and r.metric == general_metric]
    dom = [r for r in records if r.task == domain_task and r.metric == domain_metric and r.checkpoint]
    if not dom:
        found = sorted({f"{r.task}:{r.metric}" for r in records if not r.task.startswith(VAL_PREFIX)})
        raise ValueError(f"no results for domain task {domain_task!r} metric {domain_metric!r}; found: {found}")
    if not gen:
        found = sorted({f"{r.task}:{r.metric}" for r in records if r.task.startswith(VAL_PREFIX) or r.metric == general_metric})
        raise ValueError(f"no general losses for {gen_task!r} metric {general_metric!r}; found: {found}")
    sign = -1.0 if lower_is_better(domain_metric) else 1.0
    cands = []
    for d in dom:
        run_gen = sorted((g for g in gen if g.run == d.run and g.step is not None), key=lambda g: g.step)
        base = baseline_loss if baseline_loss is not None else (run_gen[0].value if run_gen else None)
        if general_task:
            match = [g for g in gen if g.run == d.run and g.checkpoint == d.checkpoint]
        else:  # the validation loss at this checkpoint's step, else the latest one before it
            match = [g for g in run_gen if d.step is not None and g.step <= d.step][-1:]
        loss = match[-1].value if match else None
        ok = loss is not None and base is not None and loss <= base * (1.0 + budget)
        cands.append(Candidate(d.run, d.checkpoint, d.step, d.value, loss, base, ok))
    cands.sort(key=lambda c: (c.run, math.inf if c.step is None else c.step))
    eligible = [c for c in cands if c.eligible]
    best = max(eligible, key=lambda c: (sign * c.domain_score, -(c.general_loss or 0.0))) if eligible else None
    return best, cands
