"""`litgpt-ext build-own-tasks`: lm-eval tasks from your own files, for `evaluate --include_path`.

Four kinds of input, each a list (repeat the flag; `NAME=PATH` names the task, else the file's stem
or the shard folder's name does):

- `--ppl_shards` val token shards (`prepare`'s `<data>/val/<shard>`): documents are split at EOS and
  decoded with the shard's tokenizer -> rolling-window perplexity (`<prefix>_ppl_<name>`).
- `--ppl_docs` raw documents (.jsonl/.json with a `text` field, .txt/.md one document per file,
  .parquet; files, folders or globs, read as `prepare` reads them) -> perplexity.
- `--mc` a .json list or .jsonl of `{question, choices, answer}` (answer: the 0-based index of
  the right choice, or its text) -> multiple choice, acc / acc_norm (`<prefix>_mc_<name>`).
- `--gen` SFT records (`{instruction, input, output}`, litgpt's JSON) -> greedy generation from the
  prompt as `sft` renders it (`--prompt_style`), exact match on the output (`<prefix>_gen_<name>`).

Output: `<out_dir>/<task>/{test,train}.jsonl` (the same split writer as the demo's tasks,
`litgpt_ext.eval.build_tasks`), `<out_dir>/<task>/<task>.yaml` (lm-eval reads the JSONL by absolute
path: rebuild after moving the folder) and `<out_dir>/manifest.json`. Every task carries the tag
`<prefix>`, so `--tasks <prefix>` runs them all:

    litgpt-ext build-own-tasks --out_dir data/mine/eval_tasks --prefix mine --mc corpus/quiz.jsonl
    litgpt-ext evaluate runs/mine/final --tasks mine --include_path data/mine/eval_tasks
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from litgpt_ext.eval.build_tasks import write_task_splits

FLAGS = {"ppl_shard": "ppl_shards", "ppl_doc": "ppl_docs", "mc": "mc", "gen": "gen"}  # input kind -> its flag
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
BUILDER = "build-own-tasks"


def _fail(where: str, what: str) -> None:
    raise ValueError(f"{where}: {what}")


def _named(spec: str) -> tuple[str | None, str]:
    """`NAME=PATH` -> (NAME, PATH); a plain path -> (None, path)."""
    name, eq, path = str(spec).partition("=")
    return (name, path) if eq and _NAME.match(name) else (None, str(spec))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", text).strip("_") or "x"  # follows `<prefix>_<kind>_`


def read_records(path: Path) -> list[tuple[str, Any]]:
    """(where, record) for every record of a .jsonl (one JSON value a line) or .json (a list) file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        out = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append((f"{path}: line {i}", json.loads(line)))
                except json.JSONDecodeError as e:
                    _fail(f"{path}: line {i}", f"not valid JSON ({e.msg})")
        return out
    if path.suffix != ".json":
        _fail(str(path), "expected a .json file (a list of records) or .jsonl (one record a line)")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from e
    if not isinstance(rows, list):
        _fail(str(path), f"expected a JSON list of records, got {type(rows).__name__}")
    return [(f"{path}: record {i}", r) for i, r in enumerate(rows)]


def _text_field(where: str, row: Any, field: str, required: bool = True, allow_empty: bool = False) -> str:
    if not isinstance(row, dict):
        _fail(where, f"expected a JSON object, got {type(row).__name__}")
    if field not in row or row[field] is None:
        if required:
            _fail(where, f"field {field!r} is missing (the record has {sorted(row)})")
        return ""
    value = row[field]
    if not isinstance(value, str):
        _fail(where, f"field {field!r} is {type(value).__name__}, not a string")
    if required and not allow_empty and not value.strip():
        _fail(where, f"field {field!r} is empty")
    return value


