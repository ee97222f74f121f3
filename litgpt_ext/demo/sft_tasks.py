"""Offline SFT tasks for the demo corpus, in litgpt's JSON format (`instruction`, `input`, `output`).

    <out_dir>/code/{train,val}.json    held-out Python functions; learn the whole text (mask_prompt: false)
    <out_dir>/math/{train,val}.json    word problems, "Question: … Answer: … #### n" (mask_prompt: true)
    <out_dir>/prose/{train,val}.json   fill-in-the-blank on held-out prose (mask_prompt: true)
    <out_dir>/manifest.json            counts, items dropped for overlapping the training data, settings

They play the paper's PyCode, GSM8K and SciQ roles and differ from the midtraining data in format
(functions rather than file chunks; question/answer pairs rather than "Problem/Solution/Answer"
documents; cloze prompts rather than running prose). Sources are the documents `build-demo` kept
out of every shard (`raw/<type>_heldout.jsonl`); the math problems come from templates that the
demo's generator (`demo/math_gen.py`) does not have. An item whose text occurs in the shards'
documents (`raw/<type>.jsonl`, e.g. a function copied between standard-library files) is dropped
and counted. Train and val are split by source document, so no document feeds both.

Note: `build-eval-tasks` reads the same held-out documents (next-line and next-sentence choices),
so the code and prose SFT sets share documents, not items, with those lm-eval tasks.
"""

from __future__ import annotations

import json
import random
import re
import textwrap
from pathlib import Path
from typing import Callable

_DEF = re.compile(r"^(?P<indent>[ \t]*)(async\s+)?def\s+\w+\s*\(")
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
_WORD = re.compile(r"\b[A-Za-z]{6,}\b")

# Names and objects deliberately not in demo/math_gen.py (NAMES, ITEMS), and none of its templates.
NAMES = ["Aria", "Bruno", "Celia", "Dario", "Elena", "Felix", "Greta", "Hugo", "Ines", "Jonas", "Lena", "Marco",
         "Nadia", "Oscar", "Paula", "Rafael", "Sofia", "Tomas", "Una", "Victor"]
MATH_NAME = "math"
TASK_MASK = {"code": False, "math": True, "prose": True}


def _lemonade(r: random.Random) -> tuple[str, str, int]:
    name, p, a, b = r.choice(NAMES), r.randint(2, 9) * 5, r.randint(3, 40), r.randint(3, 40)
    q = (f"{name} sells lemonade for {p} cents a cup. On Saturday {name} sells {a} cups and on Sunday {b} cups. "
         f"How many cents does {name} earn over the weekend?")
    s = f"{name} sells {a} + {b} = {a + b} cups. At {p} cents each that is {a + b} * {p} = {(a + b) * p} cents."
    return q, s, (a + b) * p


def _garden(r: random.Random) -> tuple[str, str, int]:
    rows, per = r.randint(3, 15), r.randint(4, 20)
    picked = r.randint(1, rows * per - 1)
    q = f"A garden has {rows} rows with {per} tulips in each row. {picked} tulips are picked. How many tulips remain?"
    s = f"There are {rows} * {per} = {rows * per} tulips. After picking, {rows * per} - {picked} = {rows * per - picked} remain."
    return q, s, rows * per - picked


def _savings(r: random.Random) -> tuple[str, str, int]:
    name, save, weeks = r.choice(NAMES), r.randint(5, 30), r.randint(3, 12)
    spend = r.randint(1, save * weeks)
    q = (f"{name} saves {save} dollars every week. After {weeks} weeks, {name} spends {spend} dollars on a bike. "
         f"How many dollars does {name} have left?")
    s = f"{name} saves {save} * {weeks} = {save * weeks} dollars, then has {save * weeks} - {spend} = {save * weeks - spend} left."
    return q, s, save * weeks - spend


