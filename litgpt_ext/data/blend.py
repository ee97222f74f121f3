"""The exact blend: which shard serves the next sample, for constant or scheduled weights.

`Blend` (constant weights) and `ScheduledBlend` (weights that change with the sample position)
are deterministic in the counts drawn so far, so a resumed run continues exactly from saved counts.
"""

from __future__ import annotations

import bisect
import math
from typing import Sequence


class Blend:
    """The exact blend: which shard serves the next sample, deterministic and memoryless.

    Tijdeman's solution of the chairman assignment problem: after every prefix of n samples each
    shard's count c_i satisfies |c_i - w_i n| <= 1 - 1/(2(S-1)) < 1. The next pick depends only on
    the counts so far, so a resumed run continues exactly from saved counts.
    """

    def __init__(self, weights: Sequence[float], counts: Sequence[int] | None = None):
        if not weights or any(w <= 0 for w in weights):
            raise ValueError(f"blend weights must be positive, got {list(weights)}")
        total = float(sum(weights))
        self.weights = [w / total for w in weights]
        self.counts = list(counts) if counts is not None else [0] * len(weights)
        if len(self.counts) != len(self.weights):
            raise ValueError("counts and weights differ in length")
        self._inv = [1.0 / w for w in self.weights]
        self._delta = 1.0 / (2 * (len(weights) - 1)) if len(weights) > 1 else 0.0
        self._limit = 1.0 - self._delta + 1e-9

    @property
    def position(self) -> int:
        return sum(self.counts)

    def next(self) -> int:
        n1 = self.position + 1
        best, best_deadline = -1, math.inf
        counts, weights, inv, delta, limit = self.counts, self.weights, self._inv, self._delta, self._limit
        for i in range(len(weights)):
            c1 = counts[i] + 1
            if c1 - weights[i] * n1 <= limit:
                deadline = (c1 - delta) * inv[i]
                if deadline < best_deadline:
                    best, best_deadline = i, deadline
        counts[best] += 1
        return best

    def take(self, n: int) -> list[int]:
        return [self.next() for _ in range(n)]

    def target(self, i: int, x: float) -> float:
        """The ideal count of shard i after x samples."""
        return self.weights[i] * x


class ScheduledBlend:
    """The exact blend for weights that change with the sample position (a mixture schedule).

    Tijdeman's theorem covers weights that vary per sample (lambda_{i,k} >= 0 with sum_i = 1 for each
    k): choosing, among shards i with c_i + 1 - T_i(n+1) <= 1 - delta, the one whose cumulative
    target T_i first reaches c_i + 1 - delta keeps |c_i(n) - T_i(n)| <= 1 - delta for every n,
    with delta = 1/(2(S-1)). Here sample k's demand is the integral of the piecewise-linear scheduled
    weight over [k, k+1), so T_i(n) is that integral over the first n samples: every prefix holds
    each shard within 1 - 1/(2(S-1)) < 1 of the integral of its scheduled weight. Deterministic in
    the counts, so a resume continues exactly.
    """

    def __init__(self, pieces: Sequence[tuple[float, Sequence[float], Sequence[float]]], counts: Sequence[int] | None = None):
        if not pieces or pieces[0][0] != 0:
            raise ValueError("a schedule's pieces must start at 0")
        S = len(pieces[0][1])
        self.starts = [float(p[0]) for p in pieces]
        self.a = [list(map(float, p[1])) for p in pieces]
        self.b = [list(map(float, p[2])) for p in pieces]
        self.b[-1] = [0.0] * S  # the last piece holds
        for j, (a, _b) in enumerate(zip(self.a, self.b)):
            if any(w < -1e-12 for w in a) or abs(sum(a) - 1) > 1e-6:
                raise ValueError(f"piece {j}: weights {a} must be >= 0 and sum to 1")
        self.counts = list(counts) if counts is not None else [0] * S
        if len(self.counts) != S:
            raise ValueError("counts and weights differ in length")
        # cumulative target of every shard at every piece start: cum[i][j]
        self.cum = [[0.0] * len(pieces) for _ in range(S)]
        for j in range(1, len(pieces)):
            u = self.starts[j] - self.starts[j - 1]
            for i in range(S):
                self.cum[i][j] = self.cum[i][j - 1] + self.a[j - 1][i] * u + 0.5 * self.b[j - 1][i] * u * u
        self._delta = 1.0 / (2 * (S - 1)) if S > 1 else 0.0
        self._limit = 1.0 - self._delta + 1e-9
        self._piece = 0
        self._n = sum(self.counts)

    @property
    def position(self) -> int:
        return sum(self.counts)

    def target(self, i: int, x: float) -> float:
        """T_i(x): the integral of shard i's scheduled weight over the first x samples."""
        j = bisect.bisect_right(self.starts, x) - 1
        u = x - self.starts[j]
        return self.cum[i][j] + self.a[j][i] * u + 0.5 * self.b[j][i] * u * u

    def weights_at(self, x: float) -> list[float]:
        j = bisect.bisect_right(self.starts, x) - 1
        u = x - self.starts[j]
        return [a + b * u for a, b in zip(self.a[j], self.b[j])]

    def _deadline(self, i: int, goal: float) -> float:
        """The first x with T_i(x) >= goal (inf if never)."""
        cum = self.cum[i]
        j = bisect.bisect_right(cum, goal) - 1
        if j < 0:
            return 0.0
        # the first piece whose end reaches the goal (pieces of zero weight keep cum flat)
        r = goal - cum[j]
        a, b = self.a[j][i], self.b[j][i]
        if b == 0.0:
            return self.starts[j] + r / a if a > 0 else math.inf
        disc = a * a + 2.0 * b * r
        if disc < 0:  # the weight falls to zero in this piece before the goal: the next piece reaches it
            return self.starts[j + 1] if j + 1 < len(self.starts) else math.inf
        denom = a + math.sqrt(disc)
        return self.starts[j] + (2.0 * r / denom if denom > 0 else 0.0)

    def next(self) -> int:
        counts, limit, delta, starts = self.counts, self._limit, self._delta, self.starts
        n1 = float(self._n + 1)
        j = self._piece
        while j + 1 < len(starts) and starts[j + 1] <= n1:
            j += 1
        self._piece = j
        u = n1 - starts[j]
        aj, bj, cum = self.a[j], self.b[j], self.cum
        last = j + 1 == len(starts)
        s0 = starts[j]
        best, best_deadline, worst, worst_gap = -1, math.inf, 0, -math.inf
        for i in range(len(counts)):
            ci, a, b = cum[i], aj[i], bj[i]
            t = ci[j] + u * (a + 0.5 * b * u)
            c = counts[i]
            if c + 1 - t <= limit:
                goal = c + 1 - delta
                r = goal - ci[j]
                if r >= 0 and (last or goal <= ci[j + 1]):  # reached within this piece (the usual case)
                    if b == 0.0:
                        deadline = s0 + r / a if a > 0 else math.inf
                    else:
                        disc = a * a + 2.0 * b * r
                        denom = a + math.sqrt(disc) if disc > 0 else 0.0
                        deadline = s0 + 2.0 * r / denom if denom > 0 else self._deadline(i, goal)
                else:
                    deadline = self._deadline(i, goal)
                if deadline < best_deadline:
                    best, best_deadline = i, deadline
            if t - c > worst_gap:
                worst, worst_gap = i, t - c
        if best < 0:  # float round-off only: serve the largest deficit
            best = worst
        counts[best] += 1
        self._n += 1
        return best

    def take(self, n: int) -> list[int]:
        return [self.next() for _ in range(n)]


