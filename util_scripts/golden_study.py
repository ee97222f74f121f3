"""The golden study: a fixed, small preset of the reproduction whose numbers a refactor must not move.

A tiny demo corpus, one general-only base run, one mid arm and one continued-pretraining arm forked
from it, SFT of every final checkpoint at one LR with 2 seeds, the similarity and `results.json`,
run through `litgpt_ext.study.reproduce.reproduce` exactly as `make reproduce` does. The record
holds every run's logged losses, the sha256 of every checkpoint tensor file and `results.json`'s
numbers. Both records run in the same scratch directory (`--work`, deleted first): a run's phase id
hashes its paths. Two records from one machine must be identical; across CPUs (AMD/Intel, other BLAS
kernels) float results may differ in the last bits, so compare records made on the same machine.

    python util_scripts/golden_study.py record --out before.json
    # ... change the code ...
    python util_scripts/golden_study.py record --out after.json
    python util_scripts/golden_study.py compare before.json after.json   # exit 1 on any difference
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TENSOR_SUFFIXES = {".pth", ".safetensors", ".bin", ".distcp", ".pt"}
LOSS_COLUMNS = ("train_loss", "loss", "val_loss", "sft_val_loss", "lr")


VOLATILE = ("time", "seconds", "minutes", "wall", "timestamp", "saved_at", "created", "date", "host", "pid",
            "phase_id")
"""Keys whose values are the clock's, the machine's or random (a phase id is a uuid), not the training's."""


def _canonical(obj, work: str):
    """A checkpoint/metrics object as plain JSON: tensors by dtype, shape and sha256 of their bytes,
    the scratch directory as `<work>`, the clock's values dropped."""
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return {"dtype": str(t.dtype), "shape": list(t.shape), "sha256": hashlib.sha256(raw).hexdigest()}
    if isinstance(obj, dict):
        return {str(k): _canonical(v, work) for k, v in obj.items()
                if not any(w in str(k).lower() for w in VOLATILE)}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v, work) for v in obj]
    if isinstance(obj, str):
        return obj.replace(work, "<work>")
    if isinstance(obj, Path):
        return str(obj).replace(work, "<work>")
    if obj is None or isinstance(obj, (bool, int, float)):
        return obj
    return repr(obj).replace(work, "<work>")


def _content(path: Path, work: str):
    """A tensor file's content, not its bytes (pickles hold paths and times): the sha256 of its
    canonical form, or for the small training state the canonical form itself (a diff names the key)."""
    import torch

    obj = _canonical(torch.load(path, map_location="cpu", weights_only=False), work)
    if path.name == "training_state.pth":
        return obj
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def run_study(work: Path, workers: int = 1) -> Path:
    """Build the demo data and run the preset under `work` (removed first) with `workers` worker
    processes (1: every job in this process); returns the study dir."""
    import torch
    import yaml

    torch.set_num_threads(1)  # one thread: the same float reductions on any core count
    from litgpt_ext.demo.corpus import build_demo
    from litgpt_ext.study.reproduce import reproduce

    shutil.rmtree(work, ignore_errors=True)
    demo = work / "demo"
    build_demo(demo, vocab_size=1000, main_tokens=30_000, code_tokens=12_000, math_tokens=12_000, heldout_docs=40,
               tokenizer_sample_chars=150_000, chunk_tokens=4096, val_fraction=0.1, seed=5)
    pre = yaml.safe_load((ROOT / "midtrain_configs" / "reproduce" / "pretrain_cpu.yaml").read_text())
    pre["model_config"].update(n_layer=1, n_head=2, n_embd=32, vocab_size=1000, padded_vocab_size=1000)
    pre["train"].update(global_batch_size=4, micro_batch_size=4, log_interval=2, save_interval=8)
    pre["eval"].update(interval=8, max_iters=2)
    sft = yaml.safe_load((ROOT / "midtrain_configs" / "reproduce" / "sft_cpu.yaml").read_text())
    sft["train"].update(global_batch_size=8, micro_batch_size=8, log_interval=2)
    sft["eval"]["max_iters"] = 2
    (work / "pre.yaml").write_text(yaml.safe_dump(pre))
    (work / "sft.yaml").write_text(yaml.safe_dump(sft))
    out = work / "study"
    reproduce(out_dir=out, demo_dir=demo, pretrain_config=work / "pre.yaml", sft_config=work / "sft.yaml",
              total_steps=16, pretrain_seeds=(42,), base_tasks=("math",), sft_lrs=(1e-3,), sft_seeds=(1, 2),
              arms=[{"name": "math_mid", "domain": "math", "start": 6, "weight": 0.25, "role": "mid",
                     "tasks": ["math"]},
                    {"name": "math_cpt", "domain": "math", "start": 12, "weight": 1.0, "role": "cpt",
                     "tasks": ["math"]}],
              similarity_docs=20, sft_task_args={"math_examples": 120}, threads=1, workers=workers)
    return out


