"""SFT on hostile inputs: every bad record, a data set that cannot train, a changed rerun, a zero LR
and a glued prompt/response give one clear error line (or warning) before training; real JSON files,
the real byte-level BPE of test_sft_data, the real `litgpt-ext sft` CLI in a subprocess."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_sft_data import _records, tok_dir, tokenizer, write_json  # noqa: F401  (fixtures)
from test_sft_run import _config, source  # noqa: F401  (fixture: a tiny source checkpoint + SFT data)

from litgpt_ext.sft import checks
from litgpt_ext.sft.config import SFTTrainArgs, check_peak_lr
from litgpt_ext.sft.data import Plain, SFTData
from litgpt_ext.sft.tokens import TokenCounter

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("litgpt-ext"))


def _dm(train, val, tokenizer, max_seq_length=64, **kw) -> SFTData:  # noqa: F811
    dm = SFTData(train_path=train, val_path=val, seed=0, **kw)
    dm.connect(tokenizer, batch_size=2, max_seq_length=max_seq_length)
    dm.setup(rank=0, world_size=1)
    return dm


# ----------------------------------------------------------------------------------------------- records


@pytest.mark.parametrize("row, match", [
    ({"prompt": "2+2?", "completion": " 4"}, r"record 1: has 'completion' but no 'output': rename 'completion' to "
                                             r"'output' and 'prompt' to 'instruction'"),
    ({"prompt": "2+2?", "response": " 4"}, r"rename 'response' to 'output' and 'prompt' to 'instruction'"),
    ({"prompt": "2+2?", "output": " 4"}, r"record 1: has 'prompt' but no 'instruction': the prompt field must be "
                                         r"named 'instruction'"),
    ({"instruction": "2+2?", "output": 4}, r"record 1: field 'output' is a number \(4\); expected a string"),
    ({"instruction": None, "output": " 4"}, r"record 1: field 'instruction' is a null \(null\); expected a string"),
    ({"instruction": ["a"], "output": " 4"}, r"field 'instruction' is a list"),
    ({"instruction": "x", "input": 3, "output": " 4"}, r"field 'input' is a number \(3\); expected a string or null"),
    ({"text": 5}, r"record 1: field 'text' is a number \(5\); expected a string"),
    ("just a string", r"record 1: is a JSON string .*not an object; expected instruction records"),
])
def test_bad_records_name_file_record_field_and_type(tmp_path, tokenizer, row, match):  # noqa: F811
    path = write_json(tmp_path / "train.json", [{"instruction": "ok", "output": " fine"}, row])
    val = write_json(tmp_path / "val.json", [{"instruction": "ok", "output": " fine"}])
    with pytest.raises(ValueError, match=match) as e:
        _dm(path, val, tokenizer)
    assert str(path) in str(e.value)


def test_jsonl_records_and_bytes_name_the_line(tmp_path, tokenizer):  # noqa: F811
    val = write_json(tmp_path / "val.json", [{"instruction": "ok", "output": " fine"}])
    p = tmp_path / "train.jsonl"
    p.write_text('{"instruction": "a", "output": " b"}\n\n{"instruction": "a", "output": 7}\n')
    with pytest.raises(ValueError, match=r"train.jsonl:3: record 1 \(line 3\): field 'output' is a number \(7\)"):
        _dm(p, val, tokenizer)
    raw = b'{"instruction": "a", "output": " b"}\n{"instruction": "caf\xe9", "output": " b"}\n'
    p.write_bytes(raw)
    assert raw.index(b"\xe9") == 57
    with pytest.raises(ValueError, match=r"train.jsonl: not UTF-8 text: byte 0xe9 at byte offset 57 \(line 2\)"):
        _dm(p, val, tokenizer)
    p.write_bytes(b'\xef\xbb\xbf{"instruction": "a", "output": " b"}\n')  # a UTF-8 BOM is fine
    assert len(_dm(p, val, tokenizer).train_examples) == 1


# ----------------------------------------------------------------------------------------------- target tokens


def _long(n: int, words: int = 60) -> list[dict]:
    return [{"instruction": "Question: " + " ".join(["the cat sat on the mat"] * (words // 6)) + f" {i}?",
             "output": f" {i}"} for i in range(n)]


def test_no_target_token_is_refused_with_the_length_that_keeps_one(tmp_path, tokenizer, caplog):  # noqa: F811
    train, val = write_json(tmp_path / "train.json", _long(6)), write_json(tmp_path / "val.json", _records(4))
    need = max(len(tokenizer.encode(r["instruction"])) + 1 for r in _long(6))
    assert need > 64
    with pytest.raises(ValueError) as e:
        _dm(train, val, tokenizer, max_seq_length=64)
    msg = str(e.value)
    assert f"SFT sft train ({train}): 6 of 6 examples keep no target token" in msg
    assert "max_seq_length=64 (mask_prompt: true" in msg and "loss 0" in msg
    assert f"raise train.max_seq_length to {need}" in msg and "mask_prompt: false" in msg
    assert len(_dm(train, val, tokenizer, max_seq_length=need).train_examples) == 6  # the named length works
    assert len(_dm(train, val, tokenizer, max_seq_length=64, mask_prompt=False).train_examples) == 6
    # the val set alone: refused too (its loss would be nan)
    with pytest.raises(ValueError, match=rf"SFT sft val \({train}\): 6 of 6 .*validation loss would be undefined"):
        _dm(val, train, tokenizer, max_seq_length=64)
    # some but not all: one warning line with the count
    write_json(tmp_path / "mixed.json", _long(3) + [r for r in _records(7) if "output" in r])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        dm = _dm(tmp_path / "mixed.json", val, tokenizer, max_seq_length=64)
    lines = [r.getMessage() for r in caplog.records if "keep no target token" in r.getMessage()]
    assert len(lines) == 1 and "3 of 9 examples keep no target token" in lines[0] and dm.stats["train"]["no_target"] == 3
    # truncation: error still refuses any cut
    with pytest.raises(ValueError, match="longer than max_seq_length=64"):
        _dm(tmp_path / "mixed.json", val, tokenizer, max_seq_length=64, truncation="error")


# ----------------------------------------------------------------------------------------------- boundary, style


def test_plain_style_glue_is_shown_and_warned(tmp_path, tokenizer, capsys, caplog):  # noqa: F811
    rows = [{"instruction": f"Add {a} and {b}", "output": f"{a} + {b} = {a + b}"} for a, b in ((41, 75), (3, 4))]
    train, val = write_json(tmp_path / "train.json", rows), write_json(tmp_path / "val.json", rows)
    dm = SFTData(train_path=train, val_path=val, seed=0)
    with caplog.at_level(logging.WARNING):
        dm.preflight(tokenizer, 64, block_size=64)
    out = capsys.readouterr().out
    assert "⟦prompt⟧Add 41 and 75⟦response⟧41 + 75 = 116⟦end⟧" in out and "prompt_style 'plain'" in out
    warn = [r.getMessage() for r in caplog.records if "fuse" in r.getMessage()]
    assert len(warn) == 1 and "in 2 of 2 train examples" in warn[0] and "'Add 41 and 7541 + 75 = 116'" in warn[0]
    # a separator: no warning; the example line shows it (escaped)
    ok = [{"instruction": f"Add {a} and {b}\nAnswer:", "output": f" {a + b}"} for a, b in ((41, 75), (3, 4))]
    train = write_json(tmp_path / "ok.json", ok)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        SFTData(train_path=train, val_path=val, seed=0).preflight(tokenizer, 64)
    assert "⟦prompt⟧Add 41 and 75\\nAnswer:⟦response⟧ 116⟦end⟧" in capsys.readouterr().out
    assert not [r for r in caplog.records if "fuse" in r.getMessage()]
    assert checks.show_example("x" * 300, "y" * 300).startswith("⟦prompt⟧…x")


def test_a_style_that_drops_the_input_is_warned(tmp_path, tokenizer, caplog):  # noqa: F811
    rows = [{"instruction": "Add the numbers.", "input": f"{a} and {b}", "output": f" {a + b}"} for a, b in ((1, 2), (3, 4))]
    train, val = write_json(tmp_path / "train.json", rows), write_json(tmp_path / "val.json", rows)
    for style, warned in (("default", True), ("plain", False), ("alpaca", False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            SFTData(train_path=train, val_path=val, seed=0, prompt_style=style).preflight(tokenizer, 256)
        lines = [r.getMessage() for r in caplog.records if "leaves out the 'input'" in r.getMessage()]
        assert (lines == [] if not warned else "2 of 2 train records" in lines[0]), (style, lines)


def test_prompt_style_file_reloads_with_litgpt(tmp_path):
    from litgpt.prompts import Alpaca, load_prompt_style

    from litgpt_ext import checkpoint as ckpt
    from litgpt_ext.train.state import TrainingState

    cfg = __import__("litgpt").Config(name="t", n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32)
    for name in ("step-00000002", "final"):
        ckpt.write_checkpoint(tmp_path / name, {}, TrainingState(step=2).to_dict(), cfg, {})
    assert len(checks.save_prompt_style(tmp_path, Plain())) == 2
    assert isinstance(load_prompt_style(tmp_path / "final"), Plain)
    assert checks.save_prompt_style(tmp_path, Plain()) == []  # already there
    checks.save_prompt_style(tmp_path, Alpaca())
    assert isinstance(load_prompt_style(tmp_path / "step-00000002"), Alpaca)
    assert ckpt.is_complete(tmp_path / "final")


# ----------------------------------------------------------------------------------------------- config, LR


def test_config_changes_and_ignored_keys():
    old = {"seed": 1, "devices": 1, "optimizer": {"init_args": {"lr": 3e-4}}, "train": {"epochs": 4, "log_interval": 1},
           "checkpoint_dir": "runs/x/final", "resume": "auto"}
    same = {**old, "devices": 4, "resume": True, "train": {"epochs": 4, "log_interval": 10, "allow_zero_lr": False},
            "optimizer": {"init_args": {"lr": "3e-4"}}, "checkpoint_dir": str(Path("runs/x/final").resolve())}
    assert checks.config_changes(old, same) == {}
    new = {**same, "optimizer": {"init_args": {"lr": 1e-3}}, "train": {"epochs": 2}}
    assert checks.config_changes(old, new) == {"optimizer.init_args.lr": (3e-4, 1e-3), "train.epochs": (4, 2)}


def test_peak_lr_must_train():
    for lr in (0.0, -1e-4, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="peak LR must be a positive finite number"):
            check_peak_lr(lr)
    check_peak_lr(0.0, allow_zero=True)
    with pytest.raises(ValueError, match="positive finite"):
        check_peak_lr(-1.0, allow_zero=True)
    with pytest.raises(ValueError, match="min_lr=0.001 exceeds the peak LR"):
        check_peak_lr(1e-4, min_lr=1e-3)
    assert SFTTrainArgs().allow_zero_lr is False


# ----------------------------------------------------------------------------------------------- token counts


@pytest.mark.parametrize("world_size, grouped", [(1, False), (2, True)])
def test_token_counts_are_what_the_batches_held(tmp_path, tokenizer, world_size, grouped):  # noqa: F811
    train, val = write_json(tmp_path / "train.json", _records(23)), write_json(tmp_path / "val.json", _records(3))
    counts = {"tokens": 0, "tokens_padded": 0, "target_tokens": 0}
    loaders = []
    for rank in range(world_size):
        dm = SFTData(train_path=train, val_path=val, seed=5, length_grouped=grouped, group_batches=2)
        dm.connect(tokenizer, batch_size=4, max_seq_length=24)
        dm.setup(rank=rank, world_size=world_size)
        loaders.append(iter(dm.train_dataloader()))
    counter = TokenCounter(dm)
    rounds_per_epoch = len(dm.train_dataloader())
    for k in range(1, 2 * rounds_per_epoch + 3):
        for it in loaders:
            b = next(it)
            counts["tokens"] += int(b["token_counts"]["raw_plus_prompt_template"].sum())  # litgpt's own count
            counts["tokens_padded"] += b["input_ids"].numel()
            counts["target_tokens"] += int((b["labels"][:, 1:] != -100).sum())
        assert counter.after(k) == counts, k
    assert counts["tokens"] < counts["tokens_padded"] and counts["target_tokens"] < counts["tokens"]


# ----------------------------------------------------------------------------------------------- the CLI


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_") and k != "LITGPT_EXT_TRACEBACK"}
    return subprocess.run([CLI, "sft", *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _error_line(r: subprocess.CompletedProcess) -> str:
    """The CLI's one error line (no traceback), exit status 1."""
    lines = [x for x in r.stderr.splitlines() if x.startswith("litgpt-ext sft: error: ")]
    assert r.returncode == 1 and len(lines) == 1, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    return lines[0]