class RevealingBlend:
    """A schedule's blend that sees each point only once the stream reaches it (no look-ahead).

    `ScheduledBlend` picks by deadlines: when a shard's cumulative target reaches its next count,
    which can lie beyond a later point of the schedule, so what it draws before a point depends on
    the weights after it. An online mixing policy decides those weights only when it gets there, so
    its runs use this blend, and so does a static replay of its trajectory (`mix_schedule_lookahead:
    false`): the pieces starting at or before the current position, the last of them held. The
    picks are then a function of the points already reached, whether the later ones exist yet or
    not, which is what makes the replay draw the online run's samples in its order exactly.
    Constant pieces only (a linear ramp needs the point it ramps to).
    """

    def __init__(self, pieces: Sequence[tuple[float, Sequence[float], Sequence[float]]], counts: Sequence[int] | None = None):
        if any(any(s != 0.0 for s in p[2]) for p in pieces[:-1]):
            raise ValueError("a blend without look-ahead takes constant pieces only (mix_schedule ramp: constant)")
        self.pieces = [(float(p[0]), list(p[1]), [0.0] * len(p[1])) for p in pieces]
        self._full = ScheduledBlend(self.pieces)  # the plan as a whole: targets for the realized-mix report
        # one list for the life of the blend: callers (the stream) hold on to `counts`
        self.counts = list(counts) if counts is not None else [0] * len(self.pieces[0][1])
        self._shown = self._reached(sum(self.counts))
        self._blend = self._scheduled()

    def _reached(self, position: int) -> int:
        return max(1, bisect.bisect_right([p[0] for p in self.pieces], float(position)))

    def _scheduled(self) -> ScheduledBlend:
        blend = ScheduledBlend(self.pieces[:self._shown], self.counts)
        blend.counts = self.counts  # it counts in place, in this blend's own list
        return blend

    @property
    def position(self) -> int:
        return self._blend.position

    def next(self) -> int:
        if self._shown < len(self.pieces) and self.pieces[self._shown][0] <= self._blend.position:
            self._shown = self._reached(self._blend.position)
            self._blend = self._scheduled()
        return self._blend.next()

    def take(self, n: int) -> list[int]:
        return [self.next() for _ in range(n)]

    def target(self, i: int, x: float) -> float:
        return self._full.target(i, x)

    def weights_at(self, x: float) -> list[float]:
        return self._full.weights_at(x)
