"""The online mixing policies' arithmetic: pure functions of plain floats, so each update can be
checked by hand and every rank computes the same weights from the same all-reduced signals.

`Exp3` is ODM's bandit (Albalak et al. 2023, "Efficient Online Data Mixing For Language Model
Pre-Training", arXiv 2312.02406): each arm's reward estimate is an exponential moving average of
its importance-weighted training loss, R_i ← α R_i + (1 − α) L_i / π_i (only arms that were drawn
in the window are updated), and the new weights are

    π_i = (1 − K ε_t) · p_i e^{ε_t R_i} / Σ_j p_j e^{ε_t R_j} + ε_t,   ε_t = min(1/K, sqrt(ln K / (K t)))

with t the update's number and p the prior (the configured mix, or uniform as in the paper).

`DoReMi` is the exponentiated-gradient step of DoReMi (Xie et al. 2023, Algorithm 1) applied
online: λ_i = mean over domain i's tokens of max(ℓ_θ − ℓ_ref, 0), α' = α · e^{η λ},
α ← (1 − c) α' / Σ α' + c / K, starting from the configured mix. A domain not drawn in the window
has λ_i = 0.

`bounded` applies the floors and caps (min/max weight, repetition caps) to a weight vector.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

Signals = Sequence[Optional[float]]  # one per arm; None: the arm served no token in the window


def _normalised(w: Sequence[float]) -> list[float]:
    total = float(sum(w))
    return [float(x) / total for x in w]


class Exp3:
    """ODM's EXP3 over K arms; `state_dict` holds everything an exact resume needs."""

    def __init__(self, prior: Sequence[float], epsilon: Optional[float] = None, smoothing: float = 0.9):
        self.K = len(prior)
        self.prior = _normalised(prior)
        self.epsilon = epsilon
        self.smoothing = smoothing
        self.t = 0
        self.rewards = [0.0] * self.K

    def epsilon_at(self, t: int) -> float:
        if self.epsilon is not None:
            return float(self.epsilon)
        return min(1.0 / self.K, math.sqrt(math.log(self.K) / (self.K * t)))

    def update(self, losses: Signals, used: Sequence[float]) -> list[float]:
        """One update from each arm's mean training loss over the window and the weights it drew with."""
        a = self.smoothing
        for i, (loss, pi) in enumerate(zip(losses, used)):
            if loss is not None:
                self.rewards[i] = a * self.rewards[i] + (1.0 - a) * loss / pi
        self.t += 1
        eps = self.epsilon_at(self.t)
        logits = [math.log(p) + eps * r for p, r in zip(self.prior, self.rewards)]
        top = max(logits)
        e = [math.exp(z - top) for z in logits]
        z = sum(e)
        return [(1.0 - self.K * eps) * x / z + eps for x in e]

    def state_dict(self) -> dict:
        return {"t": self.t, "rewards": list(self.rewards)}

    def load_state_dict(self, d: dict) -> None:
        self.t, self.rewards = int(d["t"]), [float(x) for x in d["rewards"]]


class DoReMi:
    """DoReMi's exponentiated-gradient domain weights over K arms, updated online."""

    def __init__(self, prior: Sequence[float], step_size: float = 1.0, smoothing: float = 1e-3):
        self.K = len(prior)
        self.alpha = _normalised(prior)
        self.step_size = step_size
        self.smoothing = smoothing
        self.t = 0

    def update(self, excess: Signals, used: Sequence[float] | None = None) -> list[float]:
        """One update from each arm's mean clipped excess loss over the window."""
        lam = [0.0 if x is None else float(x) for x in excess]
        logits = [math.log(a) + self.step_size * v for a, v in zip(self.alpha, lam)]
        top = max(logits)
        e = [math.exp(z - top) for z in logits]
        z = sum(e)
        c = self.smoothing
        self.alpha = [(1.0 - c) * x / z + c / self.K for x in e]
        self.t += 1
        return list(self.alpha)

    def state_dict(self) -> dict:
        return {"t": self.t, "alpha": list(self.alpha)}

    def load_state_dict(self, d: dict) -> None:
        self.t, self.alpha = int(d["t"]), [float(x) for x in d["alpha"]]


def bounded(w: Sequence[float], lo: Sequence[float], hi: Sequence[float], names: Sequence[str]) -> list[float]:
    """The weights summing to 1 with lo_i <= v_i <= hi_i, proportional to `w` among the arms not at a bound.

    Arms that fall outside their bounds are fixed at the bound and the others rescaled, until none
    is outside (at most K rounds). Bounds that cannot be met together raise a ValueError naming them.
    """
    K = len(w)
    if sum(lo) > 1.0 + 1e-12:
        raise ValueError(f"the floors {dict(zip(names, lo))} add up to {sum(lo):.4f} > 1: lower mix_policy.min_weight")
    if sum(hi) < 1.0 - 1e-12:
        raise ValueError(f"the caps {dict(zip(names, hi))} add up to {sum(hi):.4f} < 1: no mix fits them (raise"
                         " mix_policy.max_weight or data.max_epochs, add data, or shorten the phase)")
    fixed: dict[int, float] = {}
    v = list(w)
    for _ in range(K + 1):
        free = [i for i in range(K) if i not in fixed]
        room = 1.0 - sum(fixed.values())
        total = sum(w[i] for i in free)
        if free and total <= 0:
            share = room / len(free)
            v = [fixed.get(i, share) for i in range(K)]
        else:
            v = [fixed[i] if i in fixed else w[i] * room / total for i in range(K)]
        out = [i for i in free if v[i] < lo[i] - 1e-15 or v[i] > hi[i] + 1e-15]
        if not out:
            return v
        for i in out:
            fixed[i] = min(max(v[i], lo[i]), hi[i])
        if len(fixed) == K:
            return [fixed[i] for i in range(K)]
    raise ValueError(f"floors and caps did not settle for weights {dict(zip(names, w))}")
