"""`litgpt-ext prepare-sft`: the paper's SFT sets (PyCode, GSM8K, LIMA, SciQ) as litgpt JSON folders.

    litgpt-ext prepare-sft --task gsm8k --out_dir data/sft/gsm8k                   # from the Hugging Face hub
    litgpt-ext prepare-sft --task gsm8k --out_dir data/sft/gsm8k \\
        --train_files+ gsm8k/train.parquet --val_files+ gsm8k/test.parquet          # from local files (offline)

writes `<out_dir>/train.json`, `<out_dir>/val.json` (what `SFTData(train_path=<out_dir>)` reads) and
`manifest.json` (source, splits, counts, every dropped record counted by reason, checksums). Each
recipe maps the dataset's own columns to records for the paper's plain "instruction + input" prompt:

| task   | dataset (config)            | train / val split       | record                                                     | mask_prompt |
|--------|-----------------------------|-------------------------|------------------------------------------------------------|-------------|
| gsm8k  | openai/gsm8k (main)         | train / test            | instruction = question, output = "\\n" + answer (#### n)   | true        |
| sciq   | allenai/sciq                | train / validation      | instruction = question, input = support, output = "\\n" + correct_answer | true |
| lima   | GAIR/lima                   | train / 10% of train    | litgpt's LIMA formatting (first turn, or every turn pair)  | false       |
| pycode | code_search_net (python)    | train / validation      | text = func_code_string (the whole function is learned)    | false       |

With the `plain` prompt the response follows the prompt directly, so instruction records start
their output with a newline. The local-file path reads .parquet, .jsonl and .json (a list) with the
dataset's columns, so a cluster without hub access (or a test) uses files fetched elsewhere. A
dataset whose hub copy moved (CodeSearchNet's loading script does not run under datasets >= 4)
is named with `--hf_dataset`/`--hf_config`, e.g. a parquet mirror.

Why not litgpt's data modules: litgpt has no GSM8K, SciQ or CodeSearchNet module, its `LIMA`
splits at load time with a seed of its own and keeps nothing on disk, and our sweep wants one
fixed train/val folder per task that every (checkpoint, LR, seed) cell reads. litgpt's LIMA record
formatting (`litgpt.data.lima.format_dataset`) is reused as is.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from litgpt_ext.progress import progress


def _clean(x: Any) -> str:
    return x.strip() if isinstance(x, str) else ""


def _gsm8k(row: dict) -> list[dict]:
    q, a = _clean(row["question"]), _clean(row["answer"])
    return [{"instruction": q, "input": "", "output": "\n" + a}] if q and a else []


def _sciq(row: dict) -> list[dict]:
    q, a = _clean(row["question"]), _clean(row["correct_answer"])
    return [{"instruction": q, "input": _clean(row.get("support")), "output": "\n" + a}] if q and a else []


def _lima(row: dict, multiturn: bool) -> list[dict]:
    from litgpt.data.lima import format_dataset

    convo = row["conversations"]
    if not isinstance(convo, (list, tuple)) or len(convo) < 2:
        return []  # LIMA's test split: prompts without responses
    out = []
    for r in format_dataset([{"conversations": list(convo)}], multiturn):
        if _clean(r["instruction"]) and _clean(r["output"]):
            out.append({"instruction": r["instruction"].strip(), "input": "", "output": "\n" + r["output"].strip()})
    return out


def _pycode(row: dict) -> list[dict]:
    code = row["func_code_string"]
    return [{"text": code}] if isinstance(code, str) and code.strip() else []


@dataclass(frozen=True)
class Recipe:
    hf_dataset: str
    hf_config: Optional[str]
    train_split: str
    val_split: Optional[str]  # None: a seeded `val_fraction` of the train split
    columns: tuple[str, ...]  # columns every row must have
    mask_prompt: bool  # what the paper's protocol does (recorded in the manifest for the SFT config)
    convert: Callable[..., list[dict]]


RECIPES: dict[str, Recipe] = {
    "gsm8k": Recipe("openai/gsm8k", "main", "train", "test", ("question", "answer"), True, _gsm8k),
    "sciq": Recipe("allenai/sciq", None, "train", "validation", ("question", "correct_answer", "support"), True, _sciq),
    "lima": Recipe("GAIR/lima", None, "train", None, ("conversations",), False, _lima),
    "pycode": Recipe("code_search_net", "python", "train", "validation", ("func_code_string",), False, _pycode),
}

SUFFIXES = (".parquet", ".jsonl", ".json")


def _file_rows(path: Path) -> Iterable[dict]:
    """Rows of one local file (.parquet one row group at a time; .jsonl and .json as `SFTData` reads them)."""
    if path.suffix != ".parquet":
        from litgpt_ext.sft.data import read_json_rows

        return read_json_rows(path)
    return _parquet_rows(path)


def _parquet_rows(path: Path) -> Iterator[dict]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    for g in range(pf.num_row_groups):
        yield from pf.read_row_group(g).to_pylist()


def _check_files(files: list[Path], flag: str) -> list[Path]:
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{flag}: {str(f)!r} does not exist")
        if f.suffix not in SUFFIXES:
            raise ValueError(f"{flag}: {str(f)!r} is not one of {', '.join(SUFFIXES)}")
    return files


def _hub_rows(name: str, config: Optional[str], split: str) -> tuple[Iterable[dict], Optional[int]]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - a dependency of lm-eval, so normally present
        raise ValueError("reading from the Hugging Face hub needs the `datasets` package") from e
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:
        raise ValueError(f"could not load Hugging Face dataset {name!r} (config={config!r}, split={split!r}): "
                         f"{type(e).__name__}: {e}. Offline, pass the split's files with --train_files/--val_files") from e
    return ds, len(ds)


def _convert(rows: Iterable[dict], total: Optional[int], recipe: Recipe, task: str, where: str,
             counts: dict[str, int], **kw) -> list[dict]:
    out = []
    with progress(total=total, desc=f"prepare-sft {task} {where}", unit="rows") as bar:
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise ValueError(f"{where}: row {i} is a {type(row).__name__}, not a mapping of columns")
            missing = [c for c in recipe.columns if c not in row]
            if missing:
                raise ValueError(f"{where}: row {i} lacks column(s) {missing} that the {task!r} recipe reads "
                                 f"{list(recipe.columns)}; its columns: {sorted(row)}")
            recs = recipe.convert(row, **kw)
            counts["rows"] += 1
            if not recs:
                counts["dropped_empty"] += 1
            out.extend(recs)
            bar.update(1)
    return out


def _dedupe(records: list[dict], counts: dict[str, int], seen: Optional[set] = None) -> list[dict]:
    """Exact duplicate records dropped (counted), first kept; `seen` carries keys across splits."""
    seen = set() if seen is None else seen
    out = []
    for r in records:
        key = json.dumps(r, sort_keys=True)
        if key in seen:
            counts["dropped_duplicate"] += 1
            continue
        seen.add(key)
        out.append(r)
    return out


def _sample(records: list[dict], n: Optional[int], seed: int, counts: dict[str, int]) -> list[dict]:
    """At most `n` records, a seeded random subset in the original order (the rest counted)."""
    if n is None or len(records) <= n:
        return records
    keep = sorted(random.Random(seed).sample(range(len(records)), n))
    counts["not_sampled"] += len(records) - n
    return [records[i] for i in keep]


def _write_json(path: Path, records: list[dict]) -> str:
    data = json.dumps(records, ensure_ascii=False, indent=1).encode("utf-8")
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def prepare_sft(
    task: str,
    out_dir: Path,
    train_files: Optional[list[Path]] = None,
    val_files: Optional[list[Path]] = None,
    hf_dataset: Optional[str] = None,
    hf_config: Optional[str] = None,
    train_split: Optional[str] = None,
    val_split: Optional[str] = None,
    val_fraction: float = 0.1,
    max_train: Optional[int] = None,
    max_val: Optional[int] = None,
    multiturn: bool = False,
    seed: int = 1234,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write one of the paper's SFT sets as `<out_dir>/{train,val}.json` (litgpt JSON) + `manifest.json`.

    Args:
        task: gsm8k | sciq | lima | pycode (the table in this module's docstring).
        out_dir: the folder `SFTData(train_path=...)` (and the sweep's `data.init_args.train_path`) reads.
        train_files: local .parquet/.jsonl/.json files of the train split, in the dataset's columns
            (instead of the hub).
        val_files: local files of the validation split; without them (and with train_files) a seeded
            `val_fraction` of the train rows is held out.
        hf_dataset: hub dataset name (default: the recipe's).
        hf_config: hub config name (default: the recipe's).
        train_split: hub split for training (default: the recipe's).
        val_split: hub split for validation (default: the recipe's; LIMA has none: `val_fraction`).
        val_fraction: share of the train records held out when there is no validation split.
        max_train: keep at most this many train records (a seeded random subset; the rest counted).
        max_val: keep at most this many validation records (the SFT validation is a full pass at
            every `eval.interval`: CodeSearchNet's 23k validation functions are worth sampling).
        multiturn: LIMA only: every (user, assistant) turn pair of a conversation, not the first.
        seed: seed of the held-out fraction and the subsets.
        overwrite: replace an existing `out_dir` (else an existing one is refused).
    """
    if task not in RECIPES:
        raise ValueError(f"unknown SFT task {task!r}; known: {', '.join(RECIPES)}")
    recipe = RECIPES[task]
    out_dir = Path(out_dir)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    for name, v in (("max_train", max_train), ("max_val", max_val)):
        if v is not None and v < 1:
            raise ValueError(f"{name} must be >= 1 (or null for all), got {v}")
    if multiturn and task != "lima":
        raise ValueError(f"multiturn applies to the lima task only, not {task!r}")
    local = train_files is not None
    if not local and val_files is not None:
        raise ValueError("val_files needs train_files (local files replace the hub for both splits)")
    if local and any(x is not None for x in (hf_dataset, hf_config, train_split, val_split)):
        raise ValueError("train_files reads local files: hf_dataset, hf_config, train_split and val_split do not apply")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass --overwrite true to replace it")
    kw = {"multiturn": multiturn} if task == "lima" else {}

    counts = {s: {"rows": 0, "dropped_empty": 0, "dropped_duplicate": 0, "not_sampled": 0} for s in ("train", "val")}
    if local:
        tf = _check_files([Path(f) for f in train_files], "train_files")
        vf = _check_files([Path(f) for f in val_files], "val_files") if val_files else []
        if not tf:
            raise ValueError("train_files is empty")
        source = {"train_files": [str(f) for f in tf], "val_files": [str(f) for f in vf]}
        train = [r for f in tf for r in _convert(_file_rows(f), None, recipe, task, str(f), counts["train"], **kw)]
        val = [r for f in vf for r in _convert(_file_rows(f), None, recipe, task, str(f), counts["val"], **kw)]
        held_out = not vf
    else:
        name, config = hf_dataset or recipe.hf_dataset, hf_config if hf_config is not None else recipe.hf_config
        tsplit, vsplit = train_split or recipe.train_split, val_split or recipe.val_split
        source = {"hf_dataset": name, "hf_config": config, "train_split": tsplit, "val_split": vsplit}
        rows, n = _hub_rows(name, config, tsplit)
        train = _convert(rows, n, recipe, task, f"{name}:{tsplit}", counts["train"], **kw)
        val = []
        if vsplit is not None:
            rows, n = _hub_rows(name, config, vsplit)
            val = _convert(rows, n, recipe, task, f"{name}:{vsplit}", counts["val"], **kw)
        held_out = vsplit is None

    seen: set = set()
    train = _dedupe(train, counts["train"], seen)
    if held_out:  # a seeded share of the (deduplicated) train records
        if len(train) < 2:
            raise ValueError(f"{task}: {len(train)} usable train record(s): too few to hold out a validation share")
        n_val = max(1, round(val_fraction * len(train)))
        idx = set(random.Random(seed).sample(range(len(train)), n_val))
        train, val = [r for i, r in enumerate(train) if i not in idx], [r for i, r in enumerate(train) if i in idx]
        source["val_fraction"] = val_fraction
    else:
        val = _dedupe(val, counts["val"], seen)  # a val record equal to a train record is dropped and counted
    train = _sample(train, max_train, seed, counts["train"])
    val = _sample(val, max_val, seed + 1, counts["val"])
    if not train or not val:
        raise ValueError(f"{task}: no usable {'train' if not train else 'validation'} records "
                         f"(counts: {counts}); check the files or split")

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sha = {"train.json": _write_json(tmp / "train.json", train), "val.json": _write_json(tmp / "val.json", val)}
    manifest = {"task": task, "source": source, "mask_prompt": recipe.mask_prompt, "prompt_style": "plain",
                "format": "text" if task == "pycode" else "instruction", "multiturn": multiturn, "seed": seed,
                "max_train": max_train, "max_val": max_val, "train": len(train), "val": len(val),
                "counts": counts, "sha256": sha}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    dropped = {s: {k: v for k, v in c.items() if k != "rows" and v} for s, c in counts.items()}
    print(f"prepare-sft {task}: {len(train)} train / {len(val)} val records -> {out_dir} "
          f"(mask_prompt: {str(recipe.mask_prompt).lower()}; dropped: {dropped})", flush=True)
    return manifest