def _bus(r: random.Random) -> tuple[str, str, int]:
    a = r.randint(10, 50)
    off1, on1 = r.randint(1, a), r.randint(0, 20)
    mid = a - off1 + on1
    off2 = r.randint(0, mid)
    q = (f"A bus leaves the depot with {a} passengers. At the first stop {off1} get off and {on1} get on. "
         f"At the second stop {off2} get off. How many passengers are on the bus now?")
    s = f"After the first stop: {a} - {off1} + {on1} = {mid}. After the second stop: {mid} - {off2} = {mid - off2}."
    return q, s, mid - off2


def _share(r: random.Random) -> tuple[str, str, int]:
    n, each = r.randint(2, 9), r.randint(3, 15)
    eaten = r.randint(0, each)
    q = (f"{n} friends share {n * each} grapes equally. Each friend then eats {eaten} grapes. "
         f"How many grapes does each friend have left?")
    s = f"Each friend gets {n * each} / {n} = {each} grapes and keeps {each} - {eaten} = {each - eaten}."
    return q, s, each - eaten


def _ages(r: random.Random) -> tuple[str, str, int]:
    a, b = r.sample(NAMES, 2)
    age, k, years = r.randint(2, 15), r.randint(2, 5), r.randint(1, 20)
    q = f"{a} is {age} years old. {b} is {k} times as old as {a}. How old will {b} be in {years} years?"
    s = f"{b} is {k} * {age} = {age * k} years old now, so in {years} years {b} will be {age * k} + {years} = {age * k + years}."
    return q, s, age * k + years


MATH_TEMPLATES: dict[str, Callable[[random.Random], tuple[str, str, int]]] = {
    "lemonade": _lemonade, "garden": _garden, "savings": _savings, "bus": _bus, "share": _share, "ages": _ages,
}


def math_items(n: int, seed: int) -> list[dict]:
    """`n` distinct GSM8K-style records: prompt "Question: …\\nAnswer:", output " reasoning\\n#### n"."""
    r, seen, out = random.Random(seed), set(), []
    kinds = sorted(MATH_TEMPLATES)
    for _ in range(n * 50):
        if len(out) == n:
            break
        q, s, ans = MATH_TEMPLATES[r.choice(kinds)](r)
        if q in seen:
            continue
        seen.add(q)
        out.append({"instruction": f"Question: {q}\nAnswer:", "input": "", "output": f" {s}\n#### {ans}"})
    if len(out) < n:
        raise ValueError(f"could generate only {len(out)} distinct math problems, asked for {n}")
    return out


