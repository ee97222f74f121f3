"""`litgpt-ext prepare-sft` on files in the paper's datasets' own columns (parquet / jsonl / json, as the hub
serves them), then those folders through `SFTData` and a real `litgpt-ext sft` run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from litgpt import GPT, Config
from test_sft_data import tok_dir, tokenizer  # noqa: F401  (fixtures)

from litgpt_ext import checkpoint as ckpt
from litgpt_ext.cli import main as cli
from litgpt_ext.sft.data import SFTData
from litgpt_ext.sft.prepare import RECIPES
from litgpt_ext.train.state import TrainingState
from tests.conftest import ROOT, make_shard


def _parquet(path: Path, rows: list[dict], row_group_size: int = 3) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _gsm(i: int) -> dict:
    return {"question": f"Ann has {i} apples and buys {i + 2} more. How many apples does she have? ",
            "answer": f"She has {i} + {i + 2} = {2 * i + 2} apples.\n#### {2 * i + 2}"}


def _read(out: Path) -> tuple[list, list, dict]:
    return (json.loads((out / "train.json").read_text()), json.loads((out / "val.json").read_text()),
            json.loads((out / "manifest.json").read_text()))


def test_gsm8k_from_local_files_counts_every_dropped_row(tmp_path, tokenizer):  # noqa: F811
    train_rows = [_gsm(i) for i in range(10)] + [_gsm(3), {"question": "  ", "answer": "#### 1"}]
    test_rows = [_gsm(100), _gsm(101), _gsm(4)]  # _gsm(4) is also a train row: dropped from val
    tr = _parquet(tmp_path / "raw" / "train.parquet", train_rows)
    te = _jsonl(tmp_path / "raw" / "test.jsonl", test_rows)
    out = tmp_path / "sft" / "gsm8k"
    cli(["prepare-sft", "--task", "gsm8k", "--out_dir", str(out), "--train_files+", str(tr), "--val_files+", str(te)])
    train, val, man = _read(out)
    assert len(train) == 10 and len(val) == 2
    assert train[0] == {"instruction": "Ann has 0 apples and buys 2 more. How many apples does she have?",
                        "input": "", "output": "\nShe has 0 + 2 = 2 apples.\n#### 2"}
    assert [r["output"].rsplit("#### ", 1)[1] for r in val] == ["202", "204"]
    assert man["counts"] == {"train": {"rows": 12, "dropped_empty": 1, "dropped_duplicate": 1, "not_sampled": 0},
                             "val": {"rows": 3, "dropped_empty": 0, "dropped_duplicate": 1, "not_sampled": 0}}
    assert (man["train"], man["val"], man["mask_prompt"], man["format"]) == (10, 2, True, "instruction")
    # the folder is what SFTData reads; with the paper's plain prompt and masking, only "\n" + answer is learned
    dm = SFTData(train_path=out, mask_prompt=man["mask_prompt"], prompt_style="plain", seed=1)
    dm.connect(tokenizer=tokenizer, batch_size=2, max_seq_length=256)
    dm.setup()
    assert (len(dm.train_examples), len(dm.val_examples)) == (10, 2)
    ids, labels = dm.train_examples[0]
    target = tokenizer.encode(train[0]["output"], bos=False, eos=True)
    assert labels[-len(target):].tolist() == target.tolist()
    assert (labels[: len(ids) - len(target)] == -100).all()


def test_subsets_are_seeded_and_counted(tmp_path):
    tr = _jsonl(tmp_path / "train.jsonl", [_gsm(i) for i in range(30)])
    te = _jsonl(tmp_path / "test.jsonl", [_gsm(100 + i) for i in range(10)])
    outs = []
    for k, seed in enumerate((5, 5, 6)):
        out = tmp_path / f"o{k}"
        cli(["prepare-sft", "--task", "gsm8k", "--out_dir", str(out), "--train_files+", str(tr), "--val_files+", str(te),
             "--max_train", "12", "--max_val", "4", "--seed", str(seed)])
        outs.append(_read(out))
    (t0, v0, m0), (t1, v1, _), (t2, _, _) = outs
    assert (len(t0), len(v0)) == (12, 4) and (t0, v0) == (t1, v1) and t0 != t2
    assert (m0["counts"]["train"]["not_sampled"], m0["counts"]["val"]["not_sampled"]) == (18, 6)
    order = [int(r["output"].rsplit("#### ", 1)[1]) for r in t0]
    assert order == sorted(order)  # a subset keeps the dataset's order


def test_lima_first_turn_or_every_pair_and_a_held_out_share(tmp_path):
    convs = [[f"prompt {i}?", f"reply {i}.", f"follow-up {i}?", f"second reply {i}."] if i % 4 == 0
             else [f"prompt {i}?", f"reply {i}."] for i in range(20)]
    rows = [{"conversations": c, "source": "stackexchange"} for c in convs] + [{"conversations": ["no reply"], "source": "x"}]
    tr = _parquet(tmp_path / "lima" / "train.parquet", rows)
    out = tmp_path / "sft" / "lima"
    cli(["prepare-sft", "--task", "lima", "--out_dir", str(out), "--train_files+", str(tr), "--val_fraction", "0.25"])
    train, val, man = _read(out)
    assert len(train) + len(val) == 20 and len(val) == 5
    assert man["counts"]["train"]["dropped_empty"] == 1 and man["source"]["val_fraction"] == 0.25
    assert {r["instruction"] for r in train + val} == {f"prompt {i}?" for i in range(20)}
    assert {"instruction": "prompt 1?", "input": "", "output": "\nreply 1."} in train + val
    assert all(r["output"].startswith("\nreply ") for r in train + val)  # the first turn pair only
    assert man["mask_prompt"] is False
    multi = tmp_path / "sft" / "lima_multi"
    cli(["prepare-sft", "--task", "lima", "--out_dir", str(multi), "--train_files+", str(tr), "--multiturn", "true"])
    t, v, _ = _read(multi)
    assert len(t) + len(v) == 25  # 5 conversations with two turn pairs
    assert {"instruction": "follow-up 8?", "input": "", "output": "\nsecond reply 8."} in t + v


def test_sciq_and_pycode_records(tmp_path):
    sciq = [{"question": f"What is {i}?", "distractor1": "a", "distractor2": "b", "distractor3": "c",
             "correct_answer": f"answer {i}", "support": "" if i % 2 else f"Support text {i}."} for i in range(6)]
    _parquet(tmp_path / "sciq" / "train.parquet", sciq[:4])
    _parquet(tmp_path / "sciq" / "validation.parquet", sciq[4:])
    out = tmp_path / "sft" / "sciq"
    cli(["prepare-sft", "--task", "sciq", "--out_dir", str(out), "--train_files+", str(tmp_path / "sciq" / "train.parquet"),
         "--val_files+", str(tmp_path / "sciq" / "validation.parquet")])
    train, val, man = _read(out)
    assert train[0] == {"instruction": "What is 0?", "input": "Support text 0.", "output": "\nanswer 0"}
    assert train[1]["input"] == "" and len(val) == 2 and man["mask_prompt"] is True
    fns = [{"repository_name": "r", "func_name": f"f{i}", "func_code_string": f"def f{i}(x):\n    return x + {i}\n",
            "func_documentation_string": "adds"} for i in range(5)]
    code = tmp_path / "sft" / "pycode"
    val_json = tmp_path / "csn" / "val.json"  # a .json list, the third file form
    _jsonl(tmp_path / "csn" / "train.jsonl", fns[:3])
    val_json.write_text(json.dumps(fns[3:]))
    cli(["prepare-sft", "--task", "pycode", "--out_dir", str(code), "--train_files+", str(tmp_path / "csn" / "train.jsonl"),
         "--val_files+", str(val_json)])
    train, val, man = _read(code)
    assert train == [{"text": f["func_code_string"]} for f in fns[:3]] and len(val) == 2
    assert (man["mask_prompt"], man["format"]) == (False, "text")


@pytest.mark.parametrize("args, needles", [
    (["--task", "gsm9k"], ["'gsm9k'", "gsm8k, sciq, lima, pycode"]),
    (["--task", "gsm8k", "--train_files+", "{wrong}"], ["question", "answer", "columns: ['problem', 'solution']"]),
    (["--task", "gsm8k", "--train_files+", "{missing}"], ["does not exist", "nope.parquet"]),
    (["--task", "gsm8k", "--train_files+", "{csv}"], ["t.csv", ".parquet, .jsonl, .json"]),
    (["--task", "gsm8k", "--train_files+", "{good}", "--multiturn", "true"], ["multiturn", "lima"]),
    (["--task", "gsm8k", "--train_files+", "{good}", "--max_train", "0"], ["max_train", ">= 1"]),
    (["--task", "gsm8k", "--train_files+", "{good}", "--val_fraction", "1.5"], ["val_fraction", "1.5"]),
    (["--task", "gsm8k", "--train_files+", "{good}", "--hf_dataset", "x/y"], ["train_files", "hf_dataset"]),
])
def test_bad_inputs_are_named(tmp_path, capsys, args, needles):
    files = {"wrong": _jsonl(tmp_path / "w.jsonl", [{"problem": "p", "solution": "s"}]),
             "missing": tmp_path / "nope.parquet", "csv": tmp_path / "t.csv",
             "good": _jsonl(tmp_path / "g.jsonl", [_gsm(i) for i in range(4)])}
    (tmp_path / "t.csv").write_text("question,answer\n")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        cli(["prepare-sft", "--out_dir", str(out)] + [a.format(**files) for a in args])
    assert e.value.code not in (0, None)
    err = capsys.readouterr().err + str(e.value.code)
    for n in needles:
        assert n in err, (n, err)
    assert "Traceback" not in err and not out.exists()


def test_an_existing_folder_is_refused_unless_overwrite(tmp_path, capsys):
    tr = _jsonl(tmp_path / "g.jsonl", [_gsm(i) for i in range(6)])
    out = tmp_path / "out"
    cli(["prepare-sft", "--task", "gsm8k", "--out_dir", str(out), "--train_files+", str(tr)])
    first = (out / "train.json").read_text()
    with pytest.raises(SystemExit) as e:
        cli(["prepare-sft", "--task", "gsm8k", "--out_dir", str(out), "--train_files+", str(tr), "--seed", "9"])
    assert "--overwrite true" in str(e.value.code) and (out / "train.json").read_text() == first
    cli(["prepare-sft", "--task", "gsm8k", "--out_dir", str(out), "--train_files+", str(tr), "--seed", "9", "--overwrite", "true"])
    assert json.loads((out / "manifest.json").read_text())["seed"] == 9 and not (tmp_path / "out.tmp").exists()


@pytest.mark.slow
def test_hub_unreachable_names_the_dataset_and_the_offline_route(tmp_path):
    """Offline (as here and on many cluster nodes) the hub path fails at once with what to do instead."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    p = subprocess.run([sys.executable, "-m", "litgpt_ext", "prepare-sft", "--task", "sciq", "--out_dir", str(tmp_path / "o")],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert p.returncode != 0
    assert "'allenai/sciq'" in p.stderr and "--train_files" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "o").exists()


