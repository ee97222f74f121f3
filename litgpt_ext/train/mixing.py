"""The online mixing policy inside the training loop: signals per source, updates at step boundaries.

Per micro-batch `loss` computes the next-token loss as the loop does (bit-identical, see
`train.objective.token_losses`) and adds each sample's summed token loss (ODM) or clipped excess
loss over the reference model (DoReMi) to its arm, using the shard that served it (`MixedLoader.
last_sources`). Every `update_every` optimizer steps `after_step` all-reduces the sums over ranks,
runs the policy on rank 0 and broadcasts its weights, applies the floors and caps, appends a point
to the blend's schedule (`MixedLoader.set_schedule`, no look-ahead) and to `mix_trajectory.jsonl`,
and logs `mix/<arm>` and `mix_signal/<arm>`. Its state (points, policy, the window's sums) goes into
every checkpoint (`TrainingState.mix_policy`), so kill -9 and resume reproduce the weights and the
data order bit for bit.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from litgpt_ext.data.schedule import epoch_limit, parse_mix_schedule, resolve_schedule
from litgpt_ext.mix_policy.args import MixPolicyArgs
from litgpt_ext.mix_policy.policies import DoReMi, Exp3, bounded
from litgpt_ext.mix_policy.trajectory import TRAJECTORY, VERSION, append_line, write_trajectory
from litgpt_ext.train.objective import token_losses


def identity_of(args: MixPolicyArgs, phase_id: Optional[str]) -> str:
    """What a resume must find unchanged for the policy to continue (the policy and the phase)."""
    return f"{args.describe()} phase={phase_id}"


class MixController:
    def __init__(self, fabric: Any, args: MixPolicyArgs, data: Any, loader: Any, out_dir: Path, plan: Any,
                 global_batch_size: int, saved: Optional[dict], new_phase: bool, config: Optional[dict] = None,
                 reference: Optional[torch.nn.Module] = None):
        self.fabric, self.args, self.data, self.loader = fabric, args, data, loader
        self.out_dir, self.plan, self.gbs = Path(out_dir), plan, global_batch_size
        self.identity = identity_of(args, plan.phase_id)
        self.reference = reference
        st = loader.state_dict()
        sched = st.get("schedule") or {}
        resumed = saved is not None and saved.get("identity") == self.identity and sched.get("online") == self.identity
        if saved is not None and not resumed and not new_phase:
            raise ValueError(
                f"this run's mix_policy ({args.describe()}) is not the one its checkpoint's phase ran"
                f" ({(saved.get('identity') or 'none').split(' phase=')[0]}); a changed policy needs a new phase"
                " (train.new_phase: true with a new budget), or restore the checkpoint's mix_policy")
        if sched and not resumed and not sched.get("online"):
            raise ValueError("mix_policy and data.mix_schedule both set the mix over the phase; drop one of them")
        self._setup_arms(st["weights"], saved if resumed else None)
        if args.type == "odm":
            prior = [1.0] * len(self.arms) if args.prior == "uniform" else self.prior
            self.policy: Exp3 | DoReMi = Exp3(prior, args.epsilon, args.reward_smoothing)
            if args.epsilon is not None and args.epsilon > 1.0 / len(self.arms):
                raise ValueError(f"mix_policy.epsilon={args.epsilon} exceeds 1/K = {1 / len(self.arms):.4f} for the"
                                 f" {len(self.arms)} arms {self.arms}: exploration alone would exceed the simplex")
        else:
            self.policy = DoReMi(self.prior, args.step_size, args.smoothing)
        # this step's per-arm (signal sum, tokens) on this rank, and the window's so far over all ranks
        self._step = torch.zeros(2, len(self.arms), dtype=torch.float64, device=fabric.device)
        self._window = [[0.0] * len(self.arms), [0.0] * len(self.arms)]
        self.header = {"kind": "header", "version": VERSION, "policy": {**vars(args), "reference": (
            str(args.reference) if args.reference else None)}, "identity": self.identity,
            "phase": data.phase.as_dict(), "phase_id": plan.phase_id, "arms": self.arms,
            "members": {a: [s for s in self.shard_ids if self.arm_of[s] == i] for i, a in enumerate(self.arms)},
            "data": {"data_path": str(data.data_path), "seed": data.seed, "block_size": data.block_size,
                     "world_size": data.world_size,
                     "shards": {s: st["num_samples"][s] for s in self.shard_ids}},
            "config": config}
        if resumed:
            self.points, self.lines = list(saved["points"]), list(saved["lines"])
            self.policy.load_state_dict(saved["policy"])
            self._window = [list(saved["window"][0]), list(saved["window"][1])]
            self.arm_weights = list(saved["arm_weights"])
        else:
            self.arm_weights = self._bounded(self.prior, step=plan.start_step)
            self.points, self.lines = [], []
            self._add_point(plan.start_step, signals=None)
        self.loader.set_schedule(self._record(), new_segment=not resumed)  # a new phase: a new segment of the blend
        if fabric.global_rank == 0:
            path = self.out_dir / TRAJECTORY
            old = self.out_dir / f"mix_trajectory-{self._file_phase(path)}.jsonl"
            if not resumed and path.exists() and self._file_phase(path) not in (None, plan.phase_id):
                path.rename(old)  # an earlier phase's trajectory is kept beside the new one
            write_trajectory(path, self.header, self.lines)
        fabric.print(f"Online mixing: {args.type} over {len(self.arms)} arms ({', '.join(self.arms)}), an update every"
                     f" {args.update_every} steps; weights now "
                     + ", ".join(f"{a} {w:.3f}" for a, w in zip(self.arms, self.arm_weights))
                     + (f" (resumed after {len(self.points) - 1} updates)" if resumed else ""))

    # -- arms ----------------------------------------------------------------------------------
    def _setup_arms(self, weights: dict, saved: Optional[dict]) -> None:
        """Arms, each shard's arm and its share of it, and the prior: from the phase's starting mix
        (a resume takes the checkpoint's, so no float is recomputed)."""
        shards = self.data.shards_by_id
        self.shard_ids = list(weights)
        names = [shards[s].type if self.args.arms == "type" else s for s in self.shard_ids]
        self.arms = list(dict.fromkeys(names))
        if len(self.arms) < 2:
            raise ValueError(f"mix_policy.type={self.args.type} needs at least two arms to weigh; the mix has"
                             f" {self.arms} (arms: {self.args.arms}); add a source to the mix or use arms: shard")
        self.arm_of = {s: self.arms.index(n) for s, n in zip(self.shard_ids, names)}
        if saved is not None:
            self.split, self.prior = dict(saved["split"]), list(saved["prior"])
            return
        totals = [0.0] * len(self.arms)
        for s in self.shard_ids:
            totals[self.arm_of[s]] += weights[s]
        self.split = {s: weights[s] / totals[self.arm_of[s]] for s in self.shard_ids}
        self.prior = [t / sum(totals) for t in totals]

    def _caps(self, step: int) -> list[float]:
        """Each arm's cap: mix_policy.max_weight, and what keeps every shard within data.max_epochs
        over the rest of the phase at these weights."""
        hi = [self.args.max_weight if self.args.max_weight is not None else 1.0] * len(self.arms)
        max_epochs = getattr(self.data, "max_epochs", None)
        remaining = (self.plan.stop_step - step) * self.gbs
        if max_epochs is None or remaining <= 0:
            return hi
        cursors = self.loader.state_dict()["cursors"]
        for s in self.shard_ids:
            limit = epoch_limit(max_epochs, self.data.shards_by_id[s])
            if limit is not None:
                n = self.data._num_samples(s)
                room = max(0.0, limit * n - cursors.get(s, 0)) / (remaining * self.split[s])
                i = self.arm_of[s]
                hi[i] = min(hi[i], room)
        return hi

    def _bounded(self, w: list[float], step: int) -> list[float]:
        lo = [self.args.min_weight] * len(self.arms)
        try:
            return bounded(w, lo, self._caps(step), self.arms)
        except ValueError as e:
            raise ValueError(f"mix_policy at step {step}: {e}") from None

    # -- the schedule --------------------------------------------------------------------------
    def _add_point(self, step: int, signals: Optional[dict]) -> None:
        weights = {s: self.arm_weights[self.arm_of[s]] * self.split[s] for s in self.shard_ids}
        self.points.append({"at_step": step, "literal_weights": weights})
        line = {"step": step, "phase_sample": (step - self.plan.start_step) * self.gbs,
                "arm_weights": dict(zip(self.arms, self.arm_weights)), "weights": weights, "update": len(self.points) - 1}
        if signals is not None:
            line.update(signals)
        self.lines.append(line)

    def _record(self) -> dict:
        points = parse_mix_schedule(self.points)
        record = resolve_schedule(points, self.data.shards, self.data.registry, self.data.phase)
        record.update(lookahead=False, online=self.identity)
        return record

    # -- the loop's hooks ----------------------------------------------------------------------
    def loss(self, model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The loop's loss of a micro-batch (bit-identical to `next_token_loss`), its signals recorded."""
        loss, n, per_token = token_losses(model, batch)
        if self.reference is not None:
            with torch.no_grad():
                _, _, ref = token_losses(self.reference, batch)
            per_token = (per_token - ref).clamp_min(0.0)
        idx = torch.tensor([self.arm_of[s] for s in self.loader.last_sources], device=per_token.device)
        self._step[0].index_add_(0, idx, per_token.sum(dim=1).double())
        self._step[1].index_add_(0, idx, torch.full_like(idx, per_token.shape[1], dtype=torch.float64))
        return loss, n

    def after_step(self, step: int) -> dict:
        """After optimizer step `step`: fold the step's signals (all ranks) into the window, update the
        weights when one is due; returns the state a checkpoint of this step holds (the same on every rank)."""
        both = self._step
        if self.fabric.world_size > 1:
            both = self.fabric.all_reduce(both, reduce_op="sum")
        for row, values in zip(self._window, both.cpu().tolist()):
            for i, v in enumerate(values):
                row[i] += v
        self._step.zero_()
        since = step - self.plan.start_step
        if since % self.args.update_every == 0 and step < self.plan.stop_step:
            self._update(step)
        return self.state_dict()

    def _update(self, step: int) -> None:
        fabric = self.fabric
        sums, tokens = self._window
        signal = [s / t if t > 0 else None for s, t in zip(sums, tokens)]
        used = list(self.arm_weights)
        new = self._bounded(self.policy.update(signal, used), step) if fabric.global_rank == 0 else None
        if fabric.world_size > 1:  # rank 0's floats, bit for bit, on every rank
            new, state = fabric.broadcast((new, self.policy.state_dict()), src=0)
            self.policy.load_state_dict(state)
            seen = fabric.all_gather(torch.tensor(new + sums + tokens, dtype=torch.float64, device=fabric.device))
            if not bool((seen == seen[0]).all()):  # every rank must draw the same blend from here on
                raise RuntimeError(f"mix_policy at step {step}: the ranks disagree on the weights or signals: {seen.tolist()}")
        self.arm_weights = new
        name = "loss" if self.args.type == "odm" else "excess_loss"
        self._add_point(step, {"signals": dict(zip(self.arms, signal)), "signal": name,
                               "tokens": dict(zip(self.arms, tokens)), "policy_state": self.policy.state_dict()})
        self.loader.set_schedule(self._record())
        self._window = [[0.0] * len(self.arms), [0.0] * len(self.arms)]
        if fabric.global_rank == 0:
            append_line(self.out_dir / TRAJECTORY, self.lines[-1])
        metrics = {f"mix/{a}": w for a, w in zip(self.arms, new)}
        metrics.update({f"mix_signal/{a}": v for a, v in zip(self.arms, signal) if v is not None and math.isfinite(v)})
        fabric.log_dict(metrics, step=step)
        fabric.print(f"mix update {len(self.points) - 1} at step {step}: "
                     + ", ".join(f"{a} {w:.3f}" + (f" ({name} {v:.3f})" if v is not None else "")
                                 for a, w, v in zip(self.arms, new, signal)))

    def state_dict(self) -> dict:
        return {"identity": self.identity, "points": self.points, "lines": self.lines,
                "policy": self.policy.state_dict(), "arm_weights": list(self.arm_weights), "split": self.split,
                "prior": self.prior, "window": [list(r) for r in self._window]}

    @staticmethod
    def _file_phase(path: Path) -> Optional[str]:
        try:
            import json

            with open(path) as f:
                return json.loads(f.readline()).get("phase_id")
        except (OSError, ValueError):
            return None


def setup_mix_policy(fabric: Any, args: Optional[MixPolicyArgs], data: Any, loader: Any, out_dir: Path, plan: Any,
                     global_batch_size: int, saved: Optional[dict], new_phase: bool, config: Optional[dict],
                     build_reference: Callable[[Path], torch.nn.Module]) -> Optional[MixController]:
    """The run's online mixing controller (None without a policy); DoReMi's reference model is built here."""
    if args is None:
        return None
    if not callable(getattr(loader, "set_schedule", None)):
        raise ValueError(f"mix_policy needs litgpt_ext.data.ShardedMixedDataset; {type(data).__name__} has no"
                         " per-source stream")
    reference = None
    if args.type == "doremi":
        if not Path(args.reference).exists():
            raise FileNotFoundError(f"mix_policy.reference {str(args.reference)!r} does not exist")
        reference = build_reference(Path(args.reference))
        reference.eval()
        for p in reference.parameters():
            p.requires_grad_(False)
    return MixController(fabric, args, data, loader, out_dir, plan, global_batch_size, saved, new_phase, config,
                         reference)
