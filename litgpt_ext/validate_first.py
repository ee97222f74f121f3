"""Check a command's `--config` files before the heavy imports (torch, lightning, litgpt).

jsonargparse reports a bad config only after it imported the command's module (and, for a missing
data folder, after the model was built): 15-50 s on 2 busy cores. `check_configs` reads each
`--config` YAML with nothing but `yaml` and `ast` and refuses, in well under a second:

- a config that does not exist, is a folder, is not UTF-8, is not valid YAML, is empty or is not a
  mapping of options;
- a top-level key the command does not take (the function's parameters, read from its source with
  `ast`: the module is not imported), with the close names;
- a value outside a parameter's `Literal[...]` choices (`precision: bf16`);
- for `pretrain` and `sft`, a file or folder the config names (`PATH_KEYS`) that does not exist;
- a section whose values a torch-free class checks (`SECTION_CHECKS`: `pretrain`'s `lora:`).

A key also given as a flag (`--tokenizer_dir X`, `--data.init_args.data_path X`) or by a later
`--config` is left to the normal parse: that one wins; `--print_config` checks no paths (it shows a
config, whose data may not exist yet). Anything this cannot judge is left to jsonargparse, as before.
"""

from __future__ import annotations

import ast
import difflib
from pathlib import Path
from typing import Any, Optional

PACKAGE = Path(__file__).parent
# keys every command's config may hold (jsonargparse's own)
ALWAYS_VALID = {"config", "print_config", "__path__"}
# for these commands, the keys (dotted; `init_args` optional) whose values name files or folders
# that must exist before any work starts; `resume` only when it is a path (not true/false/auto)
PATH_KEYS = {
    "pretrain": ("initial_checkpoint_dir", "tokenizer_dir", "resume", "data.init_args.data_path",
                 "data.init_args.val_data_path", "data.init_args.mix_config_path", "model_config", "regularizer.reference",
                 "mix_policy.reference", "lora.base"),
    "sft": ("checkpoint_dir", "resume", "data.init_args.train_path", "data.init_args.val_path", "eval.val_data_path"),
}
# sections judged before the import: {command: {key: "module:Class"}}, `Class.parse(value)` raising one
# ValueError line for a bad value; the class's module must not import torch
SECTION_CHECKS = {"pretrain": {"lora": "litgpt_ext.checkpoint.lora:LoRAArgs"}}
HINTS = {"data/demo": "`litgpt-ext build-demo` writes data/demo", "runs/demo": "`make demo` writes runs/demo"}


class ConfigError(ValueError):
    """A bad `--config` file or value, found before the command was imported. `exit_code`: 2 for
    what jsonargparse would call a parse error (as it would exit), 1 for a missing file or folder."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def config_paths(argv: list[str]) -> list[str]:
    """The `--config X` / `--config=X` values, in order."""
    out = []
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif a.startswith("--config="):
            out.append(a.split("=", 1)[1])
    return out


def flag_keys(argv: list[str]) -> set[tuple[str, ...]]:
    """The option keys given as flags, as dotted tuples without `init_args` (`--data.init_args.x` -> data, x)."""
    keys = set()
    for a in argv:
        if a.startswith("--") and a not in ("--config", "--print_config") and not a.startswith("--config="):
            name = a[2:].split("=", 1)[0].rstrip("+")
            keys.add(tuple(p for p in name.split(".") if p != "init_args"))
    return keys


def _overridden(key: str, flags: set[tuple[str, ...]]) -> bool:
    parts = tuple(p for p in key.split(".") if p != "init_args")
    return any(parts[:len(f)] == f or f[:len(parts)] == parts for f in flags)


def function_params(target: str) -> Optional[dict[str, Optional[ast.expr]]]:
    """`module:function` -> {parameter: annotation}, from the module's source (not imported); None
    when the source or the function is not found (e.g. a re-export)."""
    module, fn = target.split(":")
    parts = module.split(".")
    if parts[0] != PACKAGE.name:
        return None
    base = PACKAGE.joinpath(*parts[1:])
    src = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
    if not src.is_file():
        return None
    for node in ast.parse(src.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef) and node.name == fn:
            a = node.args
            if a.vararg or a.kwarg:
                return None
            return {p.arg: p.annotation for p in a.posonlyargs + a.args + a.kwonlyargs}
    return None


def literal_choices(annotation: Optional[ast.expr]) -> Optional[list]:
    """The choices of `Literal[...]` or `Optional[Literal[...]]` (None: other types are accepted too)."""
    if annotation is None:
        return None
    node = annotation
    optional = False
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "Optional":
        node, optional = node.slice, True
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "Literal":
        elts = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if all(isinstance(e, ast.Constant) for e in elts):
            return [e.value for e in elts] + ([None] if optional else [])
    return None


def read_config(path: str) -> dict:
    """The YAML mapping in `path`; every way it can fail is one line naming the file."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config={path!r} is not valid: File does not exist: {path!r} (relative paths are from "
                          f"{Path.cwd()})", exit_code=2)
    if p.is_dir():
        raise ConfigError(f"config {path!r} is a folder; give a YAML file (e.g. midtrain_configs/demo/pretrain.yaml)")
    import yaml

    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {path!r} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
                          "a config is a YAML file") from None
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config {path!r} is not valid YAML{where}: {what}") from None
    if cfg is None:
        raise ConfigError(f"config {path!r} is empty; it should map options to values (e.g. `out_dir: runs/x`)")
    if not isinstance(cfg, dict):
        raise ConfigError(f"config {path!r} holds a {type(cfg).__name__}, not a mapping of options to values "
                          "(e.g. `out_dir: runs/x`)")
    return cfg


