"""One CLI: `litgpt-ext <command>` == `python -m litgpt_ext <command>`.

Commands are imported lazily so that `litgpt-ext --help` and light commands do not pay for
importing torch, lightning and lm-eval. Each command is a plain function; jsonargparse builds its
parser from the signature and docstring, which gives `--help`, `--config` and `--print_config`.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Optional

# name -> ("module:function", one-line help); required arguments are flags (`--data_path …`)
# except for the commands in POSITIONAL, which take them positionally (`evaluate <dir>`).
POSITIONAL = {"evaluate", "convert-to-hf", "convert-moe-to-litgpt", "consolidate"}
# commands whose leading bare arguments fill one list flag: `soup a b c --out d` == `soup --checkpoints+ a …`
LEADING_LIST = {"soup": "--checkpoints+"}
COMMANDS: dict[str, tuple[str, str]] = {
    "clean": ("litgpt_ext.prep.clean:clean", "quality-filter and deduplicate (MinHash) raw documents before prepare"),
    "prepare": ("litgpt_ext.prep.prepare:prepare", "tokenize raw text into typed litdata token shards"),
    "train-tokenizer": ("litgpt_ext.prep.tokenizer:train_tokenizer", "train a byte-level BPE tokenizer offline"),
    "build-demo": ("litgpt_ext.demo.corpus:build_demo", "build the offline demo corpus, tokenizer and shards"),
    "inspect-mix": ("litgpt_ext.data.inspect:inspect_mix", "print each shard's resolved weight, tokens and epochs"),
    "pretrain": ("litgpt_ext.train.loop:pretrain", "pretrain or midtrain (resume with a new blend)"),
    "fork": ("litgpt_ext.checkpoint:fork", "start a new run from another run's checkpoint"),
    "demo": ("litgpt_ext.demo.run:demo", "the README's main job: data, pretrain, fork, midtrain, compare"),
    "evaluate": ("litgpt_ext.eval.evaluate:evaluate", "run lm-eval on a checkpoint or a run's checkpoints"),
    "sft": ("litgpt_ext.sft.run:sft", "supervised fine-tuning of a checkpoint (post-training) on the same loop"),
    "sft-grid": ("litgpt_ext.sft.sweep:sft_grid", "SFT LRs x seeds from one or several checkpoints; best LR per checkpoint"),
    "prepare-sft": ("litgpt_ext.sft.prepare:prepare_sft", "the paper's SFT sets (gsm8k, sciq, lima, pycode) as litgpt JSON from the hub or local files"),
    "build-sft-tasks": ("litgpt_ext.demo.sft_tasks:build_sft_tasks", "build the demo's SFT tasks (code, math, prose) as litgpt JSON"),
    "build-eval-tasks": ("litgpt_ext.eval.build_tasks:build_tasks", "build the local lm-eval tasks from held-out demo docs"),
    "consolidate": ("litgpt_ext.checkpoint.dcp:consolidate", "turn a sharded (DCP) checkpoint into litgpt's lit_model.pth"),
    "convert-to-hf": ("litgpt_ext.eval.convert:convert_to_hf", "export a dense checkpoint to Hugging Face format"),
    "sweep": ("litgpt_ext.study.execute:sweep", "expand a grid of midtraining/SFT runs: plan table, SLURM arrays, or run locally"),
    "reproduce": ("litgpt_ext.study.reproduce:reproduce", "the paper's study at CPU scale: pretrain, midtrain, SFT, bridge, REPORT.md"),
    "similarity": ("litgpt_ext.study.similarity:similarity", "dataset similarity, proximity advantage and its correlation (the bridge)"),
    "mixfit": ("litgpt_ext.study.mixfit:mixfit", "fit a surrogate of the post-SFT gain over (start, weight, domain) to a study's results; best arm, next arms"),
    "convert-moe-to-litgpt": ("litgpt_ext.eval.convert:convert_moe_to_litgpt", "rewrite an MoE checkpoint in litgpt's own MoE layout"),
    "lm-eval": ("litgpt_ext.eval.interop:lm_eval_main", "lm-eval's CLI with --model litgpt_ext and the demo_* tasks"),
    "litgpt": ("litgpt_ext.eval.interop:litgpt_main", "litgpt's CLI (e.g. `litgpt evaluate`) with the demo_* tasks"),
    "soup": ("litgpt_ext.soup:soup", "average the weights of checkpoints into one checkpoint (model soup)"),
}
# commands that hand their arguments unparsed to another tool's CLI
PASSTHROUGH = {"lm-eval", "litgpt"}


def _load(target: str) -> Callable:
    module, fn = target.split(":")
    return getattr(importlib.import_module(module), fn)


# commands whose signals (SIGUSR1/SIGTERM/SIGINT) mean "checkpoint and exit 99" (preempt.py)
PREEMPTIBLE = {"pretrain", "sft", "sft-grid"}

# flags whose natural name is a Python keyword: `fork --from X` is the function's `source`
ALIASES: dict[str, dict[str, str]] = {"fork": {"--from": "--source"}}


def _alias(command: str, arg: str) -> str:
    flag, eq, value = arg.partition("=")
    new = ALIASES.get(command, {}).get(flag)
    return new + eq + value if new else arg


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: litgpt-ext <command> [--help] [args]", "", "commands:"]
    for name, (_target, help_) in COMMANDS.items():
        lines.append(f"  {name:<{width}}  {help_}")
    return "\n".join(lines)


def _literal_choices(typehint: Any) -> list:
    """The values of every Literal (or Enum) inside a type hint, e.g. Optional[Literal['a', 'b']]."""
    import enum
    import typing

    if typing.get_origin(typehint) is typing.Literal:
        return list(typing.get_args(typehint))
    if isinstance(typehint, type) and issubclass(typehint, enum.Enum):
        return [m.name for m in typehint]
    return [c for arg in typing.get_args(typehint) for c in _literal_choices(arg)]


def _given_value(key: str, message: str, argv: list[str]) -> Optional[str]:
    m = re.search(r"Given value: (.*)", message)
    if m:
        return m.group(1).strip()
    flag = "--" + key
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a[len(flag) + 1:]
    return None


def _own_error(message: str) -> str:
    """A class's own error (e.g. the data module's check) that jsonargparse wrapped in its Union report."""
    if "Does not validate against any of the Union subtypes" not in message:
        return message
    bullets = [b.strip() for b in re.findall(r"^\s*- (.+)$", message, re.M) if not b.startswith("Expected a <class")]
    return bullets[0] if len(bullets) == 1 else message


_PARSER_KEY = r'^Parser key "[^"]+":\s*'
_WRAPPERS = ("Does not validate", "Subtypes:", "Errors:", "Given value", "Expected a <class 'NoneType'>")


def innermost(message: str) -> str:
    """The deepest line of a jsonargparse report: the cause (`Key 'mix_weight' is not expected`, the
    bad value, the missing file) under its wrappers (`Problem with given class_path ...:`, the
    Union's alternatives), with the wrapper that names the class in front of it."""
    lines = [(len(line) - len(line.lstrip()), line.strip().lstrip("- ").strip()) for line in message.splitlines()]
    lines = [(depth, text) for depth, text in lines if text and not text.startswith(_WRAPPERS)]
    if not lines:
        return message.strip()
    depth, text = max(lines, key=lambda x: x[0])  # the first of the deepest
    where = next((t for d, t in reversed(lines[:lines.index((depth, text))]) if d < depth and t.endswith(":")), "")
    where = re.sub(_PARSER_KEY, "", where)
    return f"{where.rstrip(':')}: {text}" if where else re.sub(_PARSER_KEY, "", text)


def explain_parse_error(parser: Any, message: str, argv: list[str]) -> str:
    """jsonargparse's message for a bad value, rewritten to name the value and the valid choices.

    For a Literal it says "Cannot take a Union of no types" (and, for Optional[Literal], lists
    NoneType as the expected type), which names neither the value nor the choices.
    """
    # an error raised while building a class (e.g. the data module's own check) comes back as one
    # bullet among the Union's alternatives: that bullet is the message
    bullets = [b.strip() for b in re.findall(r"^\s*- (.+)$", message, re.M) if "Expected a <class 'NoneType'>" not in b]
    own = [b for b in bullets if not re.match(r"(Expected a|Does not validate|Cannot take|Not a valid|Import path)", b)]
    m = re.search(r'Parser key "([^"]+)"', message)
    if not m:
        return own[0] if len(own) == 1 else message.strip()
    key = m.group(1)
    try:
        from jsonargparse._actions import _find_parent_action

        action = _find_parent_action(parser, key)
    except Exception:  # a private helper: degrade to the raw message if it moves
        action = None
    hint = getattr(action, "_typehint", None)
    choices = _literal_choices(hint) if hint is not None else []
    if action is not None and getattr(action, "choices", None):
        choices = list(action.choices)
    value = _given_value(key, message, argv)
    shown = repr(value) if value is not None else "the value given (in --config)"
    if choices:
        return f"{key}={shown} is not valid; choose from: {', '.join(str(c) for c in choices)}"
    if len(own) == 1:
        return f"{key}: {innermost(message) if own[0].endswith(':') else own[0]}"
    sub = re.search(r"Subtypes: \[(.*)\]", message)
    if sub:
        types = re.sub(r"<class '(?:[\w.]*\.)?(\w+)'>", r"\1", sub.group(1)).replace("NoneType", "null")
        return f"{key}={shown} is not valid; expected one of [{types}]"
    types = re.findall(r"<class '(?:[\w.]*\.)?(\w+)'>", message.splitlines()[-1])
    if types:
        return f"{key}={shown} is not valid; expected {' or '.join(dict.fromkeys(types))}"
    return f"{key}={shown} is not valid: {innermost(message)}"


def _parser_class(name: str, argv: list[str]):
    from jsonargparse import ArgumentParser

    class Parser(ArgumentParser):
        """Parse errors as one line naming the bad value and the choices, not the whole usage."""

        def error(self, message: str, ex: Optional[Exception] = None):
            if not self.exit_on_error or os.environ.get("LITGPT_EXT_TRACEBACK"):
                return super().error(message, ex)
            sys.stderr.write(f"litgpt-ext {name}: error: {explain_parse_error(self, message, argv)}\n"
                             f"(see `litgpt-ext {name} --help` for every option)\n")
            self.exit(2)

        def parse_args(self, *args, **kwargs):
            cfg = super().parse_args(*args, **kwargs)
            _PARSED[name] = True
            _NEW_OUTPUTS[name] = [Path(v) for k in OUTPUT_KEYS if isinstance(v := cfg.get(k), (str, Path))
                                  and not Path(v).exists()]
            return cfg

    return Parser


_PARSED: dict[str, bool] = {}
_NEW_OUTPUTS: dict[str, list[Path]] = {}
OUTPUT_KEYS = ("out_dir", "output_dir", "to")  # a command's output folder, by parameter name


def _remove_empty_new_outputs(name: str) -> None:
    """A command that failed leaves no output folder it created and wrote no file into."""
    for path in _NEW_OUTPUTS.pop(name, []):
        if path.is_dir() and not any(p.is_file() for p in path.rglob("*")):
            shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return
    name, rest = argv[0], argv[1:]
    from litgpt_ext.progress import quiet_third_party_bars

    quiet_third_party_bars()  # before any command imports tqdm
    if name in PASSTHROUGH:
        _load(COMMANDS[name][0])(rest)
        return
    rest = [_alias(name, a) for a in rest]
    if name in LEADING_LIST:
        k = next((i for i, a in enumerate(rest) if a.startswith("-")), len(rest))
        rest = [x for a in rest[:k] for x in (LEADING_LIST[name], a)] + rest[k:]
    if name not in COMMANDS:
        sys.exit(f"litgpt-ext: unknown command {name!r}; known: {', '.join(COMMANDS)}\n(`litgpt-ext --help` describes them)")
    flag = None
    if name in PREEMPTIBLE:
        # before the heavy imports: a SLURM signal during the first seconds must not kill the run
        from litgpt_ext.preempt import install

        flag = install()
    from jsonargparse import CLI

    from litgpt_ext.checkpoint import CheckpointError  # a failed save (disk full): file and cause

    _PARSED[name] = False
    _NEW_OUTPUTS[name] = []
    try:
        CLI(_load(COMMANDS[name][0]), args=rest, as_positional=name in POSITIONAL, prog=f"litgpt-ext {name}",
            parser_class=_parser_class(name, rest))
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, CheckpointError) as e:
        # Our configuration errors are ValueErrors that name the culprit: show the message, not a
        # traceback. LITGPT_EXT_TRACEBACK=1 shows the traceback (for bugs that raise ValueError).
        _remove_empty_new_outputs(name)
        if os.environ.get("LITGPT_EXT_TRACEBACK"):
            raise
        sys.exit(f"litgpt-ext {name}: error: {_own_error(str(e))}\n(set LITGPT_EXT_TRACEBACK=1 for the traceback)")
    except KeyboardInterrupt:
        if os.environ.get("LITGPT_EXT_TRACEBACK"):
            raise
        sys.exit(f"litgpt-ext {name}: interrupted (Ctrl-C)")
    except Exception as e:
        # jsonargparse itself can fail on odd flags (e.g. `--optimizer.init_args '{...}'` on a dict
        # option raises AttributeError): an error in the arguments, not a bug of the command.
        if _PARSED.get(name) or os.environ.get("LITGPT_EXT_TRACEBACK"):
            raise
        sys.exit(f"litgpt-ext {name}: error: could not parse the arguments {rest}: {type(e).__name__}: {e}\n"
                 f"(see `litgpt-ext {name} --help`; set LITGPT_EXT_TRACEBACK=1 for the traceback)")
    finally:
        if flag is not None:
            flag.restore()  # main() called in-process (tests, notebooks) leaves no handlers behind


if __name__ == "__main__":
    main()
