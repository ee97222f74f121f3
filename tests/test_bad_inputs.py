"""Bad inputs to every command, through the real CLI entry point, on tiny real data.

Each case asserts: a non-zero exit, stderr naming the bad value and what would be valid, no
traceback, and no output folder left behind by the failed command. Cases run in-process
(`litgpt_ext.cli.main`); the expensive ones (that get as far as building a model) are few.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning  # noqa: F401  imported here: its log handler binds to the session's stderr, not one test's
import pytest
import yaml

from litgpt_ext.cli import main as cli_main
from litgpt_ext.prep.tokenizer import train_tokenizer_from_texts
from tests.conftest import make_shard

TEXTS = [f"document {i}: the quick brown fox {i * 7} jumps over {i % 5} lazy dogs." for i in range(40)]


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> dict[str, Path]:
    """Shards, two tokenizers, an empty folder, raw inputs (good, bad UTF-8, bad JSON) and a config."""
    root = tmp_path_factory.mktemp("bad_inputs")
    make_shard(root / "data" / "1", 0, 3200)  # token ids 0..3199
    make_shard(root / "val" / "1", 10, 400)
    tok = train_tokenizer_from_texts(TEXTS, root / "tok", vocab_size=300, min_frequency=1)
    other = train_tokenizer_from_texts(TEXTS[:20], root / "tok_other", vocab_size=290, min_frequency=1)
    (root / "empty").mkdir()
    raw = root / "raw"
    raw.mkdir()
    (raw / "good.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (raw / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    (raw / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    (raw / "nofield.jsonl").write_text('{"body": "ok"}\n')
    (raw / "table.csv").write_text("text\nhello\n")
    (root / "not_a_ckpt").mkdir()
    (root / "not_a_ckpt" / "notes.txt").write_text("hi")
    cfg = {
        "model_name": "tiny",
        "model_config": {"name": "tiny", "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16,
                         "vocab_size": 4096, "padded_vocab_size": 4096},
        "precision": "32-true",
        "data": {"class_path": "litgpt_ext.data.ShardedMixedDataset",
                 "init_args": {"data_path": str(root / "data"), "val_data_path": {"general": str(root / "val" / "1")}}},
        "train": {"max_iters": 2, "global_batch_size": 2, "micro_batch_size": 2, "max_seq_length": 16, "min_lr": 1e-5},
        "eval": {"interval": 10, "max_iters": 2},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-3}},
        "logger_name": "csv",
        "devices": 1,
    }
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    # a shard `prepare` wrote with one tokenizer, for a run that names another
    cli_main(["prepare", "--inputs+", str(raw / "good.jsonl"), "--output_dir", str(root / "prepared"),
              "--tokenizer_dir", str(tok), "--log_interval_s", "100"])
    return {"root": root, "tok": tok, "other": other, "raw": raw, "cfg": root / "cfg.yaml"}


def P(*args):  # pretrain with the tiny config; OUT is this case's output folder
    return ["pretrain", "--config", "{cfg}", "--out_dir", "{out}", *args]


# (command line, substrings stderr must contain: the bad value and the valid alternatives)
CASES = {
    # ---- pretrain: choices (jsonargparse said "Cannot take a Union of no types")
    "pretrain-scheduler": (P("--train.lr_scheduler", "cosin"), ["'cosin'", "rewarmup_cosine", "wsd"]),
    "pretrain-precision": (P("--precision", "bf16"), ["'bf16'", "bf16-mixed", "32-true"]),
    "pretrain-logger": (P("--logger_name", "tb"), ["'tb'", "tensorboard", "wandb"]),
    "pretrain-int-type": (P("--train.max_iters", "abc"), ["'abc'", "int"]),
    "pretrain-unknown-flag": (P("--train.nope", "1"), ["train.nope"]),
    "pretrain-devices": (P("--devices", "0"), ["devices", "0", "'auto'"]),
    "pretrain-num-nodes": (P("--num_nodes", "0"), ["num_nodes=0", ">= 1"]),
    "pretrain-expert-parallel": (P("--expert_parallel_size", "0"), ["expert_parallel_size=0", "divide"]),
    # ---- pretrain: inherited litgpt knobs that this loop would ignore
    "pretrain-epochs": (P("--train.epochs", "3"), ["train.epochs=3", "max_iters"]),
    "pretrain-max-time": (P("--train.max_time", "60"), ["train.max_time=60", "max_tokens"]),
    "pretrain-tie-embeddings": (P("--train.tie_embeddings", "true"), ["train.tie_embeddings=True", "model_config"]),
    "pretrain-max-new-tokens": (P("--eval.max_new_tokens", "5"), ["eval.max_new_tokens=5", "remove it"]),
    "pretrain-evaluate-example": (P("--eval.evaluate_example", "random"), ["eval.evaluate_example='random'"]),
    # ---- pretrain: counts and rates
    "pretrain-micro-batch-0": (P("--train.micro_batch_size", "0"), ["micro_batch_size", "positive", "0"]),
    "pretrain-global-batch-neg": (P("--train.global_batch_size", "-4"), ["global_batch_size", "positive", "-4"]),
    "pretrain-batch-not-multiple": (P("--train.global_batch_size", "3"), ["global_batch_size=3", "multiple"]),
    "pretrain-max-iters-0": (P("--train.max_iters", "0"), ["train.max_iters", "positive", "0"]),
    "pretrain-max-iters-neg": (P("--train.max_iters", "-5"), ["train.max_iters", "-5"]),
    "pretrain-max-tokens-0": (P("--train.max_tokens", "0"), ["train.max_tokens", "positive"]),
    "pretrain-additional-0": (P("--train.max_additional_steps", "0"), ["train.max_additional_steps", "positive"]),
    "pretrain-save-interval-0": (P("--train.save_interval", "0"), ["train.save_interval", "positive"]),
    "pretrain-log-interval-0": (P("--train.log_interval", "0"), ["train.log_interval", "positive"]),
    "pretrain-seq-len-0": (P("--train.max_seq_length", "0"), ["train.max_seq_length", "positive"]),
    "pretrain-seq-len-too-long": (P("--train.max_seq_length", "1000"), ["max_seq_length=1000", "block_size=16"]),
    "pretrain-keep-last-0": (P("--train.keep_last_k", "0"), ["train.keep_last_k", "positive"]),
    "pretrain-warmup-fraction": (P("--train.lr_warmup_fraction", "1.5"), ["lr_warmup_fraction", "1.5", "[0, 1]"]),
    "pretrain-warmup-steps-neg": (P("--train.lr_warmup_steps", "-1"), ["lr_warmup_steps", ">= 0", "-1"]),
    "pretrain-stable-steps-neg": (P("--train.stable_steps", "-1"), ["stable_steps", ">= 0"]),
    "pretrain-min-lr-neg": (P("--train.min_lr", "-1"), ["min_lr", ">= 0", "-1"]),
    "pretrain-max-norm-0": (P("--train.max_norm", "0"), ["max_norm", "positive", "null"]),
    "pretrain-eval-interval-0": (P("--eval.interval", "0"), ["eval.interval", "positive"]),
    "pretrain-eval-max-iters-0": (P("--eval.max_iters", "0"), ["eval.max_iters", "positive"]),
    "pretrain-early-stop-neg": (P("--eval.early_stop", "{{general: -1}}"), ["early_stop['general']", ">= 0"]),
    "pretrain-early-stop-unknown-set": (P("--eval.early_stop", "{{nosuch: 0.5}}"), ["nosuch", "general"]),
    # ---- pretrain: optimizer (CLI lr was silently ignored)
    "pretrain-lr-0": (P("--optimizer.init_args.lr", "0"), ["lr=0", "> 0"]),
    "pretrain-lr-neg": (P("--optimizer.init_args.lr", "-0.1"), ["lr=-0.1", "> 0"]),
    "pretrain-lr-text": (P("--optimizer.lr", "abc"), ["lr='abc'", "> 0"]),
    "pretrain-optimizer-name": (P("--optimizer", "Adamw"), ["'Adamw'", "AdamW", "SGD"]),
    "pretrain-optimizer-arg": (P("--optimizer.init_args.betaz", "1"), ["'betaz'", "betas", "weight_decay"]),
    "pretrain-optimizer-init-args-json": (P("--optimizer.init_args", '{{"lr": 1}}'), ["optimizer.init_args", "--help"]),
    # ---- pretrain: paths, data, tokenizer
    "pretrain-tokenizer-empty": (P("--tokenizer_dir", "{root}/empty"), ["empty", "tokenizer.json", "train-tokenizer"]),
    "pretrain-tokenizer-missing": (P("--tokenizer_dir", "{root}/nope"), ["nope", "not a folder"]),
    "pretrain-data-path-missing": (P("--data.init_args.data_path", "{root}/nope"), ["nope"]),
    "pretrain-mix-bad-weight": (P("--data.init_args.mix_weights_str", "main:abc"), ["abc"]),
    "pretrain-mix-unknown-type": (P("--data.init_args.mix_weights_str", "lawz:1.0"), ["lawz", "main"]),
    "pretrain-num-workers-neg": (P("--data.init_args.num_workers", "-1"), ["num_workers", "-1", ">= 0"]),
    "pretrain-resume-missing": (P("--resume", "{root}/nope"), ["nope"]),
    "pretrain-resume-true-empty": (P("--resume", "true"), ["resume", "auto"]),
    "pretrain-init-and-resume": (P("--initial_checkpoint_dir", "{root}/x", "--resume", "true"), ["initial_checkpoint_dir", "exclusive"]),
    "pretrain-vocab-too-small": (P("--model_config.vocab_size", "64", "--model_config.padded_vocab_size", "64"),
                                 ["token id 3199", "64", "vocab_size"]),
    "pretrain-other-tokenizer": (P("--data.init_args.data_path", "{root}/prepared", "--data.init_args.val_data_path", "null",
                                   "--tokenizer_dir", "{other}"), ["tok_other", "prepared with the tokenizer", "re-prepare"]),
    "pretrain-model-name": (P("--model_config", "null", "--model_name", "pythia-16m"), ["'pythia-16m'", "pythia-160m"]),
    "pretrain-no-data": (P("--data", "null"), ["no data module", "ShardedMixedDataset"]),
    "pretrain-val-path-missing": (P("--data.init_args.val_data_path", "{root}/nope"), ["nope", "does not exist"]),
    # ---- prepare
    "prepare-output-is-file": (["prepare", "--inputs+", "{raw}/good.jsonl", "--output_dir", "{raw}/good.jsonl",
                                "--tokenizer_dir", "{tok}"], ["good.jsonl", "is a file", "folder"]),
    "prepare-no-inputs": (["prepare", "--output_dir", "{out}", "--tokenizer_dir", "{tok}"], ["no inputs", "hf_dataset"]),
    "prepare-input-missing": (["prepare", "--inputs+", "{root}/nope.jsonl", "--output_dir", "{out}", "--tokenizer_dir", "{tok}"],
                              ["nope.jsonl", "does not exist"]),
    "prepare-input-extension": (["prepare", "--inputs+", "{raw}/table.csv", "--output_dir", "{out}", "--tokenizer_dir", "{tok}"],
                                ["table.csv", ".jsonl", ".parquet"]),
    "prepare-glob-empty": (["prepare", "--inputs+", "{raw}/*.xyz", "--output_dir", "{out}", "--tokenizer_dir", "{tok}"],
                           ["*.xyz", "matches no files"]),
    "prepare-shard-name": (["prepare", "--inputs+", "{raw}/good.jsonl", "--output_dir", "{out}", "--tokenizer_dir", "{tok}",
                            "--shard", "Bad!"], ["'Bad!'", "'c1' code"]),
    "prepare-val-fraction": (["prepare", "--inputs+", "{raw}/good.jsonl", "--output_dir", "{out}", "--tokenizer_dir", "{tok}",
                              "--val_fraction", "1.5"], ["val_fraction=1.5", "[0, 1)"]),
    "prepare-val-both": (["prepare", "--inputs+", "{raw}/good.jsonl", "--output_dir", "{out}", "--tokenizer_dir", "{tok}",
                          "--val_fraction", "0.1", "--val_count", "3"], ["val_fraction (0.1)", "val_count (3)", "not both"]),
    "prepare-val-count-neg": (["prepare", "--inputs+", "{raw}/good.jsonl", "--output_dir", "{out}", "--tokenizer_dir", "{tok}",
                               "--val_count", "-1"], ["val_count=-1", ">= 0"]),
    "prepare-batch-size-0": (["prepare", "--inputs+", "{raw}/good.jsonl", "--output_dir", "{out}", "--tokenizer_dir", "{tok}",
                              "--batch_size", "0"], ["batch_size=0", ">= 1"]),
    "prepare-chunk-tokens-0": (["prepare", "--inputs+", "{raw}/good.jsonl", "--output_dir", "{out}", "--tokenizer_dir", "{tok}",
                                "--chunk_tokens", "0"], ["chunk_tokens=0", ">= 1"]),
    "prepare-num-workers-0": (["prepare", "--inputs+", "{raw}/good.jsonl", "--output_dir", "{out}", "--tokenizer_dir", "{tok}",
                               "--num_workers", "0"], ["num_workers=0", ">= 1"]),
    "prepare-skip-docs-neg": (["prepare", "--inputs+", "{raw}/good.jsonl", "--output_dir", "{out}", "--tokenizer_dir", "{tok}",
                               "--skip_docs", "-1"], ["skip_docs=-1", ">= 0"]),
    "prepare-max-docs-0": (["prepare", "--inputs+", "{raw}/good.jsonl", "--output_dir", "{out}", "--tokenizer_dir", "{tok}",
                            "--max_docs", "0"], ["max_docs=0", ">= 1"]),
    "prepare-overwrite-and-resume": (["prepare", "--inputs+", "{raw}/good.jsonl", "--output_dir", "{out}", "--tokenizer_dir",
                                      "{tok}", "--overwrite", "true", "--resume", "true"], ["overwrite or resume", "not both"]),
    "prepare-tokenizer-empty": (["prepare", "--inputs+", "{raw}/good.jsonl", "--output_dir", "{out}", "--tokenizer_dir",
                                 "{root}/empty"], ["empty", "tokenizer.json", "tokenizer.model"]),
    "prepare-tokenizer-missing": (["prepare", "--inputs+", "{raw}/good.jsonl", "--output_dir", "{out}", "--tokenizer_dir",
                                   "{root}/nope"], ["nope", "not a folder", "train-tokenizer"]),
    "prepare-invalid-utf8": (["prepare", "--inputs+", "{raw}/latin1.txt", "--output_dir", "{out}", "--tokenizer_dir", "{tok}"],
                             ["latin1.txt", "invalid UTF-8 at byte 3", "invalid_utf8=replace", "invalid_utf8=skip"]),
    "prepare-invalid-utf8-mode": (["prepare", "--inputs+", "{raw}/good.jsonl", "--output_dir", "{out}", "--tokenizer_dir",
                                   "{tok}", "--invalid_utf8", "ignore"], ["'ignore'", "replace", "skip"]),
    "prepare-bad-json": (["prepare", "--inputs+", "{raw}/broken.jsonl", "--output_dir", "{out}", "--tokenizer_dir", "{tok}"],
                         ["broken.jsonl:2", "invalid JSON"]),
    "prepare-text-field": (["prepare", "--inputs+", "{raw}/nofield.jsonl", "--output_dir", "{out}", "--tokenizer_dir", "{tok}"],
                           ["'text'", "['body']"]),
    "prepare-existing-output": (["prepare", "--inputs+", "{raw}/good.jsonl", "--output_dir", "{root}/prepared",
                                 "--tokenizer_dir", "{tok}"], ["already exists", "overwrite=True", "resume=True"]),
    # ---- train-tokenizer
    "tokenizer-no-inputs": (["train-tokenizer", "--out_dir", "{out}"], ["no inputs", "--inputs+"]),
    "tokenizer-input-missing": (["train-tokenizer", "--inputs+", "{root}/nope.txt", "--out_dir", "{out}"], ["nope.txt", "does not exist"]),
    "tokenizer-vocab-small": (["train-tokenizer", "--inputs+", "{raw}/good.jsonl", "--out_dir", "{out}", "--vocab_size", "10"],
                              ["vocab_size=10", "at least 257"]),
    "tokenizer-max-docs-0": (["train-tokenizer", "--inputs+", "{raw}/good.jsonl", "--out_dir", "{out}", "--max_docs", "0"],
                             ["max_docs=0", ">= 1"]),
    "tokenizer-min-frequency-0": (["train-tokenizer", "--inputs+", "{raw}/good.jsonl", "--out_dir", "{out}",
                                   "--min_frequency", "0"], ["min_frequency=0", ">= 1"]),
    "tokenizer-invalid-utf8": (["train-tokenizer", "--inputs+", "{raw}/latin1.txt", "--out_dir", "{out}"],
                               ["latin1.txt", "invalid UTF-8", "invalid_utf8=replace"]),
    "tokenizer-out-is-file": (["train-tokenizer", "--inputs+", "{raw}/good.jsonl", "--out_dir", "{raw}/good.jsonl",
                               "--vocab_size", "300"], ["good.jsonl", "is a file", "folder"]),
    # ---- inspect-mix
    "inspect-extra-types": (["inspect-mix", "--data_path", "{root}/data", "--extra_shard_types", "{{legal:l}}"],
                            ["extra_shard_types='{legal:l}'", "dict[str, str]"]),
    "inspect-mix-config-missing": (["inspect-mix", "--data_path", "{root}/data", "--mix_config_path", "{root}/nope.json"],
                                   ["nope.json", "does not exist"]),
    "inspect-literal-unknown-shard": (["inspect-mix", "--data_path", "{root}/data", "--literal_weights_str", "main/9:1.0"],
                                      ["'main/9'", "main/1"]),
    "inspect-data-path-missing": (["inspect-mix", "--data_path", "{root}/nope"], ["nope"]),
    "inspect-mix-unknown-type": (["inspect-mix", "--data_path", "{root}/data", "--mix_weights_str", "lawz:1"], ["lawz", "main"]),
    "inspect-seq-len-0": (["inspect-mix", "--data_path", "{root}/data", "--max_seq_length", "0"], ["max_seq_length=0", ">= 1"]),
    "inspect-tokens-neg": (["inspect-mix", "--data_path", "{root}/data", "--tokens", "-1"], ["tokens=-1", ">= 1"]),
    # ---- fork
    "fork-source-missing": (["fork", "--from", "{root}/nope", "--to", "{out}"], ["nope"]),
    "fork-source-not-checkpoint": (["fork", "--from", "{root}/not_a_ckpt", "--to", "{out}"], ["not_a_ckpt"]),
    # ---- evaluate
    "evaluate-checkpoint-missing": (["evaluate", "{root}/nope"], ["nope", "does not exist"]),
    "evaluate-not-checkpoint": (["evaluate", "{root}/not_a_ckpt"], ["not_a_ckpt", "lit_model.pth"]),
    "evaluate-batch-size-0": (["evaluate", "{root}/not_a_ckpt", "--batch_size", "0"], ["batch_size=0", ">= 1"]),
    "evaluate-dtype": (["evaluate", "{root}/not_a_ckpt", "--dtype", "fp8"], ["'fp8'", "bfloat16", "float32"]),
    "evaluate-device": (["evaluate", "{root}/not_a_ckpt", "--device", "gpu"], ["'gpu'", "cuda:N", "cpu"]),
    "evaluate-limit-0": (["evaluate", "{root}/not_a_ckpt", "--limit", "0"], ["limit=0", "> 0"]),
    "evaluate-no-tasks": (["evaluate", "{root}/not_a_ckpt", "--tasks", ","], ["tasks=','", "demo_math_mc"]),
    "evaluate-fewshot-neg": (["evaluate", "{root}/not_a_ckpt", "--num_fewshot", "-1"], ["num_fewshot=-1", ">= 0"]),
    # ---- build-eval-tasks
    "eval-tasks-demo-missing": (["build-eval-tasks", "--demo_dir", "{root}/nope", "--out_dir", "{out}"],
                                ["nope", "main_heldout.jsonl"]),
    "eval-tasks-choices": (["build-eval-tasks", "--demo_dir", "{root}", "--out_dir", "{out}", "--n_choices", "1"],
                           ["n_choices", ">= 2", "1"]),
    "eval-tasks-max-examples": (["build-eval-tasks", "--demo_dir", "{root}", "--out_dir", "{out}", "--max_examples", "0"],
                                ["max_examples", ">= 1"]),
    # ---- convert-to-hf
    "convert-not-checkpoint": (["convert-to-hf", "{root}/not_a_ckpt", "{out}"], ["not_a_ckpt", "lit_model.pth"]),
    # ---- build-demo and demo (checked before minutes of work)
    "build-demo-main-shards": (["build-demo", "--out_dir", "{out}", "--main_shards", "0"], ["main_shards=0", ">= 1"]),
    "build-demo-val-fraction": (["build-demo", "--out_dir", "{out}", "--val_fraction", "1.5"], ["val_fraction=1.5", "(0, 1)"]),
    "build-demo-vocab": (["build-demo", "--out_dir", "{out}", "--vocab_size", "100"], ["vocab_size=100", "257"]),
    "build-demo-chunk-tokens": (["build-demo", "--out_dir", "{out}", "--chunk_tokens", "0"], ["chunk_tokens=0", ">= 1"]),
    "demo-fork-step": (["demo", "--out_dir", "{out}", "--fork_step", "0"], ["fork_step=0", ">= 1"]),
    "demo-eval-limit": (["demo", "--out_dir", "{out}", "--eval_limit", "0"], ["eval_limit=0", ">= 1"]),
    # ---- the CLI itself
    "cli-unknown-command": (["pretrian"], ["'pretrian'", "pretrain"]),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_is_named(case, world, tmp_path, capsys, monkeypatch):
    argv, expected = CASES[case]
    out = tmp_path / "out"
    root = world["root"]
    subst = {"cfg": world["cfg"], "out": out, "root": root, "raw": world["raw"], "tok": world["tok"], "other": world["other"]}
    argv = [a.format(**{k: str(v) for k, v in subst.items()}) for a in argv]
    monkeypatch.chdir(tmp_path)  # relative defaults (data/demo, ...) resolve inside the test folder
    before = sorted(p.name for p in tmp_path.iterdir())
    snapshot = _tree(root)
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    assert e.value.code not in (0, None), f"{case}: exit status {e.value.code!r}"
    captured = capsys.readouterr()
    err = captured.err + (e.value.code if isinstance(e.value.code, str) else "")
    assert "Traceback" not in err + captured.out
    for s in expected:
        assert s in err, f"{case}: {s!r} not in:\n{err}"
    assert len(err.strip().splitlines()) <= 6, f"{case}: a short message, not a usage dump:\n{err}"
    assert not out.exists(), f"{case}: left {sorted(str(p) for p in out.rglob('*'))}"
    assert sorted(p.name for p in tmp_path.iterdir()) == before, f"{case}: wrote into the working folder"
    assert _tree(root) == snapshot, f"{case}: changed the shared inputs"


def _tree(root: Path) -> list:
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*") if p.is_file())


def test_cli_optimizer_override_wins(world, tmp_path):
    """`--optimizer.init_args.lr` on the command line overrides the YAML (it was silently dropped)."""
    from litgpt_ext import checkpoint as ckpt

    out = tmp_path / "run"
    cli_main(["pretrain", "--config", str(world["cfg"]), "--out_dir", str(out), "--train.max_iters", "1",
              "--optimizer.init_args.lr", "0.02", "--optimizer.weight_decay", "0.5"])
    state = ckpt.load_training_state(out / "final")
    assert state["schedule"]["peak_lr"] == pytest.approx(0.02)
    saved = yaml.safe_load((out / "final" / "hyperparameters.yaml").read_text())["optimizer"]
    assert saved == {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.02, "weight_decay": 0.5}}


def test_prepare_invalid_utf8_replace_and_skip_are_counted(world, tmp_path, capsys):
    for mode, docs in (("replace", 1), ("skip", 0)):
        out = tmp_path / mode
        cli_main(["prepare", "--inputs+", str(world["raw"] / "latin1.txt"), "--inputs+", str(world["raw"] / "good.jsonl"),
                  "--output_dir", str(out), "--tokenizer_dir", str(world["tok"]), "--invalid_utf8", mode])
        meta = json.loads((out / "1" / "prepare_meta.json").read_text())
        assert meta["stats"]["invalid_utf8_documents"] == 1 and meta["stats"]["invalid_utf8_bytes"] == 2
        assert meta["stats"]["train_documents"] == len(TEXTS) + docs
        assert 0 < meta["max_token_id"] < 300
        assert "invalid UTF-8" in capsys.readouterr().out
