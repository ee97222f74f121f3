"""Build the local lm-eval tasks' JSONL from the demo corpus' held-out documents.

Input: `<demo_dir>/raw/{main,code,math}_heldout.jsonl` (one `{"text": ...}` per line; math lines
also carry `question` and `answer`). Output: `<out_dir>/<task>/{train,test}.jsonl` (`train` is the
few-shot pool, disjoint from `test`) and `manifest.json`. The task YAMLs in
`litgpt_ext/eval/tasks/` read these files; everything is deterministic given `seed`.

Run: `python -m litgpt_ext.eval.build_tasks --demo_dir data/demo --out_dir data/demo/eval_tasks`.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, Iterable

_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")
_EQUATION = re.compile(r"^\s*(?P<q>[^=\n]*\d[^=\n]*?)\s*=\s*(?P<a>-?\d+(?:\.\d+)?)\s*$")
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def _split(rows: list[dict], n_fewshot: int, max_examples: int) -> dict[str, list[dict]]:
    n_fewshot = min(n_fewshot, len(rows) // 5)  # never starve the test split
    return {"train": rows[:n_fewshot], "test": rows[n_fewshot : n_fewshot + max_examples]}


def write_task_splits(out_dir: Path, name: str, rows: list[dict], perplexity: bool, n_fewshot: int,
                      max_examples: int, max_ppl_docs: int) -> dict[str, int]:
    """Write one task's `<out_dir>/<name>/{train,test}.jsonl`: a perplexity task is all test (at most
    `max_ppl_docs`), any other holds back a few-shot pool (`train`) before at most `max_examples` test
    items. Returns {split: count} (empty splits are not written). Shared with `build-own-tasks`."""
    splits = {"test": rows[:max_ppl_docs]} if perplexity else _split(rows, n_fewshot, max_examples)
    return {split: write_jsonl(Path(out_dir) / name / f"{split}.jsonl", r) for split, r in splits.items() if r}


def _numeric_distractors(answer: str, rng: random.Random, k: int) -> list[str]:
    """Plausible wrong numbers: off-by-small, off-by-ten, digit-reversed, doubled/halved."""
    is_int = "." not in answer
    value = int(answer) if is_int else float(answer)
    cands = [value + d for d in (-1, 1, -2, 2, -10, 10, 3, -3)] + [value * 2, -value if value else 5]
    if is_int and abs(value) >= 10:
        cands.append(int(str(abs(value))[::-1]) * (1 if value >= 0 else -1))
    if not is_int:
        cands += [round(value + d, 2) for d in (-0.5, 0.5, -0.1, 0.1)]
    out = []
    for c in rng.sample(cands, len(cands)):
        s = str(c) if is_int else f"{c:g}"
        if s != answer and s not in out:
            out.append(s)
        if len(out) == k:
            break
    return out


def math_items(docs: list[dict], n_choices: int, rng: random.Random) -> list[dict]:
    """Question/answer pairs; docs without them fall back to `lhs = number` lines in their text."""
    pairs = []
    for d in docs:
        if d.get("question") and d.get("answer") is not None:
            pairs.append((str(d["question"]).strip(), str(d["answer"]).strip()))
        else:
            for line in str(d.get("text", "")).splitlines():
                if m := _EQUATION.match(line):
                    pairs.append((m["q"].strip() + " =", m["a"]))
    answers = sorted({a for _, a in pairs})
    items = []
    for q, a in pairs:
        if _NUMBER.match(a):
            wrong = _numeric_distractors(a, rng, n_choices - 1)
        else:
            pool = [x for x in answers if x != a]
            wrong = rng.sample(pool, min(n_choices - 1, len(pool)))
        if len(wrong) < n_choices - 1:
            continue
        choices = [a] + wrong
        rng.shuffle(choices)
        items.append({"question": q, "answer": a, "choices": choices, "gold": choices.index(a)})
    return items


def code_items(
    docs: list[dict], n_choices: int, rng: random.Random, context_lines: int = 12,
    min_line_chars: int = 12, per_doc: int = 3,
) -> list[dict]:
    """Next-line choice: true line vs lines of other files, re-indented like the true line."""
    files = [str(d.get("text", "")).splitlines() for d in docs]
    good = [[i for i, line in enumerate(lines) if len(line.strip()) >= min_line_chars] for lines in files]
    pool = [(f, lines[i].strip()) for f, (lines, idx) in enumerate(zip(files, good)) for i in idx]
    items = []
    for f, (lines, idx) in enumerate(zip(files, good)):
        targets = [i for i in idx if i >= 2]
        for i in rng.sample(targets, min(per_doc, len(targets))):
            true = lines[i]
            indent = true[: len(true) - len(true.lstrip())]
            others = [indent + s for g, s in pool if g != f and s != true.strip()]
            if len(set(others)) < n_choices - 1:
                continue
            wrong = rng.sample(sorted(set(others)), n_choices - 1)
            choices = [true] + wrong
            rng.shuffle(choices)
            context = "\n".join(lines[max(0, i - context_lines) : i])
            items.append({"context": context, "choices": choices, "gold": choices.index(true)})
    return items


def prose_items(
    docs: list[dict], n_choices: int, rng: random.Random, max_context_sentences: int = 5, max_choice_chars: int = 200,
) -> list[dict]:
    """Cloze: the opening sentences of a document, then its true next sentence vs others'.

    Every choice (true or not) is at most `max_choice_chars` characters, so that it fits the small
    demo models' context window: a scorer that kept only a choice's tail would grade a different
    answer (our backend and HF's refuse such requests).
    """
    sents = [[s.strip() for s in _SENTENCE_SPLIT.split(" ".join(str(d.get("text", "")).split())) if s.strip()] for d in docs]
    pool = [(f, s) for f, ss in enumerate(sents) for s in ss[1:] if 20 <= len(s) <= max_choice_chars]
    items = []
    for f, ss in enumerate(sents):
        if len(ss) < 3:
            continue
        fits = [k for k in range(2, min(max_context_sentences, len(ss) - 1) + 1) if len(ss[k]) <= max_choice_chars]
        if not fits:
            continue
        k = rng.choice(fits)
        true = ss[k]
        others = sorted({s for g, s in pool if g != f and s != true})
        if len(others) < n_choices - 1:
            continue
        choices = [true] + rng.sample(others, n_choices - 1)
        rng.shuffle(choices)
        items.append({"context": " ".join(ss[:k]), "choices": choices, "gold": choices.index(true)})
    return items


def build_tasks(
    demo_dir: Path = Path("data/demo"),
    out_dir: Path | None = None,
    n_choices: int = 4,
    n_fewshot: int = 10,
    max_examples: int = 500,
    max_ppl_docs: int = 200,
    seed: int = 1234,
    max_choice_chars: int = 200,
) -> dict[str, dict[str, int]]:
    """Write the local tasks' JSONL from `<demo_dir>/raw/*_heldout.jsonl`.

    Args:
        demo_dir: demo corpus folder (holds `raw/main_heldout.jsonl`, `code_heldout.jsonl`, `math_heldout.jsonl`).
        out_dir: output folder; defaults to `<demo_dir>/eval_tasks`.
        n_choices: answer options per multiple-choice item (1 true + distractors).
        n_fewshot: items held back as the few-shot pool (`train` split).
        max_examples: cap on test items per task.
        max_ppl_docs: cap on documents per perplexity task.
        seed: RNG seed for sampling and shuffling.
        max_choice_chars: longest prose-cloze answer choice, in characters; the default keeps
            every choice well inside the demo models' 128-token window.

    Returns:
        {task folder: {split: count}}; also written to `<out_dir>/manifest.json`.
    """
    demo_dir = Path(demo_dir)
    out_dir = Path(out_dir) if out_dir is not None else demo_dir / "eval_tasks"
    if n_choices < 2:
        raise ValueError(f"n_choices must be >= 2, got {n_choices}")
    for name, value in (("n_fewshot", n_fewshot), ("max_examples", max_examples), ("max_ppl_docs", max_ppl_docs)):
        if value < (0 if name == "n_fewshot" else 1):
            raise ValueError(f"{name} must be >= {0 if name == 'n_fewshot' else 1}, got {value}")
    raw = demo_dir / "raw"
    sources = {"main": raw / "main_heldout.jsonl", "code": raw / "code_heldout.jsonl", "math": raw / "math_heldout.jsonl"}
    if not any(p.is_file() for p in sources.values()):
        raise FileNotFoundError(f"no held-out docs in {str(raw)!r}; expected {', '.join(p.name for p in sources.values())}")
    docs = {k: read_jsonl(p) if p.is_file() else [] for k, p in sources.items()}

    tasks: dict[str, list[dict]] = {}
    if docs["math"]:
        tasks["demo_math_mc"] = math_items(docs["math"], n_choices, random.Random(seed))
    if docs["code"]:
        tasks["demo_code_completion"] = code_items(docs["code"], n_choices, random.Random(seed + 1))
    if docs["main"]:
        tasks["demo_prose_cloze"] = prose_items(docs["main"], n_choices, random.Random(seed + 2), max_choice_chars=max_choice_chars)
    for name, key in (("demo_prose_ppl", "main"), ("demo_code_ppl", "code"), ("demo_math_ppl", "math")):
        texts = [{"text": d["text"]} for d in docs[key] if str(d.get("text", "")).strip()]
        if texts:
            tasks[name] = texts[:max_ppl_docs]

    manifest: dict[str, dict[str, int]] = {}
    for name, rows in tasks.items():
        if not rows:
            print(f"build_tasks: {name}: no usable items, skipped")
            continue
        manifest[name] = write_task_splits(out_dir, name, rows, name.endswith("_ppl"), n_fewshot, max_examples, max_ppl_docs)
        print(f"build_tasks: {name}: " + ", ".join(f"{s}={n}" for s, n in manifest[name].items()))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").write_text(json.dumps({"demo_dir": str(demo_dir), "seed": seed, "tasks": manifest}, indent=2))
    return manifest


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(build_tasks, as_positional=False)
