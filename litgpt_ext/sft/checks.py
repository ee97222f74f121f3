"""SFT checks that turn silent wrong results into one clear line, before any training:

- `target_problems`: examples that keep no target token (a masked prompt longer than
  max_seq_length, an empty output): refuse a split where none keeps one, warn when some lose all;
- `show_example` / `boundary_fusions`: one rendered train example with its prompt/response
  boundary marked, and a warning when the prompt's end and the response's start fuse into one
  token run (`…41 and 75` + `41 + 75 = 116` -> `…7541 + 75 = 116`);
- `config_changes`: a rerun into a finished out_dir whose config differs from the recorded one;
- `save_prompt_style`: litgpt's `prompt_style.yaml` in every checkpoint of an SFT run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

log = logging.getLogger(__name__)
PROMPT_MARK, RESPONSE_MARK, END_MARK = "⟦prompt⟧", "⟦response⟧", "⟦end⟧"

# Keys of the resolved config that do not change a finished run's results (weights, sft_metrics.json),
# so a rerun may differ in them and still be "nothing to do": where and how it ran (devices,
# num_nodes, logger_name, resume, out_dir: the run's own folder, even if moved), how often it logged
# (train.log_interval) and which resumable checkpoints it kept (train.save_interval,
# train.keep_last_k: resume is bit-exact, so checkpoints do not change the result). Everything else
# (LR, seed, data, epochs, batch sizes, precision, eval sets and intervals, ...) is compared.
IGNORED_CONFIG_KEYS = frozenset({"devices", "num_nodes", "logger_name", "resume", "out_dir", "train.log_interval",
                                 "train.save_interval", "train.keep_last_k"})
PATH_KEYS = ("checkpoint_dir", "data.init_args.train_path", "data.init_args.val_path", "eval.val_data_path.")


# ----------------------------------------------------------------------------------------------- targets


def example_target_info(labels: torch.Tensor, max_seq_length: int, ignore_index: int) -> tuple[int, Optional[int]]:
    """(target tokens kept after cutting to max_seq_length, the shortest length that keeps one: None when
    the untruncated example has none, e.g. an empty output). Targets are labels[1:] (next-token)."""
    pos = torch.nonzero(labels[1:] != ignore_index).flatten()
    needed = int(pos[0]) + 2 if len(pos) else None
    if max_seq_length > 0:
        pos = pos[pos < max_seq_length - 1]
    return len(pos), needed


def target_problems(name: str, split: str, source: str, info: list[tuple[int, Optional[int]]],
                    max_seq_length: int, mask_prompt: bool, block_size: Optional[int] = None) -> Optional[str]:
    """Raise ValueError when no example of the split keeps a target token; return a one-line warning
    when some (not all) lose every target token; None when all keep one."""
    n = len(info)
    lost = [needed for kept, needed in info if kept == 0]
    if not lost:
        return None
    cut = [x for x in lost if x is not None]  # would keep a target with a longer max_seq_length
    empty = len(lost) - len(cut)
    why = []
    if cut:
        why.append(f"{len(cut)} lose every target token to the cut at max_seq_length={max_seq_length}"
                   + (" (mask_prompt: true, prompts longer than that)" if mask_prompt else ""))
    if empty:
        why.append(f"{empty} have no target token at all (empty output/text)")
    head = f"SFT {name} {split} ({source}): {len(lost)} of {n} examples keep no target token: " + "; ".join(why)
    fixes = []
    if cut:
        need = max(cut)
        over = f" (the model's block_size is {block_size}: that needs a longer-context model)" if (
            block_size is not None and need > block_size) else ""
        fixes.append(f"raise train.max_seq_length to {need}, which keeps a target token in all of them{over}")
        fixes.append("shorten the prompts")
        if mask_prompt:
            fixes.append("set data.init_args.mask_prompt: false")
    if empty:
        fixes.append("drop the empty records")
    fix = "; fix: " + ", or ".join(fixes)
    if len(lost) == n:
        what = ("training would run at loss 0 and learn nothing" if split == "train" else
                "its validation loss would be undefined (nan)")
        raise ValueError(f"{head}, so {what}{fix}")
    return f"{head}; they carry no loss{fix}"


# ----------------------------------------------------------------------------------------------- prompt/response boundary


def _clip(s: str, n: int, keep_end: bool) -> str:
    s = s.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")
    if len(s) <= n:
        return s
    return "…" + s[-(n - 1):] if keep_end else s[: n - 1] + "…"


def show_example(prompt: Optional[str], response: str, width: int = 100) -> str:
    """One line: the prompt (its end) and the response (its start) around the boundary, escaped."""
    if prompt is None:
        return f"⟦text⟧{_clip(response, 2 * width, False)}{END_MARK}"
    return f"{PROMPT_MARK}{_clip(prompt, width, True)}{RESPONSE_MARK}{_clip(response, width, False)}{END_MARK}"


def fuses(tokenizer, prompt: str, response: str) -> bool:
    """True when the response is glued onto the prompt with no separator: a letter/digit on both sides
    of the boundary (`…75` + `41…`), or the prompt's last and the response's first token merge (or
    split differently) when the text is tokenized as one."""
    if not prompt or not response:
        return False
    if prompt[-1].isalnum() and response[0].isalnum():
        return True
    a = tokenizer.encode(prompt, bos=False, eos=False).tolist()
    b = tokenizer.encode(response, bos=False, eos=False).tolist()
    c = tokenizer.encode(prompt + response, bos=False, eos=False).tolist()
    return bool(a and b) and c != a + b


def boundary_fusions(pairs: Iterable[tuple[Optional[str], str]], tokenizer, limit: int = 200) -> tuple[int, int, Optional[tuple]]:
    """(fused, checked, first fused pair) over the first `limit` prompt/response pairs."""
    fused = checked = 0
    first = None
    for prompt, response in pairs:
        if prompt is None:
            continue
        if checked >= limit:
            break
        checked += 1
        if fuses(tokenizer, prompt, response):
            fused += 1
            first = first or (prompt, response)
    return fused, checked, first


def fusion_warning(name: str, style: str, fused: int, checked: int, first: Optional[tuple]) -> Optional[str]:
    if not fused:
        return None
    p, r = first
    return (f"SFT {name}: in {fused} of {checked} train examples checked, the prompt (prompt_style {style!r}) and "
            f"the response fuse at the boundary (no separator): e.g. {_clip(p, 30, True)!r} + {_clip(r, 30, False)!r}"
            f" reads {_clip(p, 30, True) + _clip(r, 30, False)!r}; end the prompts or start the outputs with a "
            "space or newline (e.g. output ' 42' after 'Answer:'), or use a templated prompt_style (alpaca)")


def dropped_inputs(rows: list[dict], pairs: list[tuple[Optional[str], str]]) -> int:
    """Records whose non-empty `input` is not in their rendered prompt (litgpt's `default` drops it)."""
    return sum(1 for r, (p, _) in zip(rows, pairs) if p is not None and r.get("input") and r["input"] not in p)


def report_examples(dm, tokenizer, pairs: list[tuple[Optional[str], str]]) -> None:
    """Print one train example as trained (an instruction record if any); warn once about fused
    boundaries and about inputs the prompt style drops."""
    prompt, response = next(((p, r) for p, r in pairs if p is not None), pairs[0])
    print(f"SFT {dm.name}: a train example as trained (prompt_style {dm.prompt_style!r}, mask_prompt "
          f"{str(dm.mask_prompt).lower()}): {show_example(prompt, response)}")
    warning = fusion_warning(dm.name, str(dm.prompt_style), *boundary_fusions(pairs, tokenizer))
    if warning:
        log.warning(warning)
    dropped = dropped_inputs(dm.train_rows, pairs)
    if dropped:
        log.warning(f"SFT {dm.name}: prompt_style {dm.prompt_style!r} leaves out the 'input' field: {dropped} of "
                    f"{len(pairs)} train records checked have one that is not in their prompt; use prompt_style "
                    "plain or alpaca, or move the input into the instruction")


# ----------------------------------------------------------------------------------------------- reruns


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: d}


