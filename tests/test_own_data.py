"""docs/own-data.md runs as written, and `build-own-tasks` builds lm-eval tasks from your own files.

The walkthrough test reads the page's marked blocks (`<!-- walkthrough: run -->` before a ```bash
block: every command in it; `<!-- walkthrough: file NAME -->` before a block: that file's content),
so the page and the test cannot drift: what the reader copies is what runs here, on generated text.
"""

from __future__ import annotations

import json
import math
import random
import re
import shlex
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from eval_fixtures import arithmetic_docs  # noqa: E402

from litgpt_ext.cli import main as cli_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "own-data.md"
MARKED = re.compile(r"^<!-- walkthrough: (run|file (\S+)) -->\n```[^\n]*\n(.*?)^```", re.M | re.S)
STAGES = ["clean", "train-tokenizer", "prepare", "prepare", "inspect-mix", "pretrain", "pretrain", "sft",
          "convert-to-hf", "build-own-tasks", "evaluate"]


def walkthrough(text: str) -> list[tuple[str, str | None, str]]:
    """[(kind, file name or None, block body)] for the page's marked blocks, in page order."""
    return [(m.group(1).split()[0], m.group(2), m.group(3)) for m in MARKED.finditer(text)]


def commands(block: str) -> list[list[str]]:
    """The `litgpt-ext` command lines of a bash block (continuations joined, comments dropped) as argv."""
    joined = re.sub(r"\\\n\s*", " ", block)
    out = []
    for line in joined.splitlines():
        line = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
        if line:
            argv = shlex.split(line)
            assert argv[0] == "litgpt-ext", f"walkthrough line is not a litgpt-ext command: {line!r}"
            out.append(argv[1:])
    return out


def test_the_walkthrough_covers_every_stage():
    steps = walkthrough(DOC.read_text(encoding="utf-8"))
    names = [argv[0] for kind, _, body in steps if kind == "run" for argv in commands(body)]
    assert names == STAGES, names
    assert [name for kind, name, _ in steps if kind == "file"] == ["my_pretrain.yaml", "my_sft.yaml"]


# ------------------------------------------------------------------------------------------ generated data

NOUNS = "farmer river market village teacher garden bridge mountain letter window harbor forest road table".split()
ADJS = "old quiet busy green small bright cold warm narrow wide early late".split()
VERBS = "crossed painted watched carried followed opened visited built found moved".split()
PLACES = "town square valley coast station library hill field kitchen school".split()


def prose_doc(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(8, 12)):
        a, n, v, n2, p = rng.choice(ADJS), rng.choice(NOUNS), rng.choice(VERBS), rng.choice(NOUNS), rng.choice(PLACES)
        sentences.append(f"The {a} {n} {v} the {n2} of the {p} and went back to the {rng.choice(PLACES)} with "
                         f"{rng.randint(2, 90)} friends.")
    return " ".join(sentences)


def sft_records(n: int, seed: int) -> list[dict]:
    return [{"instruction": d["question"], "input": "", "output": " " + d["answer"]}
            for d in arithmetic_docs(n, seed=seed, hi=6)]


def write_corpus(root: Path) -> dict[str, int]:
    """The files the page says the reader brings; returns what the tests expect of them."""
    rng = random.Random(0)
    general = root / "corpus" / "general"
    general.mkdir(parents=True)
    docs = [prose_doc(rng) for _ in range(40)]
    docs += [docs[3], "Too short to keep."]  # clean drops an exact duplicate and a too-short document
    for i, d in enumerate(docs):
        (general / f"doc_{i:03d}.txt").write_text(d + "\n")
    lines = lambda rows: "".join(json.dumps(r) + "\n" for r in rows)
    (root / "corpus" / "domain.jsonl").write_text(lines({"text": d["text"]} for d in arithmetic_docs(300, seed=1, hi=6)))
    (root / "corpus" / "domain_heldout.jsonl").write_text(lines({"text": d["text"]} for d in arithmetic_docs(12, seed=2)))
    quiz = []
    for k, d in enumerate(arithmetic_docs(20, seed=3, hi=6)):
        right = int(d["answer"])
        choices = [str(right), str(right + 1), str(right + 3)]
        rng.shuffle(choices)
        quiz.append({"question": d["question"], "choices": choices,
                     "answer": choices.index(str(right)) if k % 2 else str(right)})  # index or the choice's text
    (root / "corpus" / "quiz.jsonl").write_text(lines(quiz))
    (root / "corpus" / "sft").mkdir()
    (root / "corpus" / "sft" / "train.json").write_text(json.dumps(sft_records(96, seed=4)))
    (root / "corpus" / "sft" / "val.json").write_text(json.dumps(sft_records(10, seed=5)))
    return {"general": 40, "quiz": 20, "gen": 10, "heldout": 12}


