"""`mix_policy:`, the training config's section for online data mixing, parsed and checked."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional, TypedDict

POLICIES = ("fixed", "odm", "doremi")
# knobs that belong to one policy: set for another, they would be silently ignored, so they are refused
ONLY_FOR = {"prior": "odm", "epsilon": "odm", "reward_smoothing": "odm",
            "reference": "doremi", "step_size": "doremi", "smoothing": "doremi"}
DEFAULTS = {"prior": "mix", "reward_smoothing": 0.9, "step_size": 1.0, "smoothing": 1e-3}
# the YAML section as jsonargparse parses it: plain types, so that a bad policy name reaches
# `MixPolicyArgs.parse`, whose error names it and the valid ones (jsonargparse's own message for a
# Literal inside an Optional dataclass names neither)
MixPolicyConfig = TypedDict("MixPolicyConfig", {
    "type": str, "update_every": int, "arms": str, "min_weight": float, "max_weight": Optional[float],
    "prior": Optional[str], "epsilon": Optional[float], "reward_smoothing": Optional[float],
    "reference": Optional[str], "step_size": Optional[float], "smoothing": Optional[float],
}, total=False)
MixPolicyConfig.__doc__ = ("Online data mixing: {type: fixed | odm | doremi, update_every: k, arms: type | shard,"
                           " min_weight, max_weight, ...} (see litgpt_ext.mix_policy.args.MixPolicyArgs)")


@dataclass
class MixPolicyArgs:
    """Online data mixing: the blend's weights chosen during training from per-source training losses.

    The weights change only every `update_every` optimizer steps, from losses all-reduced over the
    ranks; each change is a point of the blend's schedule (`mix_trajectory.jsonl` in the run), so a
    resumed run continues bit-identically and `litgpt-ext mix-replay` turns the trajectory into a
    static `mix_schedule` that draws the same samples in the same order.
    """

    type: Literal["fixed", "odm", "doremi"] = "fixed"
    """fixed: the configured mix (no policy); odm: EXP3 bandit with per-source training loss as
    reward (Albalak et al. 2023, "Efficient Online Data Mixing"); doremi: exponentiated-gradient
    weights on per-source excess loss over `reference` (Xie et al. 2023, DoReMi)"""
    update_every: int = 10
    """optimizer steps between two weight updates; the signals average over them"""
    arms: Literal["type", "shard"] = "type"
    """what the policy weighs: shard types (main, code, math, ...; a type's shards keep the
    configured split among them) or every shard on its own"""
    min_weight: float = 0.0
    """floor on every arm's weight after each update, on top of the policy's own exploration"""
    max_weight: Optional[float] = None
    """cap on every arm's weight after each update (data.max_epochs caps shards as well)"""
    prior: Optional[Literal["mix", "uniform"]] = None
    """odm: what the exponential weights multiply: the configured mix (default) or uniform (the paper)"""
    epsilon: Optional[float] = None
    """odm: exploration rate ε in (0, 1/K]; null: the paper's min(1/K, sqrt(ln K / (K t))) at update t"""
    reward_smoothing: Optional[float] = None
    """odm: α in [0, 1) of the reward estimate R ← α R + (1 − α) L / π (default 0.9)"""
    reference: Optional[Path] = None
    """doremi: the reference checkpoint the excess loss is measured against (required)"""
    step_size: Optional[float] = None
    """doremi: η > 0 of the step α ← α · exp(η λ) (default 1.0)"""
    smoothing: Optional[float] = None
    """doremi: c in [0, 1) of the mix with uniform, α ← (1 − c) α / Σα + c / K (default 1e-3)"""

    def __post_init__(self) -> None:
        if self.type not in POLICIES:
            raise ValueError(f"mix_policy.type={self.type!r} is not a policy; choose from: {', '.join(POLICIES)}")
        n = self.update_every
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"mix_policy.update_every must be an integer >= 1 (optimizer steps), got {n!r}")
        if self.arms not in ("type", "shard"):
            raise ValueError(f"mix_policy.arms={self.arms!r}; choose type or shard")
        foreign = sorted(k for k, owner in ONLY_FOR.items() if owner != self.type and getattr(self, k) is not None)
        if foreign:
            raise ValueError(f"mix_policy: {', '.join(f'{k} (a {ONLY_FOR[k]} knob)' for k in foreign)} set for"
                             f" type={self.type!r}, which would ignore it; remove it or change the type")
        for k, v in DEFAULTS.items():
            if ONLY_FOR[k] == self.type and getattr(self, k) is None:
                setattr(self, k, v)
        if not 0.0 <= self.min_weight < 1.0:
            raise ValueError(f"mix_policy.min_weight must be in [0, 1), got {self.min_weight!r}")
        if self.max_weight is not None and not (0.0 < self.max_weight <= 1.0 and self.max_weight >= self.min_weight):
            raise ValueError(f"mix_policy.max_weight must be in (0, 1] and >= min_weight={self.min_weight}, got"
                             f" {self.max_weight!r}")
        if self.prior is not None and self.prior not in ("mix", "uniform"):
            raise ValueError(f"mix_policy.prior={self.prior!r}; choose mix or uniform")
        if self.epsilon is not None and not 0.0 < self.epsilon <= 1.0:
            raise ValueError(f"mix_policy.epsilon must be in (0, 1/K] (K arms), got {self.epsilon!r}")
        for k, lo in (("reward_smoothing", 0.0), ("smoothing", 0.0)):
            v = getattr(self, k)
            if v is not None and not lo <= v < 1.0:
                raise ValueError(f"mix_policy.{k} must be in [0, 1), got {v!r}")
        if self.step_size is not None and not self.step_size > 0:
            raise ValueError(f"mix_policy.step_size must be > 0, got {self.step_size!r}")
        if self.type == "doremi" and self.reference in (None, ""):
            raise ValueError("mix_policy.type=doremi needs mix_policy.reference: the checkpoint whose per-source loss"
                             " the excess loss is measured against (e.g. the checkpoint the run starts from)")
        if self.reference is not None:
            self.reference = Path(self.reference)

    @property
    def active(self) -> bool:
        return self.type != "fixed"

    def describe(self) -> str:
        """The policy's identity (what a resume compares, and what the trajectory records)."""
        d = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items() if v is not None}
        return json.dumps(d, sort_keys=True)

    @classmethod
    def parse(cls, cfg) -> Optional["MixPolicyArgs"]:
        """The dataclass of a `mix_policy:` value (None or a mapping); None when no policy runs."""
        if cfg is None:
            return None
        if isinstance(cfg, dict):
            known = set(cls.__dataclass_fields__)
            unknown = sorted(set(cfg) - known)
            if unknown:
                raise ValueError(f"mix_policy: unknown key(s) {unknown}; valid: {', '.join(sorted(known))}")
            cfg = cls(**cfg)
        if not isinstance(cfg, cls):
            raise ValueError(f"mix_policy must be a mapping such as {{type: odm, update_every: 10}}, got {cfg!r}")
        return cfg if cfg.active else None
