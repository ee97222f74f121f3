"""build-sft-tasks: formats, masks, train/val split by document, and disjointness from the training documents."""

from __future__ import annotations

import json
import re
from itertools import islice
from pathlib import Path

import pytest
from test_sft_data import tok_dir, tokenizer  # noqa: F401  (fixtures)

from litgpt_ext.demo.math_gen import generate_problems
from litgpt_ext.demo.sft_tasks import build_sft_tasks, cloze_items, extract_functions, math_items

SHARED_FUNC = '''def shared_helper(x):
    """In a training file and in a held-out file."""
    y = x + 1
    return y * 2'''


def _code_doc(k: int) -> str:
    return f'''import os


class Thing{k}:
    def method_{k}(self, a, b):
        total = a + b
        for i in range(b):
            total += i * {k}
        return total

    @property
    def prop(self):
        return {k}


def helper_{k}(path):
    if not path:
        raise ValueError(
            "empty path {k}")
    return os.path.basename(path)
'''


PROSE = ("Functions are first class objects in this language. A generator produces its values lazily, one at a "
         "time, which saves memory for long sequences. The interpreter compiles every module into bytecode before "
         "running it. Exceptions propagate upward until some handler catches them.")
SHARED_SENTENCE = "The interpreter compiles every module into bytecode before running it."


@pytest.fixture()
def demo(tmp_path) -> Path:
    raw = tmp_path / "demo" / "raw"
    raw.mkdir(parents=True)

    def jl(name, texts):
        (raw / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))

    jl("code.jsonl", ["import sys\n\n" + SHARED_FUNC + "\n", _code_doc(100)])
    jl("code_heldout.jsonl", [_code_doc(k) for k in range(6)] + ["x = 1\n\n" + SHARED_FUNC + "\n"])
    jl("math.jsonl", [p["text"] for p in islice(generate_problems(42), 3000)])
    jl("main.jsonl", ["Some training prose about modules. " + SHARED_SENTENCE + " More text follows here."])
    jl("main_heldout.jsonl", [PROSE.replace("language", f"language number {k}") for k in range(8)])
    return tmp_path / "demo"


def test_extract_functions_from_fragments():
    funcs = extract_functions(_code_doc(3))
    assert [f.splitlines()[0] for _, f in funcs] == ["def method_3(self, a, b):", "def helper_3(path):"]
    raw, dedented = funcs[0]
    assert raw.startswith("    def method_3") and dedented.startswith("def method_3") and dedented.endswith("return total")
    assert funcs[1][1].endswith("return os.path.basename(path)")  # a closing paren at the def's indent stays inside


def test_math_items_new_templates_gsm8k_format():
    items = math_items(300, seed=1)
    gen_questions = {p["question"] for p in islice(generate_problems(42), 5000)}
    openings = {q.split()[0] for q in gen_questions}
    for it in items:
        q = re.fullmatch(r"Question: (.+)\nAnswer:", it["instruction"], re.S)[1]
        assert q not in gen_questions and q.split()[0] not in {"Compute", "Evaluate", "Solve", "What", "Find"}
        m = re.fullmatch(r" (.+)\n#### (-?\d+)", it["output"], re.S)
        assert m and re.findall(r"-?\d+", m[1])[-1] == m[2]  # the reasoning ends at the answer
        eqs = re.findall(r"(?<![\d-])((?:\d+ [-+*/] )+\d+) = (-?\d+)", m[1])
        assert eqs and all(eval(expr) == int(c) for expr, c in eqs)  # every step is right
    assert not any(it["instruction"].startswith(("Question: A train", "Question: Compute")) for it in items)
    assert "A" in openings  # the check above is about the generator's own openings
    assert len({it["instruction"] for it in items}) == 300 and items == math_items(300, seed=1)


def test_cloze_blanks_the_longest_word():
    import random

    items = cloze_items(PROSE, random.Random(0), per_doc=4)
    assert len(items) == 4
    sentence, rec = items[2]
    assert sentence == SHARED_SENTENCE
    assert rec["input"] == ("A generator produces its values lazily, one at a time, which saves memory for long "
                            "sequences. The ____ compiles every module into bytecode before running it.\nAnswer:")
    assert rec["output"] == " interpreter"