def _norm(key: str, v: Any) -> Any:
    if v is None:
        return None
    if any(key == p or (p.endswith(".") and key.startswith(p)) for p in PATH_KEYS):
        vs = v if isinstance(v, list) else [v]
        out = [str(Path(x).expanduser().resolve()) if isinstance(x, str) else x for x in vs]
        return out if isinstance(v, list) else out[0]
    if isinstance(v, (list, tuple)):
        return [_norm("", x) for x in v]
    if isinstance(v, str):
        try:
            return float(v)  # "1e-4" from a flag and 1e-4 from YAML are the same LR
        except ValueError:
            return v
    return v


def config_changes(recorded: dict, now: dict) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (recorded, now)} of the keys whose values differ. Keys the recorded config lacks
    (added to the config after that run) and IGNORED_CONFIG_KEYS are not compared."""
    a, b = _flat(recorded), _flat(now)
    out = {}
    for k in sorted(set(a) | set(b)):
        if k in IGNORED_CONFIG_KEYS or k not in a:
            continue
        old, new = _norm(k, a.get(k)), _norm(k, b.get(k))
        if old != new:
            out[k] = (a.get(k), b.get(k))
    return out


def refuse_changed_rerun(out_dir: Path, now: dict, checkpoint: Optional[Path] = None) -> None:
    """Refuse when the config recorded in out_dir differs from `now`: by default the finished run's
    (final/hyperparameters.yaml); with `checkpoint`, the step-* a requeue would continue."""
    import yaml

    finished = checkpoint is None
    path = Path(out_dir) / "final" / "hyperparameters.yaml" if finished else Path(checkpoint) / "hyperparameters.yaml"
    if not path.is_file():
        return
    recorded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    changed = config_changes(recorded, now)
    if not changed:
        return
    diff = "; ".join(f"{k}: {old!r} then, {new!r} now" for k, (old, new) in changed.items())
    if finished:
        raise ValueError(f"SFT run {out_dir} is finished with another config ({path}): {diff}; its results are "
                         "for the recorded config. Use a new out_dir for the new config, or delete the old run "
                         "folder to redo it")
    raise ValueError(f"SFT run {out_dir} would resume {Path(checkpoint).name}, written with another config ({path}):"
                     f" {diff}. Continue it with the recorded config (--config {path}), or use a new out_dir (or "
                     "resume: false to start over there)")


# ----------------------------------------------------------------------------------------------- prompt style


def save_prompt_style(out_dir: Path, style) -> list[Path]:
    """litgpt's `prompt_style.yaml` (`litgpt.prompts.save_prompt_style`: the style's class path) in every
    complete checkpoint folder (step-*, final) of out_dir that lacks it or holds another one."""
    from litgpt.prompts import save_prompt_style as litgpt_save

    from litgpt_ext import checkpoint as ckpt

    written = []
    want = f"class_path: {type(style).__module__}.{type(style).__name__}\n"
    for _, d in ckpt.list_checkpoints(Path(out_dir), final=True):
        f = d / "prompt_style.yaml"
        if not d.is_dir() or (f.is_file() and f.read_text(encoding="utf-8") == want):
            continue
        tmp = d / f".prompt_style.{os.getpid()}.tmp"
        tmp.mkdir(exist_ok=True)
        litgpt_save(style, tmp)
        os.replace(tmp / "prompt_style.yaml", f)
        tmp.rmdir()
        written.append(f)
    return written