def run_walkthrough(root: Path) -> None:
    for kind, name, body in walkthrough(DOC.read_text(encoding="utf-8")):
        if kind == "file":
            (root / name).write_text(body)
            continue
        for argv in commands(body):
            print("$ litgpt-ext", shlex.join(argv), flush=True)
            cli_main(argv)


@pytest.mark.slow
def test_the_walkthrough_runs_end_to_end(tmp_path, monkeypatch):
    import numpy as np
    import torch
    import transformers
    from litgpt import GPT, Config

    torch.set_num_threads(1)  # tiny matmuls on shared cores
    monkeypatch.chdir(tmp_path)
    expect = write_corpus(tmp_path)
    run_walkthrough(tmp_path)

    report = json.loads((tmp_path / "corpus" / "general_clean.report.json").read_text())
    kept = (tmp_path / "corpus" / "general_clean.jsonl").read_text().splitlines()
    assert len(kept) == expect["general"], report  # the duplicate and the short document are gone
    for shard in ("1", "m1", "val/1", "val/m1"):
        assert (tmp_path / "data" / "mine" / shard / "index.json").is_file(), shard

    runs = tmp_path / "runs" / "mine"
    assert json.loads((runs / "pretrain" / "final" / "manifest.json").read_text())["step"] == 20
    assert json.loads((runs / "midtrain" / "forked_from.json").read_text())["source"].endswith("step-00000010")
    assert json.loads((runs / "midtrain" / "final" / "manifest.json").read_text())["step"] == 20
    assert "domain" in (runs / "midtrain" / "val_metrics.csv").read_text()
    sft = json.loads((runs / "sft" / "sft_metrics.json").read_text())
    assert math.isfinite(sft["sft_val_loss"]) and sft["sft_val_loss"] > 0

    # the export gives our logits
    ckpt = runs / "sft" / "final"
    ours = GPT(Config.from_file(ckpt / "model_config.yaml"))
    sd = torch.load(ckpt / "lit_model.pth", map_location="cpu")
    ours.load_state_dict(sd.get("model", sd))
    hf = transformers.AutoModelForCausalLM.from_pretrained(runs / "sft-hf").eval()
    x = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours.eval()(x), atol=1e-4, rtol=1e-4)

    # the own tasks ran through lm-eval, with every item, and scored finite numbers
    res = json.loads((ckpt / "eval" / "mine.json").read_text())
    counts = {"mine_ppl_1": None, "mine_ppl_m1": None, "mine_ppl_domain_heldout": expect["heldout"],
              "mine_mc_quiz": expect["quiz"], "mine_gen_val": expect["gen"]}
    assert set(res["results"]) >= set(counts), sorted(res["results"])
    for task, n in counts.items():
        if n is not None:
            assert res["n-samples"][task]["effective"] == n, task
        values = [v for k, v in res["results"][task].items() if "," in k and "stderr" not in k and isinstance(v, float)]
        assert values and all(np.isfinite(values)), (task, res["results"][task])
    assert 0.0 <= res["results"]["mine_mc_quiz"]["acc,none"] <= 1.0
    assert 0.0 <= res["results"]["mine_gen_val"]["exact_match,strip"] <= 1.0
    assert res["results"]["mine_ppl_m1"]["bits_per_byte,none"] > 0

    # the page's other route: the exported model under lm-eval's own HF backend scores the same
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(tmp_path / "data" / "mine" / "eval_tasks"), include_defaults=False)
    theirs = lm_eval.simple_evaluate(model=HFLM(pretrained=str(runs / "sft-hf"), device="cpu", batch_size=8),
                                     tasks=["mine"], task_manager=tm, bootstrap_iters=0)["results"]
    for task in counts:
        for key, value in res["results"][task].items():
            if "," in key and "stderr" not in key and isinstance(value, float):
                assert theirs[task][key] == pytest.approx(value, rel=1e-4), (task, key)


# ------------------------------------------------------------------------------------------ build-own-tasks


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD_MC = {"question": "What is 1 plus 1?", "choices": ["1", "2"], "answer": 1}