def test_build_sft_tasks_disjoint_from_training_documents(demo, tmp_path):
    out = tmp_path / "tasks"
    manifest = build_sft_tasks(demo, out, math_examples=200, val_fraction=0.25, cloze_per_doc=4, max_tokens=None)
    assert manifest["code"]["dropped_overlap"] == 1  # shared_helper is in a training file
    # the 8 held-out docs differ in their first sentence only: the shared sentence is dropped once, the
    # other repeated items are kept once
    assert manifest["prose"]["dropped_overlap"] == 1 and manifest["prose"]["duplicates"] > 0
    assert manifest["math"]["dropped_overlap"] == 0
    assert json.loads((out / "manifest.json").read_text())["tasks"] == manifest
    train_text = {k: "\n".join(json.loads(x)["text"] for x in (demo / "raw" / f"{k}.jsonl").read_text().splitlines())
                  for k in ("code", "main", "math")}
    for task in ("code", "math", "prose"):
        tr = json.loads((out / task / "train.json").read_text())
        va = json.loads((out / task / "val.json").read_text())
        assert (len(tr), len(va)) == (manifest[task]["train"], manifest[task]["val"]) and tr and va
        assert not {json.dumps(r) for r in tr} & {json.dumps(r) for r in va}
        for r in tr + va:
            assert set(r) == {"instruction", "input", "output"}
            if task == "code":
                assert r["instruction"] == "" and r["output"] not in train_text["code"]
            if task == "math":
                assert r["instruction"][len("Question: "):-len("\nAnswer:")] not in train_text["math"]
            if task == "prose":
                sentence = r["input"].split("\nAnswer:")[0].replace("____", r["output"].strip())
                assert sentence.split(". ")[-1] not in train_text["main"]
    code_val = json.loads((out / "code" / "val.json").read_text())
    code_train = json.loads((out / "code" / "train.json").read_text())
    k_val = {re.search(r"_(\d+)\(", r["output"])[1] for r in code_val}
    k_train = {re.search(r"_(\d+)\(", r["output"])[1] for r in code_train}
    assert not k_val & k_train  # split by source document


def test_tasks_fit_max_tokens_and_load_in_litgpt_and_sftdata(demo, tmp_path, tokenizer, tok_dir):
    from litgpt.data import JSON

    from litgpt_ext.sft.data import Plain, SFTData, encode_record

    out = tmp_path / "tasks"
    with pytest.raises(FileNotFoundError, match="needs a tokenizer"):
        build_sft_tasks(demo, out, math_examples=50)
    full = build_sft_tasks(demo, tmp_path / "all", math_examples=50, val_fraction=0.2, max_tokens=None)
    lengths = {t: sorted(len(encode_record(r, tokenizer, Plain(), False)[0]) for s in ("train", "val")
                         for r in json.loads((tmp_path / "all" / t / f"{s}.json").read_text())) for t in full}
    limit = max(v[len(v) // 2] for v in lengths.values())  # the longest task loses about half its items
    manifest = build_sft_tasks(demo, out, math_examples=50, val_fraction=0.2, max_tokens=limit, tokenizer_dir=tok_dir)
    for t, v in lengths.items():
        assert manifest[t]["too_long"] == sum(n > limit for n in v)
        assert manifest[t]["train"] + manifest[t]["val"] + manifest[t]["too_long"] == full[t]["train"] + full[t]["val"]
    assert sum(m["too_long"] for m in manifest.values()) > 0
    tr, va = JSON(json_path=out / "math").get_splits()  # litgpt's own JSON module reads the folder
    assert (len(tr), len(va)) == (manifest["math"]["train"], manifest["math"]["val"])
    for task in ("code", "math", "prose"):
        dm = SFTData(train_path=out / task, mask_prompt=manifest[task]["mask_prompt"], seed=0)
        dm.connect(tokenizer, batch_size=4, max_seq_length=limit)
        dm.setup()
        assert dm.stats["train"]["truncated"] == dm.stats["val"]["truncated"] == 0
        assert dm.stats["train"]["no_target"] == 0


def test_missing_demo_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `litgpt-ext build-demo"):
        build_sft_tasks(tmp_path)