def mc_items(path: Path) -> list[dict]:
    """`{question, choices, answer}` records -> `{question, choices, gold}` (gold: the right choice's index)."""
    items = []
    for where, row in read_records(path):
        question = _text_field(where, row, "question")
        choices = row.get("choices")
        if not isinstance(choices, list) or len(choices) < 2:
            _fail(where, f"field 'choices' must be a list of at least 2 strings, got {choices!r}")
        for k, c in enumerate(choices):
            if not isinstance(c, str) or not c.strip():
                _fail(where, f"field 'choices' item {k} must be a non-empty string, got {c!r}")
        if len(set(choices)) < len(choices):
            _fail(where, "field 'choices' holds the same choice twice")
        if "answer" not in row:
            _fail(where, f"field 'answer' is missing (the record has {sorted(row)})")
        answer = row["answer"]
        if isinstance(answer, bool) or not isinstance(answer, (int, str)):
            _fail(where, f"field 'answer' must be a choice's 0-based index or its text, got {answer!r}")
        if isinstance(answer, int):
            if not 0 <= answer < len(choices):
                _fail(where, f"field 'answer' {answer} is out of range for {len(choices)} choices (0-based)")
            gold = answer
        elif answer in choices:
            gold = choices.index(answer)
        else:
            _fail(where, f"field 'answer' {answer!r} is not one of the choices {choices}")
        items.append({"question": question, "choices": choices, "gold": gold})
    if not items:
        _fail(str(path), "holds no records")
    return items


def gen_items(path: Path, prompt_style: str = "plain") -> list[dict]:
    """SFT records -> `{prompt, target}`: the prompt rendered as `sft` renders it, the output as target."""
    from litgpt_ext.sft.data import get_prompt_style

    style = get_prompt_style(prompt_style)
    items = []
    for where, row in read_records(path):
        instruction = _text_field(where, row, "instruction", allow_empty=True)
        _text_field(where, row, "input", required=False)
        output = _text_field(where, row, "output")
        items.append({"prompt": style.apply(prompt=instruction, **row), "target": output.strip()})
    if not items:
        _fail(str(path), "holds no records")
    return items


def doc_items(spec: str, text_field: str = "text") -> list[dict]:
    """Raw documents (files, folders, globs; as `prepare` reads them) -> `{text}`, empty ones dropped."""
    from litgpt_ext.prep.readers import DocStream, expand_inputs

    return [{"text": t} for t, _ in DocStream(expand_inputs([spec]), text_field=text_field) if t.strip()]


def shard_items(shard: Path, tokenizer_dir: Path | None = None, max_docs: int = 200) -> list[dict]:
    """The first `max_docs` documents of a token shard, split at EOS and decoded -> `{text}`."""
    import torch
    from litgpt import Tokenizer

    from litgpt_ext.data.shard_io import read_chunk_tokens

    shard = Path(shard)
    meta_file = shard / "prepare_meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if tokenizer_dir is None:
        if not meta.get("tokenizer_dir"):
            _fail(str(shard), "names no tokenizer (no prepare_meta.json with tokenizer_dir); pass --tokenizer_dir")
        tokenizer_dir = Path(meta["tokenizer_dir"])
    if not Path(tokenizer_dir).is_dir():
        raise FileNotFoundError(f"{shard}: tokenizer_dir {str(tokenizer_dir)!r} does not exist; pass --tokenizer_dir")
    tok = Tokenizer(tokenizer_dir)
    if tok.eos_id is None:
        _fail(str(tokenizer_dir), "the tokenizer has no EOS token; shard documents are split at EOS")
    if "eos_id" in meta and meta["eos_id"] != tok.eos_id:
        _fail(str(shard), f"was written with EOS id {meta['eos_id']}, but tokenizer {str(tokenizer_dir)!r} has "
                          f"EOS id {tok.eos_id}: pass the tokenizer `prepare` used")
    items: list[dict] = []
    for tokens in read_chunk_tokens(shard):  # `prepare` writes whole documents per chunk, EOS after each
        start = 0
        for end in (int(e) for e in (tokens == tok.eos_id).nonzero()[0]):
            if end > start:
                text = tok.decode(torch.as_tensor(tokens[start:end].astype("int64")))
                if text.strip():
                    items.append({"text": text})
            start = end + 1
            if len(items) >= max_docs:
                return items
    return items


