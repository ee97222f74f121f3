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
POSITIONAL = {"evaluate", "convert-to-hf", "convert-moe-to-litgpt", "consolidate", "merge-lora"}
# commands whose leading bare arguments fill one list flag: `soup a b c --out d` == `soup --checkpoints+ a …`
LEADING_LIST = {"soup": "--checkpoints+", "cka": "--checkpoints+"}
COMMANDS: dict[str, tuple[str, str]] = {
    "clean": ("litgpt_ext.prep.clean:clean", "quality-filter and deduplicate (MinHash) raw documents before prepare"),
    "prepare": ("litgpt_ext.prep.prepare:prepare", "tokenize raw text into typed litdata token shards"),
    "train-tokenizer": ("litgpt_ext.prep.tokenizer:train_tokenizer", "train a byte-level BPE tokenizer offline"),
    "synth-replay": ("litgpt_ext.prep.synth_replay:synth_replay", "sample replay documents from a frozen checkpoint into a synth shard (s1)"),
    "extend-vocab": ("litgpt_ext.prep.extend_vocab:extend_vocab", "add tokens to a checkpoint's tokenizer; new rows = mean of their old sub-pieces"),
    "build-demo": ("litgpt_ext.demo.corpus:build_demo", "build the offline demo corpus, tokenizer and shards"),
    "mix-replay": ("litgpt_ext.mix_policy.trajectory:mix_replay", "turn an online mixing run's trajectory into a static mix_schedule that draws the same samples"),
    "inspect-mix": ("litgpt_ext.data.inspect:inspect_mix", "print each shard's resolved weight, tokens and epochs"),
    "pretrain": ("litgpt_ext.train.loop:pretrain", "pretrain or midtrain (resume with a new blend)"),
    "fork": ("litgpt_ext.checkpoint:fork", "start a new run from another run's checkpoint"),
    "demo": ("litgpt_ext.demo.run:demo", "the README's main job: data, pretrain, fork, midtrain, compare"),
    "evaluate": ("litgpt_ext.eval.evaluate:evaluate", "run lm-eval on a checkpoint or a run's checkpoints"),
    "sft": ("litgpt_ext.sft.run:sft", "supervised fine-tuning of a checkpoint (post-training) on the same loop"),
    "sft-grid": ("litgpt_ext.study.sft_grid:sft_grid", "SFT LRs x seeds from one or several checkpoints; best LR per checkpoint"),
    "prepare-sft": ("litgpt_ext.sft.prepare:prepare_sft", "the paper's SFT sets (gsm8k, sciq, lima, pycode) as litgpt JSON from the hub or local files"),
    "build-sft-tasks": ("litgpt_ext.demo.sft_tasks:build_sft_tasks", "build the demo's SFT tasks (code, math, prose) as litgpt JSON"),
    "build-eval-tasks": ("litgpt_ext.eval.build_tasks:build_tasks", "build the local lm-eval tasks from held-out demo docs"),
    "build-own-tasks": ("litgpt_ext.eval.own_tasks:build_own_tasks", "lm-eval tasks from your own files: perplexity, multiple choice, SFT generation"),
    "consolidate": ("litgpt_ext.checkpoint.dcp:consolidate", "turn a sharded (DCP) checkpoint into litgpt's lit_model.pth"),
    "merge-lora": ("litgpt_ext.checkpoint.merge_lora:merge_lora", "merge a LoRA run's adapter checkpoint into its base: a full litgpt checkpoint"),
    "convert-to-hf": ("litgpt_ext.eval.convert:convert_to_hf", "export a dense checkpoint to Hugging Face format"),
    "anneal": ("litgpt_ext.study.anneal:anneal", "microanneal: branch a checkpoint into a short LR decay on a mix and on the control"),
    "sweep": ("litgpt_ext.study.execute:sweep", "expand a grid of midtraining/SFT runs: plan table, SLURM arrays, or run locally"),
    "reproduce": ("litgpt_ext.study.reproduce:reproduce", "the paper's study at CPU scale: pretrain, midtrain, SFT, bridge, REPORT.md"),
    "similarity": ("litgpt_ext.study.similarity:similarity", "dataset similarity, proximity advantage and its correlation (the bridge)"),
    "cka": ("litgpt_ext.study.cka:cka", "linear CKA per layer and weight distance per block between checkpoints (before/after SFT)"),
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


# Exceptions that, raised after parsing but before the command's work started, come from a config
# or input file the command could not use (a list where a mapping belongs, a missing key, ...):
INPUT_ERRORS = (TypeError, LookupError, AttributeError, OSError)  # LookupError: KeyError, IndexError
# a file or folder that is not there, not of its kind, not readable, or cut short: always the input's
FILE_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError, EOFError)
# ... and the frames that are the work itself: an exception raised under one of them is a bug and
# keeps its traceback. (file path suffix, function name)
WORK_FRAMES = {("litgpt_ext/train/loop.py", "fit"), ("lm_eval/evaluator.py", "evaluate")}
# frames of a reader: an exception raised in one of them is about the file being read
READER_FILES = ("torch/serialization.py", "json/decoder.py", "json/__init__.py", "/yaml/", "safetensors/",
                "pyarrow/parquet/", "codecs.py")


