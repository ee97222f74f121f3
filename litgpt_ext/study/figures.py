"""The study report's PNG figures (SFT losses per arm and task, forgetting, F4's timing x weight)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from litgpt_ext.study.spec import Arm


def study_figures(cells: dict, arms: list[Arm], out: Path, cross_table: Optional[dict]) -> list[str]:
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
