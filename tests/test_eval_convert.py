"""convert-to-hf: Transformers reproduces our logits (GPT-NeoX and Llama families); MoE is refused."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from litgpt import GPT, Tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from eval_fixtures import save_checkpoint, tiny_config, train_tokenizer  # noqa: E402

from litgpt_ext.eval.convert import convert_to_hf, hf_family  # noqa: E402

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok"), ["What is 1 plus 2?\nAnswer: 3"] * 20, vocab_size=280)


@pytest.mark.parametrize(
    "kind, extra, hf_class",
    [
        ("pythia", {}, "GPTNeoXForCausalLM"),
        ("pythia", {"parallel_residual": False, "bias": False, "gelu_approximate": "tanh"}, "GPTNeoXForCausalLM"),
        ("llama", {}, "LlamaForCausalLM"),
    ],
)
def test_hf_logits_match_ours(tmp_path, tok_dir, kind, extra, hf_class):
    torch.manual_seed(0)
    model = GPT(tiny_config(kind, vocab_size=280, **extra)).eval()
    with torch.no_grad():  # move norms/biases off their init values so a mis-mapped one shows
        for name, p in model.named_parameters():
            if "norm" in name or "ln_f" in name or name.endswith(".bias"):
                p.add_(0.2 * torch.randn_like(p))
    ckpt = save_checkpoint(tmp_path / "final", model, tok_dir)
    out = convert_to_hf(ckpt, tmp_path / "hf")
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == hf_class
    x = torch.randint(0, 280, (2, 40))
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert ours.std() > 0.1  # not a degenerate comparison
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "What is 1 plus 2?"
    assert hf_tok.encode(text, add_special_tokens=False) == Tokenizer(ckpt).encode(text).tolist()


def test_unsupported_configs_are_refused_with_reason():
    with pytest.raises(ValueError, match="mixture-of-experts"):
        hf_family(tiny_config("llama", n_expert=4, n_expert_per_token=2, mlp_class_name="LLaMAMoE"))
    with pytest.raises(ValueError, match="rotary_percentage"):
        hf_family(tiny_config("llama", rotary_percentage=0.5))
    with pytest.raises(ValueError, match="n_query_groups"):
        hf_family(tiny_config("pythia", n_query_groups=2))
