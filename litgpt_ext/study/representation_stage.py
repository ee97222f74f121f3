"""`reproduce`'s representation stage: the paper's CKA and weight-distance checks, written into REPORT.md.

For the first pretraining seed, the base run and every `mid` arm, each before and after SFT on the
arm's own domain task (the SFT run of the first SFT seed at the chosen LR), through `litgpt-ext cka`
on the demo's held-out shards: base vs arm before SFT, base vs arm after SFT, and each model vs its
own SFT'd self (what SFT moved). The section gives linear CKA per layer and the last block's relative
weight distance; `representations/` holds cka.json and the PNGs. Any failure is said, not hidden.
"""

from __future__ import annotations

import contextlib
from pathlib import Path


def representation_lines(cfg, arms: list, runs: list, logs: Path) -> list[str]:
    """REPORT.md lines for the representation stage (`cfg.cka_docs` documents; 0: skipped, said so)."""
    from litgpt_ext.sft.grid import best_lr

    if not getattr(cfg, "cka_docs", 0):
        return ["## Representations", "", "Not measured: `cka_docs: 0`.", ""]
    seed = cfg.pretrain_seeds[0]
    sft_of: dict[tuple[str, str], Path] = {}  # (source, task) -> the first SFT seed's run at the best LR
    first = min((r.seed for r in runs), default=None)
    by_src: dict[tuple[str, str], dict[float, Path]] = {}
    losses: dict[tuple[str, str], dict[float, list[float]]] = {}
    for r in runs:
        if r.seed == first and r.metrics() is not None:
            by_src.setdefault((r.source, r.task), {})[r.lr] = r.out_dir / "final"
            losses.setdefault((r.source, r.task), {})[r.lr] = [r.metrics().sft_val_loss]
    for key, lrs in by_src.items():
        sft_of[key] = lrs[best_lr(losses[key])]
    base = f"base_seed{seed}"
    ckpts: list[Path] = []
    labels: list[str] = []
    pairs: list[tuple[int, int]] = []

    def add(label: str, path: Path) -> int:
        if label not in labels:
            labels.append(label)
            ckpts.append(path)
        return labels.index(label)

    root = cfg.out_dir / "runs"
    for a in arms:
        if a.role != "mid" or seed not in (a.seeds or []):
            continue
        task = a.tasks[0] if a.tasks else None
        mid = f"{a.name}_seed{seed}"
        if task is None or (base, task) not in sft_of or (mid, task) not in sft_of:
            continue
        b, m = add("base", root / base / "final"), add(a.name, root / mid / "final")
        bs, ms = add(f"base_sft_{task}", sft_of[(base, task)]), add(f"{a.name}_sft_{task}", sft_of[(mid, task)])
        pairs += [(b, m), (bs, ms), (m, ms), (b, bs)]
    if not pairs:
        return ["## Representations", "", "Not measured: no mid arm with SFT runs of the first pretraining seed.", ""]
    pairs = list(dict.fromkeys(pairs))
    out = cfg.out_dir / "representations"
    try:
        from litgpt_ext.study.cka import cka

        with open(logs / "cka.log", "w") as fh, contextlib.redirect_stdout(fh):
            res = cka(list(ckpts), data=cfg.demo_dir / "val", labels=labels, pairs=",".join(f"{i}:{j}" for i, j in pairs),
                      num_docs=cfg.cka_docs, max_tokens=2048, out_dir=out)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        return ["## Representations", "", f"Not measured: the CKA stage failed ({e}).", ""]
    layers = res["layers"]
    L = ["## Representations", "",
         f"Linear CKA per layer (1 = the same representation up to rotation and scale) and the last block's relative "
         f"weight distance ||a − b|| / ||a||, pretraining seed {seed}, {res['samples']} token positions of "
         f"{res['num_docs']} held-out documents (`litgpt-ext cka`; `representations/cka.json`).", "",
         "| pair | " + " | ".join(layers) + " | last block distance |", "|---|" + "---|" * (len(layers) + 1)]
    for name, c in res["cka"].items():
        wd = res["weight_distance"][name].get("last_block", {})
        L.append(f"| {name} | " + " | ".join(f"{c['per_layer'][lay]:.3f}" for lay in layers)
                 + f" | {wd.get('relative', float('nan')):.4f} |")
    L += ["", "![representations/cka_heatmap.png](representations/cka_heatmap.png)",
          "![representations/weight_distance.png](representations/weight_distance.png)", ""]
    return L
