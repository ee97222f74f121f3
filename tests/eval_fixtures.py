"""Shared helpers for the eval tests: a tiny tokenizer, tiny checkpoints, tiny arithmetic data."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from litgpt import GPT, Config
from litgpt.utils import save_config

EOS = "<|endoftext|>"


def arithmetic_docs(n: int, seed: int = 0, lo: int = 0, hi: int = 9) -> list[dict]:
    """Math held-out lines as the demo builder writes them: text + question + answer."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        q, ans = f"What is {a} plus {b}?", str(a + b)
        docs.append({"text": f"Question: {q}\nAnswer: {ans}", "question": q, "answer": ans})
    return docs


def train_tokenizer(out_dir: Path, texts: list[str], vocab_size: int = 320) -> Path:
    """Byte-level BPE with an EOS token and the tokenizer_config.json that litgpt.Tokenizer reads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "bos_token": EOS,
        "unk_token": EOS, "add_bos_token": False, "model_max_length": 1024,
    }))
    return out_dir


def tiny_config(kind: str = "pythia", vocab_size: int = 320, block_size: int = 64, **kw) -> Config:
    if kind == "pythia":  # GPT-NeoX family: LayerNorm, parallel residual, partial rotary, biases
        base = dict(name="tiny-pythia", n_layer=2, n_head=4, n_embd=64, rotary_percentage=0.25,
                    parallel_residual=True, bias=True)
    elif kind == "llama":  # LLaMA family: RMSNorm, SwiGLU, GQA, no biases
        base = dict(name="tiny-llama", n_layer=2, n_head=4, n_query_groups=2, n_embd=64,
                    rotary_percentage=1.0, parallel_residual=False, bias=False, norm_class_name="RMSNorm",
                    mlp_class_name="LLaMAMLP", intermediate_size=176, norm_eps=1e-5)
    else:
        raise ValueError(kind)
    base.update(block_size=block_size, vocab_size=vocab_size, padded_vocab_size=vocab_size, padding_multiple=64)
    base.update(kw)
    return Config(**base)


def save_checkpoint(ckpt_dir: Path, model: GPT, tokenizer_dir: Path, wrap: bool = True) -> Path:
    """A litgpt-compatible checkpoint folder as the trainer writes it."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    torch.save({"model": sd} if wrap else sd, ckpt_dir / "lit_model.pth")
    save_config(model.config, ckpt_dir)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (ckpt_dir / f).write_bytes((tokenizer_dir / f).read_bytes())
    (ckpt_dir / "hyperparameters.yaml").write_text("model_name: tiny\n")
    return ckpt_dir


def train_tiny(model: GPT, token_ids: list[int], steps: int, seq_len: int = 48, batch: int = 16,
               lr: float = 3e-3, seed: int = 0) -> list[float]:
    """A few hundred plain AdamW steps (linearly decayed LR) on random windows of a token stream."""
    g = torch.Generator().manual_seed(seed)
    data = torch.tensor(token_ids, dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / steps)  # linear decay: a settled end point
    losses = []
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=g)
        x = torch.stack([data[s : s + seq_len] for s in starts])
        y = torch.stack([data[s + 1 : s + seq_len + 1] for s in starts])
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses
