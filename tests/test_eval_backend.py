"""The lm-eval backend scores exactly what a direct forward pass of the model gives."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from litgpt import GPT
from lm_eval.api.instance import Instance

sys.path.insert(0, str(Path(__file__).parent))
from eval_fixtures import EOS, arithmetic_docs, save_checkpoint, tiny_config, train_tokenizer  # noqa: E402

from litgpt_ext.eval.lm import LitGPTExtLM  # noqa: E402

BLOCK = 32


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("backend")
    texts = [d["text"] for d in arithmetic_docs(200)] + ["def f(x):\n    return x + 1\n"] * 20
    tok_dir = train_tokenizer(root / "tok", texts)
    torch.manual_seed(0)
    model = GPT(tiny_config("pythia", vocab_size=320, block_size=BLOCK))
    return save_checkpoint(root / "run" / "step-00000010", model, tok_dir, wrap=False), model


def _req(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def _manual_logprob(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    toks = (ctx + cont)[-(BLOCK + 1):]
    with torch.no_grad():
        logp = model(torch.tensor([toks[:-1]])).log_softmax(-1)[0]
    pos = range(len(toks) - 1 - len(cont), len(toks) - 1)
    lp = sum(float(logp[p, t]) for p, t in zip(pos, cont))
    greedy = all(int(logp[p].argmax()) == t for p, t in zip(pos, cont))
    return lp, greedy


def test_loglikelihood_matches_direct_forward_and_is_batch_invariant(ckpt):
    path, model = ckpt
    lm = LitGPTExtLM(pretrained=str(path), batch_size=3, device="cpu")
    long_ctx = " ".join(f"What is {i} plus {i}?" for i in range(12))  # far beyond block_size: left-truncated
    pairs = [
        ("Question: What is 2 plus 3?\nAnswer:", " 5"),
        ("Question: What is 2 plus 3?\nAnswer:", " 6"),  # same context, one-token continuations: cached path
        ("Question: What is 2 plus 3?\nAnswer:", " 15"),
        ("def f(x):\n", "    return x + 1"),
        (long_ctx, " Answer: 7"),
        ("", "What is 1 plus 1?"),  # empty context: conditioned on the prefix token
    ]
    got = lm.loglikelihood([_req("loglikelihood", c, x) for c, x in pairs], disable_tqdm=True)
    for (c, x), (lp, greedy) in zip(pairs, got):
        if c:
            ctx, cont = lm._encode_pair(c, x)
        else:
            ctx, cont = [lm.prefix_token_id], lm.tok_encode(x)
        want_lp, want_greedy = _manual_logprob(model, ctx, cont)
        assert lp == pytest.approx(want_lp, abs=1e-4), (c, x)
        assert greedy == want_greedy
        assert lp < 0
    lm.batch_size = 1
    again = lm.loglikelihood([_req("loglikelihood", c, x) for c, x in pairs], disable_tqdm=True)
    assert [a for a, _ in again] == pytest.approx([a for a, _ in got], abs=1e-4)


def test_loglikelihood_rolling_windows_over_block_size(ckpt):
    path, model = ckpt
    lm = LitGPTExtLM(pretrained=str(path), batch_size=4, device="cpu")
    short = "Question: What is 4 plus 4?"
    long = " ".join(d["text"] for d in arithmetic_docs(8, seed=3))
    got = lm.loglikelihood_rolling([_req("loglikelihood_rolling", s) for s in (short, long)], disable_tqdm=True)
    for s, lp in zip((short, long), got):
        toks = lm.tok_encode(s)
        assert len(toks) > 0
        # Disjoint windows of up to BLOCK predicted tokens, each scored from a full block of input
        # (_manual_logprob keeps the last BLOCK+1 tokens): lm-eval's context_len=1 convention.
        want, start = 0.0, 0
        while start < len(toks):
            end = min(start + BLOCK, len(toks))
            ctx = [lm.prefix_token_id] + toks[:start]
            want += _manual_logprob(model, ctx, toks[start:end])[0]
            start = end
        assert lp == pytest.approx(want, abs=1e-3)
    assert len(lm.tok_encode(long)) > 2 * BLOCK  # the long doc really spans several windows


def test_generate_until_is_greedy_and_stops(ckpt):
    path, model = ckpt
    lm = LitGPTExtLM(pretrained=str(path), batch_size=2, device="cpu")
    prompts = ["Question: What is 1 plus", "def f(x):", "Answer: 1"]
    gen = {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}
    got = lm.generate_until([_req("generate_until", p, dict(gen)) for p in prompts], disable_tqdm=True)
    for p, text in zip(prompts, got):
        toks = lm.tok_encode(p)
        out = []
        for _ in range(6):
            with torch.no_grad():
                nxt = int(model(torch.tensor([toks + out]))[0, -1].argmax())
            out.append(nxt)
            if nxt == lm.eot_token_id or "\n" in lm.tok_decode(out):
                break
        assert text == lm.tok_decode(out).split("\n")[0].replace(EOS, "")
        assert "\n" not in text


def test_bad_arguments_name_the_culprit(ckpt, tmp_path):
    path, _ = ckpt
    with pytest.raises(ValueError, match="batch_size"):
        LitGPTExtLM(pretrained=str(path), batch_size="auto")
    with pytest.raises(ValueError, match="dtype"):
        LitGPTExtLM(pretrained=str(path), dtype="float8")
    with pytest.raises(FileNotFoundError, match="lit_model.pth"):
        LitGPTExtLM(pretrained=str(tmp_path))
