"""Loglikelihood throughput: our lm-eval backend vs lm-eval's HF backend on the converted model.

Both backends score the same multiple-choice-shaped requests (shared contexts, short
continuations, as in arc/hellaswag-style tasks) with the same weights: our checkpoint natively,
and its `convert-to-hf` export through `lm_eval.models.huggingface.HFLM`. Reports requests/s for
each (best of `--repeats`), the ratio ours/HF, and the largest logprob difference between them
(a correctness check: the same model must give the same numbers).

    PYTHONPATH=. python benchmarks/lm_eval_backend.py [--n_layer 4 --n_embd 256 --batch_size 16 ...]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = ("the river model token market village answer number code function value step train "
             "data mixture expert layer return total result farmer spring autumn boat field").split()
    out = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.33:
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            out.append(f"Question: What is {a} plus {b}?\nAnswer: {a + b}")
        elif kind < 0.66:
            i = rng.randint(0, 99)
            out.append(f"def f{i}(x, y):\n    total = x * {i} + y\n    return total - {rng.randint(0, 9)}\n")
        else:
            out.append(" ".join(rng.choice(words) for _ in range(rng.randint(8, 30))).capitalize() + ".")
    return out


def build_checkpoint(root: Path, args) -> Path:
    from litgpt import GPT, Config
    from litgpt.utils import save_config
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(make_texts(3000, seed=0), trainer)
    ckpt = root / "final"
    ckpt.mkdir(parents=True)
    tok.save(str(ckpt / "tokenizer.json"))
    (ckpt / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", '
        '"add_bos_token": false, "model_max_length": %d}' % args.block_size)
    vocab = tok.get_vocab_size()
    # A larger padded vocab gives the LM head the size it has in real models (32k-50k rows).
    padded = max(vocab, args.padded_vocab_size)
    config = Config(name="bench-pythia", block_size=args.block_size, vocab_size=vocab, padded_vocab_size=padded,
                    n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, rotary_percentage=0.25,
                    parallel_residual=True, bias=True)
    torch.manual_seed(0)
    model = GPT(config)
    torch.save({"model": model.state_dict()}, ckpt / "lit_model.pth")
    save_config(config, ckpt)
    return ckpt


def make_requests(n_contexts: int, n_choices: int, max_ctx_words: int, seed: int):
    from lm_eval.api.instance import Instance

    rng = random.Random(seed)
    texts = make_texts(4 * n_contexts, seed=seed)
    reqs = []
    for _ in range(n_contexts):
        ctx = " ".join(rng.sample(texts, 6))
        ctx = " ".join(ctx.split(" ")[: rng.randint(max_ctx_words // 4, max_ctx_words)])
        for _ in range(n_choices):
            cont = " " + " ".join(rng.choice(texts).split()[: rng.randint(1, 6)])
            reqs.append(Instance(request_type="loglikelihood", doc={}, arguments=(ctx, cont), idx=len(reqs)))
    return reqs


def timed(lms: dict, reqs, repeats: int) -> dict[str, tuple[float, list, list[float]]]:
    """Best-of-`repeats` wall time per backend, runs interleaved so load drifts hit all alike."""
    for lm in lms.values():
        lm.loglikelihood(reqs[: max(1, len(reqs) // 10)], disable_tqdm=True)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in lms}
    outs: dict[str, list] = {}
    for _ in range(repeats):
        for name, lm in lms.items():
            t0 = time.perf_counter()
            outs[name] = lm.loglikelihood(reqs, disable_tqdm=True)
            times[name].append(time.perf_counter() - t0)
    return {k: (min(times[k]), outs[k], times[k]) for k in lms}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=256)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--block_size", type=int, default=512)
    p.add_argument("--vocab_size", type=int, default=2048, help="BPE vocab trained on synthetic text")
    p.add_argument("--padded_vocab_size", type=int, default=0, help="LM head rows (0: the tokenizer's vocab)")
    p.add_argument("--n_contexts", type=int, default=64)
    p.add_argument("--n_choices", type=int, default=4)
    p.add_argument("--max_ctx_words", type=int, default=160)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import logging

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    from lm_eval.models.huggingface import HFLM

    from litgpt_ext.eval.convert import convert_to_hf
    from litgpt_ext.eval.lm import LitGPTExtLM

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_checkpoint(Path(tmp), args)
        hf_dir = convert_to_hf(ckpt, Path(tmp) / "hf")
        reqs = make_requests(args.n_contexts, args.n_choices, args.max_ctx_words, seed=1)
        ours = LitGPTExtLM(pretrained=str(ckpt), batch_size=args.batch_size, device=args.device, dtype=args.dtype)
        hf = HFLM(pretrained=str(hf_dir), batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                  max_length=args.block_size)
        n_tok = [len(c) + len(x) for _, c, x in [(None, *ours._encode_pair(*r.args)) for r in reqs]]
        params = sum(p.numel() for p in hf._model.parameters())
        res = timed({"hf": hf, "ours": ours}, reqs, args.repeats)
        t_hf, out_hf, all_hf = res["hf"]
        t_ours, out_ours, all_ours = res["ours"]
        max_diff = max(abs(a[0] - b[0]) for a, b in zip(out_ours, out_hf))
        same_greedy = sum(a[1] == b[1] for a, b in zip(out_ours, out_hf)) / len(reqs)

    n = len(reqs)
    print(f"model: pythia-like {args.n_layer}x{args.n_embd}, {params / 1e6:.2f}M params, "
          f"vocab {args.vocab_size} (head {max(args.vocab_size, args.padded_vocab_size)}), "
          f"block {args.block_size}; device {args.device} {args.dtype}, torch threads {torch.get_num_threads()}")
    print(f"requests: {n} loglikelihood ({args.n_contexts} contexts x {args.n_choices} continuations), "
          f"mean {statistics.mean(n_tok):.0f} tokens/request, batch_size {args.batch_size}, best of {args.repeats}")
    print(f"lm-eval HF backend (HFLM, converted): {n / t_hf:8.1f} req/s  (runs: {', '.join(f'{t:.2f}s' for t in all_hf)})")
    print(f"litgpt_ext backend (native):          {n / t_ours:8.1f} req/s  (runs: {', '.join(f'{t:.2f}s' for t in all_ours)})")
    print(f"ratio ours/HF: {t_hf / t_ours:.2f}x; max |logprob diff| {max_diff:.2e}; is_greedy agreement {same_greedy:.1%}")


if __name__ == "__main__":
    main()