def test_prepared_folder_trains_with_litgpt_ext_sft(tmp_path, tok_dir, tokenizer):  # noqa: F811
    """The folder prepare-sft writes is an `sft` run's data as is (the paper sweep's data.init_args.train_path)."""
    data = tmp_path / "sft" / "gsm8k"
    cli(["prepare-sft", "--task", "gsm8k", "--out_dir", str(data),
         "--train_files+", str(_jsonl(tmp_path / "train.jsonl", [_gsm(i) for i in range(16)])),
         "--val_files+", str(_jsonl(tmp_path / "test.jsonl", [_gsm(50 + i) for i in range(4)]))])
    torch.manual_seed(0)
    cfg = Config(name="t", n_layer=1, n_head=2, n_embd=16, block_size=64, vocab_size=tokenizer.vocab_size, padded_vocab_size=512)
    ckpt.write_checkpoint(tmp_path / "base" / "final", GPT(cfg).state_dict(), TrainingState(step=4).to_dict(), cfg, {}, tok_dir)
    make_shard(tmp_path / "val" / "1", 0, 400)
    import yaml

    sft_cfg = {"checkpoint_dir": str(tmp_path / "base" / "final"), "out_dir": str(tmp_path / "run"), "precision": "32-true",
               "devices": 1, "logger_name": "csv", "seed": 1,
               "data": {"class_path": "litgpt_ext.sft.data.SFTData",
                        "init_args": {"train_path": str(data), "name": "gsm8k", "mask_prompt": True, "prompt_style": "plain"}},
               "train": {"epochs": 1, "global_batch_size": 4, "micro_batch_size": 4, "max_seq_length": 64, "log_interval": 1},
               "eval": {"interval": 100, "max_iters": 2, "val_data_path": {"general": str(tmp_path / "val" / "1")}},
               "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}}}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(sft_cfg))
    cli(["sft", "--config", str(tmp_path / "sft.yaml")])
    m = json.loads((tmp_path / "run" / "sft_metrics.json").read_text())
    assert (m["sft_set"], m["step"]) == ("gsm8k", 4) and m["sft_val_loss"] > 0


def test_recipes_match_the_paper_protocol():
    """mask_prompt as the protocol says: GSM8K and SciQ masked, PyCode and LIMA not."""
    assert {k: r.mask_prompt for k, r in RECIPES.items()} == {"gsm8k": True, "sciq": True, "lima": False, "pycode": False}