def extract_functions(text: str, min_lines: int = 3, max_chars: int = 2000) -> list[tuple[str, str]]:
    """(as written, dedented) for each `def` block: the def line and every following line that is
    blank or indented deeper. Works on file fragments, which `ast` cannot parse."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        m = _DEF.match(lines[i])
        if not m or (i > 0 and lines[i - 1].lstrip().startswith("@")):
            i += 1
            continue
        indent, j = len(m["indent"]), i + 1
        while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent
                                  or lines[j].lstrip().startswith(")")):
            j += 1
        block = lines[i:j]
        while block and not block[-1].strip():
            block.pop()
        raw = "\n".join(block)
        if len(block) >= min_lines and len(raw) <= max_chars:
            out.append((raw, textwrap.dedent(raw)))
        i = j if len(block) >= 1 else i + 1
    return out


def cloze_items(doc: str, rng: random.Random, per_doc: int = 3, min_chars: int = 40,
                max_chars: int = 300) -> list[tuple[str, dict]]:
    """(sentence, record): a sentence with its longest word (>= 6 letters, not the first) blanked,
    the previous sentence as context."""
    sents = [s.strip() for s in _SENTENCE_SPLIT.split(" ".join(doc.split())) if s.strip()]
    cands = [k for k, s in enumerate(sents) if min_chars <= len(s) <= max_chars]
    out = []
    for k in sorted(rng.sample(cands, min(per_doc, len(cands)))):
        s = sents[k]
        words = [m for m in _WORD.finditer(s) if m.start() > 0]
        if not words:
            continue
        w = max(words, key=lambda m: (len(m[0]), -m.start()))
        blanked = s[: w.start()] + "____" + s[w.end():]
        context = (sents[k - 1] + " ") if k > 0 and len(sents[k - 1]) <= max_chars else ""
        out.append((s, {"instruction": "Fill in the blank with the missing word.",
                        "input": f"{context}{blanked}\nAnswer:", "output": f" {w[0]}"}))
    return out


def _length_filter(max_tokens: int | None, tokenizer_dir: Path) -> Callable[[dict], bool] | None:
    if max_tokens is None:
        return None
    if not (tokenizer_dir / "tokenizer.json").is_file() and not (tokenizer_dir / "tokenizer.model").is_file():
        raise FileNotFoundError(f"max_tokens={max_tokens} needs a tokenizer; {str(tokenizer_dir)!r} holds none "
                                "(set tokenizer_dir, or max_tokens: null)")
    from litgpt import Tokenizer

    from litgpt_ext.sft.data import Plain, encode_record

    tok, style = Tokenizer(tokenizer_dir), Plain()
    return lambda rec: len(encode_record(rec, tok, style, mask_prompt=False)[0]) <= max_tokens


def _keep(items: list[tuple[int, dict]], fits: Callable[[dict], bool] | None) -> tuple[list[tuple[int, dict]], int]:
    if fits is None:
        return items, 0
    kept = [(d, rec) for d, rec in items if fits(rec)]
    return kept, len(items) - len(kept)


def _read_texts(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def _split_by_doc(items: list[tuple[int, dict]], val_fraction: float, seed: int, task: str) -> tuple[list[dict], list[dict]]:
    docs = sorted({d for d, _ in items})
    if len(docs) < 2:
        raise ValueError(f"SFT task {task}: {len(items)} items from {len(docs)} source document(s) are left after "
                         "dropping overlaps and items over max_tokens; a train/val split needs items from >= 2 "
                         "(raise max_tokens or build the demo with more held-out documents)")
    random.Random(seed).shuffle(docs)
    n_val = min(len(docs) - 1, max(1, round(val_fraction * len(docs))))
    val_docs = set(docs[:n_val])
    return [it for d, it in items if d not in val_docs], [it for d, it in items if d in val_docs]


def build_sft_tasks(
    demo_dir: Path = Path("data/demo"),
    out_dir: Path | None = None,
    math_examples: int = 2000,
    val_fraction: float = 0.1,
    cloze_per_doc: int = 3,
    min_function_lines: int = 3,
    max_function_chars: int = 2000,
    max_tokens: int | None = 128,
    tokenizer_dir: Path | None = None,
    seed: int = 4321,
) -> dict[str, dict[str, int]]:
    """Write the demo's SFT tasks (code, math, prose) as litgpt JSON train/val folders.

    Args:
        demo_dir: demo corpus folder from `litgpt-ext build-demo` (reads raw/*_heldout.jsonl and raw/*.jsonl).
        out_dir: output folder; defaults to `<demo_dir>/sft_tasks`.
        math_examples: word problems generated (train + val).
        val_fraction: fraction of source documents (code, prose) or problems (math) in the val split.
        cloze_per_doc: fill-in-the-blank items per held-out prose document at most.
        min_function_lines: shortest function kept for the code task.
        max_function_chars: longest function kept for the code task.
        max_tokens: drop (and count) items longer than this many tokens as `SFTData` encodes them
            with the `plain` prompt, so that no target is cut at the model's `max_seq_length`
            (the demo model's block size is 128); None keeps all.
        tokenizer_dir: tokenizer for `max_tokens`; defaults to `<demo_dir>/tokenizer`.
        seed: seed of the problems, the blanks and the splits.

    Returns:
        {task: {"train", "val", "dropped_overlap", "duplicates", "mask_prompt"}}; also in `<out_dir>/manifest.json`.
    """
    demo_dir = Path(demo_dir)
    out_dir = Path(out_dir) if out_dir is not None else demo_dir / "sft_tasks"
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    raw = demo_dir / "raw"
    need = [raw / f"{k}{s}.jsonl" for k in ("main", "code") for s in ("", "_heldout")] + [raw / "math.jsonl"]
    missing = [str(p) for p in need if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"missing demo raw files {missing}; run `litgpt-ext build-demo --out_dir {demo_dir}` first")

    tasks: dict[str, tuple[list[dict], list[dict]]] = {}
    dropped: dict[str, int] = {}
    too_long: dict[str, int] = {}
    fits = _length_filter(max_tokens, Path(tokenizer_dir) if tokenizer_dir else demo_dir / "tokenizer")

    code_train = "\n".join(_read_texts(raw / "code.jsonl"))
    items, seen, drop = [], set(), 0
    dups: dict[str, int] = {}
    for d, doc in enumerate(_read_texts(raw / "code_heldout.jsonl")):
        for as_written, func in extract_functions(doc, min_function_lines, max_function_chars):
            if func in seen:  # the first copy is kept: a repeat could land in the other split
                dups["code"] = dups.get("code", 0) + 1
                continue
            seen.add(func)
            if as_written in code_train or func in code_train:
                drop += 1
                continue
            items.append((d, {"instruction": "", "input": "", "output": func}))
    items, too_long["code"] = _keep(items, fits)
    tasks["code"], dropped["code"] = _split_by_doc(items, val_fraction, seed, "code"), drop

    math_train = "\n".join(_read_texts(raw / "math.jsonl"))
    probs = math_items(math_examples, seed)
    kept = [p for p in probs if p["instruction"][len("Question: "):-len("\nAnswer:")] not in math_train]
    dropped["math"] = len(probs) - len(kept)
    items, too_long["math"] = _keep(list(enumerate(kept)), fits)
    tasks["math"] = _split_by_doc(items, val_fraction, seed + 1, "math")

    prose_train = " ".join(" ".join(t.split()) for t in _read_texts(raw / "main.jsonl"))
    rng, items, drop, seen = random.Random(seed + 2), [], 0, set()
    for d, doc in enumerate(_read_texts(raw / "main_heldout.jsonl")):
        for sentence, rec in cloze_items(doc, rng, cloze_per_doc):
            key = (rec["input"], rec["output"])
            if key in seen:
                dups["prose"] = dups.get("prose", 0) + 1
                continue
            seen.add(key)
            if sentence in prose_train:
                drop += 1
                continue
            items.append((d, rec))
    items, too_long["prose"] = _keep(items, fits)
    tasks["prose"], dropped["prose"] = _split_by_doc(items, val_fraction, seed + 2, "prose"), drop

    manifest = {}
    for name, (train, val) in tasks.items():
        folder = out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        for split, rows in (("train", train), ("val", val)):
            (folder / f"{split}.json").write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        manifest[name] = {"train": len(train), "val": len(val), "dropped_overlap": dropped[name],
                          "duplicates": dups.get(name, 0), "too_long": too_long[name], "mask_prompt": TASK_MASK[name]}
        print(f"build-sft-tasks: {name}: train={len(train)} val={len(val)} (mask_prompt={TASK_MASK[name]}; "
              f"dropped: {dropped[name]} occurring in the training documents, {too_long[name]} longer than "
              f"{max_tokens} tokens; {dups.get(name, 0)} repeats kept once)", flush=True)
    (out_dir / "manifest.json").write_text(json.dumps(
        {"demo_dir": str(demo_dir), "seed": seed, "val_fraction": val_fraction, "max_tokens": max_tokens,
         "tasks": manifest}, indent=2) + "\n")
    return manifest
