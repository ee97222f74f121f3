"""What SFT training batches held, over all ranks, after a number of micro-batch rounds.

The loop's own `tokens` counter is its budget (steps x global_batch_size x max_seq_length), which
for padded SFT batches is not what was trained on. The batch order is a pure function of
(seed, epoch) (`epoch_batches`), so the counts after k rounds (a round = one micro-batch on every
rank) are computed exactly, also after a resume, without any state:

- `tokens`: real tokens (prompt included, padding excluded) of every example read;
- `tokens_padded`: what the batches held (each batch padded to its longest example);
- `target_tokens`: tokens that carry loss (the response; the whole example without mask_prompt).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from litgpt_ext.sft.data import SFTData

KEYS = ("tokens", "tokens_padded", "target_tokens")


class TokenCounter:
    def __init__(self, dm: "SFTData"):
        self.dm = dm
        self.lengths = np.array([len(ids) for ids, _ in dm.train_examples], dtype=np.int64)
        self.targets = np.array([int((lab[1:] != dm.ignore_index).sum()) for _, lab in dm.train_examples],
                                dtype=np.int64)
        self.per_round = dm.batch_size * dm.world_size
        self.rounds_per_epoch = -(-len(self.lengths) // self.per_round)
        self._cum: dict[int, np.ndarray] = {}

    def _epoch(self, epoch: int) -> np.ndarray:
        """[rounds_per_epoch, 3]: cumulative (tokens, tokens_padded, target_tokens) after each round."""
        if epoch not in self._cum:
            from litgpt_ext.sft.data import epoch_batches

            dm, W = self.dm, self.dm.world_size
            batches = epoch_batches(self.lengths, dm.batch_size, W, dm.seed, epoch, dm.length_grouped,
                                    dm.group_batches)
            rows = np.zeros((self.rounds_per_epoch, 3), dtype=np.int64)
            for k in range(self.rounds_per_epoch):
                for b in batches[k * W:(k + 1) * W]:
                    lens = self.lengths[b]
                    rows[k] += (lens.sum(), len(b) * lens.max(), self.targets[b].sum())
            if len(self._cum) > 8:
                self._cum.clear()
            self._cum[epoch] = np.cumsum(rows, axis=0)
        return self._cum[epoch]

    def after(self, rounds: int) -> dict[str, int]:
        """The counts over all ranks after `rounds` micro-batch rounds (= optimizer steps x accumulation)."""
        epochs, cursor = divmod(max(0, int(rounds)), self.rounds_per_epoch)
        total = np.zeros(3, dtype=np.int64)
        for e in range(epochs):
            total += self._epoch(e)[-1]
        if cursor:
            total += self._epoch(epochs)[cursor - 1]
        return dict(zip(KEYS, (int(x) for x in total)))
