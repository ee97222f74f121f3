"""torch.compile vs eager on CPU for the demo model's training step (same process, same weights).

    PYTHONPATH=$PWD python benchmarks/compile_cpu.py [--scope model|blocks] [--steps 20 --repeats 5 --threads 1]

The demo config's model (midtrain_configs/demo/pretrain.yaml: 4 layers x 128, 4 heads, vocab 4096,
seq 128, micro batch 8, fp32): forward, litgpt's chunked cross-entropy, backward, AdamW step. The
compiled copy goes through `litgpt_ext.train.speed.apply_compile` (inductor), as `speed.compile`
will in the loop. Compilation (the first steps) is timed separately; then blocks of `--steps`
steps alternate between the two models, `--repeats` times, and the median tokens/s is reported.

TODO(lead, issue 12): "our loop vs litgpt's, both compiled" needs `speed:` wired into the loop;
then run benchmarks/train_loop.py with compile on both sides (it replaces litgpt's torch.compile by
the identity today).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scope", choices=["model", "blocks"], default="model")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--micro", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from litgpt import Config
    from litgpt.utils import chunked_cross_entropy

    from litgpt_ext.model import build_model
    from litgpt_ext.train.speed import apply_compile

    cfg = Config(name="demo-tiny", block_size=128, n_layer=4, n_head=4, n_embd=128, vocab_size=4096,
                 padded_vocab_size=4096, bias=True)
    torch.manual_seed(0)
    eager = build_model(cfg)
    compiled = build_model(cfg)
    compiled.load_state_dict(eager.state_dict())
    apply_compile(compiled, args.scope)
    models = {"eager": eager, "compiled": compiled}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (args.micro, cfg.block_size + 1), generator=g) for _ in range(8)]

    def step(name: str, i: int) -> float:
        b = batches[i % len(batches)]
        loss = chunked_cross_entropy(models[name](b[:, :-1]), b[:, 1:])
        loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        return loss.item()

    t0 = time.perf_counter()
    first = {k: step(k, 0) for k in ("eager", "compiled")}
    step("compiled", 1)  # a second call: recompiles (e.g. dynamic shapes) show here, not in the timing
    print(f"[bench] compile + first steps: {time.perf_counter() - t0:.1f}s; first-step loss eager {first['eager']:.5f}"
          f" compiled {first['compiled']:.5f}", flush=True)
    step("eager", 1)
    tokens = args.steps * args.micro * cfg.block_size
    rates: dict[str, list[float]] = {"eager": [], "compiled": []}
    for rep in range(args.repeats):
        for name in (("eager", "compiled") if rep % 2 == 0 else ("compiled", "eager")):
            t = time.perf_counter()
            for i in range(args.steps):
                step(name, i)
            rates[name].append(tokens / (time.perf_counter() - t))
        print(f"[bench] repeat {rep}: eager {rates['eager'][-1]:,.0f} tok/s | compiled {rates['compiled'][-1]:,.0f} tok/s",
              flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    # the median of per-repeat ratios: each pair ran back to back, so slow drifts in machine load cancel
    paired = statistics.median(c / e for c, e in zip(rates["compiled"], rates["eager"]))
    print(f"[bench] demo model 4x128 seq 128 micro {args.micro}, fp32, {args.threads} thread(s), compile scope"
          f" {args.scope}: eager {med['eager']:,.0f} tok/s | compiled {med['compiled']:,.0f} tok/s (medians of"
          f" {args.repeats}) | compiled/eager = {paired:.3f} (median of per-repeat ratios)")


if __name__ == "__main__":
    main()