def _lookup(cfg: dict, key: str) -> Any:
    """A dotted key in a config; `init_args` may be written or left out (`data.data_path`)."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, dict):
            return None
        if part in node:
            node = node[part]
        elif part != "init_args":
            return None
    return node


def _paths_in(value: Any) -> list[str]:
    """Path strings in a value: a string, a list of them, or a dict of those (val_data_path)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for x in value for v in _paths_in(x)]
    if isinstance(value, dict):
        return [v for x in value.values() for v in _paths_in(x)]
    return []


def missing_paths(command: str, cfg: dict, flags: set[tuple[str, ...]]) -> list[tuple[str, str]]:
    """(key, path) for each file or folder the config names that does not exist."""
    out = []
    for key in PATH_KEYS.get(command, ()):
        if _overridden(key, flags):
            continue
        value = _lookup(cfg, key)
        if key == "resume" and (isinstance(value, bool) or str(value).lower() in ("auto", "true", "false", "none")):
            continue
        if key == "model_config" and not isinstance(value, str):
            continue  # an inline config
        out += [(key, p) for p in _paths_in(value) if not Path(p).exists()]
    return out


def check_config(command: str, target: str, path: str, flags: set[tuple[str, ...]], check_paths: bool = True) -> None:
    cfg = read_config(path)
    params = function_params(target)
    if params is not None:
        valid = set(params) | ALWAYS_VALID
        unknown = [k for k in cfg if str(k).split(".")[0] not in valid]
        if unknown:
            k = str(unknown[0])
            close = difflib.get_close_matches(k, sorted(set(params)), n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"valid keys: {', '.join(params)}"
            raise ConfigError(f"config {path!r}: unknown key {k!r} (`litgpt-ext {command}` takes no such option); {hint}")
        for k, ann in params.items():
            choices = literal_choices(ann)
            if choices is not None and k in cfg and not _overridden(k, flags) and cfg[k] not in choices:
                shown = ", ".join("null" if c is None else str(c) for c in choices)
                raise ConfigError(f"config {path!r}: {k}={cfg[k]!r} is not valid; choose from: {shown}")
    for key, target in SECTION_CHECKS.get(command, {}).items():
        if key in cfg and not _overridden(key, flags):
            import importlib

            module, cls = target.split(":")
            try:
                getattr(importlib.import_module(module), cls).parse(cfg[key])
            except (ValueError, TypeError) as e:
                raise ConfigError(f"config {path!r}: {e}") from None
    bad = missing_paths(command, cfg, flags) if check_paths else []
    if bad:
        key, p = bad[0]
        hint = next((f" ({h})" for prefix, h in HINTS.items() if p.startswith(prefix)), "")
        more = f" (and {len(bad) - 1} more: {', '.join(repr(b) for _, b in bad[1:4])}{', ...' if len(bad) > 4 else ''})" if len(bad) > 1 else ""
        raise ConfigError(f"config {path!r}: {key}={p!r} does not exist{hint}{more}; "
                          f"relative paths are from {Path.cwd()}", exit_code=1)


def check_configs(command: str, target: str, argv: list[str]) -> None:
    """Check every `--config` of `argv` for `command` (target `module:function`); ConfigError if bad."""
    if any(a in ("-h", "--help") for a in argv):
        return
    flags = flag_keys(argv)
    paths = config_paths(argv)
    printing = any(a.startswith("--print_config") for a in argv)  # shows the config: its paths need not exist yet
    later: set[tuple[str, ...]] = set()  # keys a later --config sets win over an earlier one's
    for path in reversed(paths):
        check_config(command, target, path, flags | later, check_paths=not printing)
        later |= _flat_keys(read_config(path))


def _flat_keys(cfg: dict, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    out = set()
    for k, v in cfg.items():
        key = prefix if k == "init_args" else prefix + tuple(str(k).split("."))
        out |= _flat_keys(v, key) if isinstance(v, dict) and v else {key}
    return out
