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

`lm-eval run --model litgpt_ext` also gets the CLI's error handling: a missing checkpoint or an
unknown task is one line (with close task names), not a traceback; without `--output_path` the
results go to `<checkpoint>/eval/` (where `litgpt-ext evaluate` writes); lm-eval's `git describe`
(the results' git_hash) stays quiet outside a git checkout.
"""

from __future__ import annotations

import difflib
import os
import re
import subprocess
import sys
from pathlib import Path

TASKS_DIR = Path(__file__).parent / "tasks"
_MANAGERS: list = []  # the TaskManagers lm-eval built (the last one lists every task it knew)


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
        _MANAGERS[:] = [self]

    __init__._litgpt_ext_tasks = True  # type: ignore[attr-defined]
    manager.TaskManager.__init__ = __init__


def prepare() -> None:
    """Quiet tqdm when piped, register the `litgpt_ext` backend, add our tasks."""
    from litgpt_ext.progress import quiet_third_party_bars

    quiet_third_party_bars()  # before lm-eval imports tqdm
    import litgpt_ext.eval.lm  # noqa: F401  (@register_model("litgpt_ext"))

    add_local_tasks()
    quiet_git_hash()


def quiet_git_hash() -> None:
    """lm-eval records `git describe --always` of the cwd; outside a checkout git prints `fatal: not a
    git repository` on stderr. Same hash, same fallback (lm-eval's own reader of .git), no noise."""
    from lm_eval import evaluator
    from lm_eval.loggers import utils

    def get_git_commit_hash():
        try:
            return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
        except (subprocess.CalledProcessError, FileNotFoundError):
            return utils.get_commit_from_path(os.getcwd())

    evaluator.get_git_commit_hash = get_git_commit_hash


class InteropError(Exception):
    """A bad argument of a pass-through command: one line naming it."""


def check_run_args(args) -> Path | None:
    """Refuse a missing litgpt_ext checkpoint before lm-eval loads anything; default `--output_path`
    to `<checkpoint>/eval`. Returns the folder the results go to (None: lm-eval saves nothing)."""
    model_args = args.model_args if isinstance(args.model_args, dict) else {}
    pretrained = model_args.get("pretrained")
    if args.model == "litgpt_ext":
        from litgpt_ext.checkpoint import is_complete

        if pretrained is None:
            raise InteropError("--model litgpt_ext needs --model_args pretrained=<checkpoint folder>")
        ckpt = Path(str(pretrained))
        if not ckpt.exists():
            raise InteropError(f"checkpoint {str(ckpt)!r} (--model_args pretrained=) does not exist")
        if not is_complete(ckpt, need="weights"):
            raise InteropError(f"checkpoint {str(ckpt)!r} (--model_args pretrained=) has no lit_model.pth + "
                               "model_config.yaml; give a checkpoint folder such as <run>/final or <run>/step-*")
        if args.output_path is None and getattr(args, "config", None) is None:
            args.output_path = str(ckpt / "eval")
    return None if args.output_path is None else Path(args.output_path)


def unknown_tasks_message(missing: str) -> str:
    """`Tasks not found: a, b` -> one line per task with the close names lm-eval knows (ours included)."""
    known = _MANAGERS[-1].all_tasks if _MANAGERS else []
    parts = []
    for task in [t.strip() for t in missing.split(",") if t.strip()]:
        close = difflib.get_close_matches(task, known, n=5, cutoff=0.6)
        parts.append(f"unknown task {task!r}" + (f"; did you mean: {', '.join(close)}?" if close else
                                                 "; `litgpt-ext lm-eval ls tasks` lists them"))
    return "\n".join(parts)


def _results_files(folder: Path | None) -> set[Path]:
    return set(folder.rglob("results_*.json")) if folder is not None and folder.is_dir() else set()


def lm_eval_main(argv: list[str] | None = None) -> None:
    """`lm_eval <argv>` with `--model litgpt_ext` and the demo_* tasks available."""
    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    prepare()
    from lm_eval._cli.harness import HarnessCLI
    from lm_eval.utils import setup_logging

    setup_logging()
    parser = HarnessCLI()
    args = parser.parse_args()  # lm-eval's own parser: its usage errors exit 2 as always
    out = None
    try:
        if getattr(args, "command", None) == "run":
            out = check_run_args(args)
            before = _results_files(out)
        parser.execute(args)
    except (InteropError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
        if os.environ.get("LITGPT_EXT_TRACEBACK"):
            raise
        msg = str(e)
        m = re.match(r"Tasks not found: (.*)", msg)
        msg = unknown_tasks_message(m.group(1)) if m else msg.strip() or repr(e)
        sys.exit("\n".join(f"litgpt-ext lm-eval: error: {line}" for line in msg.splitlines())
                 + "\n(set LITGPT_EXT_TRACEBACK=1 for the traceback)")
    if out is not None:
        new = sorted(_results_files(out) - before)
        print(f"lm-eval: results saved to {new[-1] if new else out}")


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
