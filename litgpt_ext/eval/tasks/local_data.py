"""Dataset loader for the local (offline) lm-eval tasks in this folder.

The YAMLs here are shipped with the package and name no file paths; each points `custom_dataset`
at `load`, which lm-eval calls with the task manager's metadata (`eval_data_dir`, set by
`litgpt_ext.eval.evaluate`) plus the YAML's `dataset_kwargs` (`task_dir`). Data lives in
`<eval_data_dir>/<task_dir>/{train,test}.jsonl`, written by `litgpt_ext.eval.build_tasks`.
Outside our evaluate command, set LITGPT_EXT_EVAL_DATA (default: data/demo/eval_tasks).
"""

import os
from pathlib import Path


def load(task_dir: str, eval_data_dir: str | None = None, **_metadata):
    import datasets

    root = Path(eval_data_dir or os.environ.get("LITGPT_EXT_EVAL_DATA", "data/demo/eval_tasks"))
    folder = root / task_dir
    files = {split: str(folder / f"{split}.jsonl") for split in ("train", "test") if (folder / f"{split}.jsonl").is_file()}
    if "test" not in files:
        raise FileNotFoundError(
            f"local task data {str(folder / 'test.jsonl')!r} not found; build it with "
            "`python -m litgpt_ext.eval.build_tasks --demo_dir data/demo --out_dir data/demo/eval_tasks` "
            "or point eval_data_dir / LITGPT_EXT_EVAL_DATA at the folder"
        )
    return datasets.load_dataset("json", data_files=files)
