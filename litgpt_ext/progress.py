"""Progress for long loops: a tqdm bar on a terminal, periodic log lines when piped.

Under SLURM or `cmd > log 2>&1`, tqdm's carriage-return updates become thousands of lines of
noise in the log. `progress(...)` gives a tqdm bar when stderr is a terminal and otherwise prints
one line every `interval_s` seconds with the count, rate and ETA (plus a final line).
`quiet_third_party_bars()` sets tqdm's own environment knobs so that lm-eval's bars stay quiet too.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

# Read by `progress` when `interval_s` is not given: how often a piped run reports.
INTERVAL_ENV = "LITGPT_EXT_PROGRESS_INTERVAL"


def is_tty(stream=None) -> bool:
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def quiet_third_party_bars() -> None:
    """When stderr is not a terminal, make tqdm bars we do not create quiet (lm-eval's, HF's).

    tqdm reads `TQDM_<ARG>` environment variables as defaults for its arguments, but only when
    tqdm is first imported, so call this before importing lm-eval/transformers. `TQDM_DISABLE`
    silences bars that leave `disable` at its default (lm-eval's request building and bootstrap);
    bars that pass `disable=` explicitly (HF backend's loglikelihood) keep running, and
    `TQDM_MININTERVAL` limits them to one update a minute. Users' own settings win (setdefault).
    """
    if is_tty():
        return
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TQDM_MININTERVAL", "60")


def fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _fmt_num(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.1f}" if n < 100 else f"{n:.0f}"


class LogProgress:
    """tqdm's small interface (`update`, `close`, context manager) printing periodic lines."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", interval_s: float = 30.0,
                 stream=None, silent: bool = False) -> None:
        self.silent = silent
        self.total, self.desc, self.unit, self.interval_s = total, desc, unit, interval_s
        self.stream = sys.stderr if stream is None else stream
        self.n = 0
        self.t0 = self.last = time.perf_counter()
        self.closed = False
        self.printed_n = -1

    def _line(self) -> str:
        el = max(time.perf_counter() - self.t0, 1e-9)
        rate = self.n / el
        done = f"{self.n:,}" + (f"/{self.total:,} ({self.n / self.total:.0%})" if self.total else "")
        eta = ""
        if self.total and self.n and self.n < self.total:
            eta = f", ETA {fmt_time((self.total - self.n) / rate)}"
        return f"{self.desc}: {done} {self.unit}, {_fmt_num(rate)} {self.unit}/s, {fmt_time(el)} elapsed{eta}"

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if not self.silent and now - self.last >= self.interval_s:
            self.last = now
            self._print()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n and not self.silent and self.printed_n != self.n:
                self._print()

    def _print(self) -> None:
        self.printed_n = self.n
        print(self._line(), file=self.stream, flush=True)

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int | None = None, desc: str = "", unit: str = "it", disable: bool = False,
             interval_s: float | None = None, stream=None):
    """A tqdm bar on a terminal; `LogProgress` lines every `interval_s` s otherwise.

    `interval_s` defaults to $LITGPT_EXT_PROGRESS_INTERVAL or 30 s.
    """
    if disable:
        return LogProgress(total, desc, unit, silent=True)
    if is_tty(stream):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=stream, disable=False)
    if interval_s is None:
        interval_s = float(os.environ.get(INTERVAL_ENV, "30"))
    return LogProgress(total, desc, unit, interval_s=interval_s, stream=stream)


def track(items: Iterable[T], total: int | None = None, **kw) -> Iterator[T]:
    """Iterate with `progress(...)`; `total` defaults to `len(items)` when it has one."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress(total=total, **kw) as bar:
        for item in items:
            yield item
            bar.update(1)