def _losses(csv_path: Path) -> list[dict]:
    rows = []
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            kept = {k: row[k] for k in row if k in LOSS_COLUMNS or k == "step" or k.endswith("_loss")}
            if any(v not in ("", None) for k, v in kept.items() if k != "step"):
                rows.append(kept)
    return rows


def record(study: Path, work: Path) -> dict:
    w = str(work)
    rec: dict = {"losses": {}, "checkpoints": {}, "sft_metrics": {}, "results": None}
    for p in sorted(study.rglob("metrics.csv")):
        rec["losses"][str(p.relative_to(study))] = _losses(p)
    for p in sorted(study.rglob("*")):
        if p.is_file() and not p.is_symlink() and p.suffix in TENSOR_SUFFIXES:
            rec["checkpoints"][str(p.relative_to(study))] = _content(p, w)
    for name in ("config.json", "model_config.yaml", "hyperparameters.yaml"):  # the files beside the weights
        for p in sorted(study.rglob(name)):
            rec["checkpoints"][str(p.relative_to(study))] = p.read_text().replace(w, "<work>")
    for p in sorted(study.rglob("sft_metrics.json")):
        rec["sft_metrics"][str(p.relative_to(study))] = _canonical(json.loads(p.read_text()), w)
    rec["results"] = _canonical(json.loads((study / "results.json").read_text()), w)
    if not rec["losses"] or not rec["checkpoints"]:
        raise SystemExit(f"golden study: no metrics.csv or no checkpoint files under {study}")
    return rec


def _diff(a, b, where: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{where}/{k}: only in {'after' if k not in a else 'before'}")
            else:
                _diff(a[k], b[k], f"{where}/{k}", out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{where}[{i}]", out)
    elif a != b:
        out.append(f"{where}: {a!r} != {b!r}")


def compare(before: dict, after: dict) -> list[str]:
    out: list[str] = []
    _diff(before, after, "", out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="run the golden study and write its record")
    r.add_argument("--work", type=Path, default=Path("/tmp/litgpt_ext_golden_study"),
                   help="scratch directory, deleted first; the same for both records (default: %(default)s)")
    r.add_argument("--out", type=Path, required=True, help="the record (JSON)")
    r.add_argument("--workers", type=int, default=1,
                   help="worker processes of the study executor (the record must not depend on it; default: %(default)s)")
    c = sub.add_parser("compare", help="compare two records; exit 1 on any difference")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "record":
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        rec = record(run_study(args.work, args.workers), args.work)
        args.out.write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
        print(f"golden study: {len(rec['losses'])} loss logs, {len(rec['checkpoints'])} checkpoint files, "
              f"{len(rec['sft_metrics'])} SFT runs -> {args.out}")
        return 0
    diffs = compare(json.loads(args.before.read_text()), json.loads(args.after.read_text()))
    for d in diffs[:50]:
        print(d, flush=True)
    n = json.loads(args.before.read_text())
    print(f"golden study: {len(diffs)} differences over {len(n['losses'])} loss logs, {len(n['checkpoints'])} "
          f"checkpoint files, {len(n['sft_metrics'])} SFT runs" + ("" if diffs else ": identical"))
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
