"""Run lm-eval's and litgpt's own CLIs with our backend and our local tasks available.

`lm_eval --model litgpt_ext` cannot find our backend by itself: lm-eval 0.4.x registers models from
its built-in `MODEL_MAPPING` or from modules that are imported, and scans no entry points
(lm_eval/api/registry.py, lm_eval/models/__init__.py). Likewise `litgpt evaluate` builds its
TaskManager inside `simple_evaluate` with no include path, and lm-eval reads no environment
variable for task folders. So these wrappers import our backend, add our task folder to every
TaskManager, and then hand the command line to the real CLI unchanged:

    litgpt-ext lm-eval --model litgpt_ext --model_args pretrained=out/run/final --tasks demo_math_mc
    litgpt-ext litgpt evaluate out/run/final --tasks demo_math_mc   # litgpt converts to HF + HFLM
    python -m litgpt_ext.eval.interop lm-eval ...                  # same, without the console script

The local tasks read their data from $LITGPT_EXT_EVAL_DATA (default data/demo/eval_tasks).
"""

from __future__ import annotations

import sys
from pathlib import Path

TASKS_DIR = Path(__file__).parent / "tasks"


def add_local_tasks() -> None:
    """Make every `lm_eval.tasks.TaskManager` also scan our task folder (idempotent).

    Patching the constructor (rather than passing `--include_path`) is what reaches the
    TaskManager that `simple_evaluate` creates for callers that pass none, such as litgpt.
    """
    from lm_eval.tasks import manager

    init = manager.TaskManager.__init__
    if getattr(init, "_litgpt_ext_tasks", False):
        return

    def __init__(self, verbosity=None, include_path=None, include_defaults=True, metadata=None):
        paths = [] if include_path is None else list(include_path) if isinstance(include_path, (list, tuple)) else [include_path]
        if not any(Path(p).resolve() == TASKS_DIR.resolve() for p in paths):
            paths.append(TASKS_DIR)
        init(self, verbosity=verbosity, include_path=paths, include_defaults=include_defaults, metadata=metadata)

    __init__._litgpt_ext_tasks = True  # type: ignore[attr-defined]
    manager.TaskManager.__init__ = __init__


def prepare() -> None:
    """Quiet tqdm when piped, register the `litgpt_ext` backend, add our tasks."""
    from litgpt_ext.progress import quiet_third_party_bars

    quiet_third_party_bars()  # before lm-eval imports tqdm
    import litgpt_ext.eval.lm  # noqa: F401  (@register_model("litgpt_ext"))

    add_local_tasks()


def lm_eval_main(argv: list[str] | None = None) -> None:
    """`lm_eval <argv>` with `--model litgpt_ext` and the demo_* tasks available."""
    prepare()
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


def litgpt_main(argv: list[str] | None = None) -> None:
    """`litgpt <argv>` (e.g. `evaluate <ckpt> --tasks demo_math_mc`) with our tasks available."""
    prepare()
    from litgpt.__main__ import main

    sys.argv = ["litgpt", *(sys.argv[1:] if argv is None else argv)]
    main()


if __name__ == "__main__":
    tools = {"lm-eval": lm_eval_main, "litgpt": litgpt_main}
    if len(sys.argv) < 2 or sys.argv[1] not in tools:
        sys.exit(f"usage: python -m litgpt_ext.eval.interop {{{','.join(tools)}}} [args of that tool]")
    tools[sys.argv[1]](sys.argv[2:])