def _refused(r: subprocess.CompletedProcess, text: str, out: Path) -> str:
    line = _error_line(r)
    assert text in line, line
    assert not (out / "final").exists() and not (out / "sft_metrics.json").exists()
    assert not list(out.glob("step-*")) if out.exists() else True
    return line


@pytest.mark.slow
def test_cli_refuses_bad_data_and_lr_before_training(tmp_path, source):  # noqa: F811
    out = tmp_path / "out"
    cfg = _config(source, out)
    bad = write_json(tmp_path / "bad" / "train.json", [{"prompt": "2+2?", "completion": " 4"}])
    write_json(tmp_path / "bad" / "val.json", _records(3))
    line = _refused(_cli("--config", str(cfg), "--data.init_args.train_path", str(bad.parent)),
                    "record 0: has 'completion' but no 'output'", out)
    assert str(bad) in line
    write_json(tmp_path / "long" / "train.json", _long(8, words=120))
    write_json(tmp_path / "long" / "val.json", _records(3))
    line = _refused(_cli("--config", str(cfg), "--data.init_args.train_path", str(tmp_path / "long")),
                    "8 of 8 examples keep no target token", out)
    assert "the model's block_size is 64" in line and "mask_prompt: false" in line
    assert not (out / "lit_model.pth").exists() and not (out / "phases.jsonl").exists()  # before any model
    line = _refused(_cli("--config", str(cfg), "--optimizer.init_args.lr", "0"), "optimizer.init_args.lr=0", out)
    assert "train.allow_zero_lr: true" in line