@pytest.mark.parametrize("bad, message", [
    ({"choices": ["1", "2"], "answer": 0}, "line 2: field 'question' is missing"),
    ({"question": "q", "choices": ["1"], "answer": 0}, "line 2: field 'choices' must be a list of at least 2"),
    ({"question": "q", "choices": ["1", ""], "answer": 0}, "line 2: field 'choices' item 1 must be a non-empty"),
    ({"question": "q", "choices": ["1", "1"], "answer": 0}, "line 2: field 'choices' holds the same choice twice"),
    ({"question": "q", "choices": ["1", "2"], "answer": 2}, "line 2: field 'answer' 2 is out of range for 2 choices"),
    ({"question": "q", "choices": ["1", "2"], "answer": "3"}, "line 2: field 'answer' '3' is not one of the choices"),
    ({"question": "q", "choices": ["1", "2"], "answer": True}, "line 2: field 'answer' must be a choice's"),
    ({"question": "q", "choices": ["1", "2"]}, "line 2: field 'answer' is missing"),
    ({"question": 3, "choices": ["1", "2"], "answer": 0}, "line 2: field 'question' is int, not a string"),
    ("{not json", "line 2: not valid JSON"),
])
def test_bad_mc_records_are_named(tmp_path, bad, message):
    from litgpt_ext.eval.own_tasks import build_own_tasks

    quiz = _jsonl(tmp_path / "quiz.jsonl", [GOOD_MC, bad])
    with pytest.raises(ValueError) as e:
        build_own_tasks(out_dir=tmp_path / "tasks", mc=[str(quiz)])
    assert str(e.value) == f"{quiz}: {message}" or str(e.value).startswith(f"{quiz}: {message}"), str(e.value)
    assert "\n" not in str(e.value) and not (tmp_path / "tasks").exists()


def test_bad_inputs_are_refused_with_the_culprit(tmp_path):
    from litgpt_ext.eval.own_tasks import build_own_tasks

    sft = tmp_path / "val.json"
    sft.write_text(json.dumps([{"instruction": "a", "output": " b"}, {"instruction": "c", "input": "d"}]))
    with pytest.raises(ValueError, match=r"val.json: record 1: field 'output' is missing"):
        build_own_tasks(out_dir=tmp_path / "t", gen=[str(sft)])
    sft.write_text(json.dumps({"instruction": "a"}))
    with pytest.raises(ValueError, match="expected a JSON list of records, got dict"):
        build_own_tasks(out_dir=tmp_path / "t", gen=[str(sft)])
    with pytest.raises(ValueError, match="no inputs"):
        build_own_tasks(out_dir=tmp_path / "t")
    with pytest.raises(ValueError, match="prefix='demo_x'"):
        build_own_tasks(out_dir=tmp_path / "t", prefix="demo_x", mc=["x"])
    with pytest.raises(ValueError, match="prefix='demo'"):
        build_own_tasks(out_dir=tmp_path / "t", prefix="demo", mc=["x"])
    with pytest.raises(FileNotFoundError, match="--mc 'nope.jsonl': no such file"):
        build_own_tasks(out_dir=tmp_path / "t", mc=["nope.jsonl"])
    with pytest.raises(FileNotFoundError, match="--ppl_shards 'gone': no such folder"):
        build_own_tasks(out_dir=tmp_path / "t", ppl_shards=["gone"])
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    qa, qb = _jsonl(a / "quiz.jsonl", [GOOD_MC]), _jsonl(b / "quiz.jsonl", [GOOD_MC])
    with pytest.raises(ValueError, match="task 'own_mc_quiz' would come from both"):
        build_own_tasks(out_dir=tmp_path / "t", mc=[str(qa), str(qb)])
    with pytest.raises(ValueError, match="text field 'text' not found"):
        build_own_tasks(out_dir=tmp_path / "t", ppl_docs=[str(qa)])
    assert not (tmp_path / "t").exists()


def test_tasks_and_yaml_are_written(tmp_path, capsys):
    import yaml

    from litgpt_ext.eval.own_tasks import build_own_tasks

    quiz = _jsonl(tmp_path / "quiz.jsonl", [{"question": f"q{i}", "choices": ["x", "y", "z"], "answer": "z"}
                                             for i in range(10)])
    sft = tmp_path / "sft.json"
    sft.write_text(json.dumps([{"instruction": "Add", "input": "1 and 2", "output": "\n3\n"}]))
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"d{i}.txt").write_text(f"document {i}\n")
    (docs / "empty.txt").write_text("  \n")
    out = tmp_path / "tasks"
    manifest = build_own_tasks(out_dir=out, prefix="mine", mc=[str(quiz), f"arith={quiz}"], gen=[str(sft)],
                               ppl_docs=[str(docs)], n_fewshot=2)
    assert set(manifest) == {"mine_mc_quiz", "mine_mc_arith", "mine_gen_sft", "mine_ppl_docs"}
    assert manifest["mine_mc_quiz"]["splits"] == {"train": 2, "test": 8}
    assert manifest["mine_ppl_docs"]["splits"] == {"test": 3}  # the empty document is dropped
    item = json.loads((out / "mine_mc_quiz" / "test.jsonl").read_text().splitlines()[0])
    assert item == {"question": "q2", "choices": ["x", "y", "z"], "gold": 2}
    gen = json.loads((out / "mine_gen_sft" / "test.jsonl").read_text())
    assert gen == {"prompt": "Add\n1 and 2", "target": "3"}  # the `plain` prompt, as `sft` renders it
    cfg = yaml.safe_load((out / "mine_mc_quiz" / "mine_mc_quiz.yaml").read_text())
    assert cfg["tag"] == ["mine"] and cfg["output_type"] == "multiple_choice" and cfg["fewshot_split"] == "train"
    assert Path(cfg["dataset_kwargs"]["data_files"]["test"]) == (out / "mine_mc_quiz" / "test.jsonl").resolve()
    assert "--tasks mine --include_path" in capsys.readouterr().out
    # a rebuild with fewer inputs leaves no stale task behind
    build_own_tasks(out_dir=out, prefix="mine", gen=[str(sft)])
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "mine_gen_sft"]


