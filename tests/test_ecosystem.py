"""Interop with litgpt's and lm-eval's own tools, MoE export, truncated choices, quiet logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from litgpt import GPT
from lm_eval.api.instance import Instance

sys.path.insert(0, str(Path(__file__).parent))
from eval_fixtures import arithmetic_docs, save_checkpoint, tiny_config, train_tokenizer  # noqa: E402

from litgpt_ext.eval.convert import convert_moe_to_litgpt  # noqa: E402
from litgpt_ext.model import MoEArgs, build_model  # noqa: E402
from litgpt_ext.progress import LogProgress, progress  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _env(**kw) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), **kw}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    texts = [d["text"] for d in arithmetic_docs(200)]
    return train_tokenizer(tmp_path_factory.mktemp("tok"), texts, vocab_size=300)


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory, tok_dir):
    """A dense checkpoint as the trainer writes it, plus the local task data for demo_math_mc."""
    root = tmp_path_factory.mktemp("dense")
    torch.manual_seed(0)
    ckpt = save_checkpoint(root / "run" / "final", GPT(tiny_config("pythia", vocab_size=300, block_size=64)), tok_dir)
    from litgpt_ext.eval.build_tasks import build_tasks

    (root / "demo" / "raw").mkdir(parents=True)
    (root / "demo" / "raw" / "math_heldout.jsonl").write_text("".join(json.dumps(d) + "\n" for d in arithmetic_docs(40, seed=1)))
    build_tasks(demo_dir=root / "demo", out_dir=root / "eval_tasks", max_examples=8)
    return ckpt, root / "eval_tasks"


# ------------------------------------------------------------------ MoE -> litgpt's layout
@pytest.mark.parametrize("moe_kw", [dict(), dict(n_shared_expert=1)])
def test_convert_moe_to_litgpt_gives_litgpt_the_same_logits(tmp_path, tok_dir, moe_kw):
    cfg = tiny_config("llama", vocab_size=300, block_size=32, mlp_class_name="LLaMAMoE", n_expert=4,
                      n_expert_per_token=2, moe_intermediate_size=32, **moe_kw)
    torch.manual_seed(0)
    ours = build_model(cfg, MoEArgs(aux_loss_coef=0.01)).eval()
    ckpt = save_checkpoint(tmp_path / "moe", ours, tok_dir)
    (ckpt / "hyperparameters.yaml").write_text("moe:\n  aux_loss_coef: 0.01\n")
    out = convert_moe_to_litgpt(ckpt, tmp_path / "lit")
    sd = torch.load(out / "lit_model.pth", weights_only=True)
    assert "transformer.h.0.mlp.experts.3.proj.weight" in sd and "model" not in sd
    from litgpt import Config

    ref = GPT(Config.from_file(out / "model_config.yaml")).eval()
    ref.load_state_dict(sd, strict=True)
    x = torch.randint(0, 300, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(ref(x), ours(x), rtol=1e-5, atol=1e-5)
    assert (out / "tokenizer.json").is_file()


def test_convert_moe_refuses_routing_litgpt_cannot_reproduce(tmp_path, tok_dir):
    cfg = tiny_config("llama", vocab_size=300, block_size=32, mlp_class_name="LLaMAMoE", n_expert=4,
                      n_expert_per_token=2, moe_intermediate_size=32)
    ckpt = save_checkpoint(tmp_path / "moe", build_model(cfg, MoEArgs(gate="sigmoid")), tok_dir)
    (ckpt / "hyperparameters.yaml").write_text("moe:\n  gate: sigmoid\n")
    with pytest.raises(ValueError, match="gate='sigmoid'.*allow_routing_change"):
        convert_moe_to_litgpt(ckpt, tmp_path / "lit")
    dense = save_checkpoint(tmp_path / "dense", GPT(tiny_config("pythia", vocab_size=300)), tok_dir)
    with pytest.raises(ValueError, match="dense model"):
        convert_moe_to_litgpt(dense, tmp_path / "lit2")


# ------------------------------------------------------------------ truncated continuations
def test_backend_refuses_continuations_longer_than_the_window(dense_ckpt):
    from litgpt_ext.eval.lm import LitGPTExtLM

    lm = LitGPTExtLM(pretrained=str(dense_ckpt[0]), device="cpu", max_length=16)
    long = " ".join(f"What is {i} plus {i}?" for i in range(10))
    ok = Instance(request_type="loglikelihood", doc={}, arguments=("Question:", " 5"), idx=0)
    bad = Instance(request_type="loglikelihood", doc={}, arguments=("Question: pick one", " " + long), idx=1)
    assert len(lm.loglikelihood([ok], disable_tqdm=True)) == 1
    with pytest.raises(ValueError, match=r"1 of 2 .*max_length=16.*'Question: pick one'"):
        lm.loglikelihood([ok, bad], disable_tqdm=True)


def test_prose_cloze_builder_keeps_choices_short():
    import random

    from litgpt_ext.eval.build_tasks import prose_items

    long_sent = "This sentence goes on " + "and on " * 200 + "forever."
    docs = [{"text": f"Doc {i} opens here. It has a second sentence. A third one follows here. "
                     + (long_sent + " " if i % 2 else "") + f"Then an ending number {i} arrives."} for i in range(12)]
    items = prose_items(docs, 4, random.Random(0), max_choice_chars=200)
    assert items and all(len(c) <= 200 for it in items for c in it["choices"])
    assert len(items) == len(docs)  # docs with one long sentence still give an item, from a short one


# ------------------------------------------------------------------ lm-eval's and litgpt's CLIs
@pytest.mark.slow
def test_lm_eval_cli_finds_our_backend_and_tasks(dense_ckpt, tmp_path):
    ckpt, data = dense_ckpt
    cmd = [sys.executable, "-m", "litgpt_ext", "lm-eval", "run", "--model", "litgpt_ext", "--model_args",
           f"pretrained={ckpt}", "--device", "cpu", "--tasks", "demo_math_mc", "--limit", "4", "--output_path", str(tmp_path / "res")]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(LITGPT_EXT_EVAL_DATA=str(data)), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "demo_math_mc" in p.stdout and "acc" in p.stdout
    assert "\r" not in p.stderr + p.stdout  # piped: no tqdm carriage returns


@pytest.mark.slow
def test_litgpt_evaluate_runs_our_tasks(dense_ckpt, tmp_path):
    pytest.importorskip("transformers")
    ckpt, data = dense_ckpt
    lit = tmp_path / "ckpt"
    lit.mkdir()
    # a checkpoint as litgpt writes it (bare state dict + config.json: what checkpoint/ writes)
    sd = torch.load(ckpt / "lit_model.pth", weights_only=True)["model"]
    torch.save(sd, lit / "lit_model.pth")
    for f in ("model_config.yaml", "tokenizer.json", "tokenizer_config.json"):
        (lit / f).write_bytes((ckpt / f).read_bytes())
    from litgpt import Config

    from litgpt_ext.eval.convert import hf_config, hf_family

    c = Config.from_file(lit / "model_config.yaml")
    hf_config(c, hf_family(c)).to_json_file(lit / "config.json")
    cmd = [sys.executable, "-m", "litgpt_ext", "litgpt", "evaluate", str(lit), "--tasks", "demo_math_mc",
           "--limit", "4", "--device", "cpu", "--out_dir", str(tmp_path / "ev")]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(LITGPT_EXT_EVAL_DATA=str(data)), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert 0.0 <= res["results"]["demo_math_mc"]["acc,none"] <= 1.0


# ------------------------------------------------------------------ progress
def test_log_progress_prints_rate_and_eta_lines_without_carriage_returns(capsys):
    import io

    buf = io.StringIO()  # not a TTY
    bar = progress(total=10, desc="score", unit="req", interval_s=0.0, stream=buf)
    assert isinstance(bar, LogProgress)
    with bar:
        for _ in range(10):
            bar.update(1)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 10 and "\r" not in buf.getvalue()  # one line per update; close adds none here
    assert lines[4].startswith("score: 5/10 (50%) req") and "req/s" in lines[4] and "ETA" in lines[4]
    assert "ETA" not in lines[-1] and "10/10 (100%)" in lines[-1]
    quiet = io.StringIO()
    with progress(total=3, disable=True, stream=quiet) as b:
        b.update(3)
    assert quiet.getvalue() == ""


@pytest.mark.slow
def test_piped_evaluate_log_has_no_carriage_returns(dense_ckpt, tmp_path):
    ckpt, data = dense_ckpt
    cmd = [sys.executable, "-m", "litgpt_ext", "evaluate", str(ckpt), "--tasks", "demo_math_mc", "--limit", "6",
           "--device", "cpu", "--eval_data_dir", str(data), "--out_dir", str(tmp_path / "a"), "--bootstrap_iters", "0"]
    env = _env(LITGPT_EXT_PROGRESS_INTERVAL="0")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    log = p.stdout + p.stderr
    assert log.count("\r") == 0
    assert "loglikelihood: 24/24 (100%) req" in log  # our backend's periodic lines instead of a bar
