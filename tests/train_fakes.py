"""A stand-in for `litgpt_ext.data.ShardedMixedDataset` with the same interface, used by the
training-loop tests until the real module lands (the loop only talks to that interface).

Two "shards" of arithmetic token patterns (`a`: +1 steps, `b`: +3 steps, mod vocab) blended by
weight; every sample is a deterministic function of (shard, cursor), so the state is the cursors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from litgpt.data import DataModule

VOCAB = 64


def _sample(shard: str, i: int, n: int) -> torch.Tensor:
    stride = 1 if shard == "a" else 3
    start = (i * 7 + (0 if shard == "a" else 5)) % VOCAB
    return (start + stride * torch.arange(n)) % VOCAB


class _Loader:
    def __init__(self, dm: "FakeMixedData"):
        self.dm = dm
        self.cursors = {"a": 0, "b": 0}  # global samples consumed per shard
        self.count = 0  # global samples drawn

    def _pick(self, k: int) -> str:
        # exact blend: sample k goes to shard a while a is behind its weight
        wa = self.dm.weights["a"]
        return "a" if self.cursors["a"] < wa * (k + 1) else "b"

    def __iter__(self):
        dm = self.dm
        while True:
            rows = []
            for _ in range(dm.world_size):  # draw a global micro-batch row-block, keep this rank's part
                for _ in range(dm.batch_size):
                    s = self._pick(self.count)
                    rows.append(_sample(s, self.cursors[s], dm.seq_len + 1))
                    self.cursors[s] += 1
                    self.count += 1
            mine = rows[dm.rank * dm.batch_size:(dm.rank + 1) * dm.batch_size]
            yield torch.stack(mine)

    def state_dict(self) -> dict:
        return {"cursors": dict(self.cursors), "count": self.count, "weights": dict(self.dm.weights)}

    def load_state_dict(self, sd: dict) -> None:
        self.cursors, self.count = dict(sd["cursors"]), sd["count"]
        if sd["weights"] != self.dm.weights:
            print(f"mix changed: {sd['weights']} -> {self.dm.weights}")

    def stats(self) -> dict:
        total = max(self.count, 1)
        return {"shards": {s: {"target_weight": self.dm.weights[s], "samples": c, "tokens": c * self.dm.seq_len,
                               "epochs": 0} for s, c in self.cursors.items()},
                "types": {s: {"target": self.dm.weights[s], "realized": c / total} for s, c in self.cursors.items()}}


class FakeMixedData(DataModule):
    def __init__(self, data_path: str = "unused", weight_a: float = 0.5, val_sets: Optional[dict] = None,
                 val_batches: int = 2, seed: int = 42):
        super().__init__()
        self.data_path, self.weight_a, self.seed, self.val_batches = data_path, weight_a, seed, val_batches
        self.val_sets = val_sets if val_sets is not None else {"general": "a", "domain": "b"}
        self.weights = {"a": weight_a, "b": 1.0 - weight_a}

    def connect(self, tokenizer=None, batch_size: int = 1, max_seq_length: Optional[int] = None, **kw) -> None:
        self.batch_size, self.seq_len = batch_size, max_seq_length

    def setup(self, stage: str = "", rank: int = 0, world_size: int = 1) -> None:
        self.rank, self.world_size = rank, world_size

    @property
    def resolved_mix(self) -> dict:
        return {"weights": dict(self.weights)}

    def train_dataloader(self):
        return _Loader(self)

    def val_dataloaders(self) -> dict:
        out = {}
        for name, shard in self.val_sets.items():
            out[name] = [torch.stack([_sample(shard, 10_000 + b * 97 + r, self.seq_len + 1)
                                      for r in range(self.batch_size)]) for b in range(self.val_batches)]
        return out


class SignalAfter(FakeMixedData):
    """Sends SIGUSR1 to this process after `n` batches (a SLURM preemption notice)."""

    def __init__(self, n: int = 5, **kw):
        super().__init__(**kw)
        self.n = n

    def train_dataloader(self):
        import os
        import signal

        inner, n = super().train_dataloader(), self.n

        class Loader:
            def __iter__(self):
                for i, b in enumerate(inner):
                    if i == n:
                        os.kill(os.getpid(), signal.SIGUSR1)
                    yield b

            def __getattr__(self, k):
                return getattr(inner, k)

        return Loader()


def kill_9_after_first_checkpoint(argv: list[str], out_dir: Path, env: dict, timeout: float = 240,
                                  after_step: int = -1) -> int:
    """Start the training command `argv` (writing into `out_dir`) and SIGKILL it as soon as its first
    checkpoint past `after_step` (e.g. a fork's step) is complete: no handler runs, whatever is on disk
    is what a resume gets. Returns the step of the newest checkpoint left; asserts the kill came before
    the run finished."""
    import signal
    import subprocess
    import time

    from litgpt_ext import checkpoint as ckpt

    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while (not any(s > after_step for s, _ in ckpt.list_checkpoints(out_dir)) and time.time() < deadline
           and proc.poll() is None):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (Path(out_dir) / "final").exists(), proc.returncode
    return ckpt.list_checkpoints(out_dir)[-1][0]
