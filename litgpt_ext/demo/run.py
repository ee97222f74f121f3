"""The README's main job: demo data, pretrain, fork at an intermediate step, midtrain two blends, compare.

Every stage is the real command a researcher would run (`litgpt-ext pretrain --config …` in a
subprocess), with the YAML configs in `midtrain_configs/demo/`, so the demo doubles as an
end-to-end check of the CLI, the checkpoints and forking. Stages whose output exists are skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from litgpt_ext.eval.results import read_val_metrics


def _run(cmd: list[str], log_file: Path) -> None:
    """Run a stage, echoing its output and keeping a log; fail loudly with the log's tail."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for line in proc.stdout:
            log.write(line)
            sys.stdout.write("  " + line)
        proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"stage failed (exit {proc.returncode}); full log: {log_file}")
    print(f"  done in {time.perf_counter() - t0:.0f}s", flush=True)


def _at(rows: list[dict], name: str, which: str) -> float | None:
    vals = sorted((r["step"], r["loss"]) for r in rows if r["set"] == name)
    if not vals:
        return None
    return vals[0][1] if which == "first" else vals[-1][1]


def comparison_table(branches: dict[str, Path], sets: list[str]) -> str:
    """Markdown: each val set's loss at the fork point and at the end of every branch."""
    metrics = {name: read_val_metrics(d) for name, d in branches.items()}
    head = "| val set | at fork | " + " | ".join(f"{b} end | {b} Δ" for b in branches) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(branches))]
    for s in sets:
        start = next((_at(m, s, "first") for m in metrics.values() if _at(m, s, "first") is not None), None)
        cells = [s, f"{start:.4f}" if start is not None else "n/a"]
        for b in branches:
            end = _at(metrics[b], s, "last")
            cells += [f"{end:.4f}" if end is not None else "n/a",
                      f"{end - start:+.4f}" if end is not None and start is not None else "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(runs: dict[str, Path], sets: list[str], out_png: Path, fork_step: int | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4.2), squeeze=False)
    for ax, s in zip(axes[0], sets):
        for name, d in runs.items():
            pts = sorted((r["step"], r["loss"]) for r in read_val_metrics(d) if r["set"] == s)
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, label=name)
        if fork_step is not None:
            ax.axvline(fork_step, color="grey", linestyle="--", linewidth=1, label="fork")
        ax.set_title(f"val loss: {s}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


_METRICS = ("acc,none", "bits_per_byte,none")  # accuracy for choice tasks, bits per byte for perplexity tasks


def benchmark_scores(checkpoints: dict[str, Path], tasks: str, limit: int | None, data_dir: Path) -> dict[str, dict[str, float]]:
    """lm-eval scores of each checkpoint on the local tasks ({name: {"task metric": value}})."""
    import json

    from litgpt_ext.eval.evaluate import evaluate

    scores = {}
    for name, ckpt in checkpoints.items():
        [path] = evaluate(ckpt, tasks=tasks, limit=limit, demo_dir=data_dir, eval_data_dir=data_dir / "eval_tasks",
                          skip_existing=True, bootstrap_iters=0)
        res = json.loads(Path(path).read_text())["results"]
        scores[name] = {}
        for t in tasks.split(","):
            metric = next((m for m in _METRICS if m in res.get(t, {})), None)
            if metric is not None:
                scores[name][f"{t} ({metric.split(',')[0]})"] = res[t][metric]
    return scores


def scores_table(scores: dict[str, dict[str, float]]) -> str:
    names = list(scores)
    tasks = list(dict.fromkeys(t for s in scores.values() for t in s))
    lines = ["| task (metric) | " + " | ".join(names) + " |", "|" + "---|" * (1 + len(names))]
    for t in tasks:
        lines.append(f"| {t} | " + " | ".join(f"{scores[n].get(t, float('nan')):.3f}" for n in names) + " |")
    return "\n".join(lines)


def demo(
    data_dir: Path = Path("data/demo"),
    out_dir: Path = Path("runs/demo"),
    config_dir: Path = Path("midtrain_configs/demo"),
    fork_step: int = 160,
    branches: dict[str, str] | None = None,
    eval_tasks: str | None = "demo_math_mc,demo_math_ppl,demo_prose_ppl,demo_code_ppl",
    eval_limit: int | None = 100,
    force: bool = False,
) -> None:
    """Build the demo data, pretrain a tiny model, fork it, midtrain two blends, and compare them.

    Args:
        data_dir: where the demo corpus, tokenizer and shards are (built if missing).
        out_dir: where the runs, the table (summary.md) and the plot (curves.png) go.
        config_dir: the YAML configs: pretrain.yaml and one per branch.
        fork_step: the pretraining checkpoint (step) the branches start from; it must be a saved step.
        branches: {run name: config file in config_dir}; default: the math blend and the control.
        eval_tasks: lm-eval tasks scored on the fork point and each branch's final checkpoint
            (null: skip the benchmark stage).
        eval_limit: examples per task (null: all).
        force: delete previous runs under out_dir and redo them.
    """
    if fork_step < 1 or (eval_limit is not None and eval_limit < 1):  # before minutes of data building
        raise ValueError(f"fork_step={fork_step} and eval_limit={eval_limit} must be >= 1 (eval_limit: or null)")
    branches = branches or {"midtrain_math": "midtrain_math.yaml", "midtrain_control": "midtrain_control.yaml"}
    t0 = time.perf_counter()
    print(f"== 1/4 demo data in {data_dir}", flush=True)
    from litgpt_ext.demo.corpus import build_demo

    build_demo(out_dir=data_dir)
    from litgpt_ext.data.inspect import inspect_mix

    print("mix report for the math branch (main:0.8,math:0.2) over a 1M-token budget:")
    inspect_mix(data_dir, mix_weights_str="main:0.8,math:0.2", tokens=1_000_000, max_seq_length=128)
    if force and out_dir.exists():
        shutil.rmtree(out_dir)
    py = [sys.executable, "-m", "litgpt_ext", "pretrain"]
    data_args = ["--data.init_args.data_path", str(data_dir), "--tokenizer_dir", str(data_dir / "tokenizer")]
    pre = out_dir / "pretrain"
    print(f"== 2/4 pretrain on main -> {pre}", flush=True)
    if (pre / "final").is_dir():
        print("  already trained (use --force true to redo)")
    else:
        _run(py + ["--config", str(config_dir / "pretrain.yaml"), "--out_dir", str(pre), *data_args], out_dir / "logs" / "pretrain.log")
    fork = pre / f"step-{fork_step:08d}"
    if not fork.is_dir():
        saved = sorted(p.name for p in pre.glob("step-*"))
        raise SystemExit(f"fork_step {fork_step}: {fork} does not exist; saved steps: {saved}")
    print(f"== 3/4 midtrain from {fork.name}: {', '.join(branches)}", flush=True)
    runs = {}
    for name, cfg in branches.items():
        run = out_dir / name
        runs[name] = run
        if (run / "final").is_dir():
            print(f"  {name}: already trained")
            continue
        _run(py + ["--config", str(config_dir / cfg), "--out_dir", str(run), "--fork_from", str(fork), *data_args],
             out_dir / "logs" / f"{name}.log")
    print("== 4/4 compare", flush=True)
    scores_md = ""
    if eval_tasks:
        scores = benchmark_scores({"at fork": fork, **{n: r / "final" for n, r in runs.items()}}, eval_tasks, eval_limit, data_dir)
        scores_md = f"\n\nlm-eval on local offline tasks (first {eval_limit or 'all'} examples each; acc: higher is better, bits_per_byte: lower is better):\n\n" + scores_table(scores)
    sets = sorted({r["set"] for d in runs.values() for r in read_val_metrics(d)}, key=lambda s: (s != "general", s))
    table = comparison_table(runs, sets)
    png = plot_curves({"pretrain": pre, **runs}, sets, out_dir / "curves.png", fork_step)
    summary = (f"# Demo: midtraining from {fork}\n\nValidation loss at the fork point and at the end of each branch "
               f"(Δ = end − fork; general up = forgetting, math down = what the new blend bought).\n\n{table}{scores_md}"
               "\n\n![curves](curves.png)\n")
    (out_dir / "summary.md").write_text(summary)
    print(table + scores_md)
    print(f"\nplot: {png}\nsummary: {out_dir / 'summary.md'}\ntotal {time.perf_counter() - t0:.0f}s")