def _reader_errors() -> tuple:
    """Decoding errors of the file readers we use (imported only where already loaded)."""
    out = []
    if "yaml" in sys.modules:
        out.append(sys.modules["yaml"].YAMLError)
    import pickle

    out.append(pickle.UnpicklingError)
    return tuple(out)


def _frames(tb) -> list:
    out = []
    while tb is not None:
        out.append(tb.tb_frame)
        tb = tb.tb_next
    return out


def _at_work(tb) -> bool:
    return any((f.f_code.co_filename.replace(os.sep, "/").endswith(path) and f.f_code.co_name == fn)
               for f in _frames(tb) for path, fn in WORK_FRAMES)


def _reading_file(tb) -> bool:
    frames = _frames(tb)
    return bool(frames) and any(r in frames[-1].f_code.co_filename.replace(os.sep, "/") for r in READER_FILES)


def _culprit_file(e: BaseException) -> Optional[str]:
    """The file an exception is about: OSError's filename, else the innermost frame of ours that holds
    a path to an existing file (the one it was reading)."""
    if isinstance(e, OSError) and e.filename:
        return str(e.filename)
    mark = getattr(e, "problem_mark", None)  # yaml
    if mark is not None and not str(getattr(mark, "name", "<")).startswith("<"):  # "<unicode string>": no file
        return str(mark.name)
    for frame in reversed(_frames(e.__traceback__)):
        if "litgpt_ext" not in frame.f_code.co_filename:
            continue
        for value in frame.f_locals.values():
            if isinstance(value, (str, Path)) and 0 < len(str(value)) < 4096 and "\n" not in str(value):
                try:
                    if Path(value).is_file():
                        return str(value)
                except (OSError, ValueError):
                    continue
    return None


def _input_error(e: BaseException) -> str:
    """One line for an input error: the command's own message (ours name the culprit), or the
    reader's, with the file named when it is known and the message does not name it yet."""
    if isinstance(e, OSError) and not isinstance(e, FileExistsError) and e.filename and e.strerror:
        return f"{e.filename!r}: {e.strerror}" + (
            "; a file is expected here, not a folder" if isinstance(e, IsADirectoryError) else
            "; a folder is expected here" if isinstance(e, NotADirectoryError) else "")
    decoding = isinstance(e, UnicodeDecodeError) or type(e).__module__ == "json.decoder"
    if isinstance(e, (ValueError, OSError)) and not decoding:
        return _own_error(str(e))
    if getattr(e, "problem_mark", None) is not None:  # yaml: where and what, not its 5-line report
        mark = e.problem_mark  # type: ignore[attr-defined]
        msg = f"not valid YAML at line {mark.line + 1}, column {mark.column + 1}: {getattr(e, 'problem', '') or e}"
    elif isinstance(e, RuntimeError) and _reading_file(e.__traceback__):  # torch.load of a file that is none
        msg = f"not a readable torch file (empty, truncated or another format): {str(e).split('.')[0]}"
    elif isinstance(e, KeyError):
        msg = f"missing key {e}"
    else:
        msg = f"{type(e).__name__}: {' '.join(str(e).split())}"
    where = _culprit_file(e)
    return f"{where}: {msg}" if where and where not in msg else msg


