"""A sweep's stages besides training: `prep` (the study's inputs, before any base run),
`synth_replay` (a synth shard per pretraining seed, sampled from that seed's base checkpoint, before
the arms that mix it in) and `merge` (a LoRA arm's adapter merged into its base, `merge-lora`, before
its SFT runs). Both are executor jobs like the training runs: `--action local` runs them in
dependency order and skips them once their output exists, `--action write` puts them in the SLURM
plan with their dependencies (`litgpt_ext.study.sweep`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from litgpt_ext.study.executor import Job
from litgpt_ext.study.spec import Arm, SweepSpec

SYNTH_TYPE = "synth"  # litgpt_ext.prep.synth_replay.SYNTH_TYPE (not imported: planning stays light)
SYNTH_META = "synth_meta.json"  # litgpt_ext.prep.synth_replay.META_FILE: written last, so it marks a finished shard


def prep_jobs(spec: SweepSpec, root: Path) -> list[Job]:
    """One job per `prep:` step, in the spec's order; each is done once its `creates` path exists."""
    names = [p.name for p in spec.prep]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"sweep spec prep: steps {dup} are named more than once; each step is one job (prep_<name>)")
    return [Job(f"prep_{p.name}", "prep", p.command, dict(p.args), root / "prep" / p.name,
                info={"creates": str(p.creates)}) for p in spec.prep]


def uses_synth(a: Arm) -> bool:
    """The arm's mix names the synth type (only an explicit `mix:` can)."""
    if not a.mix:
        return False
    from litgpt_ext.data.mix_spec import parse_weights_str

    return SYNTH_TYPE in parse_weights_str(a.mix, f"sweep arm {a.name} mix")


def synth_start(spec: SweepSpec, arms: list[Arm]) -> Optional[int]:
    """The base step the synth shards are sampled at (None without `synth_replay:`): `synth_replay.step`,
    or the one start of the arms that mix synth in."""
    s = spec.synth_replay
    if s is None:
        return None
    users = [a for a in arms if uses_synth(a)]
    if not users:
        raise ValueError(f"sweep spec synth_replay: no arm's mix has type {SYNTH_TYPE!r} (e.g. mix: "
                         f"\"{SYNTH_TYPE}:0.2,math:0.8\"); drop the section or add such an arm")
    for key in ("checkpoint", "out_dir", "shard", "link_shards_from"):
        if key in s.args:
            raise ValueError(f"sweep spec synth_replay.args.{key} is set by the plan (each pretraining seed's base"
                             f" checkpoint into <out_root>/synth_replay_seed<S>/data); remove it"
                             + (" (the shard's name is synth_replay.shard)" if key == "shard" else ""))
    if s.step is not None:
        if isinstance(s.step, bool) or not isinstance(s.step, int) or not 0 < s.step < spec.total_steps:
            raise ValueError(f"sweep spec synth_replay.step must be a base step in (0, total_steps={spec.total_steps}),"
                             f" got {s.step!r}")
        return s.step
    starts = sorted({int(a.start) for a in users})
    if len(starts) > 1:
        raise ValueError(f"sweep spec synth_replay: the arms that mix {SYNTH_TYPE} start at {starts}; give"
                         " synth_replay.step (the base checkpoint every seed's shard is sampled from)")
    return starts[0]


def synth_name(seed: int) -> str:
    """The synth-replay job of pretraining seed `seed` (and its folder under out_root)."""
    return f"synth_replay_seed{seed}"


def synth_data(root: Path, seed: int) -> Path:
    """The data folder of pretraining seed `seed`'s synth arms: its synth shard and links to the base shards."""
    return root / synth_name(seed) / "data"


def synth_job(spec: SweepSpec, root: Path, seed: int, step: int, base_job: str, base_data: Optional[str]) -> Job:
    """Seed `seed`'s synth-replay job: its base checkpoint at `step` samples the shard into `synth_data`,
    which links the base data folder's shard folders (`link_shards_from`)."""
    s = spec.synth_replay
    out = synth_data(root, seed)
    cfg = {**s.args, "checkpoint": str(root / f"base_seed{seed}" / f"step-{step:08d}"), "out_dir": str(out),
           "shard": s.shard, "link_shards_from": None if base_data is None else str(base_data)}
    return Job(synth_name(seed), "synth", "synth-replay", cfg, root / synth_name(seed), depends=[base_job],
               info={"seed": seed, "step": step, "creates": str(out / s.shard / SYNTH_META)})


def merge_job(run: str, out: Path, seed: int) -> Job:
    """A LoRA arm's `merge-lora` of its final adapter checkpoint into `<run>/merged` (a full litgpt
    checkpoint, written atomically: done once its weights exist), which its SFT runs fine-tune."""
    merged = out / "merged"
    return Job(f"merge_{run}", "merge", "merge-lora", {"checkpoint": str(out / "final"), "out_dir": str(merged)},
               out, depends=[run], info={"seed": seed, "creates": str(merged / "lit_model.pth")})