def test_evaluate_without_demo_data_points_at_build_own_tasks(tmp_path):
    from litgpt_ext.eval.evaluate import _ensure_demo_tasks

    with pytest.raises(FileNotFoundError, match="build-own-tasks") as e:
        _ensure_demo_tasks(["demo_math_mc"], tmp_path / "none", tmp_path / "none")
    assert "build-demo" in str(e.value) and "--include_path" in str(e.value)


@pytest.mark.slow
def test_own_tasks_through_lm_eval_match_a_direct_computation(tmp_path):
    """A tiny checkpoint on every task kind: lm-eval's perplexity of a shard's documents is the one our
    model gives them directly, and mc/gen scores are fractions of every item."""
    import numpy as np
    import torch
    from eval_fixtures import save_checkpoint, tiny_config, train_tokenizer
    from litgpt import GPT, Tokenizer

    from litgpt_ext.eval.evaluate import evaluate
    from litgpt_ext.eval.own_tasks import build_own_tasks
    from litgpt_ext.prep.prepare import prepare

    torch.set_num_threads(1)
    texts = [d["text"] for d in arithmetic_docs(40, seed=0)]
    tok_dir = train_tokenizer(tmp_path / "tok", texts, vocab_size=300)
    raw = _jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts[:12]])  # val: the first 6
    prepare(inputs=[str(raw)], output_dir=tmp_path / "data", shard="m1", tokenizer_dir=tok_dir, val_count=6)
    quiz = _jsonl(tmp_path / "quiz.jsonl", [{"question": d["question"], "choices": [d["answer"], "x"], "answer": 0}
                                            for d in arithmetic_docs(8, seed=1)])
    (tmp_path / "sft.json").write_text(json.dumps(sft_records(5, seed=2)))
    build_own_tasks(out_dir=tmp_path / "tasks", prefix="t", ppl_shards=[str(tmp_path / "data" / "val" / "m1")],
                    mc=[str(quiz)], gen=[str(tmp_path / "sft.json")], max_gen_toks=8)
    torch.manual_seed(0)
    model = GPT(tiny_config("pythia", vocab_size=300, block_size=64)).eval()
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tok_dir)
    [path] = evaluate(ckpt, tasks="t", include_path=tmp_path / "tasks", device="cpu", bootstrap_iters=0)
    res = json.loads(path.read_text())
    assert {k: res["n-samples"][k]["effective"] for k in ("t_ppl_m1", "t_mc_quiz", "t_gen_sft")} == \
        {"t_ppl_m1": 6, "t_mc_quiz": 8, "t_gen_sft": 5}
    assert 0 <= res["results"]["t_mc_quiz"]["acc,none"] <= 1 and 0 <= res["results"]["t_gen_sft"]["exact_match,strip"] <= 1
    # bits per byte by hand: each document scored after the EOS prefix token, as lm-eval's rolling windows do
    tok = Tokenizer(tok_dir)
    nll, n_bytes = 0.0, 0
    with torch.no_grad():
        for t in texts[:6]:
            ids = tok.encode(t, bos=False, eos=False).tolist()
            x = torch.tensor([[tok.bos_id if tok.bos_id is not None else tok.eos_id] + ids[:-1]])
            logp = torch.log_softmax(model(x)[0].double(), -1)
            nll -= logp[torch.arange(len(ids)), torch.tensor(ids)].sum().item()
            n_bytes += len(t.encode("utf-8"))
    assert res["results"]["t_ppl_m1"]["bits_per_byte,none"] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-4)
    assert np.isfinite(res["results"]["t_ppl_m1"]["word_perplexity,none"])