def _check_first(name: str, rest: list[str]) -> Optional[str]:
    """`--config` checked before the command is imported (validate_first): the error line, or None."""
    from litgpt_ext.validate_first import ConfigError, check_configs

    if os.environ.get("LITGPT_EXT_SKIP_EARLY_CHECK"):  # benchmarks/bad_config_latency.py: the late path
        return None
    try:
        check_configs(name, COMMANDS[name][0], rest)
    except ConfigError as e:
        if os.environ.get("LITGPT_EXT_TRACEBACK"):
            raise
        hint = f"see `litgpt-ext {name} --help` for every option" if e.exit_code == 2 else \
            "set LITGPT_EXT_TRACEBACK=1 for the traceback"
        if e.exit_code == 2:  # a parse error: the status jsonargparse gives one
            sys.stderr.write(f"litgpt-ext {name}: error: {e}\n({hint})\n")
            sys.exit(2)
        return f"litgpt-ext {name}: error: {e}\n({hint})"
    return None


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
    early = _check_first(name, rest)
    if early:
        sys.exit(early)
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
    except (ValueError, *FILE_ERRORS, CheckpointError, *_reader_errors()) as e:
        # Our configuration errors are ValueErrors that name the culprit: show the message, not a
        # traceback; so are a file that cannot be read or decoded (not found, a folder, no
        # permission, not UTF-8, bad JSON/YAML, a truncated torch file), with the file named.
        # LITGPT_EXT_TRACEBACK=1 shows the traceback (for bugs that raise these).
        _remove_empty_new_outputs(name)
        if os.environ.get("LITGPT_EXT_TRACEBACK"):
            raise
        sys.exit(f"litgpt-ext {name}: error: {_input_error(e)}\n(set LITGPT_EXT_TRACEBACK=1 for the traceback)")
    except KeyboardInterrupt:
        if os.environ.get("LITGPT_EXT_TRACEBACK"):
            raise
        sys.exit(f"litgpt-ext {name}: interrupted (Ctrl-C)")
    except Exception as e:
        # jsonargparse itself can fail on odd flags (e.g. `--optimizer.init_args '{...}'` on a dict
        # option raises AttributeError): an error in the arguments, not a bug of the command.
        if os.environ.get("LITGPT_EXT_TRACEBACK"):
            raise
        if not _PARSED.get(name):
            sys.exit(f"litgpt-ext {name}: error: could not parse the arguments {rest}: {type(e).__name__}: {e}\n"
                     f"(see `litgpt-ext {name} --help`; set LITGPT_EXT_TRACEBACK=1 for the traceback)")
        if _at_work(e.__traceback__) or not (isinstance(e, INPUT_ERRORS) or _reading_file(e.__traceback__)):
            raise  # a bug once the work has started (training steps, scoring): its traceback
        _remove_empty_new_outputs(name)
        sys.exit(f"litgpt-ext {name}: error: {_input_error(e)}\n(an input the command could not use, found "
                 f"before its work started; set LITGPT_EXT_TRACEBACK=1 for the traceback)")
    finally:
        if flag is not None:
            flag.restore()  # main() called in-process (tests, notebooks) leaves no handlers behind


if __name__ == "__main__":
    main()
