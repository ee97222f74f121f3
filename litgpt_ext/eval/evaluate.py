"""`litgpt-ext evaluate`: lm-eval on our checkpoints with the native backend.

Results go to `<checkpoint>/eval/<name>.json` (or `<out_dir>/<checkpoint name>/eval/<name>.json`),
where `<name>` is the task list with `,` replaced by `+`, plus `_<k>shot` / `_limit<n>` when those
are set. `training_scripts/eval_chkpts.sh` relies on this rule to skip finished checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any

from litgpt_ext.checkpoint import checkpoint_step

TASKS_DIR = Path(__file__).parent / "tasks"
DEMO_TASK_PREFIX = "demo_"
log = logging.getLogger(__name__)


def results_name(tasks: str, num_fewshot: int | None = None, limit: float | None = None) -> str:
    name = re.sub(r"[^A-Za-z0-9_.+-]", "_", "+".join(t.strip() for t in tasks.split(",") if t.strip()))
    if num_fewshot is not None:
        name += f"_{num_fewshot}shot"
    if limit is not None:
        name += f"_limit{limit:g}"
    return name + ".json"


def results_path(
    checkpoint: Path, tasks: str, num_fewshot: int | None = None, limit: float | None = None,
    out_dir: Path | None = None,
) -> Path:
    base = Path(checkpoint) if out_dir is None else Path(out_dir) / Path(checkpoint).name
    return base / "eval" / results_name(tasks, num_fewshot, limit)


def summary_lines(results: dict[str, Any]) -> list[str]:
    """One line per task: `task  metric=value±stderr ...` (stderr omitted when not computed)."""
    lines = []
    for task, metrics in results.get("results", {}).items():
        parts = []
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            label = metric if filt in ("", "none") else f"{metric}[{filt}]"
            err = metrics.get(f"{metric}_stderr,{filt}")
            err_s = f"±{err:.4f}" if isinstance(err, (int, float)) and not math.isnan(err) else ""
            parts.append(f"{label}={value:.4f}{err_s}")
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        lines.append(f"{task:<28} {' '.join(parts)}" + (f"  (n={n})" if n is not None else ""))
    return lines


class _QuietLmEval(logging.Filter):
    """Drop lm-eval's per-task boilerplate warnings about our (intentional) local-task YAMLs."""

    NOISE = ("Custom kwargs can be passed", "but aggregation is not", "but higher_is_better is not")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in self.NOISE)


def _quiet_lm_eval() -> None:
    for name in ("lm_eval", "lm_eval.api.task", "lm_eval.evaluator", "lm_eval.tasks"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, _QuietLmEval) for f in lg.filters):
            lg.addFilter(_QuietLmEval())
    for h in logging.getLogger().handlers:
        if not any(isinstance(f, _QuietLmEval) for f in h.filters):
            h.addFilter(_QuietLmEval())


def _task_manager(tasks: list[str], include_path: list[Path], eval_data_dir: Path):
    """Scan only our task folders unless a task lives elsewhere: lm-eval's 14k defaults take ~20 s."""
    from lm_eval.tasks import TaskManager

    metadata = {"eval_data_dir": str(Path(eval_data_dir).resolve())}
    paths = [str(p) for p in [TASKS_DIR, *include_path]]
    tm = TaskManager(include_path=paths, include_defaults=False, metadata=metadata)
    if all(t in tm.all_tasks for t in tasks):
        return tm
    tm = TaskManager(include_path=paths, include_defaults=True, metadata=metadata)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        local = sorted(t for t in tm.all_tasks if t.startswith(DEMO_TASK_PREFIX))
        raise ValueError(f"unknown lm-eval task(s) {unknown}; local tasks: {local}; see `lm_eval ls tasks` for the rest")
    return tm


def _ensure_demo_tasks(tasks: list[str], eval_data_dir: Path, demo_dir: Path) -> None:
    """Build the local task data from the demo corpus' held-out docs on first use."""
    if not any(t.startswith(DEMO_TASK_PREFIX) for t in tasks):
        return
    if (Path(eval_data_dir) / "manifest.json").is_file():
        return
    if not (Path(demo_dir) / "raw").is_dir():
        raise FileNotFoundError(
            f"local task data {str(eval_data_dir)!r} is missing and {str(Path(demo_dir) / 'raw')!r} does not exist "
            "to build it from; run `litgpt-ext build-demo` first or pass --eval_data_dir. For your own data: "
            "`litgpt-ext build-own-tasks --out_dir DIR --prefix mine --mc quiz.jsonl ...`, then "
            "`evaluate <checkpoint> --tasks mine --include_path DIR` (docs/own-data.md)"
        )
    from litgpt_ext.eval.build_tasks import build_tasks

    build_tasks(demo_dir=demo_dir, out_dir=eval_data_dir)


def evaluate_checkpoint(
    checkpoint: Path,
    tasks: str,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    limit: float | None = None,
    out_path: Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    include_path: Path | list[Path] | None = None,
    eval_data_dir: Path = Path("data/demo/eval_tasks"),
    bootstrap_iters: int = 1000,
    seed: int = 1234,
    model: Any = None,
) -> dict[str, Any]:
    """Run lm-eval on one checkpoint; write the results JSON to `out_path` when given."""
    import lm_eval

    from litgpt_ext.eval.lm import LitGPTExtLM

    _quiet_lm_eval()
    task_list = [t.strip() for t in tasks.split(",") if t.strip()]
    if not task_list:
        raise ValueError(f"no tasks in {tasks!r}; pass e.g. --tasks demo_math_mc,arc_easy")
    extra = [] if include_path is None else [include_path] if isinstance(include_path, (str, Path)) else list(include_path)
    tm = _task_manager(task_list, extra, eval_data_dir)
    lm = model if model is not None else LitGPTExtLM(pretrained=checkpoint, batch_size=batch_size, device=device, dtype=dtype)
    from litgpt_ext.eval.interop import quiet_git_hash

    quiet_git_hash()  # no `fatal: not a git repository` outside a checkout
    t0 = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=task_list,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=tm,
        bootstrap_iters=bootstrap_iters,
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    results["litgpt_ext"] = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "checkpoint_name": Path(checkpoint).name,
        "run": Path(checkpoint).resolve().parent.name,
        "step": None if math.isinf(s := checkpoint_step(checkpoint)) or math.isnan(s) else int(s),
        "tasks": tasks,
        "num_fewshot": num_fewshot,
        "limit": limit,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if out_path is not None:
        from lm_eval.utils import handle_non_serializable

        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
        tmp.replace(out_path)  # atomic: a half-written file never counts as "done"
    return results


DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:[0-9]+)?)$")


def check_eval_args(tasks: str, num_fewshot: int | None, batch_size: int, limit: float | None, device: str,
                    dtype: str, bootstrap_iters: int) -> None:
    """Refuse bad arguments before lm-eval, torch and the model are loaded (each names the valid range)."""
    if not [t for t in str(tasks).split(",") if t.strip()]:
        raise ValueError(f"tasks={tasks!r} names no task; pass e.g. --tasks demo_math_mc,arc_easy")
    if num_fewshot is not None and num_fewshot < 0:
        raise ValueError(f"num_fewshot={num_fewshot} must be >= 0 (or null: the task's default)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if limit is not None and not limit > 0:
        raise ValueError(f"limit={limit} must be > 0: a count of examples, or a fraction < 1 (null: all)")
    if not DEVICE_RE.match(str(device)):
        raise ValueError(f"device={device!r} is not valid; choose from: auto, cpu, cuda, cuda:N, mps")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not valid; choose from: {', '.join(DTYPES)}")
    if bootstrap_iters < 0:
        raise ValueError(f"bootstrap_iters={bootstrap_iters} must be >= 0 (0 disables)")


def evaluate(
    checkpoint: Path,
    tasks: str = "demo_math_mc,demo_code_completion,demo_prose_cloze",
    num_fewshot: int | None = None,
    batch_size: int = 8,
    limit: float | None = None,
    out_dir: Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    include_path: Path | None = None,
    all_checkpoints: bool = False,
    skip_existing: bool = False,
    eval_data_dir: Path = Path("data/demo/eval_tasks"),
    demo_dir: Path = Path("data/demo"),
    bootstrap_iters: int = 1000,
    seed: int = 1234,
) -> list[Path]:
    """Evaluate a checkpoint (or a run's latest / every checkpoint) with lm-eval.

    Args:
        checkpoint: a checkpoint folder (lit_model.pth + model_config.yaml) or a run folder
            holding `step-*/` and `final/` checkpoints.
        tasks: comma-separated lm-eval task names or tags. Local offline tasks: demo_math_mc,
            demo_code_completion, demo_prose_cloze, demo_math_gen, demo_prose_ppl, demo_code_ppl,
            demo_math_ppl (tag `demo_tasks` = all). Standard tasks (arc_easy, sciq, piqa, mmlu, ...)
            work where their datasets are reachable or cached.
        num_fewshot: few-shot examples per prompt (task default if unset).
        batch_size: sequences per forward pass.
        limit: evaluate only the first `limit` examples per task (a fraction if < 1).
        out_dir: write results under `<out_dir>/<checkpoint name>/eval/` instead of `<checkpoint>/eval/`.
        device: `auto`, `cpu`, `cuda`, `cuda:N`.
        dtype: `auto` (bf16 on capable GPUs, else fp32), `float32`, `bfloat16`, `float16`.
        include_path: an extra folder of lm-eval task YAMLs.
        all_checkpoints: with a run folder, evaluate every checkpoint instead of the latest.
        skip_existing: skip checkpoints whose results file already exists.
        eval_data_dir: where the local tasks' JSONL lives (built from `demo_dir` on first use).
        demo_dir: the demo corpus (its `raw/*_heldout.jsonl` feed the local tasks).
        bootstrap_iters: bootstrap resamples for stderr of non-mean metrics (0 disables).
        seed: seeds Python, NumPy, torch and few-shot sampling.

    Returns:
        The results files written (or found, when skipped).
    """
    check_eval_args(tasks, num_fewshot, batch_size, limit, device, dtype, bootstrap_iters)
    from litgpt_ext.checkpoint import resolve_checkpoints  # torch/litgpt: only when running

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ckpts = resolve_checkpoints(Path(checkpoint), all_checkpoints=all_checkpoints)
    task_list = [t.strip() for t in tasks.split(",") if t.strip()]
    _ensure_demo_tasks(task_list, eval_data_dir, demo_dir)
    written = []
    for i, ckpt in enumerate(ckpts, 1):
        path = results_path(ckpt, tasks, num_fewshot, limit, out_dir)
        if skip_existing and path.is_file():
            print(f"[{i}/{len(ckpts)}] {ckpt}: skip, {path} exists", flush=True)
            written.append(path)
            continue
        print(f"[{i}/{len(ckpts)}] evaluating {ckpt} on {tasks}", flush=True)
        res = evaluate_checkpoint(
            ckpt, tasks, num_fewshot=num_fewshot, batch_size=batch_size, limit=limit, out_path=path,
            device=device, dtype=dtype, include_path=include_path, eval_data_dir=eval_data_dir,
            bootstrap_iters=bootstrap_iters, seed=seed,
        )
        for line in summary_lines(res):
            print(line, flush=True)
        print(f"  -> {path} ({res['litgpt_ext']['seconds']:.1f} s)", flush=True)
        written.append(path)
    return written