def task_config(name: str, kind: str, splits: dict[str, int], folder: Path, prefix: str, mc_template: str,
                max_gen_toks: int, gen_until: list[str]) -> dict:
    """The lm-eval task YAML (as a dict) of one task whose JSONL lies in `folder`."""
    files = {s: str((folder / f"{s}.jsonl").resolve()) for s in splits}
    cfg: dict[str, Any] = {"task": name, "tag": [prefix], "dataset_path": "json",
                           "dataset_kwargs": {"data_files": files}, "test_split": "test"}
    if "train" in splits:
        cfg.update(training_split="train", fewshot_split="train")
    if kind == "ppl":
        cfg.update(output_type="loglikelihood_rolling", doc_to_text="", doc_to_target="{{text}}",
                   metric_list=[{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")])
    elif kind == "mc":
        cfg.update(output_type="multiple_choice", doc_to_text=mc_template, doc_to_choice="choices",
                   doc_to_target="gold", target_delimiter=" ",
                   metric_list=[{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")])
    else:
        cfg.update(output_type="generate_until", doc_to_text="{{prompt}}", doc_to_target="{{target}}",
                   target_delimiter="", fewshot_delimiter="\n\n",
                   generation_kwargs={"until": list(gen_until), "max_gen_toks": max_gen_toks, "do_sample": False},
                   filter_list=[{"name": "strip", "filter": [{"function": "take_first"}]}],
                   metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                                 "regexes_to_ignore": ["^\\s+", "\\s+$"]}])
    cfg["metadata"] = {"version": 1.0, "source": "litgpt-ext build-own-tasks"}
    return cfg


def _remove_previous(out_dir: Path) -> None:
    """Task folders an earlier build-own-tasks wrote here (named in its manifest), so no stale task stays."""
    manifest = out_dir / "manifest.json"
    if not manifest.is_file():
        return
    try:
        old = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return
    if old.get("builder") != BUILDER:
        return
    for name in old.get("tasks", {}):
        if _NAME.match(name) and (out_dir / name).is_dir():
            shutil.rmtree(out_dir / name)


def build_own_tasks(
    out_dir: Path = Path("data/own_tasks"),
    prefix: str = "own",
    ppl_shards: list[str] | None = None,
    ppl_docs: list[str] | None = None,
    mc: list[str] | None = None,
    gen: list[str] | None = None,
    tokenizer_dir: Path | None = None,
    text_field: str = "text",
    prompt_style: str = "plain",
    mc_template: str = "Question: {{question}}\nAnswer:",
    n_fewshot: int = 0,
    max_examples: int = 500,
    max_docs: int = 200,
    max_gen_toks: int = 32,
    gen_until: list[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Build lm-eval tasks from your own files (perplexity, multiple choice, generation) for `evaluate`.

    Args:
        out_dir: where the tasks go; pass it to `evaluate --include_path` (or lm-eval's).
        prefix: task names start with `<prefix>_` and every task has the tag `<prefix>` (`--tasks <prefix>`).
        ppl_shards: val token shards (e.g. data/mine/val/m1) -> perplexity of their documents.
        ppl_docs: raw documents (.jsonl/.json with `text_field`, .txt/.md one document per file, .parquet;
            files, folders or globs) -> perplexity.
        mc: .json/.jsonl files of {question, choices, answer} (answer: 0-based index or the choice's text).
        gen: SFT files (.json/.jsonl of {instruction, input, output}) -> generation, exact match on output.
        tokenizer_dir: the tokenizer that decodes `ppl_shards` (default: the one in each shard's prepare_meta.json).
        text_field: the text field of JSONL/Parquet `ppl_docs`.
        prompt_style: how `gen` prompts are rendered: the SFT run's `data.init_args.prompt_style`.
        mc_template: the multiple-choice prompt (Jinja over the record's fields); the choice follows a space.
        n_fewshot: items per mc/gen task held back as the few-shot pool (`train` split; 0: all are test).
        max_examples: at most this many test items per mc/gen task.
        max_docs: at most this many documents per perplexity task.
        max_gen_toks: longest generation, in tokens (prompt + this must fit the model's block size).
        gen_until: strings that end a generation (EOS always does); default ["\\n\\n"].

    Returns:
        {task: {kind, source, splits}}; also written to `<out_dir>/manifest.json`.
    """
    import yaml

    from litgpt_ext.eval.evaluate import DEMO_TASK_PREFIX

    if not _NAME.match(prefix) or f"{prefix}_".startswith(DEMO_TASK_PREFIX):  # demo_*: evaluate builds those
        raise ValueError(f"prefix={prefix!r} must be a letter then letters, digits or _, and not start with "
                         f"{DEMO_TASK_PREFIX!r} (the demo's tasks)")
    for key, value, low in (("n_fewshot", n_fewshot, 0), ("max_examples", max_examples, 1), ("max_docs", max_docs, 1),
                            ("max_gen_toks", max_gen_toks, 1)):
        if value < low:
            raise ValueError(f"{key}={value} must be >= {low}")
    gen_until = ["\n\n"] if gen_until is None else list(gen_until)
    specs = [(kind, spec) for kind, specs in (("ppl_shard", ppl_shards), ("ppl_doc", ppl_docs), ("mc", mc), ("gen", gen))
             for spec in (specs or [])]
    if not specs:
        raise ValueError("no inputs: pass at least one of --ppl_shards, --ppl_docs, --mc, --gen (each repeatable)")
    plan: dict[str, tuple[str, str, str]] = {}  # task -> (input kind, path, lm-eval kind)
    for kind, spec in specs:
        given, path = _named(spec)
        if not path or (kind != "ppl_doc" and not Path(path).exists()):
            raise FileNotFoundError(f"--{FLAGS[kind]} {path!r}: no such " + ("folder" if kind == "ppl_shard" else "file"))
        short = kind.split("_")[0]
        stem = given or (Path(path).name if kind == "ppl_shard" else Path(path.split("*")[0]).stem or "docs")
        name = f"{prefix}_{short}_{_slug(stem)}"
        if name in plan:
            raise ValueError(f"task {name!r} would come from both {plan[name][1]!r} and {path!r}; name them: "
                             f"NAME=PATH (e.g. {short}a={plan[name][1]})")
        plan[name] = (kind, path, short)

    items: dict[str, list[dict]] = {}
    for name, (kind, path, _) in plan.items():
        if kind == "ppl_shard":
            items[name] = shard_items(Path(path), tokenizer_dir, max_docs)
        elif kind == "ppl_doc":
            items[name] = doc_items(path, text_field)[:max_docs]
        elif kind == "mc":
            items[name] = mc_items(Path(path))
        else:
            items[name] = gen_items(Path(path), prompt_style)
        if not items[name]:
            _fail(path, "yielded no documents")

    out_dir = Path(out_dir)
    _remove_previous(out_dir)
    manifest: dict[str, dict[str, Any]] = {}
    for name, rows in items.items():
        kind, path, short = plan[name]
        splits = write_task_splits(out_dir, name, rows, short == "ppl", n_fewshot, max_examples, max_docs)
        cfg = task_config(name, short, splits, out_dir / name, prefix, mc_template, max_gen_toks, gen_until)
        (out_dir / name / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
        manifest[name] = {"kind": short, "source": path, "splits": splits}
        print(f"build-own-tasks: {name} ({short}, from {path}): " + ", ".join(f"{s}={n}" for s, n in splits.items()))
    (out_dir / "manifest.json").write_text(json.dumps({"builder": BUILDER, "prefix": prefix, "tasks": manifest}, indent=2))
    print(f"build-own-tasks: {len(manifest)} task(s) in {out_dir}; run them all with\n"
          f"  litgpt-ext evaluate <checkpoint> --tasks {prefix} --include_path {out_dir}")
    return manifest


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(build_own_tasks, as_positional=False)
