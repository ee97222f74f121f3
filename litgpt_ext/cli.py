"""One CLI: `litgpt-ext <command>` == `python -m litgpt_ext <command>`.

Commands are imported lazily so that `litgpt-ext --help` and light commands do not pay for
importing torch, lightning and lm-eval. Each command is a plain function; jsonargparse builds its
parser from the signature and docstring, which gives `--help`, `--config` and `--print_config`.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable

# name -> ("module:function", one-line help); required arguments are flags (`--data_path …`)
# except for the commands in POSITIONAL, which take them positionally (`evaluate <dir>`).
POSITIONAL = {"evaluate", "convert-to-hf"}
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("litgpt_ext.prep.prepare:prepare", "tokenize raw text into typed litdata token shards"),
    "train-tokenizer": ("litgpt_ext.prep.tokenizer:train_tokenizer", "train a byte-level BPE tokenizer offline"),
    "build-demo": ("litgpt_ext.prep.demo:build_demo", "build the offline demo corpus, tokenizer and shards"),
    "inspect-mix": ("litgpt_ext.data.inspect:inspect_mix", "print each shard's resolved weight, tokens and epochs"),
    "pretrain": ("litgpt_ext.train.loop:pretrain", "pretrain or midtrain (resume with a new blend)"),
    "fork": ("litgpt_ext.train.checkpoint:fork", "start a new run from another run's checkpoint"),
    "demo": ("litgpt_ext.demo:demo", "the README's main job: data, pretrain, fork, midtrain, compare"),
    "evaluate": ("litgpt_ext.eval.evaluate:evaluate", "run lm-eval on a checkpoint or a run's checkpoints"),
    "build-eval-tasks": ("litgpt_ext.eval.build_tasks:build_tasks", "build the local lm-eval tasks from held-out demo docs"),
    "convert-to-hf": ("litgpt_ext.eval.convert:convert_to_hf", "export a dense checkpoint to Hugging Face format"),
    "sweep": ("litgpt_ext.study.sweep:sweep", "expand a grid of midtraining/SFT runs: plan table, SLURM arrays, or run locally"),
    "similarity": ("litgpt_ext.study.similarity:similarity", "dataset similarity, proximity advantage and its correlation (the bridge)"),
}


def _load(target: str) -> Callable:
    module, fn = target.split(":")
    return getattr(importlib.import_module(module), fn)


# flags whose natural name is a Python keyword: `fork --from X` is the function's `source`
ALIASES: dict[str, dict[str, str]] = {"fork": {"--from": "--source"}}


def _alias(command: str, arg: str) -> str:
    flag, eq, value = arg.partition("=")
    new = ALIASES.get(command, {}).get(flag)
    return new + eq + value if new else arg


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: litgpt-ext <command> [--help] [args]", "", "commands:"]
    for name, (target, help_) in COMMANDS.items():
        lines.append(f"  {name:<{width}}  {help_}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return
    name, rest = argv[0], argv[1:]
    rest = [_alias(name, a) for a in rest]
    if name not in COMMANDS:
        sys.exit(f"litgpt-ext: unknown command {name!r}; known: {', '.join(COMMANDS)}\n\n{_usage()}")
    from jsonargparse import CLI

    try:
        CLI(_load(COMMANDS[name][0]), args=rest, as_positional=name in POSITIONAL, prog=f"litgpt-ext {name}")
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        # Our configuration errors are ValueErrors that name the culprit: show the message, not a
        # traceback. LITGPT_EXT_TRACEBACK=1 shows the traceback (for bugs that raise ValueError).
        if os.environ.get("LITGPT_EXT_TRACEBACK"):
            raise
        sys.exit(f"litgpt-ext {name}: error: {e}\n(set LITGPT_EXT_TRACEBACK=1 for the traceback)")


if __name__ == "__main__":
    main()
