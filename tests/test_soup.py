"""litgpt-ext soup: weighted means of checkpoints (dense and MoE) that evaluate/convert load."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from litgpt import GPT

sys.path.insert(0, str(Path(__file__).parent))
from eval_fixtures import save_checkpoint, tiny_config, train_tokenizer  # noqa: E402

from litgpt_ext.checkpoint import load_model_state  # noqa: E402
from litgpt_ext.checkpoint.loading import load_model  # noqa: E402
from litgpt_ext.soup import soup  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok"), ["What is 1 plus 2?\nAnswer: 3"] * 20, vocab_size=280)


def ckpt(path: Path, tok_dir: Path, seed: int, wrap: bool = True, **cfg) -> Path:
    torch.manual_seed(seed)
    return save_checkpoint(path, GPT(tiny_config("pythia", vocab_size=280, **cfg)), tok_dir, wrap=wrap)


def test_soup_of_identical_checkpoints_equals_them(tmp_path, tok_dir):
    a = ckpt(tmp_path / "a", tok_dir, 0)
    b = ckpt(tmp_path / "b", tok_dir, 0, wrap=False)  # litgpt's bare lit_model.pth works too
    out = soup([a, b], tmp_path / "soup")
    sd, ref = load_model_state(out), load_model_state(a)
    assert set(sd) == set(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
    assert not (out / "training_state.pth").exists()
    hp = yaml.safe_load((out / "hyperparameters.yaml").read_text())
    assert hp["soup"]["weights"] == [0.5, 0.5] and len(hp["soup"]["ingredients"]) == 2


def test_soup_is_the_elementwise_weighted_mean_and_loads_for_eval(tmp_path, tok_dir):
    a, b, c = (ckpt(tmp_path / n, tok_dir, s) for n, s in (("a", 0), ("b", 1), ("c", 2)))
    sa, sb, sc = (load_model_state(p) for p in (a, b, c))
    out = soup([a, b], tmp_path / "mean")
    sd = load_model_state(out)
    for k in sa:
        assert torch.allclose(sd[k], (sa[k] + sb[k]) / 2, atol=1e-7), k
    # weights that do not sum to 1 are normalised: 2:1:1 == 0.5, 0.25, 0.25
    out = soup([a, b, c], tmp_path / "w", weights=[2, 1, 1])
    sd = load_model_state(out)
    for k in sa:
        assert torch.allclose(sd[k], 0.5 * sa[k] + 0.25 * sb[k] + 0.25 * sc[k], atol=1e-6), k
    assert yaml.safe_load((out / "hyperparameters.yaml").read_text())["soup"]["weights"] == [0.5, 0.25, 0.25]
    # evaluate's loader takes it as is and computes with the averaged weights
    model, _ = load_model(out, device="cpu", dtype="float32")
    assert torch.equal(model.transformer.wte.weight, sd["transformer.wte.weight"])
    with pytest.raises(ValueError, match="one weight per checkpoint"):
        soup([a, b], tmp_path / "x", weights=[1.0])
    with pytest.raises(ValueError, match="must be >= 0 with a positive sum"):
        soup([a, b], tmp_path / "x", weights=[1.0, -1.0])
    with pytest.raises(FileExistsError, match="--overwrite true"):
        soup([a, b], tmp_path / "mean")


def test_mismatches_are_refused_and_named(tmp_path, tok_dir):
    a = ckpt(tmp_path / "a", tok_dir, 0)
    wide = ckpt(tmp_path / "wide", tok_dir, 0, n_embd=128)
    with pytest.raises(ValueError, match="model_config.yaml of .*wide differs .*n_embd: 64 vs 128"):
        soup([a, wide], tmp_path / "x")
    # same config file, different tensor shape (e.g. a hand-edited checkpoint)
    bad = ckpt(tmp_path / "bad", tok_dir, 1)
    sd = load_model_state(bad)
    sd = {k: v.clone() for k, v in sd.items()}
    sd["lm_head.weight"] = torch.zeros(10, 64)
    torch.save({"model": sd}, bad / "lit_model.pth")
    with pytest.raises(ValueError, match=r"shape mismatch for 'lm_head.weight': \(10, 64\) in .*bad vs \(280, 64\)"):
        soup([a, bad], tmp_path / "x")
    del sd["lm_head.weight"]
    torch.save({"model": sd}, bad / "lit_model.pth")
    with pytest.raises(ValueError, match=r"missing \['lm_head.weight'\]"):
        soup([a, bad], tmp_path / "x")
    moe = ckpt(tmp_path / "moe", tok_dir, 1)
    (moe / "hyperparameters.yaml").write_text("moe: {gate: sigmoid}\n")
    with pytest.raises(ValueError, match="MoE options .* gate: '<missing>' vs 'sigmoid'"):
        soup([a, moe], tmp_path / "x")


@pytest.mark.slow
def test_moe_soup_via_cli(tmp_path, tok_dir):
    """An MoE model (our grouped experts) soups too, and the CLI takes the checkpoints positionally."""
    from litgpt_ext.model import build_model, load_moe_args

    cfg = tiny_config("llama", vocab_size=280, mlp_class_name="LLaMAMoE", n_expert=4, n_expert_per_token=2,
                      moe_intermediate_size=32)
    paths = []
    for s in (0, 1):
        torch.manual_seed(s)
        d = save_checkpoint(tmp_path / f"moe{s}", build_model(cfg, None), tok_dir)
        (d / "hyperparameters.yaml").write_text("moe: {gate: softmax, aux_loss_coef: 0.01}\n")
        paths.append(d)
    r = subprocess.run([sys.executable, "-m", "litgpt_ext", "soup", str(paths[0]), str(paths[1]), "--out",
                        str(tmp_path / "moe_soup")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    sd, s0, s1 = (load_model_state(p) for p in (tmp_path / "moe_soup", *paths))
    assert any("experts" in k for k in sd)
    assert all(torch.allclose(sd[k], (s0[k] + s1[k]) / 2, atol=1e-7) for k in sd)
    assert load_moe_args(tmp_path / "moe_soup").aux_loss_coef == 0.01
    model, _ = load_model(tmp_path / "moe_soup", device="cpu", dtype="float32")  # what evaluate does
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 280)
    bad = subprocess.run([sys.executable, "-m", "litgpt_ext", "soup", str(paths[0]), "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode != 0 and "at least two checkpoints" in bad.stderr


def test_soup_converts_to_hf(tmp_path, tok_dir):
    pytest.importorskip("transformers")
    from litgpt_ext.eval.convert import convert_to_hf

    a, b = ckpt(tmp_path / "a", tok_dir, 0), ckpt(tmp_path / "b", tok_dir, 1)
    out = soup([a, b], tmp_path / "soup")
    hf = convert_to_hf(out, tmp_path / "hf")
    assert (hf / "config.json").is_file()


def test_soup_warns_when_the_ingredients_did_not_start_from_one_checkpoint(tmp_path, tok_dir, capsys):
    a, b, c = (ckpt(tmp_path / n, tok_dir, s) for n, s in (("a", 0), ("b", 1), ("c", 2)))
    for path, h in ((a, {"fork_from": "runs/base/step-00000066", "seed": 1}),
                    (b, {"fork_from": "runs/base/./step-00000066", "seed": 1}),  # the same fork point
                    (c, {"fork_from": None, "seed": 2})):
        (path / "hyperparameters.yaml").write_text(yaml.safe_dump(h))
    soup([a, b], tmp_path / "ab")
    assert "WARNING" not in capsys.readouterr().out  # data-order seeds of one fork: what soups are for
    soup([a, c], tmp_path / "ac")
    out = capsys.readouterr().out
    assert "did not start from one checkpoint" in out and "random init (seed=2)" in out
    assert "fork_from=runs/base/step-00000066" in out
