"""`litgpt-ext extend-vocab`: new tokens encode to new ids, new rows are the mean of the old
sub-pieces' rows, old-token logits are unchanged, padded_vocab_size stays a multiple of
padding_multiple, and the refusals (tokens already in the vocabulary, an empty file, shards of the
old vocabulary in a run with the new one) are one-line errors of the real CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.eval_fixtures import save_checkpoint, tiny_config, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [f"the quick brown fox {i} jumps over the lazy dog near the river bank {i % 7}" for i in range(300)]
NEW = ["quick brown", " riverbank", "jumps over"]


def cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("LITGPT_EXT_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", "litgpt_ext", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _checkpoint(root: Path, padding_multiple: int, lm_head_bias: bool = False) -> tuple[Path, Path]:
    from litgpt import GPT

    tok = train_tokenizer(root / "tok", TEXTS, vocab_size=300)
    from tokenizers import Tokenizer

    n = Tokenizer.from_file(str(tok / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=n, padded_vocab_size=None, padding_multiple=padding_multiple, lm_head_bias=lm_head_bias)
    model = GPT(cfg)
    with torch.no_grad():  # random (not zero) biases, so the test sees them copied and averaged
        if lm_head_bias:
            model.lm_head.bias.normal_()
    return save_checkpoint(root / "ckpt", model, tok, wrap=False), tok


def _build(root: Path, mult: int, bias: bool) -> dict:
    ckpt, tok = _checkpoint(root, mult, bias)
    tokens = root / "new_tokens.txt"
    tokens.write_text("".join(t + "\n" for t in NEW))
    from litgpt_ext.prep.extend_vocab import extend_vocab

    record = extend_vocab(ckpt, tokens, root / "out")
    return {"root": root, "ckpt": ckpt, "tok": tok, "out": root / "out", "record": record, "mult": mult, "bias": bias}


@pytest.fixture(scope="module", params=[(64, False), (4, True)], ids=["fits-in-padding", "grows-with-bias"])
def extended(request, tmp_path_factory):
    mult, bias = request.param
    return _build(tmp_path_factory.mktemp(f"extend_{mult}"), mult, bias)


@pytest.fixture(scope="module")
def ext64(tmp_path_factory):
    """One extended checkpoint for the CLI cases."""
    return _build(tmp_path_factory.mktemp("extend_cli"), 64, False)


def test_new_tokens_encode_to_new_ids(extended):
    from litgpt import Tokenizer

    old, new = Tokenizer(extended["tok"]), Tokenizer(extended["out"])
    ids = {t["text"]: t["id"] for t in extended["record"]["tokens"]}
    base = old.processor.get_vocab_size(with_added_tokens=True)
    assert sorted(ids.values()) == list(range(base, base + len(NEW)))
    for t in NEW:
        assert new.encode(t).tolist() == [ids[t]]
        assert len(old.encode(t)) > 1
    text = "the quick brown fox jumps over the lazy dog"
    enc = new.encode(text).tolist()
    assert ids["quick brown"] in enc and ids["jumps over"] in enc
    assert new.decode(torch.tensor(enc)) == text
    # prepare (FastTokenizer) tokenizes with the new ids too
    from litgpt_ext.prep.tokenizer import FastTokenizer

    assert FastTokenizer(extended["out"]).encode_docs([text])[0][:-1] == enc


def test_rows_are_sub_piece_means_and_config_is_padded(extended):
    from litgpt_ext.checkpoint import load_model_state

    old, new = load_model_state(extended["ckpt"]), load_model_state(extended["out"])
    cfg_old = yaml.safe_load((extended["ckpt"] / "model_config.yaml").read_text())
    cfg = yaml.safe_load((extended["out"] / "model_config.yaml").read_text())
    mult = extended["mult"]
    top = max(t["id"] for t in extended["record"]["tokens"]) + 1
    assert cfg["vocab_size"] == top and cfg["padded_vocab_size"] % mult == 0
    assert cfg["padded_vocab_size"] == max(cfg_old["padded_vocab_size"], -(-top // mult) * mult)
    if mult == 64:
        assert cfg["padded_vocab_size"] == cfg_old["padded_vocab_size"]  # the new ids fit in the old padding
    else:
        assert cfg["padded_vocab_size"] > cfg_old["padded_vocab_size"]
    keys = ["transformer.wte.weight", "lm_head.weight"] + (["lm_head.bias"] if extended["bias"] else [])
    n_old = cfg_old["vocab_size"]
    for key in keys:
        assert new[key].shape[0] == cfg["padded_vocab_size"]
        torch.testing.assert_close(new[key][:n_old], old[key][:n_old], rtol=0, atol=0)
        for t in extended["record"]["tokens"]:
            torch.testing.assert_close(new[key][t["id"]], old[key][t["pieces"]].mean(dim=0), rtol=0, atol=1e-7)
    for k in set(old) - set(keys):  # everything else untouched
        torch.testing.assert_close(new[k], old[k], rtol=0, atol=0)


def test_old_token_logits_unchanged(extended):
    from litgpt import Tokenizer

    from litgpt_ext.checkpoint.loading import load_model

    old_model, _ = load_model(extended["ckpt"], "cpu", "float32")
    new_model, cfg = load_model(extended["out"], "cpu", "float32")
    ids = Tokenizer(extended["tok"]).encode("the lazy dog near the river bank 3 the quick").unsqueeze(0).long()
    with torch.no_grad():
        a, b = old_model(ids), new_model(ids)
    assert b.shape[-1] == cfg.padded_vocab_size
    n_old = old_model.config.vocab_size
    torch.testing.assert_close(b[..., :n_old], a[..., :n_old], rtol=0, atol=1e-6)


def test_record_names_old_tokenizer(extended):
    from litgpt_ext.data.vocab_record import extended_from
    from litgpt_ext.prep.tokenizer import tokenizer_digest

    rec = json.loads((extended["out"] / "vocab_extension.json").read_text())
    assert rec["old_tokenizer_digest"] == tokenizer_digest(extended["tok"])
    assert rec["new_tokenizer_digest"] == tokenizer_digest(extended["out"])
    assert extended_from(extended["out"]) == [tokenizer_digest(extended["tok"])]


def test_old_vocab_shards_are_refused(extended, tmp_path):
    """A run with the new tokenizer refuses shards that the old one prepared; mixing old and new shards
    is refused even with no tokenizer_dir to compare to."""
    from litgpt_ext.data.vocab_record import check_shard_tokenizers
    from litgpt_ext.prep.prepare import prepare

    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:20]))
    data = tmp_path / "data"
    prepare(inputs=[str(raw)], output_dir=data, shard="1", tokenizer_dir=extended["tok"], log_interval_s=100)
    prepare(inputs=[str(raw)], output_dir=data, shard="m1", tokenizer_dir=extended["out"], log_interval_s=100)
    with pytest.raises(ValueError, match=r"shard\(s\) main/1 .*extend-vocab.*re-prepare"):
        check_shard_tokenizers({"main/1": data / "1", "m1": data / "m1"}, extended["out"])
    with pytest.raises(ValueError, match=r"different tokenizers.*extend-vocab of"):
        check_shard_tokenizers({"main/1": data / "1", "m1": data / "m1"}, None)
    check_shard_tokenizers({"m1": data / "m1"}, extended["out"])  # the new vocabulary's shard is fine
    check_shard_tokenizers({"main/1": data / "1"}, extended["tok"])


# ---------------------------------------------------------------- refusals through the real CLI


def test_refusals_in_process(ext64, tmp_path, capsys):
    """The same refusals through `litgpt_ext.cli.main` in-process (fast): one line each."""
    from litgpt_ext.cli import main

    f = tmp_path / "t.txt"
    for content, needle in (("the\n", "already in the vocabulary"), ("\n", "holds no token"),
                            ("a b\na b\n", "more than once")):
        f.write_text(content)
        with pytest.raises(SystemExit) as e:
            main(["extend-vocab", "--checkpoint", str(ext64["ckpt"]), "--new_tokens", str(f), "--out_dir",
                  str(tmp_path / "o")])
        assert needle in str(e.value) and str(e.value).count("error:") == 1, e.value
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_cli_refuses_token_in_vocabulary(ext64, tmp_path):
    f = tmp_path / "tokens.txt"
    f.write_text("the\nbrand new token\n")
    proc = cli("extend-vocab", "--checkpoint", ext64["ckpt"], "--new_tokens", f, "--out_dir", tmp_path / "o")
    one_line_error(proc, "already in the vocabulary", "'the'")
    assert not (tmp_path / "o").exists()
    f.write_text(" riverbank\n")  # in the extended vocabulary: refused when extending it again
    proc = cli("extend-vocab", "--checkpoint", ext64["out"], "--new_tokens", f, "--out_dir", tmp_path / "o")
    one_line_error(proc, "already in the vocabulary", "' riverbank'")


@pytest.mark.slow
def test_cli_refuses_empty_file_and_missing_checkpoint(ext64, tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("\n  \n")
    one_line_error(cli("extend-vocab", "--checkpoint", ext64["ckpt"], "--new_tokens", f, "--out_dir", tmp_path / "o"),
                   "holds no token", "empty.txt")
    one_line_error(cli("extend-vocab", "--checkpoint", tmp_path / "nope", "--new_tokens", f, "--out_dir", tmp_path / "o"),
                   "checkpoint", "nope")


@pytest.mark.slow
def test_cli_pretrain_refuses_old_vocab_shard(ext64, tmp_path):
    """`pretrain` from the extended checkpoint with its tokenizer, on a shard the old tokenizer made."""
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:40]))
    from litgpt_ext.prep.prepare import prepare

    prepare(inputs=[str(raw)], output_dir=tmp_path / "data", shard="1", tokenizer_dir=ext64["tok"],
            log_interval_s=100)
    cfg = yaml.safe_load((ext64["out"] / "model_config.yaml").read_text())
    config = {
        "model_name": "tiny", "model_config": cfg, "precision": "32-true", "devices": 1, "logger_name": "csv",
        "data": {"class_path": "litgpt_ext.data.ShardedMixedDataset", "init_args": {"data_path": str(tmp_path / "data")}},
        "train": {"max_iters": 2, "global_batch_size": 2, "micro_batch_size": 2, "max_seq_length": 16, "min_lr": 1e-5},
        "eval": {"interval": 10, "max_iters": 1},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    proc = cli("pretrain", "--config", tmp_path / "cfg.yaml", "--out_dir", tmp_path / "run",
               "--tokenizer_dir", ext64["out"], "--initial_checkpoint_dir", ext64["out"], timeout=300)
    one_line_error(proc, "main/1", "extend-vocab", "re-prepare")
    # re-prepared with the new tokenizer, the same run trains from the extended checkpoint
    shutil.rmtree(tmp_path / "data" / "1")
    prepare(inputs=[str(raw)], output_dir=tmp_path / "data", shard="1", tokenizer_dir=ext64["out"],
            log_interval_s=100)
    proc = cli("pretrain", "--config", tmp_path / "cfg.yaml", "--out_dir", tmp_path / "run2",
               "--tokenizer_dir", ext64["out"], "--initial_checkpoint_dir", ext64["out"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run2" / "final" / "lit_model.pth").is_file()


def test_tied_embeddings_stay_tied(ext64, tmp_path):
    from litgpt_ext.checkpoint import load_model_state
    from litgpt_ext.prep.extend_vocab import extend_vocab

    sd = dict(load_model_state(ext64["ckpt"]))
    sd["lm_head.weight"] = sd["transformer.wte.weight"]  # one tensor, saved once
    tied = tmp_path / "tied"
    shutil.copytree(ext64["ckpt"], tied)
    torch.save(sd, tied / "lit_model.pth")
    rec = extend_vocab(tied, ext64["root"] / "new_tokens.txt", tmp_path / "out")
    new = load_model_state(tmp_path / "out")
    assert rec["tied_embeddings"]
    torch.testing.assert_close(new["lm_head.weight"], new["transformer.wte.weight"], rtol=0, atol=0)
    for t in rec["tokens"]:
        torch.testing.assert_close(new["lm_head.weight"][t["id"]], sd["transformer.wte.weight"][t["pieces"]].mean(0),
                                   rtol=0, atol=1e-7)