@pytest.mark.slow
def test_rerun_into_a_finished_run_compares_the_config(tmp_path, source):  # noqa: F811
    out = tmp_path / "run"
    cfg = _config(source, out, epochs=1, save_interval=2)
    r = _cli("--config", str(cfg))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "⟦prompt⟧Question: what is" in r.stdout and "⟦response⟧" in r.stdout
    assert "| tokens " in r.stdout and "(padded " in r.stdout
    m = json.loads((out / "sft_metrics.json").read_text())
    assert 0 < m["train_target_tokens"] < m["train_tokens"] < m["train_tokens_padded"]
    for d in [out / "final", *out.glob("step-*")]:
        assert yaml.safe_load((d / "prompt_style.yaml").read_text()) == {"class_path": "litgpt_ext.sft.data.Plain"}
    before = (out / "sft_metrics.json").read_text()
    r = _cli("--config", str(cfg), "--devices", "1", "--train.log_interval", "5")  # results-neutral keys
    assert r.returncode == 0 and "nothing to do" in r.stdout, r.stderr[-2000:]
    line = _error_line(_cli("--config", str(cfg), "--optimizer.init_args.lr", "1e-4", "--seed", "9"))
    assert "is finished with another config" in line and "optimizer.init_args.lr: 0.003 then, 0.0001 now" in line
    assert "seed: 3 then, 9 now" in line and "new out_dir" in line
    assert (out / "sft_metrics.json").read_text() == before
    # a requeue (not finished: the latest step-* is continued) with another config: refused the same way
    (out / "sft_metrics.json").unlink()
    line = _error_line(_cli("--config", str(cfg), "--train.epochs", "2"))
    assert "would resume step-00000004, written with another config" in line and "train.epochs: 1 then, 2 now" in line
