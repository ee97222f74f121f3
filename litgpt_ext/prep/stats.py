"""What `litgpt-ext prepare` reports: the per-shard statistics and the periodic progress lines."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from litgpt_ext.progress import fmt_time


def fmt_int(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


@dataclass
class PrepareStats:
    shard: str
    documents: int = 0
    skipped_empty: int = 0
    tokens: int = 0
    train_documents: int = 0
    train_tokens: int = 0
    val_documents: int = 0
    val_tokens: int = 0
    train_chunks: int = 0
    val_chunks: int = 0
    seconds: float = 0.0
    skipped: bool = False  # resume found the shard complete
    invalid_utf8_documents: int = 0  # documents with bytes that are not UTF-8 (replaced or skipped)
    invalid_utf8_bytes: int = 0
    max_token_id: int = -1

    def summary(self) -> str:
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        return (
            f"prepare {self.shard}: {self.documents:,} documents ({self.skipped_empty:,} empty skipped), "
            f"{self.tokens:,} tokens = {self.train_tokens:,} train ({self.train_chunks} chunks) + "
            f"{self.val_tokens:,} val ({self.val_documents:,} docs, {self.val_chunks} chunks) "
            f"in {self.seconds:.1f}s ({fmt_int(rate)} tok/s)"
            + (f"; {self.invalid_utf8_documents:,} documents had {self.invalid_utf8_bytes:,} invalid UTF-8 bytes"
               if self.invalid_utf8_documents else "")
        )


@dataclass
class PrepareProgress:
    shard: str
    total_bytes: int | None
    max_docs: int | None
    interval_s: float
    t0: float = field(default_factory=time.perf_counter)
    last: float = field(default_factory=time.perf_counter)

    def maybe_log(self, docs: int, tokens: int, done_bytes: int, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < self.interval_s:
            return
        self.last = now
        el = max(now - self.t0, 1e-9)
        frac = None
        if self.max_docs:
            frac = docs / self.max_docs
        if self.total_bytes and done_bytes:
            frac = max(frac or 0.0, done_bytes / self.total_bytes)
        eta = f", {frac:.0%} done, ETA {fmt_time(el * (1 - frac) / frac)}" if frac else ""
        print(
            f"prepare {self.shard}: {docs:,} docs ({fmt_int(docs / el)} docs/s), "
            f"{fmt_int(tokens)} tokens ({fmt_int(tokens / el)} tok/s), {fmt_time(el)} elapsed{eta}",
            flush=True,
        )
