"""Local tasks are built from held-out docs, and a real lm-eval run ranks trained above untrained."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from litgpt import GPT, Tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from eval_fixtures import arithmetic_docs, save_checkpoint, tiny_config, train_tiny, train_tokenizer  # noqa: E402

from litgpt_ext.eval.build_tasks import build_tasks  # noqa: E402
from litgpt_ext.eval.evaluate import evaluate, results_path  # noqa: E402

CODE = "def add_{i}(x, y):\n    total = x + y + {i}\n    return total * {j}\n\nresult_{i} = add_{i}({i}, {j})\n"
PROSE = ("The village of Stone{i} sits by a river. Farmers there grow barley and rye. "
         "Every spring the river floods the lower fields. Children count {j} boats on the water. "
         "In autumn the market opens on the square.")


def _write_demo(root: Path, n_math: int = 150) -> Path:
    raw = root / "demo" / "raw"
    raw.mkdir(parents=True)
    data = {
        "math": arithmetic_docs(n_math, seed=1, hi=5),
        "code": [{"text": CODE.format(i=i, j=i % 7 + 2)} for i in range(12)],
        "main": [{"text": PROSE.format(i=i, j=i + 3)} for i in range(12)],
    }
    for name, docs in data.items():
        (raw / f"{name}_heldout.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return root / "demo"


def test_build_tasks_writes_valid_items(tmp_path):
    demo = _write_demo(tmp_path)
    manifest = build_tasks(demo, tmp_path / "tasks", n_fewshot=5, max_examples=100)
    assert manifest["demo_math_mc"] == {"train": 5, "test": 100}
    assert set(manifest) == {"demo_math_mc", "demo_code_completion", "demo_prose_cloze",
                             "demo_prose_ppl", "demo_code_ppl", "demo_math_ppl"}
    math = [json.loads(x) for x in (tmp_path / "tasks/demo_math_mc/test.jsonl").read_text().splitlines()]
    for item in math:
        assert len(item["choices"]) == len(set(item["choices"])) == 4
        assert item["choices"][item["gold"]] == item["answer"] == str(sum(map(int, re.findall(r"\d+", item["question"]))))
    golds = {item["gold"] for item in math}
    assert golds == {0, 1, 2, 3}  # the true answer is not always in the same slot
    code = [json.loads(x) for x in (tmp_path / "tasks/demo_code_completion/test.jsonl").read_text().splitlines()]
    for item in code:
        true = item["choices"][item["gold"]]
        indent = true[: len(true) - len(true.lstrip())]
        assert all(c.startswith(indent) and not c[len(indent)].isspace() for c in item["choices"])
    # a second build is byte-identical (deterministic)
    before = (tmp_path / "tasks/demo_prose_cloze/test.jsonl").read_bytes()
    build_tasks(demo, tmp_path / "tasks", n_fewshot=5, max_examples=100)
    assert (tmp_path / "tasks/demo_prose_cloze/test.jsonl").read_bytes() == before


@pytest.fixture()
def one_thread():
    """Tiny matmuls: one thread is faster, and far faster when other tests share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_trained_model_beats_untrained_on_math_mc(tmp_path, capsys, one_thread):
    demo = _write_demo(tmp_path, n_math=80)
    tok_texts = [d["text"] for d in arithmetic_docs(300, seed=5)] + [CODE, PROSE]
    tok_dir = train_tokenizer(tmp_path / "tok", tok_texts, vocab_size=300)
    tok = Tokenizer(tok_dir)
    torch.manual_seed(0)
    model = GPT(tiny_config("pythia", vocab_size=300, block_size=64))
    run = tmp_path / "run"
    save_checkpoint(run / "step-00000000", model, tok_dir)

    ids: list[int] = []
    for d in arithmetic_docs(3000, seed=7, hi=5):  # the "math shard": same distribution, other samples
        ids += tok.encode(d["text"]).tolist() + [tok.eos_id]
    losses = train_tiny(model, ids, steps=250, batch=8, seq_len=32, lr=1e-2)
    assert losses[-1] < 0.5 * losses[0]
    save_checkpoint(run / "final", model, tok_dir)

    written = evaluate(run, tasks="demo_math_mc", all_checkpoints=True, batch_size=16, device="cpu",
                       eval_data_dir=tmp_path / "eval_tasks", demo_dir=demo, bootstrap_iters=0)
    assert (tmp_path / "eval_tasks" / "manifest.json").is_file()  # built on first use
    assert written == [results_path(run / "step-00000000", "demo_math_mc"), results_path(run / "final", "demo_math_mc")]
    acc = {}
    for path in written:
        res = json.loads(path.read_text())
        assert res["n-samples"]["demo_math_mc"]["effective"] == 70
        assert res["litgpt_ext"]["checkpoint_name"] == path.parent.parent.name
        acc[path.parent.parent.name] = res["results"]["demo_math_mc"]["acc,none"]
    out = capsys.readouterr().out
    assert "demo_math_mc" in out and "acc=" in out
    # chance is 0.25; an untrained model sits near it, 250 steps on the math shard learn the sums
    assert acc["step-00000000"] < 0.45
    assert acc["final"] > 0.7
    assert acc["final"] > acc["step-00000000"] + 0.3

    # skip_existing leaves finished checkpoints alone
    stamp = written[1].stat().st_mtime_ns
    again = evaluate(run, tasks="demo_math_mc", all_checkpoints=True, skip_existing=True,
                     eval_data_dir=tmp_path / "eval_tasks", demo_dir=demo)
    assert again == written and written[1].stat().st_mtime_ns == stamp
    assert "skip" in capsys.readouterr().out


def test_missing_checkpoints_and_task_data_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        evaluate(tmp_path, tasks="demo_math_mc")
    tok_dir = train_tokenizer(tmp_path / "tok", [CODE, PROSE], vocab_size=280)
    save_checkpoint(tmp_path / "run" / "step-00000001", GPT(tiny_config(vocab_size=280)), tok_dir)
    with pytest.raises(FileNotFoundError, match="build-demo"):
        evaluate(tmp_path / "run", tasks="demo_math_mc", eval_data_dir=tmp_path / "none", demo_dir=tmp_path / "none")
